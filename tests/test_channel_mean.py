"""Channel (input-channel) sensitivity with ``reduction='mean'`` (issue #16, item 4).

The reference's tracker reduces a weight's relative contribution over output positions and then,
per point, over the kernel positions of its input channel with the *same* reduction (mean for
deterministic SiPP), before the max over outputs and points. Checked against a brute-force NumPy
loop over points, positions and outputs.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import sensprune as sp
from tests.fixtures import np_init

EPS = float(np.finfo(np.float32).eps)


class OneConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), padding="SAME", name="conv")(x)


def _reference(kernel: np.ndarray, x: np.ndarray, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """(weight, channel) sensitivities by loops, as the reference's tracker (spec 1.1)."""
    kh, kw, c_in, c_out = kernel.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    w = kernel.astype(np.float64)
    wp, wm = np.maximum(w, 0), np.minimum(w, 0)
    reduce = np.mean if reduction == "mean" else np.max
    weight = np.zeros(kernel.shape)
    channel = np.zeros(c_in)
    for point in xpad:
        for a_full in (np.maximum(point, 0), np.maximum(-point, 0)):  # sign-split pseudo-points
            g = np.zeros((x.shape[1], x.shape[2]) + kernel.shape)  # [H, W, kh, kw, c, o]
            for h in range(x.shape[1]):
                for v in range(x.shape[2]):
                    a = a_full[h:h + kh, v:v + kw, :]  # [kh, kw, c]
                    zp = np.einsum("ijc,ijco->o", a, wp)
                    zm = np.einsum("ijc,ijco->o", a, wm)
                    z = np.where(w > 0, zp, zm)
                    ok = np.abs(z) > EPS
                    g[h, v] = np.where(ok, w * a[..., None] / np.where(ok, z, 1.0), 0.0)
            per_point = reduce(g.reshape(-1, *kernel.shape), axis=0)  # over output positions
            weight = np.maximum(weight, per_point)
            per_channel = reduce(per_point.reshape(kh * kw, c_in, c_out), axis=0)  # over kernel positions
            channel = np.maximum(channel, per_channel.max(axis=-1))
    return weight, channel


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("signed", [False, True])
def test_channel_sensitivity_matches_reference_loop(reduction, signed):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 5, 5, 3)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    model = OneConv()
    variables = np_init(model, x[:1])
    sens = sp.compute_sensitivities(model, variables, x, reduction=reduction, chunk_size=2)["conv"]
    weight, channel = _reference(np.asarray(variables["params"]["conv"]["kernel"]), x, reduction)
    np.testing.assert_allclose(np.asarray(sens.weight), weight, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sens.channel), channel, rtol=2e-5, atol=1e-7)
    if reduction == "mean":  # the per-point mean is below the mean of per-position maxima over S
        upper = weight.reshape(9, 3, 4).mean(axis=0).max(axis=-1)
        assert np.all(channel <= upper + 1e-7) and np.any(channel < upper - 1e-4)


def test_channel_from_weight_reductions():
    w = jax.numpy.asarray(np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2))
    np.testing.assert_allclose(sp.sensitivity.channel_from_weight(w, "max"), np.asarray(w).max(axis=(0, 1, 3)))
    np.testing.assert_allclose(sp.sensitivity.channel_from_weight(w, "mean"),
                               np.asarray(w).mean(axis=(0, 1)).max(axis=-1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sp.sensitivity.channel_from_weight(w, "median")
