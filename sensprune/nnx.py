"""Flax NNX support: prune, mask and retrain ``flax.nnx`` models.

Every algorithm of :mod:`sensprune` is written against Linen's functional
``model.apply(variables, x, **kw)``. An nnx model is turned into exactly that:
``nnx.split(model, nnx.Param, ...)`` gives a graph definition, the ``nnx.Param``
arrays and the rest of the state (batch statistics, RNG counters, ...), and
:class:`LinenView` is a small hashable object whose ``apply`` merges them back
into a *copy* of the model and calls it. The params are a plain nested dict
with string keys (``{'layers': {'0': {'kernel': ...}}}``), so ``Layer.path``,
masks, counting and every registered method work unchanged.

Layer discovery and input capture run on that merged copy: its ``nnx.Linear`` /
``nnx.Conv`` instances are switched to an intercepting subclass (the nnx
counterpart of Linen's ``nn.intercept_methods``), so the user's model is never
touched, nothing global is patched, and the capture is pure (it works under
``jax.jit`` / ``nnx.jit``). ``sensprune.layers`` hands ``find_layers`` /
``capture_inputs`` on a :class:`LinenView` over to
:meth:`LinenView.sensprune_find_layers` / :meth:`LinenView.sensprune_capture_inputs`;
code that needs to replace layer outputs (channel-dependency tracing) uses
:meth:`LinenView.sensprune_intercept`.

Typical use::

    from flax import nnx
    import optax
    import sensprune as sp
    import sensprune.nnx as spx

    result = spx.prune(model, x_train[:256], method="pfp", keep_ratio=0.3, key=key)
    spx.apply_result(model, result)                      # pruned weights, in place
    optimizer = spx.masked_optimizer(model, optax.adam(1e-3), result.masks)
    # ... nnx.grad + optimizer.update(model, grads): pruned weights stay exactly 0
    small = spx.shrink(model, result, x_train[:8])        # a new, physically smaller model

``result.params`` and ``result.masks`` are ``nnx.State`` trees with the structure
of ``nnx.state(model, nnx.Param)`` (masks hold ``bool`` values), so
``nnx.Optimizer(model, sp.masked(tx, result.masks), wrt=nnx.Param)`` works too.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import optax
from flax import nnx
from flax import traverse_util

from sensprune import dependencies as deps_lib
from sensprune import layers as layers_lib
from sensprune import masking, paths
from sensprune import sensitivity as sensitivity_lib
from sensprune.prune import prune as _linen_prune
from sensprune.shrink import shrink as _linen_shrink
from sensprune.types import Layer, LayerSensitivity, Path, PruneResult

__all__ = [
    "LayerCall",
    "LinenView",
    "analyze",
    "apply_masks",
    "apply_result",
    "capture_inputs",
    "compute_sensitivities",
    "find_layers",
    "linen_view",
    "mask_state",
    "masked_optimizer",
    "nonzero_masks",
    "params_dict",
    "prune",
    "shrink",
    "state_like",
]

REST = "nnx_state"
"""Collection of :class:`LinenView` variables holding the non-``Param`` state."""

_PRUNABLE = (nnx.Linear, nnx.Conv)
_UNSUPPORTED = (nnx.LinearGeneral, nnx.Einsum, nnx.ConvTranspose)
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


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What an interceptor is told about one layer call.

    Attributes:
      path: the layer's ``Layer.path`` (string keys).
      module: the nnx layer (of the private model copy being run).
    """

    path: Path
    module: Any


Interceptor = Callable[[Callable[..., Any], tuple, dict, LayerCall], Any]
"""``interceptor(next_fun, args, kwargs, call) -> outputs`` around every Linear/Conv call."""

_ACTIVE: contextvars.ContextVar[Optional[tuple[Mapping[int, Path], Interceptor]]] = (
    contextvars.ContextVar("sensprune_nnx_interceptor", default=None)
)
_INTERCEPTED_CLASSES: dict[type, type] = {}


def _kind(module: Any) -> str:
    return next(c.__name__ for c in _PRUNABLE + _UNSUPPORTED if isinstance(module, c))


def _intercepted_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` goes through the active interceptor."""
    if cls not in _INTERCEPTED_CLASSES:

        def __call__(self, *args, **kwargs):  # noqa: N807
            active = _ACTIVE.get()
            path = None if active is None else active[0].get(id(self))
            if path is None:
                return cls.__call__(self, *args, **kwargs)
            if isinstance(self, _UNSUPPORTED):
                raise ValueError(
                    f"layer {_name(path)!r} is an nnx.{_kind(self)}, which cannot be pruned; "
                    + _SUPPORTED_TEXT
                )
            next_fun = functools.partial(cls.__call__, self)
            return active[1](next_fun, args, kwargs, LayerCall(path, self))

        _INTERCEPTED_CLASSES[cls] = type(cls)(
            cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__}
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
        if isinstance(sub, _PRUNABLE + _UNSUPPORTED):
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
            inputs = layers_lib._layer_input(args, kwargs)
            self.calls.setdefault(call.path, []).append(_Call(call.module, inputs, outputs))
        return outputs

    def single_calls(self) -> list[tuple[Path, _Call]]:
        """``(path, call)`` in call order; a layer called twice raises ``ValueError``."""
        out = []
        for path, calls in self.calls.items():
            if len(calls) != 1:
                raise ValueError(
                    f"layer {_name(path)!r} is called {len(calls)} times in one forward pass "
                    "(shared weights are not supported)"
                )
            out.append((path, calls[0]))
        return out


# --------------------------------------------------------------------------- geometry


def _layer(call: _Call, path: Path, order: int) -> Layer:
    """The :class:`Layer` record of one nnx.Linear / nnx.Conv call."""
    module, name = call.module, _name(path)
    if isinstance(module, nnx.Linear):
        shim = types.SimpleNamespace(features=module.out_features, use_bias=module.use_bias)
        return layers_lib._dense_layer(shim, path, call.inputs, call.outputs, order)
    if module.feature_group_count != 1:
        raise ValueError(
            f"layer {name!r}: nnx.Conv with feature_group_count={module.feature_group_count} "
            "is not supported; " + _SUPPORTED_TEXT
        )
    if module.mask is not None:
        raise ValueError(f"layer {name!r}: nnx.Conv with a `mask` is not supported; " + _SUPPORTED_TEXT)
    if isinstance(module.padding, str) and module.padding.upper() in ("CIRCULAR", "CAUSAL", "REFLECT"):
        raise ValueError(
            f"layer {name!r}: nnx.Conv with padding {module.padding!r} is not supported; " + _SUPPORTED_TEXT
        )
    shim = types.SimpleNamespace(
        kernel_size=tuple(module.kernel_size),
        features=module.out_features,
        feature_group_count=1,
        mask=None,
        strides=module.strides,
        padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation,
        use_bias=module.use_bias,
    )
    return layers_lib._conv_layer(shim, path, call.inputs, call.outputs, order)


# --------------------------------------------------------------------------- the view


def _run(module: nnx.Module, forward: Forward, x: Any, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    if forward is None:
        return module(x, *args, **kwargs)
    if isinstance(forward, str):
        fn = getattr(module, forward, None)
        if not callable(fn):
            raise ValueError(f"forward={forward!r}: {type(module).__name__} has no such method")
        return fn(x, *args, **kwargs)
    if callable(forward):
        return forward(module, x, *args, **kwargs)
    raise ValueError(
        f"forward must be None (model(x)), a method name or a function fn(model, x), got {forward!r}"
    )


@dataclasses.dataclass(frozen=True)
class LinenView:
    """An nnx model as a pure function of its params, with Linen's ``apply`` signature.

    Attributes:
      graphdef: ``nnx.split(model, nnx.Param, ...)[0]``.
      param_paths: key paths of the Params in ``nnx.state(model, nnx.Param)``
        (ints stay ints), in flattening order.

    Variables are ``{'params': params_dict(model), 'nnx_state': rest}``. Calls
    never modify the original model; state updates of the forward pass (e.g.
    BatchNorm statistics in train mode) are discarded.
    """

    graphdef: Any
    param_paths: tuple[tuple[Any, ...], ...]

    def module(self, variables: Mapping[str, Any]) -> nnx.Module:
        """A fresh model copy holding ``variables`` (pure; usable under jit)."""
        if not isinstance(variables, Mapping) or "params" not in variables or REST not in variables:
            raise KeyError(f"variables must have the collections 'params' and {REST!r}")
        params = variables["params"]
        flat = [(p, nnx.Param(paths.get_path(params, _str_path(p)))) for p in self.param_paths]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), variables[REST])

    def apply(self, variables: Mapping[str, Any], x: Any, *args: Any, method: Forward = None,
              mutable: Any = False, **kwargs: Any) -> Any:
        """Runs the model copy on ``x``; ``method`` is how to call it (see ``forward``)."""
        out = _run(self.module(variables), method, x, args, kwargs)
        return (out, {}) if mutable not in (False, None) else out

    def sensprune_intercept(self, variables: Mapping[str, Any], x: Any, interceptor: Interceptor, *,
                            method: Forward = None, mutable: Any = False, **kwargs: Any) -> Any:
        """``apply`` with ``interceptor(next_fun, args, kwargs, call)`` around every layer call.

        The counterpart of running Linen's ``apply`` under ``nn.intercept_methods``
        for the prunable layers: ``call.path`` is the ``Layer.path``; return
        ``next_fun(*args, **kwargs)`` to run the layer or any array to replace
        its output. Pure and jittable.
        """
        module = self.module(variables)
        with _intercepting(module, interceptor):
            out = _run(module, method, x, (), kwargs)
        return (out, {}) if mutable not in (False, None) else out

    def sensprune_find_layers(self, variables: Mapping[str, Any], x: Any, *, method: Forward = None,
                              **kwargs: Any) -> list[Layer]:
        """Every nnx.Linear / nnx.Conv the model calls on ``x``, in call order (no FLOPs)."""
        found: list[Layer] = []

        def trace(variables, x):
            recorder = _Recorder()
            self.sensprune_intercept(variables, x, recorder, method=method, **kwargs)
            found.extend(_layer(call, path, i) for i, (path, call) in enumerate(recorder.single_calls()))

        jax.eval_shape(trace, variables, x)
        if not found:
            raise ValueError("no prunable layer (nnx.Linear / nnx.Conv) is called by the model")
        layers_lib._check_kernels(found, variables)
        return found

    def sensprune_capture_inputs(
        self, variables: Mapping[str, Any], x: Any, *, method: Forward = None,
        layers: Optional[Sequence[Layer]] = None, **kwargs: Any,
    ) -> dict[str, jax.Array]:
        """Layer name -> the input the layer received, ``[B, *input_shape]`` (pure, jittable)."""
        kwargs.pop("mutable", None)
        recorder = _Recorder(None if layers is None else {tuple(layer.path) for layer in layers})
        self.sensprune_intercept(variables, x, recorder, method=method, **kwargs)
        captured = {_name(path): call.inputs for path, call in recorder.single_calls()}
        if layers is not None:
            missing = [layer.name for layer in layers if layer.name not in captured]
            if missing:
                raise ValueError(f"layers {missing} were not called by the model")
        return captured


def linen_view(model: nnx.Module, *, eval_mode: bool = True) -> tuple[LinenView, dict]:
    """``(view, variables)``: ``view.apply(variables, x)`` equals ``model(x)``.

    With ``eval_mode`` the view runs the model with ``deterministic=True`` and
    ``use_running_average=True`` (``nnx.view``; the model itself is unchanged).
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    if eval_mode:
        model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_paths = tuple(p for p, _ in _flat_values(params))
    return LinenView(graphdef, param_paths), {"params": params_dict(params), REST: rest}


# --------------------------------------------------------------------------- public API


def find_layers(model: nnx.Module, x: Any, *, forward: Forward = None, eval_mode: bool = True,
                **call_kwargs: Any) -> list[Layer]:
    """Every ``nnx.Linear`` / ``nnx.Conv`` the model calls on ``x``, in call order.

    ``Layer.path`` is the key path of the layer's kernel in
    ``nnx.state(model, nnx.Param)`` minus ``'kernel'``, with keys as strings.
    Raises ``ValueError`` naming the layer for a layer called twice, for
    nnx.LinearGeneral / Einsum / ConvTranspose calls and unsupported conv options.
    """
    view, variables = linen_view(model, eval_mode=eval_mode)
    return view.sensprune_find_layers(variables, x, method=forward, **call_kwargs)


def capture_inputs(model: nnx.Module, x: Any, *, forward: Forward = None,
                   layers: Optional[Sequence[Layer]] = None, eval_mode: bool = True,
                   **call_kwargs: Any) -> dict[str, jax.Array]:
    """Layer name -> the input the layer received on ``x`` (works under ``jax.jit``)."""
    view, variables = linen_view(model, eval_mode=eval_mode)
    return view.sensprune_capture_inputs(variables, x, method=forward, layers=layers, **call_kwargs)


def compute_sensitivities(model: nnx.Module, data: Any, *, reduction: str = "mean", chunk_size: int = 32,
                          layers: Optional[Sequence[Layer]] = None, forward: Forward = None,
                          eval_mode: bool = True, **call_kwargs: Any) -> dict[str, LayerSensitivity]:
    """:func:`sensprune.compute_sensitivities` of an nnx model."""
    view, variables = linen_view(model, eval_mode=eval_mode)
    return sensitivity_lib.compute_sensitivities(
        view, variables, data, reduction=reduction, chunk_size=chunk_size, layers=layers,
        method=forward, **call_kwargs,
    )


def prune(
    model: nnx.Module,
    data: Any,
    *,
    method: str,
    keep_ratio: float,
    key: Optional[jax.Array] = None,
    labels: Optional[Any] = None,
    loss_fn: Optional[Callable[[Any, Any], jax.Array]] = None,
    forward: Forward = None,
    call_kwargs: Optional[Mapping[str, Any]] = None,
    eval_mode: bool = True,
    layers: Optional[Sequence[Layer]] = None,
    **options: Any,
) -> PruneResult:
    """:func:`sensprune.prune` for an ``nnx.Module``; the model is not modified.

    Args:
      model: the nnx model. Its Linear / Conv layers are pruned.
      data, method, keep_ratio, key, labels, loss_fn: as in :func:`sensprune.prune`.
      forward: how to run the model: ``None`` (``model(x)``), a method name, or
        ``fn(model, x, **call_kwargs)``.
      call_kwargs: extra keyword arguments of the forward call.
      eval_mode: run with ``deterministic=True, use_running_average=True``.
      layers: precomputed :func:`find_layers` result (optional).
      **options: further :func:`sensprune.prune` options (``delta``,
        ``c_constant``, ``chunk_size``, ``reference_size``, ``rtol``,
        ``protect_input_channels``, ``method_options``).

    Returns:
      A :class:`~sensprune.types.PruneResult` whose ``params`` and ``masks``
      are ``nnx.State`` trees with the structure of
      ``nnx.state(model, nnx.Param)`` (masks hold bools). Apply it with
      :func:`apply_result`; per-layer dicts are keyed by ``Layer.name``.
    """
    for name in ("apply_method", "apply_kwargs"):
        if name in options:
            raise ValueError(f"{name} is for Linen models; use forward= / call_kwargs= with nnx models")
    view, variables = linen_view(model, eval_mode=eval_mode)
    result = _linen_prune(
        view, variables, data, method=method, keep_ratio=keep_ratio, key=key, labels=labels,
        loss_fn=loss_fn, layers=layers, apply_method=forward, apply_kwargs=dict(call_kwargs or {}),
        **options,
    )
    template = nnx.state(model, nnx.Param)
    return dataclasses.replace(
        result, params=state_like(template, result.params), masks=state_like(template, result.masks)
    )


def _masks_of(model: nnx.Module, masks: Any) -> nnx.State:
    """Masks (a PruneResult, an nnx.State or a string-keyed dict) as a checked State."""
    if isinstance(masks, PruneResult):
        masks = masks.masks
    template = nnx.state(model, nnx.Param)
    masks = params_dict(masks) if isinstance(masks, nnx.State) else masks
    masking.check_same_structure(params_dict(template), masks)
    return state_like(template, masks)


def mask_state(model: nnx.Module, masks: Any) -> nnx.State:
    """Masks in the structure of ``nnx.state(model, nnx.Param)`` (bool values).

    ``masks``: a :class:`PruneResult`, an ``nnx.State`` or a string-keyed dict
    like :func:`params_dict`. The result is what :func:`sensprune.masked`
    expects inside ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
    """
    return _masks_of(model, masks)


def nonzero_masks(model: nnx.Module) -> nnx.State:
    """Masks that keep exactly the nonzero Params of ``model``."""
    return masking.nonzero_masks(nnx.state(model, nnx.Param))


def apply_result(model: nnx.Module, result: PruneResult) -> None:
    """Writes the pruned (and reweighted) params of ``result`` into ``model``, in place."""
    if not isinstance(result, PruneResult):
        raise ValueError(f"result must be a PruneResult, got {type(result).__name__}")
    params = result.params
    params = params_dict(params) if isinstance(params, nnx.State) else params
    template = nnx.state(model, nnx.Param)
    masking.check_same_structure(params_dict(template), params, "result.params", require_bool=False)
    nnx.update(model, state_like(template, params))


def apply_masks(model: nnx.Module, masks: Any) -> None:
    """Zeroes the pruned Params of ``model`` in place (``masks`` as in :func:`mask_state`)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, masking.apply_masks(state, _masks_of(model, masks)))


def masked_optimizer(model: nnx.Module, tx: optax.GradientTransformation, masks: Any = None, *,
                     wrt: Any = nnx.Param) -> nnx.Optimizer:
    """``nnx.Optimizer(model, sensprune.masked(tx, masks), wrt=wrt)``.

    Pruned entries get zero gradient and zero update, so weights that are 0
    stay exactly 0 through ``optimizer.update(model, grads)``. ``masks``: as in
    :func:`mask_state`; ``None`` keeps the currently nonzero Params. Only
    ``wrt=nnx.Param`` is supported with explicit masks.
    """
    if masks is not None:
        if wrt is not nnx.Param:
            raise ValueError(f"wrt must be nnx.Param when masks are given, got {wrt!r}")
        masks = _masks_of(model, masks)
    return nnx.Optimizer(model, masking.masked(tx, masks), wrt=wrt)


# --------------------------------------------------------------------------- shrink


@dataclasses.dataclass(frozen=True, eq=False)
class _PlainView:
    """A :class:`LinenView` whose non-Param state is a plain string-keyed dict too.

    :mod:`sensprune.dependencies` and :mod:`sensprune.shrink` address variable
    leaves by string key paths (``('nnx_state', 'BatchNorm_0', 'mean')``); an
    ``nnx.State`` of Variables would add a ``value`` attribute key. Calls turn
    the dict back into the State (``rest`` is the template), whatever the shapes.
    """

    view: LinenView
    rest: Any

    def _variables(self, variables: Mapping[str, Any]) -> dict:
        return {**variables, REST: state_like(self.rest, variables[REST])}

    def apply(self, variables: Mapping[str, Any], x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.view.apply(self._variables(variables), x, *args, **kwargs)

    def sensprune_intercept(self, variables: Mapping[str, Any], x: Any, interceptor: Interceptor,
                            **kwargs: Any) -> Any:
        return self.view.sensprune_intercept(self._variables(variables), x, interceptor, **kwargs)

    def sensprune_find_layers(self, variables: Mapping[str, Any], x: Any, **kwargs: Any) -> list[Layer]:
        return self.view.sensprune_find_layers(self._variables(variables), x, **kwargs)

    def sensprune_capture_inputs(self, variables: Mapping[str, Any], x: Any, **kwargs: Any) -> dict:
        return self.view.sensprune_capture_inputs(self._variables(variables), x, **kwargs)


def _plain_view(model: nnx.Module, eval_mode: bool = True) -> tuple[_PlainView, dict]:
    view, variables = linen_view(model, eval_mode=eval_mode)
    rest = variables[REST]
    return _PlainView(view, rest), {**variables, REST: params_dict(rest)}


def analyze(model: nnx.Module, x: Any, *, forward: Forward = None, eval_mode: bool = True,
            **call_kwargs: Any) -> deps_lib.DependencyMap:
    """:func:`sensprune.dependencies.analyze` of an nnx model (channel groups).

    The result works with :func:`sensprune.predict_param_count` (with
    ``params_dict(model)`` and string-keyed masks, e.g.
    ``params_dict(result.masks)``) and as ``deps=`` of :func:`shrink`.
    """
    view, variables = _plain_view(model, eval_mode)
    first = jax.tree_util.tree_map(lambda a: a[:1], x)
    return deps_lib.analyze(view, variables, first, method=forward, **call_kwargs)


def _set_shapes(module: nnx.Module) -> None:
    """Makes the size attributes of Linear / Conv / norm layers match their (sliced) Variables."""
    for _, sub in nnx.iter_modules(module):
        kernel = getattr(sub, "kernel", None)
        if isinstance(sub, _PRUNABLE) and isinstance(kernel, nnx.Variable):
            shape = tuple(kernel.get_value().shape)
            sub.in_features, sub.out_features = shape[-2], shape[-1]
            if hasattr(sub, "kernel_shape"):
                sub.kernel_shape = shape
        elif isinstance(getattr(sub, "num_features", None), int):
            sizes = {
                v.get_value().shape[-1] for v in vars(sub).values()
                if isinstance(v, nnx.Variable) and getattr(v.get_value(), "ndim", 0) >= 1
            }
            if len(sizes) == 1:
                sub.num_features = int(sizes.pop())


def shrink(
    model: nnx.Module,
    masks_or_result: Any,
    x: Any,
    *,
    forward: Forward = None,
    eval_mode: bool = True,
    deps: Optional[deps_lib.DependencyMap] = None,
    round_to: int = 1,
    check: bool = True,
    atol: float = 1e-4,
    **call_kwargs: Any,
) -> nnx.Module:
    """A new, physically smaller nnx model: :func:`sensprune.shrink` for nnx.

    Every channel group whose consumers are fully masked is dropped: the
    ``nnx.Linear`` / ``nnx.Conv`` kernels and biases, and the per-channel
    params and batch statistics of ``nnx.BatchNorm`` / ``nnx.LayerNorm`` (and
    other norm layers) along the way are sliced, and ``in_features`` /
    ``out_features`` / ``kernel_shape`` / ``num_features`` are updated. The
    input model is not modified (the result is an ``nnx.clone``, with the same
    train/eval flags).

    Args:
      model: the dense-shaped nnx model.
      masks_or_result: a :class:`PruneResult` of :func:`prune` (its pruned and
        reweighted ``params`` under its ``masks``), bool masks (``nnx.State`` or
        a string-keyed dict, applied to the model's params) or pruned params
        (zeros = pruned).
      x: an example input (the channel groups are traced on ``x[:1]``; with
        ``check`` the shrunk outputs are compared with the masked ones on ``x``).
      forward, eval_mode, call_kwargs: how to run the model, as in :func:`prune`.
      deps: a precomputed :func:`analyze` result.
      round_to, check, atol: as in :func:`sensprune.shrink`.

    Returns:
      The shrunk nnx model. It computes what the masked model computes.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    view, variables = _plain_view(model, eval_mode)
    template = params_dict(nnx.state(model, nnx.Param))
    if isinstance(masks_or_result, PruneResult):
        params = masks_or_result.params
        params = params_dict(params) if isinstance(params, nnx.State) else params
        masking.check_same_structure(template, params, "result.params", require_bool=False)
        variables = {**variables, "params": params}
        masks_or_result = masks_or_result.masks
    if isinstance(masks_or_result, nnx.State):
        masks_or_result = params_dict(masks_or_result)
    if deps is None:
        deps = analyze(model, x, forward=forward, eval_mode=eval_mode, **call_kwargs)
    small = _linen_shrink(
        view, variables, masks_or_result, x=x if check else None, deps=deps, round_to=round_to,
        check=check, atol=atol, method=forward, **call_kwargs,
    ).variables
    new = nnx.clone(model)
    param_state, rest_state = nnx.state(new, nnx.Param, ...)
    nnx.update(new, state_like(param_state, small["params"]), state_like(rest_state, small[REST]))
    _set_shapes(new)
    return new
