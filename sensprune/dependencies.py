"""Channel dependencies of a model (Linen, or nnx through its adapter), found from its jaxpr.

Which output channels of which prunable layers (and which channels of the model
input) feed each input feature of each layer and the model output? We answer it
for any model, with no per-architecture code:

1. The model is traced once (``jax.make_jaxpr``, no FLOPs) with every
   prunable layer call replaced, through the model adapter
   (:func:`sensprune.adapter.trace_with_markers`), by a fresh *marker* input
   of the layer's output shape; the layer's input becomes an extra output of
   the traced function.
2. A small interpreter (:mod:`sensprune.channel_flow`) walks the jaxpr and
   propagates, for every array, one bitset per index of its *last* axis (the channel / feature axis): the set of
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
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from sensprune.adapter import as_adapter, trace_with_markers
from sensprune.channel_flow import n_rows, propagate, zeros
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
            in_rows.append(zeros(n_rows(shape)))
        else:
            in_rows.append(new_rows("var", keys, shape[-1]))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(x)):
        in_rows.append(new_rows("input", i, n_rows(np.shape(leaf))))
    for name in sorted(markers):  # dict leaves flatten in sorted key order
        in_rows.append(new_rows("producer", name, markers[name].shape[-1]))

    notes: set[str] = set()
    consts = [zeros(n_rows(np.shape(c))) for c in closed.consts]
    out_rows = propagate(closed.jaxpr, in_rows, consts, notes)
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
