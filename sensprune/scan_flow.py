"""Channel flow through ``nn.scan`` bodies: each slice of a scanned stack is its own layer.

The body of a scan is traced once, but the unrolled model runs it once per step with
step ``i``'s slice of every stacked kernel and per-channel vector. The channel
analysis (:mod:`sensprune.channel_flow`) does the same: it steps through the body
``length`` times, feeding the carry (e.g. the residual stream) from step to step, and
gives step ``i`` the sources of slice ``i`` only. Those arrive as :class:`Stacked`
rows: one row table per slice, for

- the *marker* of a scanned layer (its output, closed over by the body: a scan const), and
- a stacked per-channel leaf (a LayerNorm scale ``[layers, D]``: a scan ``xs``, sliced on axis 0).

Anywhere else a :class:`Stacked` value is folded into the union of its slices (an
over-approximation, which can only join more channels, never fewer). Layer inputs
inside a body are tagged (:func:`consume_tag`) and recorded per step (:class:`ScanState`),
so slice ``i`` of a layer consumes what step ``i`` feeds it. Channel groups crossing the
scan boundary through the carry join across slices as in the unrolled model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sensprune import geometry, lifted
from sensprune.axis_rows import Tracked, fold
from sensprune.types import Layer

__all__ = ["ScanState", "Stacked", "consume_tag", "flatten", "step_scan", "trace_stacked"]

_CONSUME = "consumed-by:"


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Rows of a value with one row table per slice of a scanned stack.

    Attributes:
      slices: rows (plain last-axis rows or :class:`~sensprune.axis_rows.Tracked`) of each slice.
      at: ``'const'`` (a value the scan body closes over: a marker) or ``'xs'`` (a leaf the scan
        slices on axis 0: a stacked per-channel variable).
    """

    slices: tuple[Any, ...]
    at: str


@dataclasses.dataclass
class ScanState:
    """The scan steps being interpreted (outermost first) and the layer inputs recorded so far:
    ``consumed[(tag, steps)]`` = ``[(rows, shape), ...]``."""

    steps: tuple[int, ...] = ()
    consumed: dict[tuple[str, tuple[int, ...]], list[tuple[Any, tuple[int, ...]]]] = dataclasses.field(
        default_factory=dict
    )

    def enter(self, step: int) -> "ScanState":
        return ScanState((*self.steps, step), self.consumed)

    def record(self, name: str, rows: Any, shape: tuple[int, ...]) -> None:
        """Records the rows of a tagged layer input (ignores other ``checkpoint_name`` tags)."""
        if name.startswith("sensprune:" + _CONSUME):
            key = (name[len("sensprune:" + _CONSUME):], self.steps)
            self.consumed.setdefault(key, []).append((flatten(rows, shape), shape))


def consume_tag(path_name: str) -> str:
    """The tag (:func:`sensprune.lifted.tag`) of the input of the scanned layer at ``path_name``."""
    return _CONSUME + path_name


def _union(a: Any, b: Any, shape: Sequence[int]) -> Any:
    if isinstance(a, Tracked) and isinstance(b, Tracked) and a.axes == b.axes and a.table.shape == b.table.shape:
        return Tracked(a.table | b.table, a.axes, a.ndim)
    return fold(a, shape) | fold(b, shape)


def flatten(rows: Any, shape: Sequence[int]) -> Any:
    """``rows`` with a :class:`Stacked` value folded into the union of its slices."""
    if not isinstance(rows, Stacked):
        return rows
    out = rows.slices[0]
    for r in rows.slices[1:]:
        out = _union(out, r, shape)
    return out


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(v.aval, "shape", ()))


def _slice_of(rows: Any, at: str, step: int, length: int, shape: Sequence[int]) -> Any:
    if isinstance(rows, Stacked) and rows.at == at and len(rows.slices) == length:
        return rows.slices[step]
    return flatten(rows, shape)


Run = Callable[[Any, list[Any], list[Any], ScanState], list[Any]]


def step_scan(eqn: Any, ins: list[Any], state: ScanState, run: Run, zeros: Callable[[int], Any]) -> list[Any]:
    """Output rows of a ``scan`` equation, its body interpreted once per step (``run``:
    ``(jaxpr, in_rows, const_rows, state) -> out_rows``); ``zeros(n)``: empty rows."""
    p = eqn.params
    body = p["jaxpr"]
    length, n_consts, n_carry = int(p["length"]), int(p["num_consts"]), int(p["num_carry"])
    shapes = [_shape(v) for v in eqn.invars]
    body_shapes = [_shape(v) for v in body.jaxpr.invars]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    carry = [flatten(r, s) for r, s in zip(carry, shapes[n_consts:])]
    body_consts = [zeros(int(np.shape(c)[-1]) if np.ndim(c) else 1) for c in body.consts]
    out_shapes = [_shape(v) for v in body.jaxpr.outvars[n_carry:]]
    per_step: list[list[Any]] = [[] for _ in out_shapes]
    # no slices to hand out: every step sees the same inputs, so once the carry stops changing,
    # the remaining steps repeat the last one exactly
    settles = all(out_shapes) and not any(isinstance(r, Stacked) for r in (*consts, *xs))
    for t in range(length):
        before = carry
        i = length - 1 - t if p.get("reverse") else t
        step_in = (
            [_slice_of(r, "const", i, length, s) for r, s in zip(consts, shapes)]
            + carry
            + [_slice_of(r, "xs", i, length, s) for r, s in zip(xs, body_shapes[n_consts + n_carry:])]
        )
        outs = [flatten(r, s) for r, s in zip(run(body.jaxpr, step_in, body_consts, state.enter(i)),
                                              [_shape(v) for v in body.jaxpr.outvars])]
        carry = outs[:n_carry]
        for k, r in enumerate(outs[n_carry:]):
            per_step[k].append(fold(r, out_shapes[k]))
        if settles and t and all(_same(a, b) for a, b in zip(before, carry)):
            break
    ys = []
    for k, shape in enumerate(out_shapes):
        steps = per_step[k]
        if not steps:
            ys.append(zeros(length if not shape else shape[-1]))
        elif not shape:  # a scalar per step: the stacked ys' last axis is the step
            out = zeros(length)
            for t, r in enumerate(steps):
                out[length - 1 - t if p.get("reverse") else t] = r[0]
            ys.append(out)
        else:
            acc = steps[0]
            for r in steps[1:]:
                acc = acc | r
            ys.append(acc)
    return [*carry, *ys]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tracked) or isinstance(b, Tracked):
        return (isinstance(a, Tracked) and isinstance(b, Tracked) and a.axes == b.axes
                and a.table.shape == b.table.shape and bool(np.all(a.table == b.table)))
    return len(a) == len(b) and bool(np.all(np.asarray(a, object) == np.asarray(b, object)))


# --------------------------------------------------------------------------- tracing


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def trace_stacked(adapter: Any, variables: Mapping[str, Any], x: Any, layers: Sequence[Layer]):
    """Like :func:`sensprune.adapter.trace_with_markers`, with scan slices: every slice of a scanned
    layer shares one marker (keyed by the layer's path name, of the per-step output shape), whose
    :class:`Stacked` rows hand each step its own slice, and its input is tagged
    (:func:`consume_tag`) instead of returned.

    Returns:
      ``(closed jaxpr, output shapes, markers)``.
    """
    plain = {tuple(layer.path): layer for layer in layers if not layer.index}
    stacked = {tuple(layer.path): layer for layer in layers if layer.index}

    def fn(variables, x, markers):
        captured = {}

        def interceptor(next_fun, args, kwargs, call):
            path = tuple(call.path)
            if path in plain:
                captured[plain[path].name] = geometry.layer_input(args, kwargs)
                return markers[plain[path].name]
            if path in stacked:
                lifted.tag(geometry.layer_input(args, kwargs), consume_tag(geometry.layer_name(path)))
                return markers[geometry.layer_name(path)]
            return next_fun(*args, **kwargs)

        return adapter.intercept(variables, x, interceptor), captured

    batch = int(jax.tree_util.tree_leaves(x)[0].shape[0])
    markers = {layer.name: jax.ShapeDtypeStruct((batch, *layer.output_shape), jnp.float32)
               for layer in plain.values()}
    markers.update({geometry.layer_name(path): jax.ShapeDtypeStruct((batch, *layer.output_shape), jnp.float32)
                    for path, layer in stacked.items()})
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(_abstract(variables), _abstract(x), markers)
    return closed, shapes, markers
