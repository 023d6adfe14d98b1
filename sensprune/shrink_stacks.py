"""Shrinking kernels stacked by ``nn.scan``: every slice keeps one shape.

A scanned stack is one array ``[layers, ...]`` that every step slices, so its
slices must keep the same number of input features and output channels, while
their masks (one layer per slice) differ. :func:`uniform_stacks` restores removed
channel groups of the narrower slices (in channel order) until each slice keeps
as many as the widest one: restored groups are fully masked, so they stay
zero-contribution channels and the outputs are unchanged. Each slice then keeps
*its own* channels (a slice-dependent selection, padded with masked ones), and the
stacked leaf is sliced slice by slice (:func:`slice_stacked`). Plan entries and
variable paths of one slice carry a ``'[i]'`` key after the leaf path
(:func:`slice_key`), as the dependency analysis names stacked per-channel leaves.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sensprune import dependencies as deps_lib
from sensprune.types import Layer, Path

__all__ = ["slice_key", "slice_stacked", "split_slice", "stacked_steps", "uniform_stacks", "unshrunk_stacks"]

_SLICE = re.compile(r"\[(\d+(?:, \d+)*)\]")


def slice_key(layer: Layer) -> Path:
    """``('[i]',)`` for slice ``i`` of a scanned stack, ``()`` otherwise (appended to plan paths)."""
    return (f"[{', '.join(str(i) for i in layer.index)}]",) if layer.index else ()


def split_slice(path: Path) -> tuple[Path, tuple[int, ...]]:
    """``(leaf path, slice index)`` of a plan / variable path (index ``()`` when it names a whole leaf)."""
    m = _SLICE.fullmatch(path[-1]) if path else None
    if m is None:
        return path, ()
    return path[:-1], tuple(int(i) for i in m.group(1).split(", "))


def _kept(ids: np.ndarray, removed: np.ndarray) -> int:
    return int(np.sum(~((ids >= 0) & removed[np.maximum(ids, 0)])))


def _pad(ids: np.ndarray, removed: np.ndarray, missing: int) -> bool:
    """Restores removed groups of ``ids`` (channel order) until ``missing`` more entries are kept."""
    changed = False
    gone = (ids >= 0) & removed[np.maximum(ids, 0)]
    for gid in dict.fromkeys(ids[gone].tolist()):
        if missing <= 0:
            break
        removed[gid] = False
        missing -= int(np.sum(ids == gid))
        changed = True
    return changed


def uniform_stacks(deps: deps_lib.DependencyMap, removed: np.ndarray) -> np.ndarray:
    """``removed`` with groups restored until the slices of every scanned stack keep equally many
    input features and output channels (the stack's widest slice)."""
    stacks: dict[Path, list[Layer]] = {}
    for layer in deps.layers:
        if layer.index:
            stacks.setdefault(tuple(layer.path), []).append(layer)
    removed = np.asarray(removed, bool).copy()
    changed = True
    while changed:
        changed = False
        for stack in stacks.values():
            for table in (deps.out_group, deps.in_group):
                counts = [_kept(table[layer.name], removed) for layer in stack]
                for layer, count in zip(stack, counts):
                    changed = _pad(table[layer.name], removed, max(counts) - count) or changed
    return removed


def slice_stacked(leaf: Any, steps: Mapping[tuple[int, ...], Sequence[tuple[int, np.ndarray]]]) -> np.ndarray:
    """A stacked leaf with each slice ``leaf[i]`` sliced by its own ``[(axis, kept indices), ...]``
    (slices without steps stay whole); raises ValueError when the slices end up with different shapes."""
    host = np.asarray(leaf)
    index_shape = host.shape[: len(next(iter(steps)))]
    out = {}
    for idx in np.ndindex(*index_shape):
        piece = host[idx]
        for axis, kept in steps.get(idx, ()):
            if len(kept) != piece.shape[axis]:
                piece = np.take(piece, kept, axis=axis)
        out[idx] = piece
    shapes = {piece.shape for piece in out.values()}
    if len(shapes) != 1:
        raise ValueError(f"the slices of a scanned stack would keep different shapes {sorted(shapes)}")
    return np.stack([out[idx] for idx in np.ndindex(*index_shape)]).reshape(index_shape + shapes.pop())


def stacked_steps(plan: Mapping[Path, Any], path: Path) -> Optional[dict[tuple[int, ...], Any]]:
    """The per-slice steps of the stacked leaf at ``path`` (None when the plan slices no slice of it)."""
    out = {}
    for key, steps in plan.items():
        base, idx = split_slice(key)
        if idx and base == path:
            out[idx] = steps
    return out or None


def unshrunk_stacks(adapter: Any, variables: Mapping[str, Any], x: Any,
                    deps: deps_lib.DependencyMap) -> dict[str, str]:
    """Kernels stacked by ``nn.scan`` that keep their full size (not analysed slice by slice) -> why."""
    find = getattr(adapter, "find_layers_report", None)
    if find is None:
        return {}
    shrunk = {"/".join(layer.path) for layer in deps.layers if layer.index}
    stacked = {"/".join(layer.path) for layer in find(variables, x)[0] if layer.index} - shrunk
    why = ("stacked by nn.scan, but its slices are not in the channel analysis (slices of a nested scan, a "
           "kernel traced through, or deps given without them), so it keeps its full size (pruned entries "
           "stay zero)")
    return {name: why for name in sorted(stacked)}
