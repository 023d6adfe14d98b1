"""Discovery of the prunable layers of a Linen model and capture of their inputs.

Both functions run ``model.apply`` under :func:`flax.linen.intercept_methods`
and look at every ``__call__`` of an ``nn.Dense`` or ``nn.Conv``:

* :func:`find_layers` traces the model under :func:`jax.eval_shape` (no
  compute) and turns each call into a static :class:`~sensprune.types.Layer`.
* :func:`capture_inputs` ``sow``-s each layer input into a private collection;
  it is pure and works inside :func:`jax.jit`.

The user's model and variables are never modified. Layers are keyed by
``Layer.path`` (the module's scope path, which is its path in
``variables['params']``) and by name ``'/'.join(path)``.

A model object that is not a Linen module can take part by providing
``sensprune_find_layers(variables, x, *, method, **kw)`` and
``sensprune_capture_inputs(variables, x, *, method, layers, **kw)`` next to its
``apply``; both functions then delegate to it (``sensprune.nnx.LinenView``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
from flax import traverse_util
from flax.linen.linear import canonicalize_padding
from jax import lax

from sensprune import paths
from sensprune.types import Layer, Path

_COLLECTION = "_sensprune_layer_inputs"
_PRUNABLE = (nn.Dense, nn.Conv)
_UNSUPPORTED = (nn.DenseGeneral, nn.ConvTranspose, nn.ConvLocal, nn.Einsum)
_SUPPORTED_TEXT = (
    "sensprune prunes nn.Dense and nn.Conv (feature_group_count=1, zero padding: "
    "'SAME', 'VALID', ints or (low, high) pairs)"
)


def _name(path: Path) -> str:
    return "/".join(path) or "<root>"


def _layer_input(args: tuple, kwargs: Mapping[str, Any]) -> jax.Array:
    """The array passed to ``Dense.__call__`` / ``Conv.__call__``."""
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise ValueError("could not find the input of a Dense/Conv call (expected `inputs`)")


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _dense_layer(module: nn.Dense, path: Path, inputs: Any, outputs: Any, order: int) -> Layer:
    if inputs.ndim < 2:
        raise ValueError(
            f"layer {_name(path)!r}: nn.Dense input of shape {tuple(inputs.shape)} has no "
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


def _resolve_padding(
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
                f"layer {_name(path)!r}: padding {padding!r} is not supported; "
                + _SUPPORTED_TEXT
            )
        dilated = [(k - 1) * d + 1 for k, d in zip(window, kernel_dilation)]
        padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv_layer(module: nn.Conv, path: Path, inputs: Any, outputs: Any, order: int) -> Layer:
    name = _name(path)
    kernel_size = module.kernel_size
    window = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    rank = len(window)
    if module.feature_group_count != 1:
        raise ValueError(
            f"layer {name!r}: nn.Conv with feature_group_count={module.feature_group_count} "
            "is not supported; " + _SUPPORTED_TEXT
        )
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
    padding = _resolve_padding(path, module.padding, spatial, window, strides, kernel_dilation)
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
        kernel_shape=window + (int(inputs.shape[-1]), int(module.features)),
        use_bias=bool(module.use_bias),
        input_shape=tuple(inputs.shape[1:]),
        output_shape=tuple(outputs.shape[1:]),
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        order=order,
    )


def _check_supported(module: nn.Module, path: Path) -> None:
    if isinstance(module, _UNSUPPORTED):
        raise ValueError(
            f"layer {_name(path)!r} is a {type(module).__name__}, which cannot be pruned; "
            + _SUPPORTED_TEXT
        )


def _check_kernels(layers: Iterable[Layer], variables: Mapping[str, Any]) -> None:
    """Each layer's kernel must be in ``variables['params']`` with the traced shape."""
    for layer in layers:
        try:
            kernel = paths.get_kernel(variables["params"], layer)
        except KeyError as err:
            raise ValueError(
                f"layer {layer.name!r}: kernel not found in variables['params'] "
                "(lifted transforms such as nn.scan / nn.vmap are not supported)"
            ) from err
        if tuple(kernel.shape) != layer.kernel_shape:
            raise ValueError(
                f"layer {layer.name!r}: kernel in variables['params'] has shape "
                f"{tuple(kernel.shape)}, the traced call expects {layer.kernel_shape} "
                "(lifted transforms such as nn.scan / nn.vmap are not supported)"
            )


def _hook(model: Any, name: str) -> Callable[..., Any] | None:
    """``model.<name>`` for non-Linen models that implement it (see module doc)."""
    if isinstance(model, nn.Module):
        return None
    hook = getattr(model, name, None)
    return hook if callable(hook) else None


def find_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Any,
    *,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> list[Layer]:
    """Every ``nn.Dense`` / ``nn.Conv`` the model calls on ``x``, in call order.

    Runs ``model.apply(variables, x, method=method, **apply_kwargs)`` under
    ``jax.eval_shape`` (no FLOPs spent). Raises ``ValueError`` naming the layer
    for modules called more than once (shared weights), unsupported linear
    layers or conv options, and when no prunable layer is found.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise KeyError("variables has no 'params' collection")
    hook = _hook(model, "sensprune_find_layers")
    if hook is not None:
        return hook(variables, x, method=method, **apply_kwargs)
    found: list[Layer] = []
    seen: set[Path] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        _check_supported(module, path)
        if not isinstance(module, _PRUNABLE):
            return next_fun(*args, **kwargs)
        if path in seen:
            raise ValueError(
                f"layer {_name(path)!r} is called more than once in one forward pass "
                "(shared weights are not supported)"
            )
        seen.add(path)
        inputs = _layer_input(args, kwargs)
        outputs = next_fun(*args, **kwargs)
        build = _dense_layer if isinstance(module, nn.Dense) else _conv_layer
        found.append(build(module, path, inputs, outputs, len(found)))
        return outputs

    apply = functools.partial(model.apply, method=method, **apply_kwargs)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply, variables, x)
    if not found:
        raise ValueError(f"no prunable layer (nn.Dense / nn.Conv) found in {type(model).__name__}")
    _check_kernels(found, variables)
    return found


def _with_collection(mutable: Any) -> Any:
    """``mutable`` argument for apply that also makes our collection mutable."""
    if mutable is True:
        return True
    if mutable is False or mutable is None:
        return [_COLLECTION]
    if isinstance(mutable, str):
        return [mutable, _COLLECTION]
    if isinstance(mutable, (list, tuple)):
        return [*mutable, _COLLECTION]
    raise ValueError(
        f"mutable must be a bool, a collection name or a list of names, got {mutable!r}"
    )


def capture_inputs(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Any,
    *,
    method: Callable[..., Any] | str | None = None,
    layers: Sequence[Layer] | None = None,
    **apply_kwargs: Any,
) -> dict[str, jax.Array]:
    """Layer name -> the input the layer received, shape ``[B, *input_shape]``.

    Pure and jittable. ``layers`` restricts the capture (default: every Dense
    and Conv call). A layer called more than once raises ``ValueError``.
    """
    hook = _hook(model, "sensprune_capture_inputs")
    if hook is not None:
        return hook(variables, x, method=method, layers=layers, **apply_kwargs)
    wanted = None if layers is None else {tuple(layer.path): layer for layer in layers}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _PRUNABLE):
            if wanted is None or tuple(module.path) in wanted:
                module.sow(_COLLECTION, "inputs", _layer_input(args, kwargs))
        return next_fun(*args, **kwargs)

    mutable = _with_collection(apply_kwargs.pop("mutable", False))
    with nn.intercept_methods(interceptor):
        _, state = model.apply(variables, x, method=method, mutable=mutable, **apply_kwargs)
    flat = traverse_util.flatten_dict(dict(state.get(_COLLECTION, {})))
    captured: dict[str, jax.Array] = {}
    for key, values in flat.items():
        path = tuple(key[:-1])
        if len(values) != 1:
            raise ValueError(
                f"layer {_name(path)!r} is called {len(values)} times in one forward pass "
                "(shared weights are not supported)"
            )
        captured["/".join(path)] = values[0]
    if wanted is not None:
        missing = [layer.name for layer in wanted.values() if layer.name not in captured]
        if missing:
            raise ValueError(f"layers {missing} were not called by the model")
    return captured
