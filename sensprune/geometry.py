"""Static geometry of prunable layers: a :class:`~sensprune.types.Layer` from a Dense/Conv call.

Pure functions of a layer's fields and its traced input/output shapes; no model is
run here (:mod:`sensprune.adapter` runs models and hands each call to these).
Linen modules are read directly; nnx layers pass a namespace with the same
fields (``features``, ``kernel_size``, ``strides``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
from flax.linen.linear import canonicalize_padding
from jax import lax

from sensprune import paths
from sensprune.types import Layer, Path

PRUNABLE = (nn.Dense, nn.Conv)
SUPPORTED_TEXT = (
    "sensprune prunes nn.Dense and nn.Conv (feature_group_count=1, zero padding: "
    "'SAME', 'VALID', ints or (low, high) pairs)"
)


def layer_name(path: Path) -> str:
    return "/".join(path) or "<root>"


def layer_input(args: tuple, kwargs: Mapping[str, Any]) -> jax.Array:
    """The array passed to ``Dense.__call__`` / ``Conv.__call__``."""
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise ValueError("could not find the input of a Dense/Conv call (expected `inputs`)")


def with_layer_input(args: tuple, kwargs: Mapping[str, Any], value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a layer call with its input (:func:`layer_input`) replaced by ``value``."""
    if args:
        return (value, *args[1:]), dict(kwargs)
    if "inputs" in kwargs:
        return args, {**kwargs, "inputs": value}
    raise ValueError("could not find the input of a Dense/Conv call (expected `inputs`)")


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def dense_layer(module: nn.Dense, path: Path, inputs: Any, outputs: Any, order: int) -> Layer:
    if inputs.ndim < 2:
        raise ValueError(
            f"layer {layer_name(path)!r}: nn.Dense input of shape {tuple(inputs.shape)} has no "
            "batch axis; the first input axis must be the batch axis"
        )
    return Layer(
        path=path,
        kind="dense",
        kernel_shape=(int(inputs.shape[-1]), int(module.features)),
        use_bias=bool(module.use_bias),
        input_shape=tuple(inputs.shape[1:]),
        output_shape=tuple(outputs.shape[1:]),
        order=order,
    )


def resolve_padding(
    path: Path,
    padding: Any,
    spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    kernel_dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Flax padding spec -> explicit ``(low, high)`` pairs, exactly as lax resolves it."""
    padding = canonicalize_padding(padding, len(window))
    if isinstance(padding, str):
        if padding.upper() in ("CIRCULAR", "CAUSAL", "REFLECT"):
            raise ValueError(
                f"layer {layer_name(path)!r}: padding {padding!r} is not supported; "
                + SUPPORTED_TEXT
            )
        dilated = [(k - 1) * d + 1 for k, d in zip(window, kernel_dilation)]
        padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_layer(module: nn.Conv, path: Path, inputs: Any, outputs: Any, order: int) -> Layer:
    name = layer_name(path)
    kernel_size = module.kernel_size
    window = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    rank = len(window)
    groups = int(getattr(module, "feature_group_count", 1) or 1)
    if module.mask is not None:
        raise ValueError(f"layer {name!r}: nn.Conv with a `mask` is not supported")
    if inputs.ndim < rank + 2:
        raise ValueError(
            f"layer {name!r}: nn.Conv input of shape {tuple(inputs.shape)} has no batch "
            f"axis (expected [batch, *{rank} spatial, channels])"
        )
    strides = _as_tuple(module.strides, rank)
    input_dilation = _as_tuple(module.input_dilation, rank)
    kernel_dilation = _as_tuple(module.kernel_dilation, rank)
    spatial = tuple(int(s) for s in inputs.shape[-(rank + 1) : -1])
    padding = resolve_padding(path, module.padding, spatial, window, strides, kernel_dilation)
    expected = tuple(
        ((n - 1) * di + 1 + lo + hi - ((k - 1) * dk + 1)) // s + 1
        for n, di, (lo, hi), k, dk, s in zip(
            spatial, input_dilation, padding, window, kernel_dilation, strides
        )
    )
    got = tuple(outputs.shape[-(rank + 1) : -1])
    if expected != got:
        raise ValueError(
            f"layer {name!r}: resolved conv geometry gives output size {expected}, but the "
            f"layer returned {got}"
        )
    return Layer(
        path=path,
        kind="conv",
        kernel_shape=window + (int(inputs.shape[-1]) // groups, int(module.features)),
        use_bias=bool(module.use_bias),
        input_shape=tuple(inputs.shape[1:]),
        output_shape=tuple(outputs.shape[1:]),
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        order=order,
        groups=groups,
    )


def check_kernels(layers: Iterable[Layer], variables: Mapping[str, Any]) -> None:
    """Each layer's kernel must be in ``variables['params']`` with the traced shape."""
    for layer in layers:
        try:
            leaf_only = dataclasses.replace(layer, param_shape=(), transposed=False)  # the leaf, no view
            kernel = paths.get_kernel(variables["params"], leaf_only)
        except KeyError as err:
            raise ValueError(
                f"layer {layer.name!r}: kernel not found in variables['params'] "
                "(lifted transforms such as nn.scan / nn.vmap are not supported)"
            ) from err
        expected = tuple(layer.param_shape) or layer.kernel_shape
        if tuple(kernel.shape) != expected:
            raise ValueError(
                f"layer {layer.name!r}: kernel in variables['params'] has shape "
                f"{tuple(kernel.shape)}, the traced call expects {expected} "
                "(lifted transforms such as nn.scan / nn.vmap are not supported)"
            )
