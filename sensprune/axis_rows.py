"""Source rows over several axes of an array: what lets the channel analysis see attention heads.

:mod:`sensprune.channel_flow` keeps one bitset of sources per index of an
array's *last* axis. That cannot tell attention heads apart: a query
projection's output ``[B, L, heads, head_dim]`` has one unit per
``(head, dim)`` pair, and the scores ``q . k`` ``[B, heads, Lq, Lk]`` carry the
head on an inner axis. A :class:`Tracked` value keeps a *table* of bitsets over
any set of axes (``table[i, j]`` = sources of the entries with index ``i`` on
``axes[0]`` and ``j`` on ``axes[1]``; entries along the other axes share them).
Plain last-axis rows are the special case ``axes = (ndim - 1,)``.

Tracked values are created for layer outputs whose units span several trailing
axes (``nn.DenseGeneral`` with ``features=(heads, head_dim)``) and followed
exactly through the ops of dot-product attention: elementwise ops, reductions
(softmax over keys), ``broadcast_in_dim``, ``transpose``, reshapes that keep the
tracked trailing block, and ``dot_general`` (batch dims keep the head axis,
contracted axes are joined: ``q . k`` joins ``head_dim``, ``attn . v`` joins
the keys). :func:`tracked_rule` returns None for any other op, and the caller
folds the table into last-axis rows (:func:`fold`, an over-approximation).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["Tracked", "as_tracked", "flat_rows", "fold", "source_table", "tracked_rule"]

_ELEMENTWISE_EXTRA = frozenset(("optimization_barrier",))
_REDUCE = frozenset("reduce_sum reduce_max reduce_min reduce_prod".split())


@dataclasses.dataclass(frozen=True)
class Tracked:
    """Source bitsets over the array axes ``axes`` (sorted) of an array of rank ``ndim``."""

    table: np.ndarray
    axes: tuple[int, ...]
    ndim: int


def _objects(shape: Sequence[int], value: int = 0) -> np.ndarray:
    out = np.empty(tuple(shape), object)
    out[...] = value
    return out


def _union(values: np.ndarray) -> int:
    return functools.reduce(operator.or_, np.asarray(values, object).ravel().tolist(), 0)


def as_tracked(rows: Any, shape: Sequence[int]) -> Tracked:
    """``rows`` (plain last-axis rows or Tracked) as a :class:`Tracked` of an array of ``shape``."""
    if isinstance(rows, Tracked):
        return rows
    nd = len(shape)
    if nd == 0:
        return Tracked(_objects((), _union(rows)), (), 0)
    n = int(shape[-1])
    if len(rows) == n:
        table = np.asarray(rows, object).reshape(n) if n else _objects((0,))
    else:  # size-1 rows broadcast; any other mismatch joins all
        table = _objects((n,), rows[0] if len(rows) == 1 else _union(rows))
    return Tracked(table, (nd - 1,), nd)


def _reduce_axes(t: Tracked, keep: Sequence[int]) -> Tracked:
    """``t`` with the tracked axes outside ``keep`` joined (unioned away)."""
    keep = tuple(a for a in t.axes if a in keep)
    if keep == t.axes:
        return t
    drop = tuple(i for i, a in enumerate(t.axes) if a not in keep)
    moved = np.moveaxis(t.table, drop, tuple(range(len(t.axes) - len(drop), len(t.axes))))
    kept_shape = moved.shape[: len(keep)]
    flat = moved.reshape(kept_shape + (-1,))
    table = _objects(kept_shape)
    for idx in np.ndindex(*kept_shape):
        table[idx] = _union(flat[idx])
    return Tracked(table, keep, t.ndim)


def _expand(t: Tracked, axes: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``t``'s table broadcast over ``axes`` (a superset of ``t.axes``) of an array of ``shape``."""
    axes = tuple(axes)
    view = t.table.reshape(tuple(t.table.shape[t.axes.index(a)] if a in t.axes else 1 for a in axes))
    return np.broadcast_to(view, tuple(int(shape[a]) for a in axes))


def fold(rows: Any, shape: Sequence[int]) -> np.ndarray:
    """Plain last-axis rows of ``rows`` (the other tracked axes joined)."""
    if not isinstance(rows, Tracked):
        return rows
    nd = len(shape)
    n = int(shape[-1]) if nd else 1
    if nd and nd - 1 in rows.axes:
        return np.asarray(_reduce_axes(rows, (nd - 1,)).table, object).reshape(n).copy()
    return _objects((n,), _union(rows.table))


def _trailing_block(shape: Sequence[int], n: int) -> Optional[int]:
    """The first axis ``k`` with ``prod(shape[k:]) == n`` (``None`` if there is none)."""
    size = 1
    for k in range(len(shape) - 1, -1, -1):
        size *= int(shape[k])
        if size == n:
            return k
        if size > n:
            return None
    return None


def flat_rows(rows: Any, shape: Sequence[int], n: int) -> np.ndarray:
    """``n`` rows over the flattened trailing axes of an array of ``shape`` whose product is ``n``
    (e.g. the ``heads * head_dim`` input features of an output projection); joins all when no
    trailing block has ``n`` entries."""
    if not isinstance(rows, Tracked) and len(rows) == n:
        return rows
    t = as_tracked(rows, shape)
    k = _trailing_block(shape, n)
    if k is None:
        return _objects((n,), _union(t.table))
    block = tuple(range(k, len(shape)))
    reduced = _reduce_axes(t, block)
    return np.asarray(_expand(reduced, block, shape), object).reshape(n).copy()


def source_table(shape: Sequence[int], n: int, first_bit: int) -> Any:
    """Input rows of a layer output of ``shape`` whose ``n`` units (the flattened trailing block,
    ``first_bit`` onwards) are new sources: plain rows when the units are the last axis (all units
    joined on every row when no trailing block holds them)."""
    k = _trailing_block(shape, n)
    bits = _objects((n,))
    bits[:] = [1 << (first_bit + c) for c in range(n)]
    if k is None:  # units not laid out on trailing axes: every entry may hold any unit
        return _objects((int(shape[-1]) if len(shape) else 1,), _union(bits))
    if k == len(shape) - 1:
        return bits
    block = tuple(int(s) for s in shape[k:])
    return Tracked(bits.reshape(block), tuple(range(k, len(shape))), len(shape))


# --------------------------------------------------------------------------- rules


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(v.aval, "shape", ()))


def _elementwise(ins: Sequence[Tracked], shape: Sequence[int]) -> Tracked:
    nd = len(shape)
    same = [t for t in ins if t.ndim == nd]
    axes = tuple(sorted({a for t in same for a in t.axes}))
    table = _objects(tuple(int(shape[a]) for a in axes))
    for t in ins:
        if t.ndim == nd:
            table = table | _expand(t, axes, shape)
        else:  # a scalar
            table = table | _union(t.table)
    return Tracked(table, axes, nd)


def _renumber(t: Tracked, mapping: dict[int, int], ndim: int) -> Tracked:
    """``t`` with axis ``a`` renamed ``mapping[a]`` (axes must all be mapped)."""
    new = [mapping[a] for a in t.axes]
    order = np.argsort(new)
    return Tracked(np.transpose(t.table, order) if len(new) > 1 else t.table, tuple(sorted(new)), ndim)


def _dot_general(eqn: Any, lhs: Tracked, rhs: Tracked, out_shape: Sequence[int]) -> Tracked:
    """Batch axes keep their sources per index, free axes too, contracted axes are joined."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nb = len(lb)

    def out_axes(t: Tracked, contract: Sequence[int], batch: Sequence[int], offset: int) -> dict[int, int]:
        free = [a for a in range(t.ndim) if a not in contract and a not in batch]
        mapping = {a: i for i, a in enumerate(batch)}
        mapping.update({a: offset + i for i, a in enumerate(free)})
        return mapping

    n_lhs_free = lhs.ndim - len(lc) - nb
    parts = []
    for t, contract, batch, offset in ((lhs, lc, lb, nb), (rhs, rc, rb, nb + n_lhs_free)):
        mapping = out_axes(t, tuple(contract), tuple(batch), offset)
        parts.append(_renumber(_reduce_axes(t, tuple(mapping)), mapping, len(out_shape)))
    return _elementwise(parts, out_shape)


def _reshape(t: Tracked, in_shape: Sequence[int], out_shape: Sequence[int]) -> Optional[Tracked]:
    """Reshapes that keep the tracked trailing block (e.g. ``[B, L, H*D] <-> [B, L, H, D]``)."""
    if not t.axes:
        return Tracked(t.table, (), len(out_shape))
    k = t.axes[0]
    n = int(np.prod(in_shape[k:], dtype=np.int64))
    j = _trailing_block(out_shape, n)
    if j is None or int(np.prod(in_shape[:k], dtype=np.int64)) != int(np.prod(out_shape[:j], dtype=np.int64)):
        return None
    block = tuple(range(k, len(in_shape)))
    flat = np.asarray(_expand(t, block, in_shape), object).reshape(n)
    out_block = tuple(int(s) for s in out_shape[j:])
    return Tracked(flat.reshape(out_block), tuple(range(j, len(out_shape))), len(out_shape))


def tracked_rule(eqn: Any, ins: Sequence[Any], *, elementwise: bool) -> Optional[list[Any]]:
    """Output rows of one equation with a :class:`Tracked` input, or None (then fold).

    ``elementwise``: whether the primitive is elementwise (the caller's list).
    """
    name = eqn.primitive.name
    p = eqn.params
    in_shapes = [_shape(v) for v in eqn.invars]
    out_shapes = [_shape(v) for v in eqn.outvars]
    tracked = [as_tracked(r, s) for r, s in zip(ins, in_shapes)]
    if elementwise or name in _ELEMENTWISE_EXTRA:
        if len(eqn.outvars) == len(ins) and len(ins) > 1:  # per-operand pass-through ops
            return list(ins)
        if any(t.ndim not in (0, len(out_shapes[0])) for t in tracked):
            return None
        return [_elementwise(tracked, out_shapes[0])] * len(eqn.outvars)
    if name in _REDUCE:
        reduced = tuple(int(a) for a in p["axes"])
        t = _reduce_axes(tracked[0], tuple(a for a in tracked[0].axes if a not in reduced))
        mapping = {a: a - sum(1 for r in reduced if r < a) for a in t.axes}
        return [_renumber(t, mapping, len(out_shapes[0]))]
    if name == "broadcast_in_dim":
        dims = tuple(int(d) for d in p["broadcast_dimensions"])
        t = tracked[0]
        keep = tuple(a for a in t.axes if in_shapes[0][a] == out_shapes[0][dims[a]])
        t = _reduce_axes(t, keep)
        return [_renumber(t, {a: dims[a] for a in t.axes}, len(out_shapes[0]))]
    if name == "transpose":
        perm = tuple(int(a) for a in p["permutation"])
        return [_renumber(tracked[0], {a: perm.index(a) for a in tracked[0].axes}, len(out_shapes[0]))]
    if name in ("reshape", "squeeze", "expand_dims"):
        out = _reshape(tracked[0], in_shapes[0], out_shapes[0])
        return None if out is None else [out]
    if name == "dot_general" and len(tracked) == 2:
        return [_dot_general(eqn, tracked[0], tracked[1], out_shapes[0])]
    return None
