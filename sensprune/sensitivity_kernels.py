"""Sensitivity kernels: weights (SiPP) and input channels (PFP) of one layer over one chunk.

Notation (spec §1.1). A layer is a matrix product per output position ``p``:
patches ``a(x, p)`` of length ``J`` times the kernel matrix ``W [J, O]``
(:mod:`sensprune.patches`); the bias is ignored. With ``W+ = max(W, 0)`` and
``W- = min(W, 0)``::

    z+_i(x, p) = sum_j W+_ji a_j(x, p)       z-_i(x, p) = sum_j W-_ji a_j(x, p)
    g_ji(x, p) = W_ji a_j(x, p) / z^{sign W_ji}_i(x, p)        (0 if W_ji == 0)

Denominators with ``|z| <= eps(float32)`` contribute 0. ``g`` is reduced over
``p`` by ``mean`` (deterministic SiPP) or ``max`` (SiPP rand / hybrid, PFP),
then maxed over every point of S.

Input sign split. A point with a negative entry is replaced by the two
nonnegative pseudo-points ``max(a, 0)`` and ``max(-a, 0)``. Splitting a
nonnegative point yields ``(a, 0)`` and the zero point contributes nothing, so
the split is decided per small group of points (``lax.cond`` on "any negative
entry"): the result is exactly the reference's per-batch rule, independent of
chunking, and post-ReLU inputs pay no 2x.

Efficient formulation. Numerator and denominator share their sign, so::

    g_ji(x, p) = |W_ji| * a_j(x, p) * q_{s(ji), i}(x, p),
    q+ = 1 / z+,  q- = 1 / |z-|   (0 where guarded),  s(ji) = sign of W_ji.

Both ``z`` come from one matmul against ``[W+, W-]`` and ``|W|`` factors out of
every reduction (it is constant per ``(j, i)``):

* ``mean`` over ``P > 1`` positions: ``sum_p a_j q_i`` is one batched matmul
  (``'gpj,gpi->gji'``) against ``[q+, q-]``; the sign of each weight then
  selects its half, followed by a max over points.
* ``max`` (and Dense layers, where ``P == 1`` makes both reductions equal) is a
  (max, x) contraction over all rows ``n = (point, p)``:
  ``max_n a[n, j] * q_sel[n, j, i]``, where ``q_sel`` picks ``q+`` or ``q-``
  by the sign of ``W_ji`` *before* the product, so there is one contraction,
  not two (measured 1.5-2x faster than two contractions and a final select).
  It is a ``lax.scan`` over blocks of rows:

  - on CPU (``contraction='unrolled'``) the carry is the ``[O, J]``
    running max itself and each step applies ``_UNROLL_ROWS`` (16) rank-1
    updates ``carry = max(carry, a[n] * q_sel[n])`` as a Python-unrolled chain
    of elementwise ops, which XLA fuses into one vectorised loop that reads
    and writes the carry once per 16 products (2-4x faster on conv-sized and
    ~10x on LeNet-sized dense contractions than ``'carry'``; with fewer than
    16 rows per step XLA fuses the scan's dynamic slices into that loop and it
    slows down several-fold). ``'carry'``, the previous strategy, keeps a
    ``[rows, O, J]`` carry (about ``_CARRY_ELEMENTS``) updated with one
    product per element and step and reduced over ``rows`` at the end.
    XLA:CPU emits reductions as slow scalar loops (a fused multiply-max reduce
    over ``N`` ran at ~0.3 G products/s) but vectorises elementwise updates;
    ``[O, J]`` layout beat ``[J, O]`` by ~1.5x.
  - elsewhere (``'reduce'``) each step is one fused broadcast-multiply-max
    reduce over a block of about ``_BLOCK_ELEMENTS`` products, which keeps
    GPU kernel launches few; nothing of size ``N * J * O`` is materialised.

Points are processed in groups inside a ``lax.scan`` (patches are built per
group), so memory is ``O(group * P * J + J * O)`` whatever the chunk size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensprune.patches import gather_rows, input_patches, kernel_matrix, matrix_to_kernel
from sensprune.types import Layer, LayerSensitivity

EPS = float(np.finfo(np.float32).eps)
REDUCTIONS = ("mean", "max")
_HIGHEST = lax.Precision.HIGHEST

# Sizes of per-step intermediates, in elements (tuned on CPU, see module doc).
_GROUP_ELEMENTS = 2**18  # patch entries per group of points
_CARRY_ELEMENTS = 2**15  # running-max carry of the (max, x) contraction on CPU
_BLOCK_ELEMENTS = 2**24  # products per fused reduce on accelerators
_UNROLL_ROWS = 16  # rank-1 updates per scan step of the unrolled CPU contraction
# (max, x) contraction strategies (``contraction=`` of the kernels): "auto" (unrolled on CPU,
# reduce elsewhere), "unrolled", "carry" (the previous CPU strategy), "reduce".
CONTRACTIONS = ("auto", "unrolled", "carry", "reduce")


def _ensure_pytree() -> None:
    """Registers LayerSensitivity as a pytree (unless types.py already does)."""
    probe = LayerSensitivity(weight=0, channel=1)  # type: ignore[arg-type]
    if len(jax.tree_util.tree_leaves(probe)) != 2:
        jax.tree_util.register_dataclass(
            LayerSensitivity, data_fields=["weight", "channel"], meta_fields=[]
        )


_ensure_pytree()


def max_sensitivity(a: LayerSensitivity, b: LayerSensitivity) -> LayerSensitivity:
    """Elementwise maximum of two sensitivities of the same layer."""
    return LayerSensitivity(
        weight=jnp.maximum(a.weight, b.weight), channel=jnp.maximum(a.channel, b.channel)
    )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _guarded_inverse(z: jax.Array) -> jax.Array:
    """``1 / |z|``, and 0 where ``|z| <= eps``."""
    mag = jnp.abs(z)
    ok = mag > EPS
    return jnp.where(ok, 1.0 / jnp.where(ok, mag, 1.0), 0.0)


def _like(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _scan_max(fn: Callable[..., Any], xs: tuple, like: Any) -> Any:
    """``max_k fn(*[x[k] for x in xs])`` (a pytree of arrays shaped as the
    ``ShapeDtypeStruct`` leaves of ``like``) as a scan with a running-max carry."""
    if xs[0].shape[0] == 1:
        return fn(*(x[0] for x in xs))

    def step(carry, x):
        return jax.tree_util.tree_map(jnp.maximum, carry, fn(*x)), None

    init = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), like)
    return lax.scan(step, init, xs)[0]


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def resolve_contraction(contraction: str) -> str:
    """The (max, x) strategy ``contraction`` names, with ``'auto'`` resolved for the default backend."""
    if contraction not in CONTRACTIONS:
        raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    if contraction == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "reduce"
    return contraction


def _unrolled_max_contract(a: jax.Array, q_plus: jax.Array, q_minus: jax.Array, positive_t: jax.Array) -> jax.Array:
    """The CPU contraction: an ``[O, J]`` running max updated with ``_UNROLL_ROWS``
    rank-1 products per scan step, written as a chain of elementwise maxima so
    XLA fuses the step into one vectorised loop (the carry is read and written
    once per ``_UNROLL_ROWS`` products). Returns ``[O, J]``."""
    n, fan_in = a.shape
    out = q_plus.shape[1]
    rows = n if n <= _UNROLL_ROWS else _UNROLL_ROWS  # <= 16 rows: one step, no dynamic slicing
    pad = -n % rows
    if pad:  # zero rows add zero products, which never raise a max of values >= 0
        a, q_plus, q_minus = (jnp.pad(v, ((0, pad), (0, 0))) for v in (a, q_plus, q_minus))
    xs = (a.reshape(-1, rows, fan_in), q_plus.reshape(-1, rows, out), q_minus.reshape(-1, rows, out))

    def step(carry, x):
        a_rows, qp_rows, qn_rows = x
        for r in range(rows):  # unrolled: one fused elementwise loop per step
            q_sel = jnp.where(positive_t, qp_rows[r][:, None], qn_rows[r][:, None])
            carry = jnp.maximum(carry, a_rows[r][None, :] * q_sel)
        return carry, None

    if xs[0].shape[0] == 1:
        return step(jnp.zeros((out, fan_in), jnp.float32), tuple(x[0] for x in xs))[0]
    return lax.scan(step, jnp.zeros((out, fan_in), jnp.float32), xs)[0]


def _max_contract(
    a: jax.Array, q_plus: jax.Array, q_minus: jax.Array, positive: jax.Array, contraction: str
) -> jax.Array:
    """``max_n a[n, j] * (q+[n, i] if W_ji > 0 else q-[n, i])`` -> ``[J, O]``.

    ``a [N, J]`` and ``q+/- [N, O]`` are nonnegative; ``positive [J, O]``.
    Works in ``[O, J]`` layout (the longer fan-in axis is minor). ``contraction``:
    a resolved strategy (:func:`resolve_contraction`).
    """
    if contraction == "unrolled":
        return _unrolled_max_contract(a, q_plus, q_minus, positive.T).T
    n, fan_in = a.shape
    out = q_plus.shape[1]
    use_carry = contraction == "carry"
    budget = _CARRY_ELEMENTS if use_carry else _BLOCK_ELEMENTS
    rows = min(_pow2_floor(budget // (fan_in * out)), _pow2_floor(n))
    pad = -n % rows
    if pad:  # zero rows add zero products, which never raise a max of values >= 0
        a, q_plus, q_minus = (jnp.pad(v, ((0, pad), (0, 0))) for v in (a, q_plus, q_minus))
    a = a.reshape(-1, rows, fan_in)
    q_plus = q_plus.reshape(-1, rows, out)
    q_minus = q_minus.reshape(-1, rows, out)
    positive = positive.T

    def products(a_rows, qp_rows, qn_rows):  # [rows, O, J]
        q_sel = jnp.where(positive, qp_rows[:, :, None], qn_rows[:, :, None])
        return a_rows[:, None, :] * q_sel

    if use_carry:
        # XLA:CPU runs reductions slowly but elementwise updates fast: keep a
        # [rows, O, J] running max and reduce it once at the end.
        carry = _scan_max(products, (a, q_plus, q_minus), _like((rows, out, fan_in)))
        return jnp.max(carry, axis=0).T
    block_max = lambda *x: jnp.max(products(*x), axis=0)  # noqa: E731  (one fused reduce)
    return _scan_max(block_max, (a, q_plus, q_minus), _like((out, fan_in))).T


def _group_ratios(a: jax.Array, w_split: jax.Array, positive: jax.Array, reduction: str, contraction: str,
                  channels: int):
    """Max over the points of ``a [g, P, J] >= 0`` of the reduced ``g / |W|`` -> ``[J, O]``, and
    for ``'mean'`` the reference's channel sensitivity times the window size, ``[channels]``: per
    point, the patch-reduced ``g`` summed over window positions, maxed over outputs, then over
    points (:func:`channel_from_sums` divides by the layer's window; ``None`` for ``'max'``, where
    :func:`channel_from_weight` gives it exactly). ``J`` is window-major: ``(window, channels)``."""
    _, num_patches, fan_in = a.shape
    out = positive.shape[1]
    q = _guarded_inverse(jnp.einsum("gpj,jo->gpo", a, w_split, precision=_HIGHEST))
    if reduction == "mean" and num_patches > 1:
        sums = jnp.einsum("gpj,gpo->gjo", a, q, precision=_HIGHEST) / num_patches
        per_point = jnp.where(positive, sums[..., :out], sums[..., out:])
        g = per_point * (w_split[:, :out] - w_split[:, out:])  # [g, (window, channels), O]
        g = g.reshape(g.shape[0], -1, channels, out)
        return jnp.max(per_point, axis=0), jnp.max(jnp.sum(g, axis=1), axis=(0, 2))
    q = q.reshape(-1, 2 * out)
    return _max_contract(a.reshape(-1, fan_in), q[:, :out], q[:, out:], positive, contraction), None


def channel_from_sums(layer: Layer, sums: Any) -> Any:
    """The ``'mean'`` channel sensitivity ``[in]`` from :func:`_group_ratios`' window sums
    (possibly over padded channels), or None."""
    return None if sums is None else sums[: layer.in_channels] / layer.window_size


def _group_size(layer: Layer, batch: int) -> int:
    """Points per scan step: about ``_GROUP_ELEMENTS`` patch entries, balanced groups."""
    return _balanced_group(_point_elements(layer.num_patches, layer.in_channels * layer.window_size,
                                           layer.out_channels), batch)


def _point_elements(num_patches: int, fan_in: int, out: int) -> int:
    """Largest per-point intermediate of a kernel (patches or ``[z+, z-]``), in elements."""
    return num_patches * max(fan_in, 2 * out)


def _balanced_group(per_point: int, batch: int) -> int:
    groups = -(-batch // max(1, _GROUP_ELEMENTS // per_point))
    return -(-batch // groups)


def _weight_ratio(
    layer: Layer, wmat: jax.Array, inputs: jax.Array, reduction: str, contraction: str, split: bool | None = None
) -> tuple[jax.Array, Any]:
    """Max over points (and pseudo-points) of the reduced ``g / |W|`` -> ``[J, O]``, and the
    ``'mean'`` channel window sums or None (:func:`_group_ratios`).

    ``split``: None decides the sign split per group of points (``lax.cond``,
    both branches compiled); True/False splits every group or none, for a
    caller that knows whether ``inputs`` holds a negative entry (one branch
    compiled, ~30% less XLA compile time). Same result whichever: the split of
    a nonnegative point adds only a zero pseudo-point.
    """
    w_split = jnp.concatenate([jnp.maximum(wmat, 0.0), jnp.minimum(wmat, 0.0)], axis=1)
    return layer_ratio(layer, w_split, wmat > 0, inputs, reduction=reduction, contraction=contraction, split=split)


def split_weights(wmat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host-side ``([W+, W-] [J, 2O], W > 0 [J, O])`` of a window-major kernel matrix (NumPy: no program)."""
    wmat = np.asarray(wmat, np.float32)
    return np.concatenate([np.maximum(wmat, 0.0), np.minimum(wmat, 0.0)], axis=1), wmat > 0


def layer_ratio(
    layer: Layer,
    w_split: jax.Array,
    positive: jax.Array,
    inputs: jax.Array,
    *,
    reduction: str,
    contraction: str,
    split: bool | None = None,
) -> tuple[jax.Array, Any]:
    """:func:`_weight_ratio` from the split kernel matrix (:func:`split_weights`): ``max g / |W|``,
    ``[J, O]``, and the ``'mean'`` channel window sums (or None; :func:`channel_from_sums`).

    The sensitivities are ``|W| * ratio`` (:func:`sensitivity_from_ratio`); a
    running max over chunks may be kept on the ratio (``|W| >= 0`` scales
    monotonically, so the max commutes with the product, rounding included).
    ``contraction``: a resolved strategy (:func:`resolve_contraction`).
    """
    patch_fn = functools.partial(input_patches, layer, order="window")
    return _ratio_over_groups(patch_fn, inputs, w_split, positive, _group_size(layer, inputs.shape[0]),
                              channels=layer.in_channels, reduction=reduction, contraction=contraction, split=split)


def rows_ratio(
    rows: jax.Array,
    index: jax.Array,
    w_split: jax.Array,
    positive: jax.Array,
    *,
    num_patches: int,
    reduction: str,
    contraction: str,
    split: bool | None = None,
) -> tuple[jax.Array, Any]:
    """:func:`layer_ratio` of a conv whose input is laid out as rows ``[n, R, C]``
    (:mod:`sensprune.sensitivity_buckets`): patches are the rows at ``index
    [num_patches * K]``, so the program depends on shapes only, not on the
    conv's geometry."""
    fan_in = index.shape[0] // num_patches * rows.shape[-1]

    def patch_fn(x):
        return gather_rows(x, index).reshape(x.shape[0], num_patches, fan_in)

    size = _balanced_group(_point_elements(num_patches, fan_in, positive.shape[1]), rows.shape[0])
    return _ratio_over_groups(patch_fn, rows, w_split, positive, size, channels=rows.shape[-1],
                              reduction=reduction, contraction=contraction, split=split)


def _ratio_over_groups(
    patch_fn: Callable[[jax.Array], jax.Array],
    inputs: jax.Array,
    w_split: jax.Array,
    positive: jax.Array,
    size: int,
    *,
    channels: int,
    reduction: str,
    contraction: str,
    split: bool | None,
) -> tuple[jax.Array, Any]:
    """Max over groups of ``size`` points of :func:`_group_ratios` of ``patch_fn(group)``."""
    ratios = functools.partial(
        _group_ratios, w_split=w_split, positive=positive, reduction=reduction, contraction=contraction,
        channels=channels,
    )

    def split_ratios(a):
        return ratios(jnp.concatenate([jnp.maximum(a, 0.0), jnp.maximum(-a, 0.0)], axis=0))

    def group_max(x):
        patches = patch_fn(x)
        if split is None:
            return lax.cond(jnp.any(x < 0), split_ratios, ratios, patches)
        return split_ratios(patches) if split else ratios(patches)

    inputs = jnp.asarray(inputs, jnp.float32)
    batch = inputs.shape[0]
    pad = -batch % size
    if pad:  # repeated points do not change a max
        inputs = jnp.concatenate([inputs, jnp.repeat(inputs[:1], pad, axis=0)])
    groups = inputs.reshape((-1, size) + inputs.shape[1:])
    if groups.shape[0] == 1:
        return group_max(groups[0])
    # the carry's shapes from the patch layout alone (tracing group_max twice doubled the kernel's trace)
    _, num_patches, fan_in = jax.eval_shape(patch_fn, groups[0]).shape
    sums = _like((channels,)) if reduction == "mean" and num_patches > 1 else None
    return _scan_max(group_max, (groups,), (_like((fan_in, positive.shape[1])), sums))


def sensitivity_from_ratio(
    layer: Layer, kernel: np.ndarray, ratio: np.ndarray, sums: np.ndarray | None = None
) -> LayerSensitivity:
    """Host-side ``|W| * ratio`` in the kernel's shape and its channel sensitivity (what
    :func:`layer_sensitivity` returns; float32 products, so the same numbers): from the
    ``'mean'`` window ``sums`` when given (:func:`channel_from_sums`), else the max over window
    positions and outputs (exact for ``'max'`` and for layers with one output position)."""
    wmat = np.asarray(kernel, np.float32).reshape(-1, layer.out_channels)
    weight = (np.abs(wmat) * np.asarray(ratio, np.float32)).reshape(layer.kernel_shape)
    axes = tuple(i for i in range(weight.ndim) if i != weight.ndim - 2)
    channel = np.max(weight, axis=axes) if sums is None else channel_from_sums(layer, np.asarray(sums, np.float32))
    # device_put, not jnp.asarray: the latter compiles a copy program per shape
    return LayerSensitivity(*jax.device_put((weight, channel)))


def channel_from_weight(weight: jax.Array, reduction: str = "max") -> jax.Array:
    """Input-channel sensitivity ``(in,)`` from a weight sensitivity: the window positions
    reduced as the patches (``reduction``: the reference's tracker reduces both alike), then
    the max over outputs.

    Exact for ``'max'`` (maxima commute). For ``'mean'`` the reference averages per point,
    before the max over S; :func:`layer_sensitivity` does that in its kernel when the layer
    has several output positions, and uses this (the mean of per-position maxima over S, an
    upper bound) only for layers with one output position and a window (Dense: exact).
    """
    _check_reduction(reduction)
    window = tuple(range(weight.ndim - 2))
    per_output = jnp.mean(weight, axis=window) if reduction == "mean" else jnp.max(weight, axis=window)
    return jnp.max(per_output, axis=-1)


def layer_sensitivity(
    layer: Layer,
    kernel: jax.Array,
    inputs: jax.Array,
    *,
    reduction: str,
    contraction: str = "auto",
    split: bool | None = None,
) -> LayerSensitivity:
    """Sensitivities of one layer over one chunk of points (pure, jittable).

    Args:
      layer: static geometry.
      kernel: the layer's kernel (``layer.kernel_shape``).
      inputs: what the layer received, ``[B, *layer.input_shape]``.
      reduction: ``'mean'`` or ``'max'`` over output positions.
      contraction: strategy of the (max, x) contraction, one of ``CONTRACTIONS``
        (same result, different speed per backend).
      split: whether ``inputs`` may hold a negative entry (True: sign-split
        every point; False: the caller knows ``inputs >= 0``); None (default)
        decides per group of points inside the program. Same result; a static
        answer compiles one branch instead of two.
    """
    _check_reduction(reduction)
    contraction = resolve_contraction(contraction)
    if layer.groups > 1:  # per group: output filters of a group see only that group's input channels
        from sensprune.layer_kinds import grouped_sensitivity

        return grouped_sensitivity(layer, kernel, inputs, reduction=reduction, contraction=contraction)
    wmat = kernel_matrix(layer, jnp.asarray(kernel, jnp.float32), order="window")
    ratio, sums = _weight_ratio(layer, wmat, jnp.asarray(inputs, jnp.float32), reduction, contraction, split)
    weight = matrix_to_kernel(layer, jnp.abs(wmat) * ratio, order="window")
    channel = channel_from_sums(layer, sums)
    if channel is None:
        channel = channel_from_weight(weight, reduction)
    return LayerSensitivity(weight=weight, channel=channel)
