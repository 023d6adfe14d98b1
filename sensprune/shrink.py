"""Physical compression of a filter-pruned model, and its export.

:func:`shrink` turns masks (or masked params) into a smaller network: every
channel group (:mod:`sensprune.dependencies`) whose consumer features are all
masked contributes exactly nothing to the masked model, so it is dropped
everywhere at once: the producers' filters (kernel slices and biases), the
consumers' kernel rows and the per-channel entries of BatchNorm/LayerNorm
params and statistics along the way (and of optimizer-state subtrees shaped
like the params, when given).

The shrunk network is the *original* module applied to the smaller variables
under an ``nn.intercept_methods`` interceptor (:class:`ShrunkModel`) that
computes every ``nn.Dense`` / ``nn.Conv`` / ``nn.ConvTranspose`` directly from its stored kernel with
the layer's geometry (Flax would otherwise insist that the kernel has
``features`` columns). Norm layers infer their sizes from their inputs.

Protocol a model follows to be shrinkable (the zoo follows it):

* channel counts are never hard-coded outside ``features=`` of Dense/Conv:
  flatten with ``x.reshape(x.shape[0], -1)``, not ``x.reshape(b, 512)``;
* no Python control flow on channel counts at apply time (decide structure
  from the module's fields, or from whether a submodule's params exist, e.g.
  ``self.has_variable('params', 'downsample_conv')``);
* linear layers are ``nn.Dense`` / ``nn.Conv`` (grouped and depthwise convs lose
  whole groups: ``feature_group_count`` follows), ``nn.ConvTranspose``,
  ``nn.DenseGeneral`` (no batch dims) or ``nn.Einsum``, each called once per
  forward pass; other params are per-channel vectors (rank 1) or independent
  of the channels.

Attention (``nn.MultiHeadDotProductAttention``) shrinks by whole heads: a
DenseGeneral kernel ``(*in axes, *out axes)`` loses whole slices of each axis
(the q/k/v kernels ``[d, heads, head_dim]`` and the output kernel
``[heads, head_dim, d]`` lose the removed heads), and the module runs with its
original ``num_heads`` field: the head count it computes with is the kernels'.
``Shrunk.meta['fields']`` lists the field values the narrower kernels imply, per
module path, and ``Shrunk.rebuilt()`` a module built with them
(:mod:`sensprune.shrink_fields`).
Groups that would cut a multi-axis kernel into a non-box shape stay (fully
masked, so the outputs do not change).

:func:`shrink` checks the shrunk model against the masked one on the example
input and raises a ``ValueError`` naming this protocol when they disagree.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from sensprune import boxing, masking, paths, shrink_fields
from sensprune import dependencies as deps_lib
from sensprune import shrink_heads as heads
from sensprune import shrink_stacks as stacks
from sensprune.adapter import LayerCall, LinenAdapter, ModelAdapter, as_adapter
from sensprune.geometry import resolve_padding
from sensprune.types import Path

__all__ = [
    "Shrunk",
    "ShrunkModel",
    "load_shrunk",
    "predict_param_count",
    "read_shrunk_meta",
    "removed_for",
    "save_shrunk",
    "shrink",
]

_FORMAT = "sensprune.shrunk/1"
_META_FILE = "shrunk.json"
_VARS_DIR = "variables"


# --------------------------------------------------------------------------- runnable model


def _as_tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _dense(module: nn.Dense, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _over_batch(fn: Callable[[jax.Array], jax.Array], x: jax.Array, rank: int) -> jax.Array:
    """``fn`` on ``x`` with its leading (batch) axes flattened into one, as Flax convs allow any number."""
    batch_shape = x.shape[: x.ndim - rank - 1]
    y = fn(x.reshape((-1,) + x.shape[x.ndim - rank - 1 :]))
    return y.reshape(batch_shape + y.shape[1:])


def _conv(module: nn.Conv, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    window = tuple(kernel.shape[:-2])
    rank = len(window)
    strides = _as_tuple(module.strides, rank)
    input_dilation = _as_tuple(module.input_dilation, rank)
    kernel_dilation = _as_tuple(module.kernel_dilation, rank)
    groups = x.shape[-1] // kernel.shape[-2]  # a grouped conv keeps whole groups: fewer of them

    def one(x: jax.Array) -> jax.Array:
        padding = resolve_padding(
            tuple(module.path), module.padding, x.shape[1:-1], window, strides, kernel_dilation
        )
        x, k, b = promote_dtype(x, kernel, bias, dtype=module.dtype)
        spec = (0, rank + 1) + tuple(range(1, rank + 1))
        dn = lax.ConvDimensionNumbers(spec, (rank + 1, rank) + tuple(range(rank)), spec)
        y = lax.conv_general_dilated(
            x, k, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
            dimension_numbers=dn, feature_group_count=groups, precision=module.precision,
        )
        return y if b is None else y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))

    return _over_batch(one, x, rank)


def _conv_transpose(module: nn.ConvTranspose, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """A Linen ``ConvTranspose`` (``transpose_kernel=False``) from its stored kernel."""
    from sensprune.layer_kinds import transpose_padding

    window = tuple(kernel.shape[:-2])
    rank = len(window)
    strides = _as_tuple(module.strides, rank)
    dilation = _as_tuple(module.kernel_dilation, rank)
    padding = transpose_padding(module.padding, window, strides, dilation)

    def one(x: jax.Array) -> jax.Array:
        x, k, b = promote_dtype(x, kernel, bias, dtype=module.dtype)
        y = lax.conv_transpose(x, k, strides, padding, rhs_dilation=dilation, precision=module.precision)
        return y if b is None else y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))

    return _over_batch(one, x, rank)


def _direct_interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict, call: LayerCall) -> Any:
    """Computes Linen Dense/Conv/DenseGeneral/Einsum calls from their stored (possibly narrower) kernels.

    Other layers (nnx layers compute from their kernels anyway) run as they are.
    """
    module = call.module
    if not isinstance(module, nn.Module):
        out = heads.nnx_direct(module, args, kwargs)
        return next_fun(*args, **kwargs) if out is None else out
    fns: dict[type, Callable[..., jax.Array]] = {
        nn.Dense: _dense, nn.Conv: _conv, nn.ConvTranspose: _conv_transpose, nn.DenseGeneral: heads.dense_general,
        nn.Einsum: heads.einsum,
    }
    fn = fns.get(type(module))
    skip = getattr(module, "transpose_kernel", False) or getattr(module, "batch_dims", ())
    if fn is None or skip or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    kernel = boxing.unbox(module.get_variable("params", "kernel"))
    bias = boxing.unbox(module.get_variable("params", "bias")) if module.use_bias else None
    if isinstance(module, nn.Einsum):
        return heads.einsum(module, x, kernel, bias, args[1] if len(args) > 1 else kwargs.get("einsum_str"))
    return fn(module, x, kernel, bias)


@dataclasses.dataclass(frozen=True)
class ShrunkModel:
    """The original module (or model adapter), run on shrunk variables (``apply`` as for Linen)."""

    module: nn.Module | ModelAdapter

    def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.module, nn.Module):
            return LinenAdapter(self.module).raw_apply(variables, *args, interceptor=_direct_interceptor, **kwargs)
        if len(args) != 1 or kwargs:
            raise ValueError("a shrunk adapter model is applied as apply(variables, x)")
        return self.module.intercept(variables, args[0], _direct_interceptor)


@dataclasses.dataclass
class Shrunk:
    """A physically smaller model.

    Attributes:
      model: :class:`ShrunkModel` (``model.apply(variables, x, train=False)``).
      variables: the smaller variables (params, batch_stats, ...).
      widths: layer name -> ``(in_features, out_features)`` after shrinking.
      kept: layer name -> ``{'in': indices, 'out': indices}`` kept from the original.
      opt_state: the sliced optimizer state (None when not given).
      meta: how to rebuild the module (class path and fields), for export; ``'unshrunk'``:
        kernels left at full size (stacked by ``nn.scan``) and why.
    """

    model: ShrunkModel
    variables: dict
    widths: dict[str, tuple[int, int]]
    kept: dict[str, dict[str, np.ndarray]]
    opt_state: Any = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> Any:
        return self.variables["params"]

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """``model.apply(variables, *args, **kwargs)``."""
        return self.model.apply(self.variables, *args, **kwargs)

    def rebuilt(self) -> nn.Module:
        """The Linen module with the field values of the narrower kernels (``meta['fields']``):
        its plain ``apply(variables, ...)`` runs the shrunk variables (:mod:`sensprune.shrink_fields`)."""
        if not isinstance(self.model.module, nn.Module) or "fields" not in self.meta:
            raise ValueError("only a Linen model shrunk with an example input x has its fields recorded")
        return shrink_fields.rebuild(self.model.module, self.meta["fields"])


# --------------------------------------------------------------------------- which groups go


def _round(deps: deps_lib.DependencyMap, removed: np.ndarray, round_to: int) -> np.ndarray:
    """Restores removed groups until every layer keeps a multiple of ``round_to`` filters.

    Restored groups are fully masked in the model, so they stay zero-contribution
    channels and the outputs are unchanged.
    """
    removed = removed.copy()
    changed = True
    while changed:
        changed = False
        for layer in deps.layers:
            ids = deps.out_group[layer.name]
            gone = (ids >= 0) & removed[np.maximum(ids, 0)]
            missing = -(layer.out_channels - int(gone.sum())) % round_to
            if missing and gone.any():
                restore = list(dict.fromkeys(ids[gone].tolist()))  # channel order
                count = 0
                for gid in restore:
                    if count >= missing:
                        break
                    removed[gid] = False
                    count += int(np.sum(ids == gid))
                changed = True
    return removed


def _kernel_masks(deps: deps_lib.DependencyMap, masks_or_params: Any) -> dict[str, np.ndarray]:
    out = {}
    for layer in deps.layers:
        leaf = np.asarray(paths.get_kernel(masks_or_params, layer))
        out[layer.name] = leaf if leaf.dtype == bool else leaf != 0
    return out


def removed_for(deps: deps_lib.DependencyMap, masks_or_params: Any, round_to: int = 1) -> np.ndarray:
    """bool ``[groups]`` that :func:`shrink` drops for these masks (or masked params)."""
    round_to = deps_lib.check_round_to(round_to)
    removed = deps_lib.removed_groups(deps, _kernel_masks(deps, masks_or_params))
    removed = _round(deps, removed, round_to) if round_to > 1 else removed
    removed = heads.representable(deps, removed)
    while True:  # slices of a scanned stack keep one shape (restoring whole heads keeps boxes)
        uniform = heads.representable(deps, stacks.uniform_stacks(deps, removed))
        if np.array_equal(uniform, removed):
            return removed
        removed = uniform


def _plan(deps: deps_lib.DependencyMap, removed: np.ndarray) -> dict[Path, list[tuple[int, np.ndarray]]]:
    """Variable leaf path (collection first) -> ``[(axis, kept indices), ...]``."""
    keep_in = deps_lib.consumer_masks_for(deps, removed)
    keep_out = deps_lib.producer_masks_for(deps, removed)
    plan: dict[Path, list[tuple[int, np.ndarray]]] = {}
    for layer in deps.layers:
        ki, ko = np.flatnonzero(keep_in[layer.name]), np.flatnonzero(keep_out[layer.name])
        nd = len(layer.kernel_shape)
        kernel, one = ("params",) + paths.kernel_path(layer), stacks.slice_key(layer)  # one: a scan slice's own
        if heads.view_dims(layer) is None:
            plan[kernel + one] = [(nd - 2, ki), (nd - 1, ko)]
            bias_steps = [(0, ko)]
        else:  # a DenseGeneral/Einsum kernel (*in axes, *out axes): whole slices per axis
            plan[kernel + one], bias_steps = heads.view_steps(layer, ki, ko)
        if layer.use_bias:
            plan[("params",) + paths.bias_path(layer) + one] = bias_steps
    return plan


def _plan_variables(plan, deps, removed, variables) -> dict:
    drops = deps_lib.variable_keep(deps, removed)
    for path, drop in drops.items():
        base, index = stacks.split_slice(path)  # a stacked per-channel leaf: the slice's own entries
        leaf = paths.get_path(variables, base)[index] if index else paths.get_path(variables, base)
        n = int(np.shape(leaf)[-1])
        plan[path] = [(len(np.shape(leaf)) - 1, np.setdiff1d(np.arange(n), drop))]
    return plan


def _slice_tree(tree: Any, plan: Mapping[Path, list], prefix: Path = ()) -> Any:
    def one(key_path, leaf):
        path = prefix + tuple(str(getattr(k, "key", k)) for k in key_path)
        steps = plan.get(path)
        per_slice = None if steps else stacks.stacked_steps(plan, path)
        if per_slice:
            return jnp.asarray(stacks.slice_stacked(leaf, per_slice))
        if not steps:
            return leaf
        host = np.asarray(leaf)
        for axis, idx in steps:
            if len(idx) != host.shape[axis]:
                host = np.take(host, idx, axis=axis)
        return jnp.asarray(host) if host.shape != np.shape(leaf) else leaf

    return jax.tree_util.tree_map_with_path(one, tree)


def _slice_opt_state(opt_state: Any, params: Any, plan: Mapping[Path, list]) -> Any:
    """Slices every subtree of ``opt_state`` with the structure of ``params``."""
    treedef = jax.tree_util.tree_structure(params)

    def params_like(node: Any) -> bool:
        return isinstance(node, Mapping) and jax.tree_util.tree_structure(node) == treedef  # type: ignore[operator]

    return jax.tree_util.tree_map(
        lambda node: _slice_tree(node, plan, ("params",)) if params_like(node) else node,
        opt_state,
        is_leaf=params_like,
    )


def predict_param_count(deps: deps_lib.DependencyMap, params: Any, masks_or_params: Any, round_to: int = 1) -> int:
    """Entries of the shrunk params, from shapes, masks and groups alone.

    Per layer ``kept_in * window * kept_out`` (+ ``kept_out`` bias); a
    per-channel leaf loses its entries in removed groups; everything else keeps
    its size.
    """
    removed = removed_for(deps, masks_or_params, round_to)
    keep_in = deps_lib.consumer_masks_for(deps, removed)
    keep_out = deps_lib.producer_masks_for(deps, removed)
    drops = deps_lib.variable_keep(deps, removed)
    special: dict[Path, int] = {}
    for layer in deps.layers:
        kin, kout = int(keep_in[layer.name].sum()), int(keep_out[layer.name].sum())
        kernel = paths.kernel_path(layer)  # the slices of a scanned stack add up
        special[kernel] = special.get(kernel, 0) + kin * layer.window_size * kout
        if layer.use_bias:
            special[paths.bias_path(layer)] = special.get(paths.bias_path(layer), 0) + kout
    total = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        shape = np.shape(leaf)
        if path in special:
            total += special[path]
        elif ("params",) + path in drops:
            total += int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] - len(drops[("params",) + path]))
        else:
            total += int(np.prod(shape, dtype=np.int64))
    return total


# --------------------------------------------------------------------------- shrink


def _module_meta(model: nn.Module) -> dict:
    cls = type(model)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        try:
            json.dumps(value)
        except TypeError:
            return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": None}
        fields[f.name] = value
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def shrink(
    model: nn.Module | ModelAdapter,
    variables: Mapping[str, Any],
    masks_or_params: Any,
    *,
    x: Any = None,
    deps: Optional[deps_lib.DependencyMap] = None,
    round_to: int = 1,
    opt_state: Any = None,
    check: bool = True,
    atol: float = 1e-4,
    info: Optional[Mapping[str, Any]] = None,
    method: Any = None,
    **apply_kwargs: Any,
) -> Shrunk:
    """Physically removes the fully masked channel groups of a filter-pruned model.

    Args:
      model: the Linen module (or a model adapter, e.g. of an nnx model).
      variables: its (dense-shaped) variables; ``params`` may be dense or pruned.
      masks_or_params: bool masks (``PruneResult.masks``) or pruned params
        (``PruneResult.params``; zeros = pruned), with the structure of params.
      x: an example input (needed unless ``deps`` is given; also used by ``check``).
      deps: a precomputed :func:`sensprune.dependencies.analyze` result.
      round_to: keep a multiple of this many filters per layer (e.g. 8 for GPUs,
        128 for TPUs); extra channels are fully masked ones (outputs unchanged).
      opt_state: optional optimizer state; subtrees shaped like params are sliced.
      check: compare shrunk and masked outputs on ``x`` (raises ``ValueError``).
      atol: tolerance of that check (relative to the output scale).
      info: optional JSON-serialisable metadata saved with the model
        (``Shrunk.meta['info']``, :func:`read_shrunk_meta`), e.g. how the caller
        rebuilds its module before :func:`load_shrunk`.
      method, apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=False``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection (as returned by model.init)")
    boxed = variables  # partitioned params (sensprune.boxing): sliced as arrays, given back in their boxes
    variables, masks_or_params = boxing.unbox_variables(variables), boxing.unbox(masks_or_params)
    opt_state = boxing.unbox(opt_state)
    adapter = as_adapter(model, method, apply_kwargs)
    if deps is None:
        if x is None:
            raise ValueError("shrink needs x (an example input) or deps (a DependencyMap)")
        first = jax.tree_util.tree_map(lambda a: a[:1], x)
        deps = deps_lib.analyze(adapter, variables, first)
    leaves = jax.tree_util.tree_leaves(masks_or_params)
    if all(np.asarray(leaf).dtype == bool for leaf in leaves):
        masking.check_same_structure(variables["params"], masks_or_params, what="masks_or_params")
        params = masking.apply_masks(variables["params"], masks_or_params)
    else:
        _check_params_like(variables["params"], masks_or_params)
        params = masks_or_params
    removed = removed_for(deps, masks_or_params, round_to)
    plan = _plan_variables(_plan(deps, removed), deps, removed, variables)
    masked_vars = {**variables, "params": params}
    small = {col: _slice_tree(tree, plan, (col,)) for col, tree in masked_vars.items()}
    small_opt = None if opt_state is None else _slice_opt_state(opt_state, params, plan)
    keep_in = deps_lib.consumer_masks_for(deps, removed)
    keep_out = deps_lib.producer_masks_for(deps, removed)
    kept = {
        layer.name: {"in": np.flatnonzero(keep_in[layer.name]), "out": np.flatnonzero(keep_out[layer.name])}
        for layer in deps.layers
    }
    widths = {name: (int(k["in"].size), int(k["out"].size)) for name, k in kept.items()}
    linen = adapter.model if isinstance(adapter, LinenAdapter) else None
    meta = {"module": _module_meta(linen), "apply_kwargs": _jsonable(apply_kwargs)} if linen is not None else {}
    if x is not None:
        unshrunk = stacks.unshrunk_stacks(adapter, variables, jax.tree_util.tree_map(lambda a: a[:1], x), deps)
        if unshrunk:
            meta["unshrunk"] = unshrunk
    if info is not None:
        try:
            meta["info"] = json.loads(json.dumps(dict(info)))
        except TypeError as err:
            raise ValueError(f"info must be JSON-serialisable: {err}") from None
    if linen is not None and x is not None:  # the fields the narrower kernels imply (shrink_fields)
        first = jax.tree_util.tree_map(lambda a: a[:1], x)
        meta["fields"] = shrink_fields.new_fields(
            lambda v, x: adapter.intercept(v, x, _direct_interceptor), small, first)
    shrunk = Shrunk(ShrunkModel(linen if linen is not None else adapter), small, widths, kept, small_opt, meta)
    if check and x is not None:
        _check(adapter, masked_vars, small, x, atol)
    shrunk.variables = {col: boxing.rebox_like(boxed[col], tree) for col, tree in small.items()}
    return shrunk


def _check_params_like(params: Any, other: Any) -> None:
    a = jax.tree_util.tree_flatten_with_path(params)[0]
    b = jax.tree_util.tree_flatten_with_path(other)[0]
    if [p for p, _ in a] != [p for p, _ in b] or any(np.shape(x) != np.shape(y) for (_, x), (_, y) in zip(a, b)):
        raise ValueError(
            "masks_or_params must be bool masks or pruned params with the structure and shapes of variables['params']"
        )


def _jsonable(kwargs: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            pass
    return out


def _check(adapter: ModelAdapter, masked_vars: Mapping[str, Any], small: Mapping[str, Any], x: Any,
           atol: float) -> None:
    """Raises ``ValueError`` unless the shrunk variables give the masked model's outputs on ``x``."""
    name = type(getattr(adapter, "model", adapter)).__name__
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 (~1e-3 relative)
        try:
            got = jax.jit(lambda v, x: adapter.intercept(v, x, _direct_interceptor))(small, x)
        except Exception as err:  # flax / shape errors of many kinds
            raise ValueError(
                f"the shrunk {name} does not run ({type(err).__name__}: {err}); the model must "
                "follow the shrink protocol (see sensprune.shrink: no hard-coded channel counts, no control "
                "flow on channel counts)"
            ) from err
        want = jax.jit(adapter.apply)(masked_vars, x)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = 1.0 + float(np.max(np.abs(a))) if a.size else 1.0
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=atol * scale):
            raise ValueError(
                f"the shrunk {name} disagrees with the masked model on x "
                f"(max abs diff {float(np.max(np.abs(a - b))) if a.shape == b.shape else 'shape mismatch'}); "
                "the model must follow the shrink protocol (see sensprune.shrink)"
            )


# --------------------------------------------------------------------------- export


def save_shrunk(path: str | os.PathLike, shrunk: Shrunk) -> None:
    """Writes ``shrunk`` to the directory ``path`` (orbax arrays + JSON metadata)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, boxing.unbox(shrunk.variables))  # boxes: their arrays
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, _VARS_DIR), variables, force=True)
    checkpointer.wait_until_finished()
    meta = {
        "format": _FORMAT,
        "widths": {k: list(v) for k, v in shrunk.widths.items()},
        "kept": {k: {s: v[s].tolist() for s in ("in", "out")} for k, v in shrunk.kept.items()},
        **shrunk.meta,
    }
    with open(os.path.join(path, _META_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build_module(meta: dict, model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is not None and not isinstance(model, str) and callable(model):
        return model()
    if model is not None:
        raise ValueError(
            f"model must be None, a Linen module or a zero-argument factory, got {type(model).__name__} "
            "(resolve model names, e.g. of a model zoo, before calling load_shrunk)"
        )
    fields = (meta.get("module") or {}).get("fields")
    cls_path = (meta.get("module") or {}).get("class")
    if not cls_path or fields is None:
        raise ValueError("the saved model cannot be rebuilt from its metadata; pass model= (a module or a factory)")
    module_name, _, qualname = cls_path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot import the saved model class {cls_path!r} ({err}); pass model= (a module or a factory)"
        ) from None
    return obj(**{k: _tuples(v) for k, v in fields.items()})


def read_shrunk_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model saved by :func:`save_shrunk` (``'info'``: what ``shrink(info=...)`` stored)."""
    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, _META_FILE)
    if not os.path.isfile(meta_file):
        raise ValueError(f"{path!r} is not a saved shrunk model: {_META_FILE} is missing")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{meta_file!r} is corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_file!r} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {_FORMAT!r}")
    return meta


def load_shrunk(path: str | os.PathLike, model: Optional[nn.Module | Callable[[], nn.Module]] = None) -> Shrunk:
    """Loads a model saved by :func:`save_shrunk`, without the original dense params.

    Args:
      path: the directory written by :func:`save_shrunk`.
      model: ``None`` (rebuild the module from the saved class and fields), a
        Linen module or a zero-argument factory returning one (e.g. built from
        ``read_shrunk_meta(path)['info']``).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = read_shrunk_meta(path)
    vars_dir = os.path.join(path, _VARS_DIR)
    if not os.path.isdir(vars_dir):
        raise ValueError(f"{path!r} is not a complete saved shrunk model: {_VARS_DIR}/ is missing")
    try:
        variables = ocp.StandardCheckpointer().restore(vars_dir)
    except Exception as err:  # orbax raises many error types for damaged checkpoints
        raise ValueError(f"cannot read the variables in {vars_dir!r}: {type(err).__name__}: {err}") from err
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    module = _build_module(meta, model)
    widths = {k: tuple(v) for k, v in meta.get("widths", {}).items()}
    kept = {k: {s: np.asarray(v[s], np.int64) for s in ("in", "out")} for k, v in meta.get("kept", {}).items()}
    extra = {k: v for k, v in meta.items() if k in ("module", "info", "apply_kwargs", "fields")}
    return Shrunk(ShrunkModel(module), dict(variables), widths, kept, None, extra)
