"""Plain data types shared by every sensprune module.

Params, masks, sensitivities and scales are ordinary pytrees / dicts of arrays.
A prunable layer is identified by ``Layer.path``: the tuple of keys that leads
to its module in the params tree (the kernel lives at ``path + ('kernel',)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

Path = tuple[str, ...]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layer:
    """Static description of one prunable Dense or Conv layer.

    Attributes:
      path: keys of the module in the params tree, e.g. ``('block1', 'Conv_0')``.
      kind: ``'dense'`` or ``'conv'``.
      kernel_shape: shape of the kernel leaf. Dense: ``(in, out)``; Conv:
        ``(*window, in, out)`` (Flax's HWIO layout).
      use_bias: whether the layer has a bias leaf.
      input_shape: per-sample shape of the layer input (without batch axis).
      output_shape: per-sample shape of the layer output (without batch axis).
      strides, padding, input_dilation, kernel_dilation: conv geometry, already
        resolved to explicit tuples; ``padding`` is a tuple of ``(low, high)``
        pairs. Empty tuples for Dense layers.
      order: position of the layer in the forward pass (0 = first call).
      param_shape: shape of the parameter leaf when ``kernel_shape`` is a 2-D
        ``[fan_in, units]`` *view* of it (``nn.DenseGeneral`` / ``nn.Einsum``:
        contracted axes x remaining axes; ``nn.Embed.attend``: the transposed
        table); ``()`` when the leaf has ``kernel_shape`` itself.
        :mod:`sensprune.paths` converts between the two.
      param_name: name of the parameter leaf in the module (``'kernel'``,
        ``'embedding'`` for ``Embed.attend``).
      transposed: the view is the leaf with its last two axes swapped and its
        window axes reversed (``Embed.attend``: the transposed table;
        ``ConvTranspose(transpose_kernel=True)``: the flipped, in/out-swapped kernel).
      conv_transpose: the layer is a transposed conv (``kind='conv'`` over the
        input dilated by its strides).
      input_axes: a permutation of the per-sample input axes that makes the
        contracted axes trailing (``nn.DenseGeneral(axis=1)`` on ``[B, F, T]``:
        ``(1, 0)``); the patches read the permuted input. ``()``: identity.
      groups: ``feature_group_count`` of a conv; ``kernel_shape`` is then
        ``(*window, in / groups, out)`` and output filters of group ``g`` read
        only input channels of group ``g``.
      calls: how often the model calls the layer in one forward pass (shared
        weights; every step of an ``nn.RNN`` / ``nn.scan`` over a broadcast
        kernel is a call); captured inputs of all calls are stacked on the batch axis.
      index: for one slice of a kernel stacked by ``nn.scan`` (``variable_axes=
        {'params': 0}``: one layer per scan step), its index into the leading
        axes of the parameter leaf; ``()`` for an unstacked kernel. Each slice
        is a layer of its own (name ``'blocks/mlp[2]'``).
      positions_folded: a shared dense layer whose calls differ in their position
        axes: every position of every call is one point (``input_shape = (fan_in,)``;
        ``calls`` = positions per sample over all calls).
    """

    path: Path
    kind: str
    kernel_shape: tuple[int, ...]
    use_bias: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()
    order: int = 0
    param_shape: tuple[int, ...] = ()
    param_name: str = "kernel"
    transposed: bool = False
    conv_transpose: bool = False
    input_axes: tuple[int, ...] = ()
    groups: int = 1
    calls: int = 1
    index: tuple[int, ...] = ()
    positions_folded: bool = False

    @property
    def name(self) -> str:
        """Human-readable path, e.g. ``'block1/Conv_0'`` (``'blocks/Dense_0[2]'`` for a scan slice)."""
        return "/".join(self.path) + "".join(f"[{i}]" for i in self.index)

    @property
    def in_channels(self) -> int:
        return self.kernel_shape[-2]

    @property
    def out_channels(self) -> int:
        return self.kernel_shape[-1]

    @property
    def window_size(self) -> int:
        """Number of kernel positions (kappa in the papers; 1 for Dense)."""
        size = 1
        for k in self.kernel_shape[:-2]:
            size *= k
        return size

    @property
    def num_patches(self) -> int:
        """Output positions per sample (P in the papers; 1 for Dense)."""
        size = 1
        for k in self.output_shape:
            size *= k
        return size // self.out_channels

    @property
    def channel_structured(self) -> bool:
        """Whether filter methods may prune this layer: a Dense/Conv/ConvTranspose kernel or the 2-D
        view of a DenseGeneral/Einsum kernel contracting its trailing axes (attention projections),
        called once, at most one scan deep (the channel-dependency analysis reads these only)."""
        return (
            not self.transposed and not self.input_axes and len(self.index) <= 1
            and self.groups == 1 and self.calls == 1 and self.param_name == "kernel"
        )

    @property
    def num_neurons(self) -> int:
        """Output entries per sample (eta_l in the papers)."""
        return self.num_patches * self.out_channels

    @property
    def kernel_size(self) -> int:
        size = 1
        for k in self.kernel_shape:
            size *= k
        return size


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """Empirical sensitivities of one layer, maxima over every point of S.

    Attributes:
      weight: kernel-shaped, sensitivity of each weight (SiPP), >= 0.
      channel: shape ``(in_channels,)``, sensitivity of each input channel (PFP).
    """

    weight: jax.Array
    channel: jax.Array


@dataclasses.dataclass
class PruneResult:
    """What :func:`sensprune.prune` returns.

    Attributes:
      params: pruned params (masked, and reweighted for sampling methods).
      masks: bool pytree with the structure of params (True = kept).
      keep_ratio: achieved fraction of nonzero parameters vs. the reference
        (dense) count, biases and norm parameters included.
      target_keep_ratio: the requested keep ratio.
      layer_kept: kept kernel entries per layer, by layer name.
      layer_total: kernel entries per layer, by layer name.
      flops: multiply-accumulates of the pruned model (per sample).
      flops_dense: same for the dense reference.
      sensitivities: per-layer sensitivities (or scores) used, by layer name.
      info: method-specific extras (epsilon, sample counts, ...).
    """

    params: PyTree
    masks: PyTree
    keep_ratio: float
    target_keep_ratio: float
    layer_kept: Mapping[str, int]
    layer_total: Mapping[str, int]
    flops: int
    flops_dense: int
    sensitivities: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
