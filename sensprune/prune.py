"""The one entry point: ``prune(model, variables, data, method=..., keep_ratio=...)``."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sensprune import boxing, counting, layer_kinds, masking, paths, reach, registry, validation, zeroing
from sensprune import budget as budget_lib
from sensprune import group_leftovers as leftovers
from sensprune import points as points_lib
from sensprune.context import PruneContext
from sensprune.sensitivity import resolve_contraction
from sensprune.types import Layer, PruneResult


def default_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def _as_points(data: Any) -> Any:
    """The points of S (:mod:`sensprune.points`): an array, a tuple of positional arguments, a pytree."""
    if isinstance(data, np.ndarray) or not isinstance(data, (list, tuple, dict)) and hasattr(data, "shape"):
        data = np.asarray(data)
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(
                f"data must be an array of points [N, *input_shape] with N >= 1 (or a list of such batches), "
                f"got shape {data.shape}"
            )
        return data
    return points_lib.as_points(data)


def _shapes(points: Any) -> Any:
    """Per-point shapes of the leaves of ``points``, for messages."""
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)[1:]), points)


def _kernel_masks_tree(params, layers: Sequence[Layer], masks: Mapping[str, np.ndarray]):
    tree = masking.ones_like_masks(params)
    for layer in layers:
        if layer.name in masks:
            tree = _set_kernel_on_host(tree, layer, np.asarray(masks[layer.name], bool))
    return tree


def _set_kernel_on_host(tree, layer: Layer, value: np.ndarray):
    """``paths.set_kernel`` with a NumPy value, then the leaf placed on the device: a kernel view
    (e.g. DenseGeneral's) reshapes on the host, not in an eager program compiled per shape."""
    tree = paths.set_kernel(tree, layer, value)
    path = paths.kernel_path(layer)
    return paths.set_path(tree, path, jax.device_put(paths.get_path(tree, path)))


def _pruned_params(params, layers: Sequence[Layer], sel: registry.Selection):
    for layer in layers:
        kernel = paths.get_kernel(params, layer)
        new = np.asarray(sel.kernels.get(layer.name, kernel)) * sel.masks[layer.name]
        if layer.name in sel.scales:
            new = new * np.asarray(sel.scales[layer.name])
        params = _set_kernel_on_host(params, layer, np.asarray(new, kernel.dtype))
    return params


def search_selection(
    ctx: PruneContext,
    spec: registry.Method,
    target: float,
    key: Optional[jax.Array],
    *,
    rtol: float = 0.005,
    options: Optional[Mapping[str, Any]] = None,
    zero_dead: bool = True,
) -> tuple[registry.Selection, int, int, bool, int]:
    """The keep-ratio search of :func:`prune`, on an existing context.

    Finds the nominal kernel budget whose selection brings the model's size
    (nonzero params outside the prunable kernels + each layer's
    ``Selection.layer_size``) to ``target`` within ``rtol``. With ``zero_dead``
    each selection first loses its parameters of exactly zero gradient over S
    (:mod:`sensprune.zeroing`), so the size counts what that zeroing freed.

    Returns:
      ``(selection, nominal budget, achieved size, reachable, select calls)``.
    """
    alive = ctx.alive()
    kernel_alive = int(sum(int(a.sum()) for a in alive.values()))
    fixed = counting.count_nonzero(ctx.params) - kernel_alive
    selections: dict[int, registry.Selection] = {}

    def achieved(b: int) -> int:
        if b not in selections:
            selections[b] = spec.select(ctx, b, key, **dict(options or {}))
            if len(selections) == 1:  # the pass over S ran: its numbers must be finite
                validation.check_finite_sensitivities(ctx.computed_sensitivities(), spec.name, selections[b].scores)
            if zero_dead:
                selections[b] = zeroing.apply(ctx, selections[b], structured=spec.structured)
            if spec.structured:  # removed groups take their biases and norm channels along
                selections[b] = leftovers.apply(ctx, selections[b])
        sel = selections[b]
        freed = zeroing.zeroed_other(sel) + leftovers.removed_other(sel)
        return fixed - freed + int(sum(sel.layer_size(name) for name in sel.masks))

    if zero_dead and spec.retrainable:  # masks only: its gradient program compiles alongside the pass
        zeroing.compile_ahead(ctx)
    guess = int(round(target - fixed))
    chosen, size, ok = budget_lib.search_budget(achieved, target, guess, kernel_alive, rtol=rtol)
    return selections[chosen], chosen, size, ok, len(selections)


def prune(
    model: Any,
    variables: Mapping[str, Any],
    data: Any,
    *,
    method: str,
    keep_ratio: float,
    key: Optional[jax.Array] = None,
    labels: Optional[Any] = None,
    loss_fn: Optional[Callable[[Any, Any], jax.Array]] = None,
    delta: float = 1e-16,
    c_constant: float = 3.0,
    chunk_size: int = 32,
    reference_size: Optional[int] = None,
    rtol: float = 0.005,
    layers: Optional[Sequence[Layer]] = None,
    protect_input_channels: bool = True,
    apply_method: Any = None,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
    mesh: Any = None,
    method_options: Optional[Mapping[str, Any]] = None,
    fused_pass: bool = False,
    contraction: str = "auto",
    allow_dead_layers: bool = False,
    include: layer_kinds.LayerFilter = None,
    exclude: layer_kinds.LayerFilter = None,
    zero_dead: bool = True,
) -> PruneResult:
    """Prunes the Dense/Conv kernels of a Flax Linen model to a keep ratio.

    Args:
      model: a ``flax.linen.Module``, or a model adapter (:mod:`sensprune.adapter`;
        e.g. ``sensprune.nnx.adapter(nnx_model)``), which already says how to call it.
      variables: its variables, with a ``'params'`` collection (and e.g.
        ``'batch_stats'``, used as is).
      data: the points of S (:mod:`sensprune.points`): an array ``[N, *input_shape]``;
        a tuple is the positional arguments of ``__call__`` (e.g. ``(inputs, targets)``
        of an encoder-decoder, each ``[N, ...]``); any other pytree (a dict) is one
        argument; a list is a list of batches of these.
      method: a registered method name (see ``sensprune.available_methods()``).
      keep_ratio: fraction of all parameters (nonzero entries, biases and norm
        parameters included) to keep, in (0, 1], relative to ``reference_size``.
      key: ``jax.random`` key, required by sampling methods.
      labels, loss_fn: labels of S and ``loss_fn(outputs, labels)`` for
        gradient-based methods (default loss: softmax cross-entropy).
      delta, c_constant: failure probability and constant C of the bounds.
      chunk_size: points per chunk in the sensitivity pass (memory bound).
      reference_size: parameter count the ratio refers to; default: every
        entry of ``params`` (the dense size). Pass the original dense count to
        prune an already pruned model further ("cascade").
      rtol: relative tolerance of the achieved size.
      layers: precomputed ``find_layers`` result (optional).
      protect_input_channels: filter methods keep the input channels of layers
        that read the model input.
      apply_method, apply_kwargs: forwarded to ``model.apply`` (e.g.
        ``apply_kwargs={'train': False}``).
      mesh: optional ``jax.sharding.Mesh`` (``sensprune.sharding.data_mesh()``):
        the sensitivity pass runs data-parallel, S split over all its devices.
      method_options: keyword options of the method's select function, e.g.
        ``{'joint': 'mean', 'round_to': 8}`` for ``ft``/``softnet``
        (``sensprune.method_options(method)`` lists them).
      fused_pass: run the sensitivity pass as one compiled program (one
        dispatch; for accelerators, see ``compute_sensitivities(fused=...)``).
      contraction: strategy of the sensitivity kernels' (max, x) contraction,
        one of ``sensprune.sensitivity.CONTRACTIONS`` (``'auto'`` picks by backend).
      allow_dead_layers: let the selection leave a layer without any weight
        (or channel); by default that, and a keep ratio below the smallest
        reachable one (:mod:`sensprune.reach`), raise ``ValueError``.
      include, exclude: which layers to prune, by name (``'/'.join(path)``): a regex
        (``re.search``), a predicate ``name -> bool`` or a list of names; e.g.
        ``exclude='Embed|head'``. The others stay dense and count as fixed size.
      zero_dead: as the reference (on by default; ``False`` turns it off), also
        zero every kernel entry and bias of the pruned layers whose gradient
        over S (the loss's with ``labels``, else a label-free surrogate) is
        exactly zero (filter methods: whole filters and input channels), inside
        the keep-ratio search, so the freed budget goes to entries that matter
        (:mod:`sensprune.zeroing`; embeddings, norms and dense layers are never
        zeroed). Low-rank methods are unaffected. A model JAX cannot
        reverse-differentiate (e.g. a layer inside ``nn.while_loop``) is not
        zeroed: one warning, and ``result.info['zero_dead'] = {'skipped': reason}``.

    Linear layers that cannot be scored (e.g. ``nn.ConvLocal``), layers the
    filters leave out, and (for filter methods) layers whose channels the
    dependency analysis does not map (attention projections, grouped convs,
    shared layers) stay dense: ``result.info['dense_layers']`` maps their names
    to the reason, and one log line lists them.

    Returns:
      A :class:`~sensprune.types.PruneResult`.
    """
    from sensprune.layers import find_layers

    spec = registry.get_method(method)
    method_options = registry.check_options(spec, method_options)
    keep_ratio = budget_lib.validate_keep_ratio(keep_ratio)
    resolve_contraction(contraction)  # bad names fail before any work
    key = validation.check_key(key)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection (as returned by model.init)")
    boxed_params = variables["params"]  # boxed (partitioned) params: results come back in the same boxes
    variables = boxing.unbox_variables(variables)
    if spec.stochastic and key is None:
        raise ValueError(f"method {method!r} samples: pass key=jax.random.PRNGKey(seed)")
    if spec.needs_labels and labels is None:
        raise ValueError(f"method {method!r} needs labels of the points in data (labels=...)")
    points = _as_points(data)
    validation.check_finite_points([points])
    apply_kwargs = dict(apply_kwargs or {})
    params = variables["params"]
    validation.check_finite_params(variables)
    dense: dict[str, str] = {}
    if layers is None:
        try:
            layers, dense = layer_kinds.discover(
                model, variables, points_lib.take(points, 0, 1), apply_method, apply_kwargs, find_layers
            )
        except (flax.errors.FlaxError, NameError) as err:
            explained = validation.explain_apply_error(err, model, _shapes(points))
            if explained is None:
                raise
            raise explained from err
    layers, dense = layer_kinds.choose_layers(layers, dense, include, exclude, spec.structured)
    ctx = PruneContext(
        model=model,
        variables=variables,
        layers=layers,
        data=points,
        labels=None if labels is None else np.asarray(labels),
        loss_fn=loss_fn or default_loss,
        delta=delta,
        c_constant=c_constant,
        chunk_size=chunk_size,
        apply_kwargs=apply_kwargs,
        apply_method=apply_method,
        protect_input_channels=protect_input_channels,
        mesh=mesh,
        fused_pass=bool(fused_pass),
        contraction=contraction,
    )
    validation.check_deterministic(ctx.adapter, variables, points_lib.take(points, 0, 2))
    reference = int(reference_size) if reference_size is not None else counting.count_params(params)
    if keep_ratio == 1.0 or not layers:  # keeps everything (zero-initialised biases are not "pruned")
        kept_all = validation.keep_everything(params, layers, reference, method, rtol)
        kept_all = layer_kinds.report_dense(kept_all, dense, reachable=bool(layers) or None)
        return boxing.rebox_result(kept_all, boxed_params)
    if not allow_dead_layers:
        reach.check_reachable(method, keep_ratio, reference, params, layers, ctx.alive(), spec.structured, rtol)
    sel, chosen, size, ok, searches = search_selection(
        ctx, spec, keep_ratio * reference, key, rtol=rtol, options=method_options, zero_dead=zero_dead
    )
    if not allow_dead_layers:
        reach.check_no_dead_layers(method, sel.masks, sel.sizes, ctx.alive(), spec.structured, keep_ratio)
    if not ok:
        logging.warning(
            "prune(%s): keep_ratio %.4f not reachable within %.2f%%; achieved %.4f",
            method, keep_ratio, 100 * rtol, size / reference,
        )
    new_params = _pruned_params(params, layers, sel)
    masks = _kernel_masks_tree(params, layers, sel.masks)
    new_params, masks, zeroed = zeroing.zero_params(new_params, masks, sel)
    new_params, masks = leftovers.zero_params(new_params, masks, sel)
    kept = {layer.name: sel.layer_size(layer.name) for layer in layers}
    info = dict(sel.info)
    info.update(group_leftovers=leftovers.removed_other(sel))
    info.update(zero_dead=zeroed, nominal_budget=chosen, reachable=ok, searches=searches, method=method,
                dense_layers=dense)
    size = counting.count_nonzero(new_params)
    flops = counting.flops(new_params, layers)
    if sel.sizes or sel.flops:
        # Rewritten layers (e.g. low rank) cost what the method says, not their nonzeros.
        nnz = counting.layer_nonzero(new_params, layers)
        size += sum(kept[name] - nnz[name] for name in sel.sizes)
        by_layer = {layer.name: layer for layer in layers}
        flops += sum(sel.flops[name] - nnz[name] * counting.mac_positions(by_layer[name]) for name in sel.flops)
    return boxing.rebox_result(PruneResult(
        params=new_params,
        masks=masks,
        keep_ratio=size / reference,
        target_keep_ratio=keep_ratio,
        layer_kept=kept,
        layer_total={layer.name: layer.kernel_size for layer in layers},
        flops=flops,
        flops_dense=counting.dense_flops(layers),
        sensitivities=dict(sel.scores),
        info=info,
    ), boxed_params)
