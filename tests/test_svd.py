"""The low-rank baseline ``svd``: ranks, reconstruction, honest size/FLOP counts."""

import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from sensprune.context import PruneContext
from sensprune.methods import svd
from sensprune.types import Layer
from tests.fixtures import CNN, digits, mlp, np_init


def conv_ctx(kernel, patches=16):
    layer = Layer(path=("c",), kind="conv", kernel_shape=kernel.shape, use_bias=False,
                  input_shape=(4, 4, kernel.shape[2]), output_shape=(4, 4, kernel.shape[3]),
                  strides=(1, 1), padding=((1, 1), (1, 1)), input_dilation=(1, 1), kernel_dilation=(1, 1))
    assert layer.num_patches == patches
    return PruneContext(model=None, variables={"params": {"c": {"kernel": jnp.asarray(kernel)}}},
                        layers=[layer], data=np.zeros((1, 1)))


def test_rank_for_fraction_by_hand():
    # (n, d) = (100, 20): rank k costs 121 k; 0.5 * 2000 / 121 = 8.26 -> 8.
    assert svd.rank_for_fraction(100, 20, 0.5) == 8
    assert svd.rank_for_fraction(100, 20, 0.01) == 1  # at least rank 1
    # A factorisation not smaller than the dense matrix: stay dense (0).
    assert svd.rank_for_fraction(100, 20, 1.0) == 0
    assert svd.rank_for_fraction(3, 3, 0.9) == 1  # 7 <= 8.1 parameters
    assert svd.rank_for_fraction(2, 2, 0.9) == 0  # rank 1 costs 5 > 4
    with pytest.raises(ValueError, match="shape"):
        svd.rank_for_fraction(0, 3, 0.5)


def test_low_rank_is_the_eckart_young_optimum():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 6, 10)).astype(np.float32)
    s = np.linalg.svd(kernel.reshape(-1, 10), compute_uv=False)
    for k in (1, 3, 7):
        approx = svd.low_rank(kernel, k)
        assert approx.shape == kernel.shape and approx.dtype == kernel.dtype
        assert np.linalg.matrix_rank(approx.reshape(-1, 10), tol=1e-4) == k
        err = np.linalg.norm((kernel - approx).reshape(-1))
        np.testing.assert_allclose(err, np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-4)


def test_select_counts_factor_sizes_and_flops():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)  # n = 72, d = 16
    ctx = conv_ctx(kernel)
    sel = svd.select(ctx, budget=int(0.4 * kernel.size), key=None)
    k = int(np.floor(0.4 * 72 * 16 / 89))
    assert sel.info["ranks"]["c"] == k
    assert sel.sizes["c"] == k * (72 + 16 + 1)
    assert sel.flops["c"] == k * (72 + 16) * 16
    assert sel.masks["c"].all()
    np.testing.assert_allclose(sel.kernels["c"], svd.low_rank(kernel, k), rtol=1e-6)


def test_prune_mlp_meets_budget_and_is_not_retrainable():
    model, variables = mlp()
    x, _ = digits()
    dense = sp.count_params(variables["params"])
    res = sp.prune(model, variables, x[:8], method="svd", keep_ratio=0.3)
    assert not sp.get_method("svd").retrainable
    assert sp.get_method("wt").retrainable
    # Size = biases + k (n + d + 1) per layer, and it hits the target within the search tolerance.
    ranks = res.info["ranks"]
    expected = sum(np.asarray(layer["bias"]).size for layer in variables["params"].values())
    flops = 0
    for name, p in variables["params"].items():
        kernel = np.asarray(p["kernel"])
        (n, d), r = kernel.shape, ranks[name]
        if r < min(n, d):  # factorised
            cost, macs = r * (n + d + 1), r * (n + d)
            np.testing.assert_allclose(res.params[name]["kernel"], svd.low_rank(kernel, r), rtol=1e-5, atol=1e-6)
        else:  # left dense
            cost, macs = n * d, n * d
            np.testing.assert_array_equal(res.params[name]["kernel"], kernel)
        assert res.layer_kept[name] == cost
        expected += cost
        flops += macs
    assert any(r < 32 for r in ranks.values())
    assert res.keep_ratio == pytest.approx(expected / dense)
    assert res.keep_ratio == pytest.approx(0.3, rel=0.02)
    # FLOPs count both thin factors (no patches in an MLP).
    assert res.flops == flops < res.flops_dense
    # Lower keep ratio -> lower ranks; outputs still close to the dense model's on average.
    low = sp.prune(model, variables, x[:8], method="svd", keep_ratio=0.1)
    assert all(low.info["ranks"][n] <= ranks[n] for n in ranks)


def test_prune_cnn_runs_and_reconstructs():
    model = CNN()
    x, _ = digits()
    variables = np_init(model, x[:1])
    res = sp.prune(model, variables, x[:8], method="svd", keep_ratio=0.6, apply_kwargs={"train": False})
    assert res.keep_ratio == pytest.approx(0.6, abs=0.05)
    full = model.apply(variables, x[:64])
    approx = model.apply({**variables, "params": res.params}, x[:64])
    rel = np.linalg.norm(approx - full) / np.linalg.norm(full)
    assert rel < 0.8
