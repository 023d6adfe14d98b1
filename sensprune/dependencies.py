"""Channel dependencies of a Flax Linen model, found from its jaxpr.

Which output channels of which prunable layers (and which channels of the model
input) feed each input feature of each layer and the model output? We answer it
for any Linen model, with no per-architecture code:

1. The model is traced once (``jax.make_jaxpr``, no FLOPs) with every
   prunable layer call replaced, through the model adapter
   (:func:`sensprune.adapter.trace_with_markers`), by a fresh *marker* input
   of the layer's output shape; the layer's input becomes an extra output of
   the traced function.
2. A small interpreter walks the jaxpr and propagates, for every array, one
   bitset per index of its *last* axis (the channel / feature axis): the set of
   sources that flow into it. Sources are the channels of the model input, the
   output channels of every layer (the markers) and the last-axis entries of
   the other variable leaves (BatchNorm/LayerNorm scales, biases, statistics).
   Elementwise ops take unions, data movement (reshape/flatten, slicing,
   concatenation, padding, broadcasting) maps indices exactly, reductions over
   the channel axis and every op without a rule (convolutions and matmuls
   outside prunable layers, gathers, loops, ...) join *all* channels: an
   over-approximation, which can only make groups larger, never unsafe.
3. Union-find builds *channel groups*: every input feature of a layer is joined
   with all the sources that feed it, so producers summed into the same
   residual stream, a stream channel read by several layers, and the
   per-channel BatchNorm entries along the way end up in one group. A group is
   removed jointly or not at all. It is *removable* only when it does not touch
   the model input or output, has a producer, and its variable entries are all
   rank-1 per-channel leaves; other groups are listed with the reason.

The result, :class:`DependencyMap`, is plain data (numpy arrays and dicts) and
is cached by :class:`~sensprune.context.PruneContext`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from sensprune.adapter import as_adapter, trace_with_markers
from sensprune.types import Layer, Path

__all__ = [
    "DependencyMap",
    "Group",
    "analyze",
    "consumer_masks_for",
    "kernel_masks_for",
    "producer_masks_for",
    "removed_groups",
    "joint_removal",
    "variable_keep",
]

_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
    population_count pow real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor sharding_constraint
    mesh_cast device_put pvary""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min reduce_window".split())
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


# --------------------------------------------------------------------------- result types


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels that must be removed together.

    Attributes:
      producers: layer name -> output channels (filters) in the group.
      consumers: layer name -> input features (kernel rows) in the group.
      variables: variable leaf path (collection first, e.g.
        ``('params', 'bn1', 'scale')``) -> indices on its last axis.
      inputs: channels of the model input in the group.
      output: whether the group reaches the model output.
      removable: whether removing the whole group is safe.
      reason: why it is not removable (``''`` when it is).
    """

    producers: Mapping[str, np.ndarray]
    consumers: Mapping[str, np.ndarray]
    variables: Mapping[Path, np.ndarray]
    inputs: np.ndarray
    output: bool
    removable: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class DependencyMap:
    """Channel groups of a model (see the module docstring).

    Attributes:
      layers: the prunable layers, in call order.
      groups: every group that holds a layer channel.
      out_group: layer name -> ``[out]`` group id of each output channel.
      in_group: layer name -> ``[in]`` group id of each input feature.
      unsafe: group id -> reason, for groups not removable for another reason
        than touching the model input or output.
      notes: primitives handled by the conservative join-all rule.
    """

    layers: tuple[Layer, ...]
    groups: tuple[Group, ...]
    out_group: Mapping[str, np.ndarray]
    in_group: Mapping[str, np.ndarray]
    unsafe: Mapping[int, str]
    notes: tuple[str, ...] = ()

    @property
    def removable(self) -> np.ndarray:
        """bool ``[groups]``."""
        return np.array([g.removable for g in self.groups], bool)

    def layer_unsafe(self) -> dict[str, str]:
        """Layer name -> reason, for layers with an output channel in an unsafe group."""
        out = {}
        for name, ids in self.out_group.items():
            for gid in np.unique(ids):
                if int(gid) in self.unsafe:
                    out[name] = self.unsafe[int(gid)]
                    break
        return out


# --------------------------------------------------------------------------- bitset rows


def _n_rows(shape: Sequence[int]) -> int:
    return int(shape[-1]) if len(shape) else 1


def _zeros(n: int) -> np.ndarray:
    out = np.empty(n, object)
    out[:] = 0
    return out


def _full(n: int, value: int) -> np.ndarray:
    out = np.empty(n, object)
    out[:] = value
    return out


def _union_all(rows: np.ndarray) -> int:
    return functools.reduce(operator.or_, rows.tolist(), 0)


def _fit(rows: np.ndarray, n: int) -> np.ndarray:
    """Rows broadcast to ``n`` (size-1 rows repeat; any other mismatch joins all)."""
    if len(rows) == n:
        return rows
    if len(rows) == 1:
        return _full(n, rows[0])
    return _full(n, _union_all(rows))


def _remap(rows: np.ndarray, out_idx: np.ndarray, in_idx: np.ndarray, n_out: int) -> np.ndarray:
    """``out[j] = OR of rows[i]`` over the pairs ``(j, i)``."""
    out = _zeros(n_out)
    pairs = np.unique(np.stack([out_idx, in_idx], 1), axis=0)
    for j, i in pairs.tolist():
        out[j] = out[j] | rows[i]
    return out


def _reshape_rows(rows: np.ndarray, in_shape, out_shape) -> np.ndarray:
    n_in, n_out = _n_rows(in_shape), _n_rows(out_shape)
    total = int(np.prod(in_shape, dtype=np.int64))
    if n_in == n_out or total == 0:
        return _fit(rows, n_out)
    flat = np.arange(total, dtype=np.int64)
    return _remap(rows, flat % n_out, flat % n_in, n_out)


def _pad_rows(rows: np.ndarray, pad_rows: np.ndarray, config, n_out: int) -> np.ndarray:
    lo, _, interior = (int(v) for v in config)
    out = _full(n_out, pad_rows[0] if len(pad_rows) else 0)
    for i, row in enumerate(rows.tolist()):
        pos = lo + i * (interior + 1)
        if 0 <= pos < n_out:
            out[pos] = row
    return out


# --------------------------------------------------------------------------- interpreter


def _is_literal(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(v.aval, "shape", ()))


def _sub_jaxpr(eqn) -> Any:
    for key in _SUBJAXPR_KEYS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr = getattr(sub, "jaxpr", sub)
        if hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars):
            return jaxpr
    return None


def _eqn_rule(eqn, ins: list[np.ndarray], notes: set[str]) -> list[np.ndarray]:
    """Output rows of one equation from its input rows."""
    name = eqn.primitive.name
    p = eqn.params
    in_shapes = [_shape(v) for v in eqn.invars]
    out_shapes = [_shape(v) for v in eqn.outvars]
    n_out = [_n_rows(s) for s in out_shapes]
    nd = len(in_shapes[0]) if in_shapes else 0
    last = nd - 1

    if name in _ELEMENTWISE or name == "optimization_barrier":
        if len(eqn.outvars) == len(ins) and len(ins) > 1:  # per-operand pass-through ops
            return [_fit(r, n) for r, n in zip(ins, n_out)]
        rows = _zeros(n_out[0])
        for r in ins:
            rows = rows | _fit(r, n_out[0])
        return [rows] * len(eqn.outvars)
    if name == "iota":
        return [_zeros(n) for n in n_out]
    if name in ("reshape", "squeeze", "expand_dims"):
        return [_reshape_rows(ins[0], in_shapes[0], out_shapes[0])]
    if name == "broadcast_in_dim":
        dims = tuple(p["broadcast_dimensions"])
        if not in_shapes[0] or in_shapes[0][-1] == 1:
            return [_fit(ins[0][:1], n_out[0])]
        if dims[-1] == len(out_shapes[0]) - 1:
            return [_fit(ins[0], n_out[0])]
        return [_full(n_out[0], _union_all(ins[0]))]
    if name == "transpose":
        perm = tuple(p["permutation"])
        if not perm or perm[-1] == len(perm) - 1:
            return [ins[0]]
        return [_full(n_out[0], _union_all(ins[0]))]
    if name == "slice":
        if nd == 0:
            return [ins[0]]
        strides = p.get("strides") or (1,) * nd
        return [ins[0][p["start_indices"][-1] : p["limit_indices"][-1] : strides[-1]]]
    if name == "rev":
        return [ins[0][::-1] if last in tuple(p["dimensions"]) else ins[0]]
    if name == "concatenate":
        if int(p["dimension"]) == last:
            return [np.concatenate([_fit(r, _n_rows(s)) for r, s in zip(ins, in_shapes)])]
        rows = _zeros(n_out[0])
        for r in ins:
            rows = rows | _fit(r, n_out[0])
        return [rows]
    if name == "pad":
        config = p["padding_config"]
        if nd and tuple(config[-1]) != (0, 0, 0):
            return [_pad_rows(ins[0], ins[1], config[-1], n_out[0])]
        return [ins[0] | _fit(ins[1], n_out[0])]
    if name == "split":
        if int(p["axis"]) == last:
            bounds = np.cumsum([0, *p["sizes"]])
            return [ins[0][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [ins[0]] * len(eqn.outvars)
    if name in _REDUCTIONS:
        if nd and last not in tuple(p["axes"]):
            return [_fit(ins[0], n) for n in n_out]
        return [_full(n, _union_all(ins[0])) for n in n_out]
    if name in _CUMULATIVE:
        if nd and int(p["axis"]) != last:
            return [ins[0]]
        return [_full(n_out[0], _union_all(ins[0]))]
    if name in _WINDOWED:
        k = len(in_shapes[0])
        ok = (
            k
            and p["window_dimensions"][-1] == 1
            and p["window_strides"][-1] == 1
            and tuple(p["padding"][-1]) == (0, 0)
            and all(tuple(p.get(d) or (1,) * k)[-1] == 1 for d in ("base_dilation", "window_dilation"))
        )
        if ok:
            n_data = len(eqn.outvars)
            rows = [_fit(r, n) for r, n in zip(ins[:n_data], n_out)]
            for extra in ins[n_data:]:  # init values
                rows = [r | _fit(extra, len(r)) for r in rows]
            return rows
    # Anything else (conv / matmul outside a prunable layer, gathers, loops, ...): join everything.
    if name not in ("conv_general_dilated", "dot_general"):
        notes.add(name)
    everything = functools.reduce(operator.or_, [_union_all(r) for r in ins], 0)
    return [_full(n, everything) for n in n_out]


def _propagate(jaxpr, in_rows: list[np.ndarray], const_rows: list[np.ndarray], notes: set[str]) -> list[np.ndarray]:
    env: dict[Any, np.ndarray] = {}

    def read(v):
        if _is_literal(v):
            return _zeros(_n_rows(_shape(v)))
        return env[v]

    for v, r in zip(jaxpr.constvars, const_rows):
        env[v] = r
    for v, r in zip(jaxpr.invars, in_rows):
        env[v] = r
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            consts = [_zeros(_n_rows(_shape(c))) for c in sub.constvars]
            outs = _propagate(sub, ins, consts, notes)
        else:
            outs = _eqn_rule(eqn, ins, notes)
        for v, r in zip(eqn.outvars, outs):
            if type(v).__name__ != "DropVar":
                env[v] = r
    return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- tracing


def _path_keys(path) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# --------------------------------------------------------------------------- union-find


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _bits(value: int) -> list[int]:
    out = []
    while value:
        low = value & -value
        out.append(low.bit_length() - 1)
        value ^= low
    return out


# --------------------------------------------------------------------------- analysis


def _sorted_arrays(d: Mapping[Any, list[int]]) -> dict[Any, np.ndarray]:
    return {k: np.asarray(sorted(v), np.int64) for k, v in d.items()}


def analyze(
    model: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    layers: Sequence[Layer] | None = None,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> DependencyMap:
    """Channel groups of ``model`` (traced on ``x``; only shapes matter, no compute).

    Args:
      model: a Linen module or a model adapter (:mod:`sensprune.adapter`).
      variables: its variables (only shapes and the tree structure are used).
      x: an example input ``[B, *input_shape]`` (B = 1 is enough).
      layers: the prunable layers (default: :func:`sensprune.find_layers`).
      method, apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=False``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise KeyError("variables has no 'params' collection")
    adapter = as_adapter(model, method, apply_kwargs)
    if layers is None:
        layers = adapter.find_layers(variables, x)
    layers = tuple(layers)
    names = [layer.name for layer in layers]
    closed, shapes, markers = trace_with_markers(adapter, variables, x, layers)

    # Sources: model input channels, layer output channels, per-channel variable entries.
    kinds: list[tuple[str, Any, int]] = []
    in_rows: list[np.ndarray] = []

    def new_rows(kind: str, owner: Any, n: int) -> np.ndarray:
        start = len(kinds)
        kinds.extend((kind, owner, c) for c in range(n))
        rows = np.empty(n, object)
        rows[:] = [1 << (start + c) for c in range(n)]
        return rows

    layer_paths = {tuple(layer.path) for layer in layers}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = _path_keys(path)
        shape = tuple(np.shape(leaf))
        owned = keys[1:-1] in layer_paths  # kernels / biases of prunable layers
        if owned or len(shape) == 0 or shape[-1] <= 1:
            in_rows.append(_zeros(_n_rows(shape)))
        else:
            in_rows.append(new_rows("var", keys, shape[-1]))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(x)):
        in_rows.append(new_rows("input", i, _n_rows(np.shape(leaf))))
    for name in sorted(markers):  # dict leaves flatten in sorted key order
        in_rows.append(new_rows("producer", name, markers[name].shape[-1]))

    notes: set[str] = set()
    consts = [_zeros(_n_rows(np.shape(c))) for c in closed.consts]
    out_rows = _propagate(closed.jaxpr, in_rows, consts, notes)
    leaves_with_path = jax.tree_util.tree_flatten_with_path(shapes)[0]
    outputs, consumed = [], {}
    for (path, _), rows in zip(leaves_with_path, out_rows):
        if getattr(path[0], "idx", None) == 0:
            outputs.append(rows)
        else:
            consumed[_path_keys(path[1:])[0]] = rows

    # Union-find over sources and consumer features.
    n_src = len(kinds)
    feature_base, total = {}, n_src
    for layer in layers:
        feature_base[layer.name] = total
        total += layer.in_channels
    uf = _UnionFind(total)
    for layer in layers:
        rows = consumed[layer.name]
        if len(rows) != layer.in_channels:
            raise ValueError(
                f"layer {layer.name!r}: traced input has {len(rows)} features, kernel expects {layer.in_channels}"
            )
        seen: dict[int, int] = {}
        for j, row in enumerate(rows.tolist()):
            node = feature_base[layer.name] + j
            if row in seen:
                uf.union(node, seen[row])
                continue
            bits = _bits(row)
            for b in bits:
                uf.union(node, b)
            seen[row] = node
    output_bits: set[int] = set()
    for rows in outputs:
        for row in set(rows.tolist()):
            bits = _bits(row)
            for b in bits[1:]:
                uf.union(bits[0], b)
            output_bits.update(bits)
    output_roots = {uf.find(b) for b in output_bits}

    # Collect members per root.
    members: dict[int, dict[str, dict]] = {}

    def slot(root: int) -> dict:
        if root not in members:
            members[root] = {"producers": {}, "consumers": {}, "variables": {}, "inputs": []}
        return members[root]

    for b, (kind, owner, c) in enumerate(kinds):
        root = uf.find(b)
        if kind == "producer":
            slot(root)["producers"].setdefault(owner, []).append(c)
        elif kind == "input":
            slot(root)["inputs"].append(c)
        else:
            slot(root)["variables"].setdefault(owner, []).append(c)
    for layer in layers:
        base = feature_base[layer.name]
        for j in range(layer.in_channels):
            slot(uf.find(base + j))["consumers"].setdefault(layer.name, []).append(j)

    var_rank = {
        _path_keys(path): len(np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    groups: list[Group] = []
    unsafe: dict[int, str] = {}
    out_group = {name: np.full(layer.out_channels, -1, np.int64) for name, layer in zip(names, layers)}
    in_group = {name: np.full(layer.in_channels, -1, np.int64) for name, layer in zip(names, layers)}
    for root in sorted(members):
        m = members[root]
        if not m["producers"] and not m["consumers"]:
            continue
        gid = len(groups)
        output = root in output_roots
        reason = ""
        if m["inputs"]:
            reason = "reads the model input"
        elif output:
            reason = "reaches the model output"
        elif not m["producers"]:
            reason = "fed by no prunable layer (a constant feature)"
            unsafe[gid] = reason
        else:
            high = sorted("/".join(k) for k in m["variables"] if var_rank[k] != 1)
            if high:
                reason = f"variable leaves {high} of rank != 1 are indexed by these channels"
                unsafe[gid] = reason
        group = Group(
            producers=_sorted_arrays(m["producers"]),
            consumers=_sorted_arrays(m["consumers"]),
            variables=_sorted_arrays(m["variables"]),
            inputs=np.asarray(sorted(m["inputs"]), np.int64),
            output=output,
            removable=not reason,
            reason=reason,
        )
        groups.append(group)
        for name, ch in group.producers.items():
            out_group[name][ch] = gid
        for name, ch in group.consumers.items():
            in_group[name][ch] = gid
    return DependencyMap(
        layers=layers,
        groups=tuple(groups),
        out_group=out_group,
        in_group=in_group,
        unsafe=unsafe,
        notes=tuple(sorted(notes)),
    )


# --------------------------------------------------------------------------- helpers


def check_round_to(round_to: Any) -> int:
    """``round_to`` (kept channels per group a multiple of it) as an int >= 1, or a ValueError."""
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(f"round_to must be a positive int (1 = no rounding), got {round_to!r}")
    return int(round_to)


def removed_groups(deps: DependencyMap, kernel_masks: Mapping[str, Any]) -> np.ndarray:
    """bool ``[groups]``: removable groups whose every consumer feature is fully masked.

    ``kernel_masks``: layer name -> bool kernel-shaped mask (True = kept). Such a
    group contributes exactly nothing to the masked model, so dropping it (its
    producers' filters and per-channel variables included) keeps the outputs.
    """
    keep_in = {
        layer.name: np.asarray(kernel_masks[layer.name], bool)
        .reshape(-1, layer.in_channels, layer.out_channels)
        .any(axis=(0, 2))
        for layer in deps.layers
    }
    return joint_removal(deps, keep_in)


def joint_removal(
    deps: DependencyMap, keep_in: Mapping[str, np.ndarray], *, allow: np.ndarray | None = None
) -> np.ndarray:
    """bool ``[groups]``: groups dropped by *every* consumer (and allowed; default: removable)."""
    allow = deps.removable if allow is None else np.asarray(allow, bool)
    kept = np.zeros(len(deps.groups), bool)
    for name, ids in deps.in_group.items():
        keep = np.asarray(keep_in.get(name, np.ones(ids.shape, bool)), bool)
        hit = ids[keep & (ids >= 0)]
        kept[hit] = True
    return allow & ~kept


def consumer_masks_for(deps: DependencyMap, removed: np.ndarray) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[in]``: input features kept (not in a removed group)."""
    removed = np.asarray(removed, bool)
    return {name: ~((ids >= 0) & removed[np.maximum(ids, 0)]) for name, ids in deps.in_group.items()}


def producer_masks_for(deps: DependencyMap, removed: np.ndarray) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[out]``: output filters kept (not in a removed group)."""
    removed = np.asarray(removed, bool)
    return {name: ~((ids >= 0) & removed[np.maximum(ids, 0)]) for name, ids in deps.out_group.items()}


def kernel_masks_for(deps: DependencyMap, removed: np.ndarray) -> dict[str, np.ndarray]:
    """Layer name -> bool kernel-shaped mask of the entries outside removed groups."""
    keep_in, keep_out = consumer_masks_for(deps, removed), producer_masks_for(deps, removed)
    out = {}
    for layer in deps.layers:
        m = keep_in[layer.name][:, None] & keep_out[layer.name][None, :]
        out[layer.name] = np.broadcast_to(m, layer.kernel_shape).copy()
    return out


def variable_keep(deps: DependencyMap, removed: np.ndarray) -> dict[Path, np.ndarray]:
    """Variable leaf path -> indices of its last axis to drop (only leaves touched by removed groups)."""
    out: dict[Path, list[np.ndarray]] = {}
    for gid in np.flatnonzero(np.asarray(removed, bool)):
        for path, idx in deps.groups[gid].variables.items():
            out.setdefault(path, []).append(idx)
    return {path: np.sort(np.concatenate(v)) for path, v in out.items()}
