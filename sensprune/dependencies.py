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
   A layer output whose units span several trailing axes (a DenseGeneral's
   ``[.., heads, head_dim]``) is followed over those axes
   (:mod:`sensprune.axis_rows`), so each attention head is one group.
3. Union-find builds *channel groups*: every input feature of a layer is joined
   with all the sources that feed it, so producers summed into the same
   residual stream, a stream channel read by several layers, and the
   per-channel BatchNorm entries along the way end up in one group. A group is
   removed jointly or not at all. It is *removable* only when it does not touch
   the model input or output, has a producer, and its variable entries are all
   rank-1 per-channel leaves (or kernels of grouped / depthwise convs, which are
   traced through, not marked: a removed depthwise channel takes its producer
   filter, its kernel slice and its consumer column); other groups are listed
   with the reason.

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
from sensprune.axis_rows import Tracked, flat_rows, source_table
from sensprune.channel_flow import n_rows, propagate, zeros
from sensprune.scan_flow import ScanState, Stacked, trace_stacked
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
      layers: the prunable layers (default: those of :func:`sensprune.find_layers` whose channels
        can be followed: not shared layers or slices of nested scans); grouped convs and kernel views whose
        feature axis is not the input's last are traced through, not marked.
      method, apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=False``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise KeyError("variables has no 'params' collection")
    adapter = as_adapter(model, method, apply_kwargs)
    if layers is None:  # shared layers and slices of nested scans: their channels cannot be followed
        layers = [layer for layer in adapter.find_layers(variables, x) if layer.calls == 1 and len(layer.index) <= 1]
    layers = tuple(layer for layer in layers if _marked(layer))
    scan = ScanState() if any(layer.index for layer in layers) else None
    if scan is None:
        closed, shapes, markers = trace_with_markers(adapter, variables, x, layers)
    else:
        closed, shapes, markers = trace_stacked(adapter, variables, x, layers)
    sources = _sources(variables, x, markers, layers)
    notes: set[str] = set()
    sliced: set[int] = set()
    consts = [zeros(n_rows(np.shape(c))) for c in closed.consts]
    in_channels = {layer.name: layer.in_channels for layer in layers}
    outputs, consumed = _split_outputs(
        shapes, propagate(closed.jaxpr, sources.rows, consts, notes, sliced, scan), in_channels
    )
    if scan is not None:
        consumed.update(slice_inputs(scan, layers))
    joined = _join(layers, len(sources.kinds), consumed, outputs)
    members = _members(sources, joined, layers)
    var_rank = {_path_keys(p): len(np.shape(leaf)) for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    var_rank.update(sources.slice_rank)
    for b in (b for row in sliced for b in _bits(row)):  # grouped-conv kernels: last axis mapped exactly
        if sources.kinds[b][0] == "var":
            var_rank[sources.kinds[b][1]] = 1  # sliced on its last axis like a per-channel vector
    return _dependency_map(layers, members, joined.output_roots, var_rank, tuple(sorted(notes)))


def slice_inputs(scan: ScanState, layers: Sequence[Layer]) -> dict[str, np.ndarray]:
    """Layer name -> input rows of each scan slice, from the inputs recorded at its own step."""
    out = {}
    for layer in layers:
        if not layer.index:
            continue
        name = "/".join(layer.path)
        found = [rec for (tag, steps), recs in scan.consumed.items() if tag == name
                 and steps[: len(layer.index)] == layer.index for rec in recs]
        if not found:
            raise ValueError(f"layer {layer.name!r}: no input found at scan step {layer.index} (is it called "
                             "inside nn.scan with params stacked on axis 0?)")
        rows = [flat_rows(r, shape, layer.in_channels) for r, shape in found]
        out[layer.name] = functools.reduce(operator.or_, rows)
    return out


def _marked(layer: Layer) -> bool:
    """Whether the trace replaces the layer by a marker; grouped convs (mapped group by group by
    :mod:`sensprune.channel_flow`), DenseGenerals contracting non-trailing axes and transposed-kernel
    ConvTransposes (views whose feature axis is not the input's last) are traced through."""
    return (layer.groups == 1 and not layer.input_axes and not (layer.conv_transpose and layer.transposed)
            and len(layer.index) <= 1)


@dataclasses.dataclass
class _Sources:
    """Source bits: ``kinds[b] = (kind, owner, channel)`` of bit ``b``; ``rows``: the jaxpr's input rows."""

    kinds: list[tuple[str, Any, int]] = dataclasses.field(default_factory=list)
    rows: list[Any] = dataclasses.field(default_factory=list)
    slice_rank: dict[Path, int] = dataclasses.field(default_factory=dict)

    def add_stacked(self, kind: str, owners: Sequence[Any], shape: Sequence[int], n: int, at: str) -> None:
        """Appends the input rows of an array holding one slice per owner (``shape``: one slice's),
        each with ``n`` new sources (:class:`~sensprune.scan_flow.Stacked`)."""
        tables = []
        for owner in owners:
            start = len(self.kinds)
            self.kinds.extend((kind, owner, c) for c in range(n))
            tables.append(source_table(shape, n, start))
        self.rows.append(Stacked(tuple(tables), at))

    def add(self, kind: str, owner: Any, n: int) -> None:
        """Appends the input rows of an array whose ``n`` last-axis entries are new sources."""
        start = len(self.kinds)
        self.kinds.extend((kind, owner, c) for c in range(n))
        rows = np.empty(n, object)
        rows[:] = [1 << (start + c) for c in range(n)]
        self.rows.append(rows)

    def add_units(self, kind: str, owner: Any, shape: Sequence[int], n: int) -> None:
        """Like :meth:`add` for an array whose ``n`` units span its trailing axes (e.g. ``[.., heads, dim]``)."""
        start = len(self.kinds)
        self.kinds.extend((kind, owner, c) for c in range(n))
        self.rows.append(source_table(shape, n, start))

    def add_none(self, shape: Sequence[int]) -> None:
        """Appends the (empty) input rows of an array that is no source."""
        self.rows.append(zeros(n_rows(shape)))


def _sources(variables: Mapping[str, Any], x: Any, markers: Mapping[str, Any], layers: Sequence[Layer]) -> _Sources:
    """Model input channels, layer output channels (markers) and per-channel variable entries.

    In the flattening order of the traced function's arguments ``(variables, x, markers)``.
    """
    sources = _Sources()
    layer_paths = {tuple(layer.path) for layer in layers}
    stacks = _stack_prefixes(layers)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = _path_keys(path)
        shape = tuple(np.shape(leaf))
        owned = keys[1:-1] in layer_paths  # kernels / biases of prunable layers
        depth = next((n for prefix, n in stacks.items() if keys[1:1 + len(prefix)] == prefix), 0)
        if owned or len(shape) == 0 or shape[-1] <= 1:
            sources.add_none(shape)
        elif depth and len(shape) >= 2 and shape[0] == depth:  # stacked by nn.scan: one slice per step
            owners = [(*keys, f"[{i}]") for i in range(depth)]
            sources.slice_rank.update({owner: len(shape) - 1 for owner in owners})
            sources.add_stacked("var", owners, shape[1:], shape[-1], "xs")
        else:
            sources.add("var", keys, shape[-1])
    for i, leaf in enumerate(jax.tree_util.tree_leaves(x)):
        sources.add("input", i, n_rows(np.shape(leaf)))
    units = {layer.name: layer.out_channels for layer in layers}
    slices: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.index:
            slices.setdefault("/".join(layer.path), []).append(layer)
    for name in sorted(markers):  # dict leaves flatten in sorted key order
        if name in slices:
            stack = sorted(slices[name], key=lambda layer: layer.index)
            sources.add_stacked("producer", [layer.name for layer in stack], markers[name].shape,
                                stack[0].out_channels, "const")
        else:
            sources.add_units("producer", name, markers[name].shape, units[name])
    return sources


def _stack_prefixes(layers: Sequence[Layer]) -> dict[Path, int]:
    """Module path of each scanned block (the common prefix of its scanned layers' module paths)
    -> its number of slices."""
    out: dict[Path, int] = {}
    for layer in layers:
        if len(layer.index) != 1:
            continue
        depth = layer.index[0] + 1
        parent = tuple(layer.path[:-1])
        for prefix in list(out):
            common = _common_prefix(prefix, parent)
            if common:
                depth = max(depth, out.pop(prefix))
                parent = common
        if parent:
            out[parent] = max(out.get(parent, 0), depth)
    return out


def _common_prefix(a: Path, b: Path) -> Path:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return tuple(a[:n])


def _split_outputs(
    shapes: Any, out_rows: list[Any], in_channels: Mapping[str, int]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The traced function's output rows as ``(model output rows, {layer name: input rows})``.

    A layer's input rows are one per input feature (``in_channels``: the flattened contracted
    axes, e.g. ``heads * head_dim`` of an attention output projection).
    """
    outputs, consumed = [], {}
    for (path, leaf), rows in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], out_rows):
        if getattr(path[0], "idx", None) == 0:
            outputs.append(np.asarray(rows.table, object).ravel() if isinstance(rows, Tracked) else rows)
        else:
            name = _path_keys(path[1:])[0]
            consumed[name] = flat_rows(rows, np.shape(leaf), in_channels[name])
    return outputs, consumed


@dataclasses.dataclass
class _Joined:
    """Union-find over source bits and consumer features (feature ``j`` of a layer is node ``base + j``)."""

    uf: _UnionFind
    feature_base: dict[str, int]
    output_roots: set[int]


def _join(layers: Sequence[Layer], n_sources: int, consumed: Mapping[str, np.ndarray],
          outputs: Sequence[np.ndarray]) -> _Joined:
    """Joins every consumer feature with its sources, and the sources of each model output entry."""
    feature_base, total = {}, n_sources
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
        row_list = rows.tolist()
        # Sources every feature shares (a normalised stream: all of it, plus a per-feature scale)
        # are joined once; each feature then joins one of them and its own extra sources.
        common = functools.reduce(operator.and_, row_list) if row_list else 0
        shared = _bits(common)
        for b in shared[1:]:
            uf.union(shared[0], b)
        for j, row in enumerate(row_list):
            node = feature_base[layer.name] + j
            if row in seen:
                uf.union(node, seen[row])
                continue
            if shared:
                uf.union(node, shared[0])
            for b in _bits(row & ~common):
                uf.union(node, b)
            seen[row] = node
    output_bits: set[int] = set()
    for rows in outputs:
        for row in set(rows.tolist()):
            bits = _bits(row)
            for b in bits[1:]:
                uf.union(bits[0], b)
            output_bits.update(bits)
    return _Joined(uf, feature_base, {uf.find(b) for b in output_bits})


@dataclasses.dataclass
class _Members:
    """What one union-find root holds (lists of channel indices per owner)."""

    producers: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    consumers: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    variables: dict[Path, list[int]] = dataclasses.field(default_factory=dict)
    inputs: list[int] = dataclasses.field(default_factory=list)


def _members(sources: _Sources, joined: _Joined, layers: Sequence[Layer]) -> dict[int, _Members]:
    """Union-find root -> its members."""
    members: dict[int, _Members] = {}
    for b, (kind, owner, c) in enumerate(sources.kinds):
        m = members.setdefault(joined.uf.find(b), _Members())
        if kind == "producer":
            m.producers.setdefault(owner, []).append(c)
        elif kind == "input":
            m.inputs.append(c)
        else:
            m.variables.setdefault(owner, []).append(c)
    for layer in layers:
        base = joined.feature_base[layer.name]
        for j in range(layer.in_channels):
            members.setdefault(joined.uf.find(base + j), _Members()).consumers.setdefault(layer.name, []).append(j)
    return members


def _removal_reason(m: _Members, output: bool, var_rank: Mapping[Path, int]) -> tuple[str, bool]:
    """``(reason, unsafe)``: why the group is not removable (``''``: it is), and whether that
    reason is other than touching the model input or output."""
    if m.inputs:
        return "reads the model input", False
    if output:
        return "reaches the model output", False
    if not m.producers:
        return "fed by no prunable layer (a constant feature)", True
    high = sorted("/".join(k) for k in m.variables if var_rank[k] != 1)
    if high:
        return f"variable leaves {high} of rank != 1 are indexed by these channels", True
    return "", False


def _dependency_map(layers: tuple[Layer, ...], members: Mapping[int, _Members], output_roots: set[int],
                    var_rank: Mapping[Path, int], notes: tuple[str, ...]) -> DependencyMap:
    """The groups (roots with a layer channel, in root order) and each layer channel's group id."""
    groups: list[Group] = []
    unsafe: dict[int, str] = {}
    out_group = {layer.name: np.full(layer.out_channels, -1, np.int64) for layer in layers}
    in_group = {layer.name: np.full(layer.in_channels, -1, np.int64) for layer in layers}
    for root in sorted(members):
        m = members[root]
        if not m.producers and not m.consumers:
            continue
        gid = len(groups)
        output = root in output_roots
        reason, is_unsafe = _removal_reason(m, output, var_rank)
        if is_unsafe:
            unsafe[gid] = reason
        group = Group(
            producers=_sorted_arrays(m.producers),
            consumers=_sorted_arrays(m.consumers),
            variables=_sorted_arrays(m.variables),
            inputs=np.asarray(sorted(m.inputs), np.int64),
            output=output,
            removable=not reason,
            reason=reason,
        )
        groups.append(group)
        for name, ch in group.producers.items():
            out_group[name][ch] = gid
        for name, ch in group.consumers.items():
            in_group[name][ch] = gid
    return DependencyMap(layers, tuple(groups), out_group, in_group, unsafe, notes)


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
        layer.name: np.asarray(
            np.asarray(kernel_masks[layer.name], bool)
            .reshape(-1, layer.in_channels, layer.out_channels)
            .any(axis=(0, 2))
        )
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
