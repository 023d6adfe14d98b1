"""Flax NNX support: prune, mask and retrain ``flax.nnx`` models.

Every algorithm of :mod:`sensprune` runs models through a model adapter
(:mod:`sensprune.adapter`); an nnx model gets an
:class:`~sensprune.nnx_adapter.NNXAdapter` (:func:`adapter`), whose variables
are ``{'params': params_dict(model), 'nnx_state': rest}``. The params are a
plain nested dict with string keys, so ``Layer.path``, masks, counting and
every registered method work unchanged, and the user's model is never touched.

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

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import optax
from flax import nnx

from sensprune import dependencies as deps_lib
from sensprune import masking
from sensprune import sensitivity as sensitivity_lib
from sensprune.adapter import LayerCall
from sensprune.nnx_adapter import (
    PRUNABLE,
    REST,
    Forward,
    NNXAdapter,
    fit_group_counts,
    nnx_adapter,
    params_dict,
    state_like,
)
from sensprune.prune import prune as _linen_prune
from sensprune.shrink import shrink as _linen_shrink
from sensprune.types import Layer, LayerSensitivity, PruneResult

__all__ = [
    "LayerCall",
    "NNXAdapter",
    "REST",
    "adapter",
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

LinenView = NNXAdapter  # the former name of the nnx adapter


def adapter(model: nnx.Module, *, forward: Forward = None, eval_mode: bool = True,
            **call_kwargs: Any) -> tuple[NNXAdapter, dict]:
    """``(adapter, variables)`` of an nnx model, usable wherever sensprune takes a Linen model.

    ``sp.prune(adapter, variables, data, ...)`` equals :func:`prune` (except
    that the result holds plain dicts). ``forward`` and ``call_kwargs`` say
    how to run the model (see :func:`prune`).
    """
    return nnx_adapter(model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode)


def linen_view(model: nnx.Module, *, eval_mode: bool = True) -> tuple[NNXAdapter, dict]:
    """``(adapter, variables)`` with ``adapter.apply(variables, x) == model(x)`` (former name of :func:`adapter`)."""
    return nnx_adapter(model, eval_mode=eval_mode)


# --------------------------------------------------------------------------- public API


def find_layers(model: nnx.Module, x: Any, *, forward: Forward = None, eval_mode: bool = True,
                **call_kwargs: Any) -> list[Layer]:
    """Every ``nnx.Linear`` / ``nnx.Conv`` the model calls on ``x``, in call order.

    ``Layer.path`` is the key path of the layer's kernel in
    ``nnx.state(model, nnx.Param)`` minus ``'kernel'``, with keys as strings.
    Linear layers that cannot be scored are left out (``prune`` reports them in
    ``result.info['dense_layers']``).
    """
    adapter_, variables = nnx_adapter(model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode)
    return adapter_.find_layers(variables, x)


def capture_inputs(model: nnx.Module, x: Any, *, forward: Forward = None,
                   layers: Optional[Sequence[Layer]] = None, eval_mode: bool = True,
                   **call_kwargs: Any) -> dict[str, jax.Array]:
    """Layer name -> the input the layer received on ``x`` (works under ``jax.jit``)."""
    adapter_, variables = nnx_adapter(model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode)
    return adapter_.capture_inputs(variables, x, layers)


def compute_sensitivities(model: nnx.Module, data: Any, *, reduction: str = "mean", chunk_size: int = 32,
                          layers: Optional[Sequence[Layer]] = None, forward: Forward = None,
                          eval_mode: bool = True, contraction: str = "auto",
                          **call_kwargs: Any) -> dict[str, LayerSensitivity]:
    """:func:`sensprune.compute_sensitivities` of an nnx model."""
    adapter_, variables = nnx_adapter(model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode)
    return sensitivity_lib.compute_sensitivities(
        adapter_, variables, data, reduction=reduction, chunk_size=chunk_size, layers=layers,
        contraction=contraction,
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
    adapter_, variables = nnx_adapter(model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode)
    result = _linen_prune(
        adapter_, variables, data, method=method, keep_ratio=keep_ratio, key=key, labels=labels,
        loss_fn=loss_fn, layers=layers, **options,
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


def analyze(model: nnx.Module, x: Any, *, forward: Forward = None, eval_mode: bool = True,
            **call_kwargs: Any) -> deps_lib.DependencyMap:
    """:func:`sensprune.dependencies.analyze` of an nnx model (channel groups).

    The result works with :func:`sensprune.predict_param_count` (with
    ``params_dict(model)`` and string-keyed masks, e.g.
    ``params_dict(result.masks)``) and as ``deps=`` of :func:`shrink`.
    """
    adapter_, variables = nnx_adapter(
        model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode, plain_rest=True
    )
    first = jax.tree_util.tree_map(lambda a: a[:1], x)
    return deps_lib.analyze(adapter_, variables, first)


def _set_shapes(module: nnx.Module) -> None:
    """Makes the size attributes of Linear / LinearGeneral / Einsum / Conv / norm layers and the head counts
    of ``nnx.MultiHeadAttention`` match their (sliced) Variables."""
    for _, sub in nnx.iter_modules(module):
        kernel = getattr(sub, "kernel", None)
        if isinstance(sub, nnx.LinearGeneral) and isinstance(kernel, nnx.Variable):
            shape = tuple(kernel.get_value().shape)
            n_in = len(sub.axis)
            sub.in_features, sub.out_features = shape[:n_in], shape[n_in:]
        elif isinstance(sub, nnx.Einsum) and isinstance(kernel, nnx.Variable):
            sub.kernel_shape = tuple(kernel.get_value().shape)  # nnx.Einsum shapes its bias by it
        elif isinstance(sub, nnx.MultiHeadAttention) and isinstance(sub.query, nnx.LinearGeneral):
            heads, head_dim = tuple(sub.query.kernel.get_value().shape[-2:])
            sub.num_heads, sub.head_dim, sub.qkv_features = heads, head_dim, heads * head_dim
            sub.num_kv_heads = int(sub.key.kernel.get_value().shape[-2])
        elif isinstance(sub, PRUNABLE + (nnx.ConvTranspose,)) and isinstance(kernel, nnx.Variable):
            shape = tuple(kernel.get_value().shape)
            fit_group_counts(sub)  # a grouped conv loses whole groups
            groups = sub.feature_group_count if isinstance(sub, nnx.Conv) else 1
            sub.in_features, sub.out_features = shape[-2] * groups, shape[-1]
            if hasattr(sub, "kernel_shape"):
                sub.kernel_shape = shape
        elif isinstance(getattr(sub, "num_features", None), int):
            sizes = {
                v.get_value().shape[-1] for v in vars(sub).values()
                if isinstance(v, nnx.Variable) and getattr(v.get_value(), "ndim", 0) >= 1
            }
            if len(sizes) == 1:
                setattr(sub, "num_features", int(sizes.pop()))


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
    adapter_, variables = nnx_adapter(
        model, forward=forward, call_kwargs=call_kwargs, eval_mode=eval_mode, plain_rest=True
    )
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
        adapter_, variables, masks_or_result, x=x if check else None, deps=deps, round_to=round_to,
        check=check, atol=atol,
    ).variables
    new = nnx.clone(model)
    param_state, rest_state = nnx.state(new, nnx.Param, ...)
    nnx.update(new, state_like(param_state, small["params"]), state_like(rest_state, small[REST]))
    _set_shapes(new)
    return new
