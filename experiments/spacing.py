"""Keep-ratio spacings and their split into compress-only / retrain steps.

A spacing is a list of segments (``experiments.spacing`` in a config); each
segment is a mapping with a ``type`` and the fields that type needs. Keys are
snake_case (``num_intervals``, ``max_val``, ``min_val``, ``values``); the
reference's camelCase spellings (``numIntervals``, ``maxVal``, ``minVal``) are
accepted too. The keep ratios of the segments are concatenated in order.

Segment types (``n`` = ``num_intervals``, ``k`` counts from 0):

* ``geometric``: ``np.geomspace(max_val, min_val, n)``.
* ``linear``: ``np.linspace(max_val, min_val, n)``.
* ``cubic``: ``min_val + (max_val - min_val) * (1 - k / (n - 1)) ** 3``, a
  cubic ease from ``max_val`` down to ``min_val`` that places most ratios near
  ``min_val`` (the reference's definition).
* ``harmonic``: a power law ``r_i = (i + 1) ** -p`` for ``i = 1..N`` with
  ``p = ln 2 / ln(1 + n)``, i.e. ``n`` (a positive float) is the number of
  steps, in the ``(i + 1)`` index, needed to halve the keep ratio, and
  ``N = max(1, floor(min_val ** (-1 / p)))``. ``max_val`` is not used. As in the
  reference the last ratio, ``(N + 1) ** -p``, may fall slightly below
  ``min_val``. ``{n: 0.8, min_val: 0.05}`` gives the reference's 12 ratios
  0.442, 0.274, 0.195, ..., 0.053, 0.049.
* ``harmonic2``: ``max_val * i ** -p`` for ``i = 1..n`` with
  ``p = ln(max_val / min_val) / ln n``: a power law through both end points.
* ``manual``: the listed ``values``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

SPACING_TYPES = ("geometric", "harmonic", "harmonic2", "linear", "cubic", "manual")

_ALIASES = {
    "num_intervals": ("num_intervals", "numIntervals"),
    "max_val": ("max_val", "maxVal"),
    "min_val": ("min_val", "minVal"),
    "values": ("values",),
    "type": ("type",),
}


@dataclasses.dataclass(frozen=True)
class Step:
    """One retrain step: compress through ``compress_only`` (no retraining
    in between), then compress to ``keep_ratio`` and retrain."""

    compress_only: tuple[float, ...]
    keep_ratio: float

    @property
    def ratios(self) -> tuple[float, ...]:
        """All ratios of the step in the order they are applied."""
        return (*self.compress_only, self.keep_ratio)


def _get(segment: Any, key: str, where: str, required: bool = True) -> Any:
    """Read ``key`` (or one of its aliases) from a segment mapping."""
    for name in _ALIASES[key]:
        if name in segment:
            return segment[name]
    if required:
        raise ValueError(f"{where}.{key} is required but missing")
    return None


def _ratio_field(segment: Any, key: str, where: str) -> float:
    value = _get(segment, key, where)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.{key} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{where}.{key} must be in (0, 1], got {value!r}")
    return value


def _count_field(segment: Any, where: str) -> int:
    value = _get(segment, "num_intervals", where)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}.num_intervals must be an integer >= 1, got {value!r}")
    return int(value)


def _harmonic(segment: Any, where: str) -> np.ndarray:
    halving = _get(segment, "num_intervals", where)
    if isinstance(halving, bool) or not isinstance(halving, (int, float, np.number)) or not halving > 0:
        raise ValueError(
            f"{where}.num_intervals must be a number > 0 for type 'harmonic', got {halving!r}"
        )
    min_val = _ratio_field(segment, "min_val", where)
    power = math.log(2.0) / math.log1p(float(halving))
    count = max(1, int(min_val ** (-1.0 / power)))
    return np.arange(2, count + 2, dtype=np.float64) ** -power


def _harmonic2(segment: Any, where: str) -> np.ndarray:
    n = _count_field(segment, where)
    max_val = _ratio_field(segment, "max_val", where)
    min_val = _ratio_field(segment, "min_val", where)
    if n == 1:
        return np.array([max_val])
    power = math.log(max_val / min_val) / math.log(n)
    return max_val * np.arange(1, n + 1, dtype=np.float64) ** -power


def _cubic(segment: Any, where: str) -> np.ndarray:
    n = _count_field(segment, where)
    max_val = _ratio_field(segment, "max_val", where)
    min_val = _ratio_field(segment, "min_val", where)
    if n == 1:
        return np.array([max_val])
    frac = np.arange(n, dtype=np.float64) / (n - 1)
    return min_val + (max_val - min_val) * (1.0 - frac) ** 3


def _evenly(segment: Any, where: str, fn) -> np.ndarray:
    n = _count_field(segment, where)
    max_val = _ratio_field(segment, "max_val", where)
    min_val = _ratio_field(segment, "min_val", where)
    return fn(max_val, min_val, n)


def _manual(segment: Any, where: str) -> np.ndarray:
    values = _get(segment, "values", where)
    is_list = isinstance(values, (Sequence, np.ndarray)) and not isinstance(values, (str, bytes))
    if not is_list:
        raise ValueError(f"{where}.values must be a list of numbers in (0, 1], got {values!r}")
    try:
        return np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.values must be a list of numbers in (0, 1], got {values!r}") from None


def segment_ratios(segment: Mapping[str, Any], where: str = "experiments.spacing[0]") -> list[float]:
    """Keep ratios of one spacing segment; ``where`` names it in errors."""
    kind = _get(segment, "type", where)
    if kind == "geometric":
        ratios = _evenly(segment, where, np.geomspace)
    elif kind == "linear":
        ratios = _evenly(segment, where, np.linspace)
    elif kind == "harmonic":
        ratios = _harmonic(segment, where)
    elif kind == "harmonic2":
        ratios = _harmonic2(segment, where)
    elif kind == "cubic":
        ratios = _cubic(segment, where)
    elif kind == "manual":
        ratios = _manual(segment, where)
    else:
        raise ValueError(f"{where}.type must be one of {SPACING_TYPES}, got {kind!r}")
    for j, ratio in enumerate(ratios):
        if not 0.0 < ratio <= 1.0:  # also rejects NaN
            raise ValueError(
                f"{where} ({kind}) gives keep ratio #{j} = {ratio!r}; keep ratios must be in (0, 1]"
            )
    return [float(r) for r in ratios]


def keep_ratios(
    spacing: Sequence[Mapping[str, Any]], *, field: str = "experiments.spacing"
) -> list[float]:
    """Concatenated keep ratios of all segments of ``spacing``."""
    if isinstance(spacing, Mapping) or isinstance(spacing, (str, bytes)):
        raise ValueError(f"{field} must be a list of segments, got {spacing!r}")
    ratios: list[float] = []
    for i, segment in enumerate(spacing):
        ratios.extend(segment_ratios(segment, f"{field}[{i}]"))
    if not ratios:
        raise ValueError(f"{field} yields no keep ratios; give at least one segment")
    return ratios


def split_keep_ratios(
    ratios: Sequence[float],
    retrain_iterations: int,
    *,
    cascade: bool = True,
    field: str = "experiments.retrain_iterations",
) -> list[Step]:
    """Split ``ratios`` into ``retrain_iterations`` steps (``np.array_split``).

    The last ratio of each chunk is retrained; the earlier ones are
    compress-only steps applied just before it. ``-1`` makes one step per
    ratio. With ``cascade=False`` (every step restarts from the dense net) the
    compress-only lists pile up: each step also repeats the compress-only
    ratios of all earlier steps (but, as in the reference, not their retrained
    ratios).
    """
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("split_keep_ratios needs at least one keep ratio")
    if isinstance(retrain_iterations, bool) or not isinstance(retrain_iterations, (int, np.integer)):
        raise ValueError(f"{field} must be an integer (-1 or >= 1), got {retrain_iterations!r}")
    if retrain_iterations == -1:
        retrain_iterations = len(ratios)
    if not 1 <= retrain_iterations <= len(ratios):
        raise ValueError(
            f"{field} must be -1 or in [1, {len(ratios)}] (the number of keep ratios), "
            f"got {retrain_iterations!r}"
        )
    steps: list[Step] = []
    carried: tuple[float, ...] = ()
    for chunk in np.array_split(np.asarray(ratios), int(retrain_iterations)):
        own = tuple(float(r) for r in chunk[:-1])
        compress_only = own if cascade else carried + own
        carried = compress_only
        steps.append(Step(compress_only=compress_only, keep_ratio=float(chunk[-1])))
    return steps
