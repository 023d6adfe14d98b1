"""Input checks of :func:`sensprune.prune`: nothing silently wrong.

Every check raises a ``ValueError`` that names what is wrong and where (the
points of S, the param path, the layer), before any expensive work where
possible:

* :func:`check_key` - a ``jax.random`` key (``jax.random.PRNGKey(seed)`` or
  ``jax.random.key(seed)``), not a plain integer.
* :func:`check_finite_points` - no NaN/inf in the points of S (any pytree of
  arrays; integer leaves, e.g. token ids, are finite by construction).
* :func:`check_finite_params` - no NaN/inf in the variables.
* :func:`check_finite_sensitivities` - after the pass over S: no NaN/inf in the
  sensitivities or scores a method computed (e.g. a diverged model whose
  activations overflow).

* :func:`check_deterministic` - the pass over S is not random (``rngs`` given
  and the outputs depend on them: Dropout active).
* :func:`explain_apply_error` - what to do about the first model call's error
  (a missing dropout rng or an unbound BatchNorm axis: ``train=False``);
  :func:`layer_advice` names a way forward for layer kinds that are not pruned.

:func:`keep_everything` builds the result of ``keep_ratio=1``: nothing pruned.
(The keep ratio itself is checked by :func:`sensprune.budget.validate_keep_ratio`,
which refuses booleans and strings.)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from sensprune.types import Layer, PruneResult

__all__ = [
    "check_finite_params",
    "check_finite_points",
    "check_finite_sensitivities",
    "check_deterministic",
    "check_key",
    "explain_apply_error",
    "keep_everything",
    "layer_advice",
]

_LISTED = 8


def _listing(items: Sequence[Any], total: Optional[int] = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:_LISTED])
    return shown + (f", ... ({total} in all)" if total > _LISTED else "")


def check_key(key: Any, field: str = "key") -> Any:
    """``key`` if it is a ``jax.random`` key (typed, or a raw uint32 key array)."""
    if key is None:
        return None
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
            return key
        if np.dtype(dtype) == np.uint32 and len(shape) == 1 and shape[0] >= 2:
            return key
    what = type(key).__name__ if dtype is None else f"{type(key).__name__} of dtype {dtype} and shape {shape}"
    raise ValueError(
        f"{field} must be one jax.random key, e.g. jax.random.PRNGKey(seed) or jax.random.key(seed); "
        f"got {what}" + (f" ({key!r})" if isinstance(key, (int, float, str)) else "")
    )


def _float_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """(path, host array) of the floating / complex leaves of ``tree``."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            leaf = np.asarray(leaf)
            dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, np.inexact):
            name = jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"
            out.append((name, leaf))
    return out


def check_finite_points(data: Any, field: str = "data") -> None:
    """Raises if a point of S holds NaN or inf, naming the point indices.

    ``data`` is an array ``[N, ...]``, a list of such batches or any pytree of
    them (the leading axis indexes points); integer leaves are skipped.
    """
    batches = data if isinstance(data, list) else [data]  # a tuple: the arguments of one batch
    offset = 0
    bad: list[int] = []
    where: set[str] = set()
    for batch in batches:
        n = None
        for name, leaf in _float_leaves(batch):
            a = np.asarray(leaf)
            if a.ndim == 0:
                if not np.isfinite(a):
                    raise ValueError(f"{field} {name} is not finite: {a}")
                continue
            n = a.shape[0] if n is None else n
            ok = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if not ok.all():
                bad.extend(int(i) + offset for i in np.flatnonzero(~ok))
                where.add(name)
        if n is None:
            leaves = jax.tree_util.tree_leaves(batch)
            n = int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0
        offset += n
    if bad:
        bad = sorted(set(bad))
        location = "" if where <= {"<root>"} else f" (in {', '.join(sorted(where))})"
        raise ValueError(
            f"{field}: {len(bad)} of {offset} points hold NaN or inf{location}: point indices {_listing(bad)}; "
            "sensitivities over non-finite points are meaningless (drop or repair those points)"
        )


@jax.jit
def _non_finite_counts(leaves: list) -> list:
    import jax.numpy as jnp

    return [jnp.sum(~jnp.isfinite(x)) for x in leaves]


def check_finite_params(variables: Mapping[str, Any], field: str = "variables") -> None:
    """Raises if a leaf of ``variables`` holds NaN or inf, naming the param paths."""
    leaves = _float_leaves(variables)
    # On the device, one compiled program for the tree (params may be split over a mesh);
    # only the counts come back.
    from sensprune.counting import host_readable

    on_host = all(not isinstance(leaf, jax.Array) or host_readable(leaf) for _, leaf in leaves)
    counts = (
        [int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf)))) for _, leaf in leaves]
        if on_host  # no compile for single-device params (issue #18)
        else jax.device_get(_non_finite_counts([leaf for _, leaf in leaves]))
    )
    bad = [f"{name} ({int(c)} of {int(np.size(leaf))} entries)" for (name, leaf), c in zip(leaves, counts) if c]
    if bad:
        raise ValueError(
            f"{field} hold NaN or inf at {_listing(bad)}; the model has diverged or was loaded wrongly "
            "(prune a model with finite parameters)"
        )


def check_finite_sensitivities(
    sensitivities: Mapping[str, Mapping[str, Any]], method: str, scores: Optional[Mapping[str, Any]] = None
) -> None:
    """Raises if the per-layer sensitivities a method used (reduction -> layer name -> value, as
    :meth:`~sensprune.context.PruneContext.computed_sensitivities` gives them) or its scores are not finite."""
    sensitivities = {**dict(sensitivities), "scores": dict(scores or {})}
    bad: dict[str, int] = {}

    def visit(layer: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(k, v)
            return
        fields = [getattr(value, f) for f in ("weight", "channel") if hasattr(value, f)] or [value]
        for v in fields:
            a = np.asarray(jax.device_get(v))
            if a.dtype.kind in "fc":
                count = int(a.size - np.isfinite(a).sum())
                if count:
                    bad[layer] = bad.get(layer, 0) + count

    for k, v in sensitivities.items():
        visit(str(k), v)
    if bad:
        layers = [f"{name} ({count} entries)" for name, count in bad.items()]
        raise ValueError(
            f"prune(method={method!r}): the sensitivities over S are NaN or inf in layer(s) {_listing(layers)}; "
            "the model's activations overflow on these points (a diverged model?)"
        )


def keep_everything(params: Any, layers: Sequence[Layer], reference: int, method: str,
                    rtol: float = 0.005) -> PruneResult:
    """The result of ``keep_ratio=1``: nothing pruned (already pruned kernel entries stay pruned).

    Kept size = every entry of ``params`` but the kernel entries already zero,
    so a fresh model (zero-initialised biases included) reports exactly 1.
    """
    import jax.numpy as jnp

    from sensprune import counting, masking, paths

    masks = masking.ones_like_masks(params)
    kept, total, dead = {}, {}, 0
    for layer in layers:
        alive = np.asarray(paths.get_kernel(params, layer)) != 0
        masks = paths.set_kernel(masks, layer, jnp.asarray(alive))
        kept[layer.name] = int(alive.sum())
        total[layer.name] = layer.kernel_size
        dead += alive.size - kept[layer.name]
    size = counting.count_params(params) - dead
    return PruneResult(
        params=params,
        masks=masks,
        keep_ratio=size / reference,
        target_keep_ratio=1.0,
        layer_kept=kept,
        layer_total=total,
        flops=counting.flops(params, layers),
        flops_dense=counting.dense_flops(layers),
        sensitivities={},
        info=dict(nominal_budget=sum(kept.values()), reachable=abs(size - reference) <= rtol * reference,
                  searches=0, method=method),
    )


# --------------------------------------------------------------------------- errors of the model call

_TRAIN_HINT = (
    "run the model deterministically in the pass over S: apply_kwargs={'train': False} (or "
    "deterministic=True / use_running_average=True, whatever your __call__ takes)"
)


def explain_apply_error(err: BaseException, model: Any, shapes: Any) -> Optional[ValueError]:
    """A ``ValueError`` that says what to do about an error of the model's first call on S (None: unknown).

    * a missing random stream (``flax.errors.InvalidRngError``: Dropout without an rng) is not a
      variables mismatch: the model runs in training mode;
    * JAX's ``unbound axis name`` (BatchNorm / ``lax.pmean`` with ``axis_name``) means the same;
    * other Flax errors: the variables do not match the model.
    """
    import flax

    name = type(model).__name__
    text = str(err)
    if isinstance(err, flax.errors.InvalidRngError) or "needs PRNG" in text:
        return ValueError(
            f"{name} asks for a random number stream on S ({text.split(' (https')[0]}): it runs in training "
            f"mode (e.g. Dropout). Sensitivities must not be random: {_TRAIN_HINT}."
        )
    if isinstance(err, NameError) and "unbound axis name" in text:
        return ValueError(
            f"{name} reduces over a named axis on S ({text.split('.')[0]}), e.g. nn.BatchNorm(axis_name=...) in "
            f"training mode, which only works inside pmap / shard_map: {_TRAIN_HINT}, so that batch statistics "
            "come from the stored running averages."
        )
    if isinstance(err, flax.errors.FlaxError):
        return ValueError(f"variables do not match the model {name} on points of shape {shapes}: {err}")
    return None


def check_deterministic(adapter: Any, variables: Mapping[str, Any], x: Any) -> None:
    """Refuses a pass over S that is random: ``rngs`` given to ``apply`` and the outputs depend on them.

    The model is run twice on ``x`` (a few points) with different keys for every
    random stream; different outputs mean Dropout (or another stochastic layer)
    is active and the sensitivities would be random.
    """
    from sensprune.adapter import LinenAdapter

    if not isinstance(adapter, LinenAdapter):
        return
    kwargs = adapter.apply_kwargs
    rngs = kwargs.get("rngs")
    if rngs is None:
        return
    if not isinstance(rngs, Mapping):
        rngs = {"params": rngs}
    outs = []
    for salt in (1, 2):
        other = {stream: jax.random.fold_in(key, salt) for stream, key in rngs.items()}
        again = LinenAdapter.create(adapter.model, adapter.method, {**kwargs, "rngs": other})
        outs.append(jax.tree_util.tree_leaves(again.apply(variables, x)))
    if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*outs)):
        raise ValueError(
            f"{type(adapter.model).__name__} is random on S: with apply_kwargs rngs={sorted(rngs)} its outputs "
            f"change with the keys (Dropout or another stochastic layer is active), so the sensitivities would "
            f"be random. {_TRAIN_HINT[0].upper() + _TRAIN_HINT[1:]}, and drop 'rngs'."
        )


_LAYER_ADVICE = {
    "ConvLocal": (
        "nn.ConvLocal has its own kernel at every output position (no weight sharing), which the "
        "sensitivity kernels do not cover. Use nn.Conv for layers you want pruned; to prune the rest of "
        "the model, move the ConvLocal out of the pruned module (apply it in a separate module before or "
        "after it)"
    ),
    "OptimizedLSTMCell": (
        "nn.OptimizedLSTMCell keeps its gate kernels in fused DenseParams, not nn.Dense, so they stay dense "
        "and count as fixed parameters. To prune the input side, project the whole sequence with one "
        "nn.Dense(4 * hidden) before the recurrence (a Dense called once, on [B, T, features]) and feed "
        "the cell the projected gates"
    ),
}


def layer_advice(module: Any) -> str:
    """What to do about a layer kind sensprune cannot prune ('' when there is no advice)."""
    for cls in type(module).__mro__:
        if cls.__name__ in _LAYER_ADVICE:
            return _LAYER_ADVICE[cls.__name__]
    return ""


_WARNED: set[str] = set()


def warn_fixed_layer(module: Any, path: Any) -> None:
    """Logs once per kind that a layer with parameters stays dense, and how to prune it instead."""
    kind = type(module).__name__
    advice = layer_advice(module)
    if advice and kind == "OptimizedLSTMCell" and kind not in _WARNED:
        from absl import logging

        _WARNED.add(kind)
        logging.warning("layer %s is not pruned: %s.", "/".join(path) or kind, advice)
