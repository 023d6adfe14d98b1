"""Channel flow through a jaxpr: which sources feed each last-axis index of each array.

A small abstract interpreter for :mod:`sensprune.dependencies`. Every array
carries one *row* per index of its last axis (the channel / feature axis); a row
is a Python int used as a bitset of *sources* (model input channels, layer
output channels, per-channel variable entries). Elementwise ops take unions,
data movement (reshape/flatten, slicing, concatenation, padding, broadcasting,
transposes that keep the last axis) maps indices exactly, and reductions over
the channel axis and every op without a rule (convolutions and matmuls outside
prunable layers, gathers, loops, ...) join *all* channels: an
over-approximation, which can only make channel groups larger, never unsafe.
Grouped and depthwise convolutions map channels exactly (group by group).
Sub-jaxprs (``pjit``, ``custom_jvp_call``, ...) are interpreted recursively.
Arrays whose sources span several axes (attention heads: :mod:`sensprune.axis_rows`)
carry a :class:`~sensprune.axis_rows.Tracked` table instead of last-axis rows.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import numpy as np

from sensprune.axis_rows import Tracked, fold, tracked_rule
from sensprune.scan_flow import ScanState, flatten, step_scan

__all__ = ["n_rows", "propagate", "zeros"]

_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
    population_count pow real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor sharding_constraint
    mesh_cast device_put pvary name""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min reduce_window".split())
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


# --------------------------------------------------------------------------- bitset rows


def n_rows(shape: Sequence[int]) -> int:
    return int(shape[-1]) if len(shape) else 1


def zeros(n: int) -> np.ndarray:
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
    out = zeros(n_out)
    pairs = np.unique(np.stack([out_idx, in_idx], 1), axis=0)
    for j, i in pairs.tolist():
        out[j] = out[j] | rows[i]
    return out


def _reshape_rows(rows: np.ndarray, in_shape, out_shape) -> np.ndarray:
    n_in, n_out = n_rows(in_shape), n_rows(out_shape)
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


def _grouped_conv_rows(p, ins: list[np.ndarray], in_shapes, out_shapes):
    """``(output rows, kernel rows)`` of a grouped conv (``feature_group_count = G > 1``) in the
    channel-last layouts, else None. Output channel ``o`` of group ``g = o // (O/G)`` reads input
    channels ``[g C/G, (g+1) C/G)`` and kernel row ``o`` (depthwise: channel ``o // (O/C)``), so a
    removed channel group takes its producer filters, kernel rows and consumer columns together."""
    groups = int(p.get("feature_group_count", 1))
    dn = p.get("dimension_numbers")
    if groups <= 1 or int(p.get("batch_group_count", 1)) != 1 or dn is None or len(in_shapes) != 2:
        return None
    lhs, rhs, out = (tuple(spec) for spec in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    if lhs[1] != len(in_shapes[0]) - 1 or rhs[0] != len(in_shapes[1]) - 1 or out[1] != len(out_shapes[0]) - 1:
        return None
    n_in, n_out = n_rows(in_shapes[0]), n_rows(out_shapes[0])
    if len(ins[0]) != n_in or len(ins[1]) != n_out or n_in % groups or n_out % groups:
        return None
    c_g, o_g = n_in // groups, n_out // groups
    per_group = [_union_all(ins[0][g * c_g : (g + 1) * c_g]) for g in range(groups)]
    rows = zeros(n_out)
    for o in range(n_out):
        rows[o] = per_group[o // o_g] | ins[1][o]
    return rows, ins[1]


def _eqn_rule(eqn, ins: list[np.ndarray], notes: set[str], sliced: set[int]) -> list[np.ndarray]:
    """Output rows of one equation from its input rows; ``sliced`` collects the sources (as bitsets)
    of grouped-conv kernels (their last axis is mapped exactly, so they may be sliced on it)."""
    name = eqn.primitive.name
    p = eqn.params
    in_shapes = [_shape(v) for v in eqn.invars]
    out_shapes = [_shape(v) for v in eqn.outvars]
    n_out = [n_rows(s) for s in out_shapes]
    nd = len(in_shapes[0]) if in_shapes else 0
    last = nd - 1

    if name in _ELEMENTWISE or name == "optimization_barrier":
        if len(eqn.outvars) == len(ins) and len(ins) > 1:  # per-operand pass-through ops
            return [_fit(r, n) for r, n in zip(ins, n_out)]
        rows = zeros(n_out[0])
        for r in ins:
            rows = rows | _fit(r, n_out[0])
        return [rows] * len(eqn.outvars)
    if name == "iota":
        return [zeros(n) for n in n_out]
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
            return [np.concatenate([_fit(r, n_rows(s)) for r, s in zip(ins, in_shapes)])]
        rows = zeros(n_out[0])
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
            fitted = [_fit(r, n) for r, n in zip(ins[:n_data], n_out)]
            for extra in ins[n_data:]:  # init values
                fitted = [r | _fit(extra, len(r)) for r in fitted]
            return fitted
    if name == "conv_general_dilated":
        grouped = _grouped_conv_rows(p, ins, in_shapes, out_shapes)
        if grouped is not None:
            rows, kernel_rows = grouped
            sliced.add(_union_all(kernel_rows))
            return [rows]
    # Anything else (conv / matmul outside a prunable layer, gathers, loops, ...): join everything.
    if name not in ("conv_general_dilated", "dot_general"):
        notes.add(name)
    everything = functools.reduce(operator.or_, [_union_all(r) for r in ins], 0)
    return [_full(n, everything) for n in n_out]


def _leaf_rule(eqn, ins: list[Any], notes: set[str], sliced: set[int], scan: ScanState | None) -> list[Any]:
    """Output rows of an equation without a sub-jaxpr (a tagged scan-slice input is recorded)."""
    if scan is not None and eqn.primitive.name == "name":
        scan.record(str(eqn.params.get("name", "")), ins[0], _shape(eqn.invars[0]))
    if any(isinstance(r, Tracked) for r in ins):  # rows over several axes (attention heads)
        outs = tracked_rule(eqn, ins, elementwise=eqn.primitive.name in _ELEMENTWISE)
        if outs is not None:
            return outs
        ins = [fold(r, _shape(v)) for r, v in zip(ins, eqn.invars)]
    return _eqn_rule(eqn, ins, notes, sliced)


def propagate(
    jaxpr, in_rows: list[Any], const_rows: list[np.ndarray], notes: set[str], sliced: set[int] | None = None,
    scan: ScanState | None = None,
) -> list[Any]:
    """Rows of the jaxpr's outputs: plain last-axis rows, or :class:`~sensprune.axis_rows.Tracked`
    tables where the sources span several axes (attention heads); ``notes`` collects the primitives
    joined conservatively, ``sliced`` the sources (bitsets) of grouped-conv kernels
    (:func:`_grouped_conv_rows`). With ``scan`` (scan slices marked: :mod:`sensprune.scan_flow`),
    scan bodies are stepped through and tagged layer inputs recorded; otherwise a scan body is
    read once."""
    sliced = set() if sliced is None else sliced
    env: dict[Any, Any] = {}

    def read(v):
        if _is_literal(v):
            return zeros(n_rows(_shape(v)))
        return env[v]

    for v, r in zip(jaxpr.constvars, const_rows):
        env[v] = r
    for v, r in zip(jaxpr.invars, in_rows):
        env[v] = r

    def run(sub, rows, consts, state):
        return propagate(sub, rows, consts, notes, sliced, state)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if scan is not None and eqn.primitive.name == "scan":
            outs = step_scan(eqn, ins, scan, run, zeros)
        elif sub is not None:  # a call: stacked rows pass through to the scans inside
            consts = [zeros(n_rows(_shape(c))) for c in sub.constvars]
            outs = propagate(sub, ins, consts, notes, sliced, scan)
        else:
            outs = _leaf_rule(eqn, [flatten(r, _shape(v)) for r, v in zip(ins, eqn.invars)], notes, sliced, scan)
        for v, r in zip(eqn.outvars, outs):
            if type(v).__name__ != "DropVar":
                env[v] = r
    return [flatten(read(v), _shape(v)) for v in jaxpr.outvars]
