"""The model adapter of ``flax.nnx`` models (:class:`NNXAdapter`).

An nnx model is split once, ``nnx.split(model, nnx.Param, ...)``, into a graph
definition, the ``nnx.Param`` arrays and the rest of the state (batch
statistics, RNG counters, ...). The adapter merges them back into a *private
copy* of the model per call, so every function is pure in the variables
``{'params': params_dict(model), 'nnx_state': rest}``. The params are a plain
nested dict with string keys (``{'layers': {'0': {'kernel': ...}}}``), so
``Layer.path``, masks, counting and every registered method work unchanged.

Layer calls are intercepted on that copy: its ``nnx.Linear`` / ``nnx.Conv``
instances are switched to an intercepting subclass (the nnx counterpart of
Linen's ``nn.intercept_methods``), so the user's model is never touched,
nothing global is patched, and the capture works under ``jax.jit`` /
``nnx.jit``. The public nnx workflow is :mod:`sensprune.nnx`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
from flax import nnx, traverse_util

from sensprune import geometry, layer_kinds, paths
from sensprune.adapter import Interceptor, LayerCall, check_captured
from sensprune.points import as_args
from sensprune.types import Layer, Path

__all__ = ["NNXAdapter", "REST", "nnx_adapter", "params_dict", "state_like"]

REST = "nnx_state"
"""Collection of :class:`NNXAdapter` variables holding the non-``Param`` state."""

PRUNABLE = (nnx.Linear, nnx.Conv)
_SCORED = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.ConvTranspose)  # Embed: ``attend``
_UNSUPPORTED: tuple[type, ...] = ()  # linear layers recorded but left dense (none at present)
_SUPPORTED_TEXT = (
    "sensprune prunes nnx.Linear and nnx.Conv (feature_group_count=1, no mask, zero "
    "padding: 'SAME', 'VALID', ints or (low, high) pairs)"
)

Forward = Optional[Any]  # None (model(x)), a method name, or fn(model, x, **kw)


def _name(path: Path) -> str:
    return "/".join(path) or "<root>"


def _str_path(path: Sequence[Any]) -> Path:
    return tuple(str(k) for k in path)


# --------------------------------------------------------------------------- params


def _flat_values(state: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """``(key path, array)`` of every leaf of an ``nnx.State`` (Variables unwrapped)."""
    out = []
    for path, value in nnx.to_flat_state(state):
        if isinstance(value, nnx.Variable):
            value = value.get_value()
        out.append((tuple(path), value))
    return out


def params_dict(model_or_state: Any) -> dict:
    """The ``nnx.Param`` arrays as a nested dict with string keys.

    ``model_or_state``: an ``nnx.Module`` or an ``nnx.State`` (e.g.
    ``nnx.state(model, nnx.Param)``). List indices become strings, so a layer
    at ``model.layers[0]`` has ``Layer.path == ('layers', '0')``.
    """
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    values = _flat_values(state)
    flat = {_str_path(p): v for p, v in values}
    if len(flat) != len(values):
        raise ValueError("two Param paths of the model coincide once their keys are strings")
    return traverse_util.unflatten_dict(flat)


def state_like(template: Any, tree: Mapping[str, Any]) -> nnx.State:
    """``tree`` (string-keyed, like :func:`params_dict`) in the structure of ``template``.

    ``template`` is ``nnx.state(model, nnx.Param)``; each leaf keeps its
    Variable type and metadata and takes the value at the same path of ``tree``.
    """
    flat = []
    for path, var in nnx.to_flat_state(template):
        value = paths.get_path(tree, _str_path(path))
        if isinstance(var, nnx.Variable):
            value = jax.tree.map(lambda _, v=value: v, var)
        flat.append((tuple(path), value))
    return nnx.from_flat_state(flat)


# --------------------------------------------------------------------------- recording


_ACTIVE: contextvars.ContextVar[Optional[tuple[Mapping[int, Path], Interceptor]]] = (
    contextvars.ContextVar("sensprune_nnx_interceptor", default=None)
)
_INTERCEPTED_CLASSES: dict[type, type] = {}


def _kind(module: Any) -> str:
    return next(c.__name__ for c in _SCORED + _UNSUPPORTED if isinstance(module, c))


def _method(cls: type) -> str:
    """The intercepted method: ``attend`` of an Embed (its output projection), else ``__call__``."""
    return "attend" if issubclass(cls, nnx.Embed) else "__call__"


def _intercepted_class(cls: type) -> type:
    """A subclass of ``cls`` whose layer method goes through the active interceptor."""
    if cls not in _INTERCEPTED_CLASSES:
        method = _method(cls)

        def call(self, *args, **kwargs):
            active = _ACTIVE.get()
            path = None if active is None else active[0].get(id(self))
            if path is None:
                return getattr(cls, method)(self, *args, **kwargs)
            next_fun = functools.partial(getattr(cls, method), self)
            return active[1](next_fun, args, kwargs, LayerCall(path, self))

        _INTERCEPTED_CLASSES[cls] = type(cls)(
            cls.__name__, (cls,), {method: call, "__module__": cls.__module__}
        )
    return _INTERCEPTED_CLASSES[cls]


@contextlib.contextmanager
def _intercepting(module: nnx.Module, interceptor: Interceptor) -> Iterator[None]:
    """Runs ``interceptor`` around the layer calls of ``module``, which must be a private copy.

    The copy's Linear/Conv (and unsupported linear) instances are switched to
    intercepting subclasses; nothing outside the copy changes. Calls of
    unsupported layers raise ``ValueError`` naming the layer.
    """
    modules: dict[int, Path] = {}
    for path, sub in nnx.iter_modules(module):
        if isinstance(sub, _SCORED + _UNSUPPORTED):
            modules[id(sub)] = _str_path(path)
            object.__setattr__(sub, "__class__", _intercepted_class(type(sub)))
    token = _ACTIVE.set((modules, interceptor))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclasses.dataclass
class _Call:
    module: Any
    inputs: Any
    outputs: Any


class _Recorder:
    """An interceptor that records the calls of the wanted layers (default: all)."""

    def __init__(self, wanted: Optional[set[Path]] = None):
        self.wanted = wanted
        self.calls: dict[Path, list[_Call]] = {}

    def __call__(self, next_fun: Callable[..., Any], args: tuple, kwargs: dict, call: LayerCall) -> Any:
        outputs = next_fun(*args, **kwargs)
        if self.wanted is None or call.path in self.wanted:
            inputs = geometry.layer_input(args, kwargs)
            self.calls.setdefault(call.path, []).append(_Call(call.module, inputs, outputs))
        return outputs

    def single_calls(self) -> list[tuple[Path, _Call]]:
        """``(path, call)`` in call order; a shared layer's inputs stacked on the batch axis."""
        out = []
        for path, calls in self.calls.items():
            inputs = layer_kinds.stack_calls([c.inputs for c in calls])
            out.append((path, _Call(calls[0].module, inputs, calls[0].outputs)))
        return out


_STACKED_TEXT = (
    "a kernel stacked by nnx.vmap (a block stack run by nnx.scan or nnx.vmap): sensprune does not see "
    "the calls inside nnx.scan yet, so it is left dense. Way forward: unroll the stack (a Python loop over "
    "an nnx.List of blocks), or write the blocks as a Linen nn.scan (each slice is pruned as its own layer)"
)


def _stacked_uncalled(module: nnx.Module, called: set[Path]) -> dict[str, str]:
    """Layer name -> why, for the linear layers never seen called whose kernel has a leading stack axis."""
    out = {}
    for path, sub in nnx.iter_modules(module):
        key = _str_path(path)
        kernel = getattr(sub, "kernel", None)
        if not isinstance(sub, PRUNABLE) or key in called or kernel is None:
            continue
        plain = 2 if isinstance(sub, nnx.Linear) else len(getattr(sub, "kernel_size", ())) + 2
        if len(getattr(getattr(kernel, "value", kernel), "shape", ())) > plain:
            out[_name(key)] = _STACKED_TEXT
    return out


# --------------------------------------------------------------------------- geometry


def _layer(call: _Call, path: Path, order: int) -> Layer:
    """The :class:`Layer` record of one nnx layer call (Unscorable/ValueError: left dense)."""
    module, name = call.module, _name(path)
    if isinstance(module, _UNSUPPORTED):
        raise layer_kinds.Unscorable(f"nnx.{_kind(module)} is left dense")
    if isinstance(module, nnx.ConvTranspose):
        return layer_kinds.conv_transpose_layer(module, module.out_features, path, call.inputs, call.outputs, order)
    if isinstance(module, nnx.Embed):
        return layer_kinds.general_layer(
            path, call.inputs, call.outputs, (module.num_embeddings, module.features), 1, False, order,
            transposed=True, param_name="embedding",
        )
    if isinstance(module, nnx.LinearGeneral):
        shape = tuple(module.in_features) + tuple(module.out_features)
        return layer_kinds._dense_general(
            path, module.axis, tuple(getattr(module, "batch_axis", {}) or {}), len(module.in_features), shape,
            call.inputs, call.outputs, module.use_bias, order, "nnx.LinearGeneral",
        )
    if isinstance(module, nnx.Einsum):
        k = layer_kinds.einsum_fan_in(module.einsum_str or "")
        if k is None:
            raise layer_kinds.Unscorable(
                f"nnx.Einsum {module.einsum_str!r} is not a linear map '...C,CO->...O' of its input"
            )
        return layer_kinds._dense_general(
            path, tuple(range(-k, 0)), (), k, tuple(module.kernel_shape), call.inputs, call.outputs,
            getattr(module, "bias", None) is not None, order, "nnx.Einsum",
        )
    if isinstance(module, nnx.Linear):
        shim = types.SimpleNamespace(features=module.out_features, use_bias=module.use_bias)
        return geometry.dense_layer(shim, path, call.inputs, call.outputs, order)  # type: ignore[arg-type]  # duck-typed
    if module.mask is not None:
        raise ValueError(f"layer {name!r}: nnx.Conv with a `mask` is not supported; " + _SUPPORTED_TEXT)
    if isinstance(module.padding, str) and module.padding.upper() in ("CIRCULAR", "CAUSAL", "REFLECT"):
        raise ValueError(
            f"layer {name!r}: nnx.Conv with padding {module.padding!r} is not supported; " + _SUPPORTED_TEXT
        )
    shim = types.SimpleNamespace(
        kernel_size=tuple(module.kernel_size),
        features=module.out_features,
        feature_group_count=module.feature_group_count,
        mask=None,
        strides=module.strides,
        padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation,
        use_bias=module.use_bias,
    )
    return geometry.conv_layer(shim, path, call.inputs, call.outputs, order)  # type: ignore[arg-type]  # duck-typed


def fit_group_counts(module: nnx.Module) -> nnx.Module:
    """``module`` with each grouped ``nnx.Conv`` whose kernel lost whole groups (:func:`sensprune.shrink`)
    set to the remaining ``feature_group_count`` / ``in_features`` / ``out_features`` (in place)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, nnx.Conv) and sub.feature_group_count > 1:
            shape = tuple(sub.kernel.get_value().shape)
            if shape[-1] != sub.out_features:
                sub.feature_group_count = shape[-1] * sub.feature_group_count // sub.out_features
                sub.in_features, sub.out_features = shape[-2] * sub.feature_group_count, shape[-1]
    return module


# --------------------------------------------------------------------------- the adapter


def _run(module: nnx.Module, forward: Forward, x: Any, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    xs = as_args(x)  # a tuple of points = the positional arguments (sensprune.points)
    if forward is None:
        return module(*xs, *args, **kwargs)
    if isinstance(forward, str):
        fn = getattr(module, forward, None)
        if not callable(fn):
            raise ValueError(f"forward={forward!r}: {type(module).__name__} has no such method")
        return fn(*xs, *args, **kwargs)
    if callable(forward):
        return forward(module, *xs, *args, **kwargs)
    raise ValueError(
        f"forward must be None (model(x)), a method name or a function fn(model, x), got {forward!r}"
    )



@dataclasses.dataclass(frozen=True)
class NNXAdapter:
    """An nnx model as a pure function of its variables (a :class:`~sensprune.adapter.ModelAdapter`).

    Attributes:
      graphdef: ``nnx.split(model, nnx.Param, ...)[0]``.
      param_paths: key paths of the Params in ``nnx.state(model, nnx.Param)``
        (ints stay ints), in flattening order.
      forward: how to run the model: ``None`` (``model(x)``), a method name, or
        ``fn(model, x, **kwargs)``.
      kwargs: extra keyword arguments of the forward call, as sorted pairs.
      plain_rest: the ``'nnx_state'`` collection is a string-keyed dict like
        :func:`params_dict` (``rest_template`` turns it back into the State);
        :mod:`sensprune.dependencies` and :mod:`sensprune.shrink` address
        variable leaves by string key paths.
      rest_template: the model's non-Param ``nnx.State`` (with ``plain_rest``).

    Calls never modify the original model; state updates of the forward pass
    (e.g. BatchNorm statistics in train mode) are discarded.
    """

    graphdef: Any
    param_paths: tuple[tuple[Any, ...], ...]
    forward: Forward = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    plain_rest: bool = False
    rest_template: Any = dataclasses.field(default=None, compare=False, repr=False)

    def module(self, variables: Mapping[str, Any]) -> nnx.Module:
        """A fresh model copy holding ``variables`` (pure; usable under jit)."""
        if not isinstance(variables, Mapping) or "params" not in variables or REST not in variables:
            raise KeyError(f"variables must have the collections 'params' and {REST!r}")
        params = variables["params"]
        flat = [(p, nnx.Param(paths.get_path(params, _str_path(p)))) for p in self.param_paths]
        rest = state_like(self.rest_template, variables[REST]) if self.plain_rest else variables[REST]
        return fit_group_counts(nnx.merge(self.graphdef, nnx.from_flat_state(flat), rest))

    def apply(self, variables: Mapping[str, Any], x: Any) -> Any:
        """Runs a model copy on ``x``."""
        return _run(self.module(variables), self.forward, x, (), dict(self.kwargs))

    def intercept(self, variables: Mapping[str, Any], x: Any, interceptor: Interceptor) -> Any:
        """:meth:`apply` with ``interceptor(next_fun, args, kwargs, call)`` around every layer call."""
        module = self.module(variables)
        with _intercepting(module, interceptor):
            return _run(module, self.forward, x, (), dict(self.kwargs))

    def find_layers(self, variables: Mapping[str, Any], x: Any) -> list[Layer]:
        """Every scored nnx layer the model calls on ``x``, in call order (no FLOPs)."""
        found, dense = self.find_layers_report(variables, x)
        if not found:
            raise ValueError(
                "no prunable layer (nnx.Linear / nnx.Conv) is called by the model"
                + (f" ({layer_kinds.layer_report(dense)})" if dense else "")
            )
        return found

    def find_layers_report(self, variables: Mapping[str, Any], x: Any) -> tuple[list[Layer], dict[str, str]]:
        """``(scored layers, {name: reason} of the linear layers left dense)`` (see :mod:`sensprune.layer_kinds`)."""
        found: list[Layer] = []
        dense: dict[str, str] = {}

        def trace(variables, x):
            recorder = _Recorder()
            self.intercept(variables, x, recorder)
            for path, calls in recorder.calls.items():
                try:
                    layer = _layer(calls[0], path, len(found))
                    for extra in calls[1:]:
                        layer = layer_kinds.merge_call(layer, extra.inputs)
                    if layer.positions_folded:  # folding calls of different shapes: Linen only, for now
                        raise layer_kinds.Unscorable(
                            f"called {len(calls)} times with different input shapes; left dense"
                        )
                    found.append(layer)
                except ValueError as err:
                    dense[_name(path)] = str(err)

            dense.update(_stacked_uncalled(self.module(variables), set(recorder.calls)))

        jax.eval_shape(trace, variables, x)
        geometry.check_kernels(found, variables)
        return found, dense

    def capture_inputs(
        self, variables: Mapping[str, Any], x: Any, layers: Optional[Sequence[Layer]] = None
    ) -> dict[str, jax.Array]:
        """Layer name -> the input the layer received, ``[B, *input_shape]`` (pure, jittable)."""
        recorder = _Recorder(None if layers is None else {tuple(layer.path) for layer in layers})
        self.intercept(variables, x, recorder)
        return check_captured({_name(path): call.inputs for path, call in recorder.single_calls()}, layers)


def nnx_adapter(
    model: nnx.Module,
    *,
    forward: Forward = None,
    call_kwargs: Optional[Mapping[str, Any]] = None,
    eval_mode: bool = True,
    plain_rest: bool = False,
) -> tuple[NNXAdapter, dict]:
    """``(adapter, variables)``: ``adapter.apply(variables, x)`` equals ``model(x)`` (forward, call_kwargs).

    With ``eval_mode`` the adapter runs the model with ``deterministic=True``
    and ``use_running_average=True`` (``nnx.view``; the model itself is
    unchanged). With ``plain_rest`` the non-Param state in ``variables`` is a
    string-keyed dict too (see :class:`NNXAdapter`).
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if eval_mode:
        model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    param_paths = tuple(p for p, _ in _flat_values(params))
    kwargs = tuple(sorted(dict(call_kwargs or {}).items()))
    adapter = NNXAdapter(graphdef, param_paths, forward, kwargs, plain_rest, rest if plain_rest else None)
    variables = {"params": params_dict(params), REST: params_dict(rest) if plain_rest else rest}
    return adapter, variables
