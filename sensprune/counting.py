"""Parameter counts, FLOPs and the size of the sensitivity set S.

All results are Python ints computed on the host (no int32 overflow on large
models). Conventions follow the reference (spec §1.1, §1.5):

* ``count_nonzero`` counts nonzero entries of *every* leaf, biases and norm
  parameters included (torchprune's ``NetHandle.size()``).
* ``flops`` counts multiply-accumulates of Dense/Conv layers only, per sample:
  ``sum_l nnz(kernel_l) * positions_l`` (:func:`mac_positions`: the output
  patches, or the input positions of a transposed conv).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sensprune.paths import stored_kernel
from sensprune.types import Layer, PyTree

__all__ = [
    "count_nonzero",
    "count_params",
    "dense_flops",
    "flops",
    "layer_nonzero",
    "layer_total",
    "mac_positions",
    "sample_size",
]

# Per-leaf counts on device are int32; larger leaves are counted on the host.
_MAX_DEVICE_COUNT = 2**31 - 1


def _size(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        shape = np.shape(leaf)
    return math.prod(int(d) for d in shape)


# Arrays of at most this many entries on one device are read to the host rather than
# reduced by a compiled program (a compile costs ~0.1-0.4 s; copying 4 M entries less).
_HOST_READ_ENTRIES = 2**22


def host_readable(x: jax.Array) -> bool:
    """Whether ``x`` is cheaper to reduce with numpy than with a freshly compiled program:
    on one device, and that device is the CPU (no copy) or the array is small."""
    try:
        devices = x.sharding.device_set
    except AttributeError:  # e.g. a tracer: leave it to the device path
        return False
    if len(devices) != 1 or not x.is_fully_addressable:
        return False
    device: Any = next(iter(devices))
    return device.platform == "cpu" or _size(x) <= _HOST_READ_ENTRIES


@jax.jit
def _device_nonzero(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.count_nonzero(x) for x in leaves]


def _nonzero_per_leaf(leaves: Sequence[Any]) -> list[int]:
    """Nonzero entries of each leaf, as Python ints.

    JAX arrays are reduced on their device in one compiled call with one
    transfer of the small counts; anything else, and leaves too large for an
    int32 count, is counted with numpy on the host.
    """
    leaves = list(leaves)
    on_device = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and _size(x) <= _MAX_DEVICE_COUNT and not host_readable(x)
    ]
    counted: dict[int, int] = {}
    if on_device:
        device_counts = jax.device_get(_device_nonzero([leaves[i] for i in on_device]))
        counted = {i: int(c) for i, c in zip(on_device, device_counts)}
    return [counted[i] if i in counted else int(np.count_nonzero(np.asarray(x))) for i, x in enumerate(leaves)]


def count_params(tree: PyTree) -> int:
    """Number of entries of all leaves of ``tree`` (zeros included)."""
    return sum(_size(x) for x in jax.tree.leaves(tree))


def count_nonzero(tree: PyTree) -> int:
    """Number of nonzero entries of all leaves (the reference's ``size()``)."""
    return sum(_nonzero_per_leaf(jax.tree.leaves(tree)))


def layer_total(layers: Sequence[Layer]) -> dict[str, int]:
    """Kernel entries of each layer, by layer name."""
    return {layer.name: layer.kernel_size for layer in layers}


def layer_nonzero(params: Mapping[str, Any], layers: Sequence[Layer]) -> dict[str, int]:
    """Nonzero kernel entries of each layer, by layer name (biases excluded)."""
    kernels = [stored_kernel(params, layer) for layer in layers]
    return {layer.name: n for layer, n in zip(layers, _nonzero_per_leaf(kernels))}


def mac_positions(layer: Layer) -> int:
    """How often one sample applies each kernel entry, over all calls of ``layer``.

    A Dense/Conv layer applies its kernel once per output patch (``num_patches``). A transposed
    conv is scored as a stride-1 conv over its input dilated by the strides, but most taps of that
    conv read the inserted zeros; what it computes is one kernel tap per *input* position (the
    scatter form: input positions x taps x in x out), about ``prod(strides)`` times fewer.
    """
    if layer.conv_transpose:
        positions = math.prod(layer.input_shape[:-1])  # [*spatial, channels] per sample
    else:
        positions = layer.num_patches
    return positions * layer.calls  # calls: shared layers


def flops(params: Mapping[str, Any], layers: Sequence[Layer]) -> int:
    """Per-sample multiply-accumulates of the Dense/Conv layers of ``params``.

    ``sum_l nnz(kernel_l) * mac_positions(l)``; bias, norms, pooling and
    activations are not counted (spec §1.5).
    """
    nnz = layer_nonzero(params, layers)
    return sum(nnz[layer.name] * mac_positions(layer) for layer in layers)


def dense_flops(layers: Sequence[Layer]) -> int:
    """:func:`flops` of the unpruned network (every kernel entry kept)."""
    return sum(layer.kernel_size * mac_positions(layer) for layer in layers)


def sample_size(
    layers: Sequence[Layer],
    delta: float,
    c_constant: float = 3.0,
    batch_size: int | None = None,
) -> int:
    """Size of the sensitivity set S (spec §1.1).

    ``|S| = ceil(C * ln(8 * eta_star / delta'))`` with ``delta' = delta / eta``,
    ``eta`` the total and ``eta_star`` the largest per-layer neuron count
    (``Layer.num_neurons``). With ``batch_size``, rounded *up* to a multiple of
    it.

    Args:
      layers: the prunable layers.
      delta: failure probability, in (0, 1).
      c_constant: the constant C > 0 (the reference overrides it to 10).
      batch_size: optional positive int.
    """
    if not layers:
        raise ValueError("layers must contain at least one Layer, got none")
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in the open interval (0, 1), got {delta!r}")
    c_constant = float(c_constant)
    if not (math.isfinite(c_constant) and c_constant > 0.0):
        raise ValueError(f"c_constant must be a finite number > 0, got {c_constant!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")

    neurons = [layer.num_neurons for layer in layers]
    eta, eta_star = sum(neurons), max(neurons)
    if eta_star < 1:
        raise ValueError(f"layers must have at least one output neuron, got {neurons}")
    # ln(8 * eta_star * eta / delta), summed in log space (delta may be tiny).
    log_term = math.log(8.0) + math.log(eta_star) + math.log(eta) - math.log(delta)
    size = math.ceil(c_constant * log_term)
    if batch_size is not None:
        batch_size = int(batch_size)
        size = -(-size // batch_size) * batch_size
    return int(size)
