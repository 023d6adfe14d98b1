"""Which keep ratios a model can reach, and the guard against dead layers.

Only the kernels of the prunable layers are pruned; every other parameter
(embeddings, norms, biases, layers sensprune cannot prune) is *fixed* and
counts as kept. A keep ratio below ``fixed / reference`` cannot be met, and
methods asked for it used to zero every kernel and return a dead model.

* :func:`check_reachable` refuses such a target up front (``ValueError`` with
  the smallest reachable ratio and the largest fixed parameter groups).
* :func:`check_no_dead_layers` refuses a selection that leaves a layer without
  any weight (weight methods) or any channel (filter methods), unless the
  caller asked for it (``prune(..., allow_dead_layers=True)``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from sensprune import counting
from sensprune.types import Layer

__all__ = ["check_no_dead_layers", "check_reachable", "fixed_groups", "smallest_size"]

_LISTED = 5


def fixed_groups(params: Any, layers: Sequence[Layer]) -> list[tuple[str, int]]:
    """``(leaf name, nonzero entries)`` of every param leaf that is not a prunable kernel, largest first."""
    kernels = {layer.name + "/kernel" for layer in layers}
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith("/value"):  # the value of a boxed (partitioned) param
            name = name[: -len("/value")]
        if name not in kernels:
            out.append((name, int(np.count_nonzero(np.asarray(leaf)))))
    return sorted(out, key=lambda item: -item[1])


def smallest_size(
    fixed: int, layers: Sequence[Layer], alive: Mapping[str, np.ndarray], structured: bool,
    protected: frozenset[str] = frozenset(),
) -> int:
    """The fewest parameters a pruned model may keep with no layer left empty.

    Weight methods keep at least one weight per layer; filter methods at least
    one input channel (one window of one output unit), and every input channel
    of a layer whose input channels are protected.
    """
    least = 0
    for layer in layers:
        if not np.any(alive[layer.name]):
            continue
        if not structured:
            least += 1
        elif layer.name in protected:
            least += layer.window_size * layer.in_channels
        else:
            least += layer.window_size
    return fixed + least


def check_reachable(
    method: str, keep_ratio: float, reference: int, params: Any, layers: Sequence[Layer],
    alive: Mapping[str, np.ndarray], structured: bool, rtol: float,
) -> None:
    """Raises ``ValueError`` when ``keep_ratio * reference`` is below the smallest reachable size."""
    kernel_alive = int(sum(int(np.sum(a)) for a in alive.values()))
    fixed = counting.count_nonzero(params) - kernel_alive
    least = smallest_size(fixed, layers, alive, structured)
    target = keep_ratio * reference
    if target >= least * (1.0 - rtol):
        return
    groups = fixed_groups(params, layers)
    shown = ", ".join(f"{name} ({count})" for name, count in groups[:_LISTED])
    more = f", ... ({len(groups)} in all)" if len(groups) > _LISTED else ""
    what = "one input channel" if structured else "one weight"
    raise ValueError(
        f"prune(method={method!r}): keep_ratio {keep_ratio:.4g} is not reachable: the smallest reachable "
        f"keep ratio is {least / reference:.4g} ({least} of {reference} parameters). Only the kernels of the "
        f"{len(layers)} prunable layer(s) ({kernel_alive} parameters, {kernel_alive / reference:.1%}) can be "
        f"pruned and each keeps at least {what}; the {fixed} fixed parameters are in {shown}{more}. "
        "Ask for a keep ratio in "
        f"[{least / reference:.4g}, 1], or make more of the model prunable (nn.Dense / nn.Conv layers)."
    )


def check_no_dead_layers(
    method: str, masks: Mapping[str, np.ndarray], sizes: Mapping[str, int], alive: Mapping[str, np.ndarray],
    structured: bool, keep_ratio: float,
) -> None:
    """Raises ``ValueError`` if the selection leaves a layer that had weights with none at all."""
    dead = [name for name, mask in masks.items()
            if np.any(alive.get(name, True)) and int(sizes.get(name, np.sum(mask))) == 0]
    if not dead:
        return
    what = "channel" if structured else "weight"
    shown = ", ".join(dead[:_LISTED]) + (f", ... ({len(dead)} in all)" if len(dead) > _LISTED else "")
    raise ValueError(
        f"prune(method={method!r}, keep_ratio={keep_ratio:.4g}) would leave layer(s) {shown} without any "
        f"{what}: the pruned model would be dead there. Ask for a higher keep ratio, or pass "
        "allow_dead_layers=True if this is wanted."
    )
