"""Data-dependent zeroing: parameters of the pruned net that influence nothing on S.

After a method has selected its kernel entries, the reference zeroes every
parameter whose loss gradient over S is exactly zero, then counts the size.
Exact zeros are structural: an entry reads an input that is zero on every
point of S (a dead ReLU unit upstream, a removed feature), or writes to a unit
whose backward signal is zero on every point (a dead ReLU unit, a unit none of
whose outgoing entries survived the selection). Such entries (and biases or
norm parameters of dead units) cost budget but change no output on S, so
removing them frees budget the keep-ratio search re-spends on entries that
matter.

Scope. Only the prunable (scored) layers' kernels and their biases are
zeroed, never embeddings, norm parameters or layers left dense: an embedding
row of a token absent from S has an exactly zero gradient too, yet matters on
any other input. [tp] zeroes every parameter of zero gradient, norms included.
Leaving the norm is exact on S in the usual case: a filter dead on S (its
ReLU after an eval-mode norm never fires) goes whole, its norm then sees 0
and outputs norm(0), which lies between the norm's outputs on S (an affine map
of one channel) when the filter's pre-norm output takes both signs on S, so
the ReLU still gives 0. Only a filter whose pre-norm output has one sign on
every point, with a norm scale of the opposite sign, can pass a constant
where [tp] (zeroing the norm too) passes zero.

Constant input channels (filter methods). [tp] also removes input channels
that are constant over S. A channel that is *zero* on every point of S gives
its entries an exactly zero gradient, so the rule above removes it (as a whole
channel for filter methods). A *nonzero* constant channel is kept: removing it
is only exact if its contribution is folded into the consumer's bias, which
this module does not do (a padded conv does not even see a constant there).
Filter methods keep the input channels of layers that read the model input
while ``protect_input_channels`` is on, as their selection does.

One pass, as the reference, not a fixpoint: the gradient of an entry can be
an exact zero because the points where its input is positive and those where
its unit is active are disjoint; zeroing other entries of that unit moves its
active set, so the zeroed net may again have a nonzero gradient there.

The pattern is a property of the *pruned* net (pruning every outgoing entry of
a unit kills the gradient of its incoming ones), so :func:`dead_params` runs
on the selection's masked params. Its gradient program is compiled once per
prune call (masked params are an argument); each evaluated search budget costs
one forward/backward pass over S.

Without labels, the gradient is that of a label-free surrogate with the same
exact-zero pattern: ``sum_x <r(x), f(x)>`` with a fixed pseudo-random cotangent
``r`` (uniform in (-1, 1), never zero; :func:`_cotangent`), i.e. a random
vector-Jacobian product. A parameter gets an exact zero
there iff its output Jacobian vanishes on every point of S (up to
measure-zero cancellations), which is the structural zero pattern of the loss
gradient too (softmax cross-entropy never has a zero output gradient). The sum
of the outputs would also do on most nets, but cancels exactly when the
outputs are normalised (e.g. softmax probabilities summing to one).

Models that JAX cannot reverse-differentiate (e.g. a layer inside an
``nn.while_loop``) are not zeroed: the selection stays as the method made it,
one warning is logged, and ``info['zero_dead']`` is ``{'skipped': reason}``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from sensprune import paths, registry
from sensprune import points as points_lib
from sensprune.adapter import with_params
from sensprune.compile_tiers import tiered_jit
from sensprune.context import PruneContext


def _abs_grad_impl(variables, params, x, y, index, *, adapter, loss_fn):
    """|d surrogate / d params| on one chunk; ``loss_fn=None``: the label-free surrogate
    (its cotangent keyed by the chunk ``index``).

    Compiled once per (adapter, loss, shapes), so repeated prune calls on one
    model reuse it.
    """
    surrogate = functools.partial(_surrogate, variables, x=x, y=y, index=index, adapter=adapter, loss_fn=loss_fn)
    return jax.tree.map(jnp.abs, jax.grad(surrogate)(params))


def _surrogate(variables, params, *, x, y, index, adapter, loss_fn):
    """The loss on one chunk, or (``loss_fn=None``) the random-cotangent surrogate keyed by ``index``."""
    out = adapter.apply(with_params(variables, params), x)
    if loss_fn is not None:
        return loss_fn(out, y)
    leaves = jax.tree.leaves(out)
    return sum(
        jnp.sum(leaf.astype(jnp.float32) * _cotangent(leaf.shape, index, number))
        for number, leaf in enumerate(leaves)
    )


def _cotangent(shape: tuple[int, ...], index: jax.Array, number: int) -> jax.Array:
    """A fixed pseudo-random array of ``shape``, uniform in (-1, 1) and never zero: an integer
    hash of each entry's position, the chunk ``index`` and the output leaf ``number``. A few
    elementwise integer ops, where ``jax.random`` (threefry) added about a second of XLA
    compile to the gradient program of a ResNet on CPU."""
    size = int(np.prod(shape, dtype=np.int64))
    h = lax.iota(jnp.uint32, size) + jnp.asarray(index).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
    h = h ^ jnp.uint32((0x85EBCA6B * (number + 1)) & 0xFFFFFFFF)
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # a 32-bit integer mix (xorshift-multiply)
        h = (h ^ (h >> shift)) * jnp.uint32(factor)
    h = h ^ (h >> 16)
    # 23 high bits k: (k + 1/2) / 2^22 - 1 is exact in float32, in (-1, 1) and never 0
    unit = ((h >> 9).astype(jnp.float32) + 0.5) * np.float32(2.0**-22) - 1.0
    return unit.reshape(shape)


PROMOTE_AFTER = 6  # gradient calls (budgets x chunks) on the quick build (sensprune.compile_tiers)
_abs_grad = tiered_jit(_abs_grad_impl, static_argnames=("adapter", "loss_fn"), promote_after=PROMOTE_AFTER)


def _closure_program(ctx: PruneContext):
    loss_fn = ctx.loss_fn if ctx.labels is not None else None
    return tiered_jit(functools.partial(_abs_grad_impl, adapter=ctx.adapter, loss_fn=loss_fn),
                      promote_after=PROMOTE_AFTER)


def _program(ctx: PruneContext):
    """The gradient program: shared across prune calls when adapter and loss hash, else one per context."""
    loss_fn = ctx.loss_fn if ctx.labels is not None else None
    try:
        hash((ctx.adapter, loss_fn))
    except TypeError:  # e.g. a model holding a list of layers or lambdas
        return ctx.memo(_closure_program)
    return functools.partial(_abs_grad, adapter=ctx.adapter, loss_fn=loss_fn)


class NotDifferentiable(ValueError):
    """The model's forward pass traces, its reverse-mode gradient does not (e.g. ``lax.while_loop``)."""


def _not_differentiable(ctx: PruneContext, params: Any, args: tuple) -> Optional[str]:
    """Why the gradient program failed, when the model cannot be reverse-differentiated
    (its gradient fails to trace while its value traces), else None (some other fault)."""
    loss_fn = ctx.loss_fn if ctx.labels is not None else None
    x, y, index = args

    def value(p):
        return _surrogate(ctx.variables, p, x=x, y=y, index=index, adapter=ctx.adapter, loss_fn=loss_fn)

    try:
        jax.eval_shape(value, params)
    except Exception:  # noqa: BLE001 - the forward or loss fails too: not a differentiation limit
        return None
    try:
        jax.eval_shape(jax.grad(value), params)
    except Exception as grad_err:  # noqa: BLE001 - any failure of the gradient alone
        lines = str(grad_err).strip().splitlines()
        return f"{type(grad_err).__name__}: {lines[0] if lines else ''}"
    return None


def _chunk_args(ctx: PruneContext, index: int) -> tuple:
    """``(x, y, index)`` of chunk ``index`` of S as :func:`dead_params` passes them. The last
    chunk repeats its first point up to the chunk size: one compiled shape, and a repeated point
    adds the same |gradient| again, which keeps the exact-zero pattern."""
    n = points_lib.num_points(ctx.data)
    chunk = max(1, min(int(ctx.chunk_size), n))
    start = index * chunk
    stop = min(start + chunk, n)
    rows = np.concatenate([np.arange(start, stop), np.full(chunk - (stop - start), start)])
    labels = np.zeros(n, np.int32) if ctx.labels is None else np.asarray(ctx.labels)
    return jax.tree.map(lambda a: np.asarray(a)[rows], ctx.data), labels[rows], np.int32(index)


def _num_chunks(ctx: PruneContext) -> int:
    n = points_lib.num_points(ctx.data)
    return -(-n // max(1, min(int(ctx.chunk_size), n)))


def _compile(ctx: PruneContext) -> None:
    """Compiles the gradient program for the arguments :func:`dead_params` will pass (masked
    params have the kernels' shapes, dtypes and placement), filling jit's cache."""
    from sensprune.prune import _pruned_params

    sel = registry.Selection(masks={layer.name: np.ones((), bool) for layer in ctx.layers})
    params = _pruned_params(ctx.params, ctx.layers, sel)
    program: Any = _program(ctx)
    args = (ctx.variables, params, *_chunk_args(ctx, 0))
    if isinstance(program, functools.partial):  # the shared jit, its static arguments bound
        jitted: Any = program.func
        jitted.lower(*args, **program.keywords).compile()
    else:
        program.lower(*args).compile()


def _compile_ahead(ctx: PruneContext) -> concurrent.futures.Future:
    """:func:`_compile` started in a background thread (XLA compiles without the GIL, so on a
    multi-core CPU it overlaps the pass and its compiles)."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensprune-zeroing")
    future = executor.submit(_compile, ctx)
    executor.shutdown(wait=False)
    return future


def compile_ahead(ctx: PruneContext) -> None:
    """Starts compiling the gradient program of :func:`dead_params` in the background, once
    per context; :func:`dead_params` waits for it (a failure there is ignored: the program is
    then compiled, and any error raised, on first use)."""
    ctx.memo(_compile_ahead)


def dead_params(ctx: PruneContext, params: Any) -> Any:
    """Tree of bool like ``params``: True where the gradient over S is exactly zero.

    The loss gradient with ``ctx.labels``, else the random-cotangent surrogate
    (module docstring). Absolute gradients are summed over chunks of S, so
    chunks cannot cancel each other. The points may be any pytree
    (:mod:`sensprune.points`).
    """
    ctx.memo(_compile_ahead).exception()  # waits; never compile the same program twice at once
    program = _program(ctx)
    total = None
    for i in range(_num_chunks(ctx)):
        args = _chunk_args(ctx, i)
        try:
            g = jax.device_get(program(ctx.variables, params, *args))
        except Exception as err:
            reason = _not_differentiable(ctx, params, args) if total is None else None
            if reason is None:
                raise
            raise NotDifferentiable(reason) from err
        total = g if total is None else jax.tree.map(np.add, total, g)  # host sums: no add programs
    return jax.tree.map(lambda t: np.asarray(t) == 0, total)


def _bias(tree: Any, layer) -> Any:
    """The layer's bias leaf in ``tree``, or None."""
    try:
        return paths.get_path(tree, paths.bias_path(layer))
    except KeyError:
        return None


def _dead_biases(ctx: PruneContext, pruned: Any, dead: Any, names: Any) -> tuple[Any, int]:
    """``(tree, count)``: a bool tree like ``pruned``, True only at the dead biases of the
    layers in ``names`` (zero ones too, so that their masks hold them at zero in a cascade);
    and how many of them are nonzero (what zeroing them saves)."""
    tree = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), pruned)
    count = 0
    for layer in ctx.layers:
        bias, gone = _bias(pruned, layer), _bias(dead, layer)
        if layer.name not in names or bias is None or gone is None:
            continue
        drop = np.asarray(gone, bool)
        count += int(np.count_nonzero(np.asarray(bias)[drop]))
        tree = paths.set_path(tree, paths.bias_path(layer), drop)
    return tree, count


def _structured(layer, keep: np.ndarray, dead: np.ndarray, protect_inputs: bool) -> np.ndarray:
    """``keep`` less whole output filters and whole input channels none of whose kept
    entries has a nonzero gradient (filter methods stay channel-structured);
    ``protect_inputs``: the input channels stay."""
    live = (keep & ~dead).reshape(-1, layer.in_channels, layer.out_channels)
    filters = live.any(axis=(0, 1))
    channels = live.any(axis=(0, 2)) | protect_inputs
    shape = keep.reshape(-1, layer.in_channels, layer.out_channels).shape
    both = np.broadcast_to(channels[None, :, None] & filters[None, None, :], shape)
    return keep & both.reshape(keep.shape)


def apply(ctx: PruneContext, sel: registry.Selection, structured: bool = False) -> registry.Selection:
    """``sel`` with every kept entry of exactly zero gradient over S removed.

    Only the scored layers' kernels and biases (module docstring).
    ``structured`` (filter methods, as the reference): only whole output filters
    and whole input channels go whose kept entries all have a zero gradient (an
    input channel that is zero on every point of S, a filter of a dead unit).

    Kernel masks lose their dead entries; dead nonzero biases of the scored
    layers are recorded in ``info['zero_dead']`` (``'dead'``: the bool tree of
    them, ``'other'``: how many, ``'kernel'``: how many kept kernel entries go)
    for :func:`zero_params`. Selections that rewrite kernels or cost a
    method-defined size (low rank) are returned unchanged; so are all selections
    of a model JAX cannot reverse-differentiate, with ``info['zero_dead'] =
    {'skipped': reason}`` (one warning per context).
    """
    if sel.kernels or sel.sizes:
        return sel
    from sensprune.prune import _pruned_params

    skipped = ctx.memo(_skipped)
    if not skipped:
        pruned = _pruned_params(ctx.params, ctx.layers, sel)
        try:
            dead = dead_params(ctx, pruned)
        except NotDifferentiable as err:
            skipped.append(str(err))
            logging.warning(
                "sensprune: zero_dead skipped, the model cannot be reverse-differentiated (%s); "
                "the selection keeps its entries of zero gradient", err,
            )
    if skipped:
        return dataclasses.replace(sel, info=dict(sel.info, zero_dead={"skipped": skipped[0]}))
    masks = {}
    kernel_gone = 0
    protected = ctx.input_layers() if structured and ctx.protect_input_channels else frozenset()
    for layer in ctx.layers:
        if layer.name not in sel.masks:
            continue
        keep = np.asarray(sel.masks[layer.name], bool)
        gone = np.asarray(paths.get_kernel(dead, layer))
        new = _structured(layer, keep, gone, layer.name in protected) if structured else keep & ~gone
        kernel_gone += int(keep.sum() - new.sum())
        masks[layer.name] = new
    biases, other = _dead_biases(ctx, pruned, dead, masks)
    info = dict(sel.info, zero_dead={"dead": biases, "other": other, "kernel": kernel_gone})
    return dataclasses.replace(sel, masks={**sel.masks, **masks}, info=info)


def _skipped(ctx: PruneContext) -> list[str]:
    """Per context: holds the reason once zeroing was found impossible (then not retried)."""
    return []


def zeroed_other(sel: registry.Selection) -> int:
    """Nonzero biases of scored layers that :func:`apply` removed (0 without zeroing)."""
    return int(sel.info.get("zero_dead", {}).get("other", 0))


def zero_params(params: Any, masks: Any, sel: registry.Selection) -> tuple[Any, Any, dict[str, int]]:
    """``(params, masks, counts)``: the dead biases of ``sel`` set to zero / False,
    and how many kept entries went (``{'kernel': .., 'other': ..}``; empty without zeroing,
    ``{'skipped': reason}`` where the model could not be differentiated)."""
    record: Mapping[str, Any] = sel.info.get("zero_dead", {})
    if "skipped" in record:
        return params, masks, {"skipped": record["skipped"]}
    if "dead" not in record:
        return params, masks, {}
    params, masks = clear(params, masks, record["dead"])
    return params, masks, {"kernel": int(record["kernel"]), "other": int(record["other"])}


def clear(params: Any, masks: Any, dead: Any) -> tuple[Any, Any]:
    """``(params, masks)`` set to zero / False where the bool tree ``dead`` is True (on the host,
    back on each leaf's device; leaves without a dead entry are returned as they are)."""
    params = jax.tree.map(_where_dead(lambda p, d: np.where(d, np.zeros_like(p), p)), params, dead)
    masks = jax.tree.map(_where_dead(lambda m, d: np.logical_and(np.asarray(m, bool), ~d)), masks, dead)
    return params, masks



def _where_dead(fn: Any) -> Any:
    """``fn(leaf, dead)`` on the host for leaves with a dead entry, back on the leaf's device;
    other leaves unchanged (no per-leaf programs)."""

    def update(leaf: Any, dead: Any) -> Any:
        dead = np.asarray(dead, bool)
        if not dead.any():
            return leaf
        new = fn(np.asarray(leaf), dead)
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(new, sharding) if sharding is not None else jax.device_put(new)

    return update
