"""Layer inputs from inside lifted transforms (``nn.scan``, ``nn.remat``, ``nn.RNN``, ``jax.jit``).

A Linen ``sow`` inside ``nn.scan`` is dropped unless the user's scan lists the
collection in its ``variable_axes``, so the inputs of layers called inside a
scan cannot be collected through a Flax collection. Instead every captured
input is *tagged* with an identity (:func:`tag`, ``checkpoint_name``), the
forward is traced to a jaxpr, and :func:`tagged_values` rewrites that jaxpr
so each tagged value becomes an extra output: a tag inside a ``scan`` body
comes out stacked over the scan steps (leading axis = step), a tag inside
``remat`` / ``jit`` as is; a tag inside a ``while`` loop or a ``cond`` branch
cannot be handed out and is reported as lost (the layer stays dense). Pure and
jittable (the rewritten jaxpr is evaluated in the caller's trace).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from sensprune.types import Layer

__all__ = ["expand_layer", "in_call_order", "layer_input", "lost_reason", "stack_dims", "tag", "tagged_values"]

_PREFIX = "sensprune:"
_CALLS = ("remat2", "checkpoint", "jit", "pjit", "closed_call", "core_call")


def tag(x: Any, name: str) -> Any:
    """``x`` marked as the input of layer ``name`` (an identity, kept through scan and remat)."""
    return checkpoint_name(x, _PREFIX + name)


def _tag_name(eqn: Any) -> str | None:
    if eqn.primitive.name != "name":
        return None
    name = str(eqn.params.get("name", ""))
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else None


def _tags_in(jaxpr: Any) -> list[str]:
    """Every tag inside ``jaxpr`` (open or closed), nested bodies included."""
    out = []
    for e in _eqns(jaxpr):
        name = _tag_name(e)
        if name is not None:
            out.append(name)
        for sub in jcore.jaxprs_in_params(e.params):
            out.extend(_tags_in(sub))
    return out


def _has_tags(jaxpr: Any) -> bool:
    return bool(_tags_in(jaxpr))


def _eqns(jaxpr: Any) -> list:
    return list(getattr(jaxpr, "jaxpr", jaxpr).eqns)


def _surface(jaxpr: Any, lost: dict[str, str]) -> tuple[Any, list[str]]:
    """``jaxpr`` (open) with every tagged value appended to its outputs, and the tags in that order.

    Tags inside a primitive whose body cannot return them (a while loop, a cond branch) go to ``lost``
    (tag -> primitive name)."""
    eqns, extra, tags = [], [], []
    for eqn in jaxpr.eqns:
        name = _tag_name(eqn)
        if name is not None:
            eqns.append(eqn)
            extra.append(eqn.outvars[0])
            tags.append(name)
            continue
        inside = [t for sub in jcore.jaxprs_in_params(eqn.params) for t in _tags_in(sub)]
        if not inside:
            eqns.append(eqn)
            continue
        if eqn.primitive.name != "scan" and eqn.primitive.name not in _CALLS:
            lost.update({t: eqn.primitive.name for t in inside})
            eqns.append(eqn)
            continue
        eqn, outs, inner = _surface_eqn(eqn, lost)
        eqns.append(eqn)
        extra.extend(outs)
        tags.extend(inner)
    new = jaxpr.replace(eqns=eqns, outvars=[*jaxpr.outvars, *extra], debug_info=None)
    return new, tags


def _closed(jaxpr: Any, consts: Any) -> Any:
    return jcore.ClosedJaxpr(jaxpr, consts)


def _surface_eqn(eqn: Any, lost: dict[str, str]) -> tuple[Any, list[Any], list[str]]:
    """An equation holding tagged values in its body, rewritten to also return them."""
    prim = eqn.primitive.name
    params = dict(eqn.params)
    if prim == "scan":
        body, tags = _surface(params["jaxpr"].jaxpr, lost)
        params["jaxpr"] = _closed(body, params["jaxpr"].consts)
        length = int(params["length"])
        new = body.outvars[len(body.outvars) - len(tags):]
        outs = [jcore.Var(v.aval.update(shape=(length, *v.aval.shape))) for v in new]
    else:  # one of _CALLS
        key = "jaxpr" if "jaxpr" in params else "call_jaxpr"
        inner = params[key]
        closed = isinstance(inner, jcore.ClosedJaxpr)
        body, tags = _surface(inner.jaxpr if closed else inner, lost)
        params[key] = _closed(body, inner.consts) if closed else body
        outs = [jcore.Var(v.aval) for v in body.outvars[len(body.outvars) - len(tags):]]
        for field, fill in (("out_shardings", None), ("out_layouts", None)):
            if field in params:
                extra: Any = _unspecified() if field == "out_shardings" else fill
                params[field] = (*params[field], *([extra] * len(tags)))
    return eqn.replace(params=params, outvars=[*eqn.outvars, *outs]), outs, tags


def _unspecified() -> Any:
    from jax._src.sharding_impls import UNSPECIFIED  # the "no sharding given" marker of jit outputs

    return UNSPECIFIED


def tagged_values(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, list[Any]], dict[str, str]]:
    """``(fn(*args), {tag: [value of each tagged occurrence, in program order]}, lost)``.

    A tag inside ``scan`` bodies comes back with one leading axis per enclosing
    scan (its steps). ``lost``: tag -> the primitive (``while``, ``cond``, ...)
    whose body holds it and cannot hand it out. Pure: works under :func:`jax.jit`.
    """
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    lost: dict[str, str] = {}
    body, tags = _surface(closed.jaxpr, lost)
    flat = jcore.jaxpr_as_fun(_closed(body, closed.consts))(*jax.tree_util.tree_leaves(args))
    n = len(flat) - len(tags)
    out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat[:n])
    found: dict[str, list[Any]] = {}
    for name, value in zip(tags, flat[n:]):
        found.setdefault(name, []).append(value)
    return out, found, lost


def lost_reason(primitive: str) -> str:
    """Why a layer called inside ``primitive`` is left dense."""
    return (
        f"called inside a {primitive!r} (a lax.while_loop / nn.while_loop or a lax.cond branch), whose inputs "
        "sensprune cannot read (it reads them through jit, nn.remat, nn.scan and nn.RNN); left dense"
    )


# --------------------------------------------------------------------------- layers inside scans


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _scan_axes(layer: Layer, value_shape: Sequence[int]) -> int:
    """Leading scan-step axes of a tagged input ``[*steps, B, *input_shape]``."""
    return len(value_shape) - 1 - len(layer.input_shape)


def stack_dims(layer: Layer, leaf_shape: Sequence[int]) -> tuple[int, ...]:
    """Leading axes of the parameter leaf that ``nn.scan`` stacked (one slice per step), or ``()``."""
    inner = tuple(layer.param_shape) or tuple(layer.kernel_shape)
    extra = len(leaf_shape) - len(inner)
    if extra > 0 and tuple(leaf_shape[extra:]) == inner:
        return tuple(int(d) for d in leaf_shape[:extra])
    return ()


def expand_layer(
    layer: Layer, leaf_shape: Sequence[int], occurrences: Sequence[Any], batch: int = 1
) -> list[Layer]:
    """The layers of one traced layer module: one per slice of a stacked (scanned) kernel,
    with ``calls`` counting every step of the scans that share the kernel.

    ``occurrences``: shapes of the tagged inputs (:func:`tagged_values`), one per call site, of a
    forward on ``batch`` points.
    Raises ValueError when the stack is not on the leading scan axes.
    """
    stack = stack_dims(layer, leaf_shape)
    shapes = [tuple(getattr(shape, "shape", shape)) for shape in occurrences]
    if layer.positions_folded:
        if stack:
            raise ValueError("a scan-stacked kernel called with different input shapes is left dense")
        rows = sum(_prod(shape) for shape in shapes) // layer.input_shape[0]
        return [dataclasses.replace(layer, calls=max(rows // max(batch, 1), 1))]
    calls = 0
    for shape in shapes:
        n = _scan_axes(layer, shape)
        if n < len(stack) or shape[: len(stack)] != stack:
            raise ValueError(
                f"kernel of shape {tuple(leaf_shape)} is stacked as {stack}, but the layer runs inside scans of "
                f"lengths {shape[:max(n, 0)]}: nn.scan must stack params on axis 0 (variable_axes={{'params': 0}})"
            )
        calls += _prod(shape[len(stack) : n])
    calls = max(calls, 1)
    if not stack:
        return [dataclasses.replace(layer, calls=calls)]
    return [dataclasses.replace(layer, calls=calls, index=tuple(int(i) for i in idx)) for idx in np.ndindex(*stack)]


def layer_input(layer: Layer, values: Sequence[Any]) -> Any:
    """The input of ``layer`` (``[calls * B, *input_shape]``) from its tagged values: its own
    slice of stacked scan steps, the other steps (a shared kernel) folded into the batch axis."""
    parts = []
    for v in values:
        if layer.index:
            v = v[layer.index]
        parts.append(v.reshape((-1, *layer.input_shape)))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def in_call_order(layers: Sequence[Layer]) -> list[Layer]:
    """Scan slices in execution order: within each run of consecutively found stacked layers
    (one scanned block), slice 0 of every layer, then slice 1, ...; ``order`` renumbered."""
    out: list[Layer] = []
    run: list[Layer] = []

    def flush() -> None:
        out.extend(sorted(run, key=lambda layer: (layer.index, layer.order)))
        run.clear()

    for layer in layers:
        if layer.index and (not run or len(run[0].index) == len(layer.index)):
            run.append(layer)
            continue
        flush()
        if layer.index:
            run.append(layer)
        else:
            out.append(layer)
    flush()
    return [dataclasses.replace(layer, order=i) for i, layer in enumerate(out)]
