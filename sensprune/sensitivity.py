"""Empirical sensitivities over S: the streaming pass of the kernels of :mod:`sensprune.sensitivity_kernels`.

:func:`compute_sensitivities` runs S in fixed-size chunks: one jitted capture
of every layer's input per chunk (through the model adapter) and one jitted
kernel per distinct layer geometry, maxed into a running result; or, with
``fused=True``, the whole pass as one compiled program (:func:`fused_pass`).
With a mesh, each chunk is split over every device and the maxima are reduced
across devices inside the compiled kernels. The kernel names
(``layer_sensitivity``, ``CONTRACTIONS``, ...) are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensprune import paths, sharding
from sensprune import points as points_lib
from sensprune import sensitivity_buckets as buckets_lib
from sensprune.adapter import ModelAdapter, as_adapter
from sensprune.compile_tiers import LIGHT, tiered_jit
from sensprune.sensitivity_kernels import (
    CONTRACTIONS,
    EPS,
    REDUCTIONS,
    _check_reduction,
    channel_from_weight,
    layer_ratio,
    layer_sensitivity,
    max_sensitivity,
    resolve_contraction,
    rows_ratio,
    sensitivity_from_ratio,
    split_weights,
)
from sensprune.types import Layer, LayerSensitivity

# Calls of one program specialisation on its quick build before its full one (sensprune.compile_tiers):
# a capture runs once per chunk of S, a kernel once per layer of its geometry and chunk.
CAPTURE_PROMOTE_AFTER = 4
KERNEL_PROMOTE_AFTER = 16

__all__ = [
    "CONTRACTIONS",
    "EPS",
    "REDUCTIONS",
    "capture_function",
    "channel_from_weight",
    "compute_sensitivities",
    "fused_pass",
    "layer_sensitivity",
    "max_sensitivity",
    "resolve_contraction",
]


# ---------------------------------------------------------------------------
# Streaming over S.


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _concat(arrays: list[Any]) -> Any:
    if len(arrays) == 1:
        return arrays[0]
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays)
    return jnp.concatenate(arrays)


def _chunks(data: Any, chunk_size: int) -> Iterator[Any]:
    """Fixed-size chunks of points; the last one is padded by repeating its first point."""
    if not _is_array(data):  # pytree points (a tuple = the positional arguments), lists of batches
        yield from points_lib.chunks(data, chunk_size)
        return
    if _is_array(data):
        if data.ndim == 0 or data.shape[0] == 0:
            raise ValueError("data must hold at least one point (got an empty array)")
        size = min(chunk_size, data.shape[0])
        batches: Iterable[Any] = [data]
    else:
        size = chunk_size
        batches = data
    pending: list[Any] = []
    held = 0
    for batch in batches:
        if not _is_array(batch) or batch.ndim == 0:
            raise ValueError(
                "data must be an array [N, ...] or an iterable of arrays [n, ...], got "
                f"{type(batch).__name__}"
            )
        pending.append(batch)
        held += batch.shape[0]
        if held < size:
            continue
        joined = _concat(pending)
        full = held - held % size
        for start in range(0, full, size):
            yield joined[start : start + size]
        pending = [joined[full:]] if held > full else []
        held -= full
    if held:
        rest = _concat(pending)
        yield _concat([rest] + [rest[:1]] * (size - held))


def _first(iterator: Iterator[Any]) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        raise ValueError("data must hold at least one point (got no points)") from None


def compute_sensitivities(
    model: Any,
    variables: Mapping[str, Any],
    data: Any,
    *,
    reduction: str = "mean",
    chunk_size: int = 32,
    layers: Sequence[Layer] | None = None,
    method: Callable[..., Any] | str | None = None,
    mesh: Any = None,
    fused: bool = False,
    contraction: str = "auto",
    **apply_kwargs: Any,
) -> dict[str, LayerSensitivity]:
    """Empirical sensitivities of every prunable layer over the points in ``data``.

    Args:
      model, variables: a Flax Linen model (or a model adapter) and its variables.
      data: an array ``[N, ...]`` or an iterable of arrays ``[n, ...]`` (S).
      reduction: ``'mean'`` (SiPP det) or ``'max'`` (SiPP rand / hybrid, PFP)
        over output positions.
      chunk_size: points per jitted call; the last chunk is padded by repeating
        its first point, so every call has the same shape.
      layers: restrict to these layers (default: :func:`find_layers`).
      method, apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=False``).
      mesh: a ``jax.sharding.Mesh`` (:func:`sensprune.sharding.data_mesh`) to
        run data-parallel: each chunk is split over every device of the mesh
        (padded to a multiple of the device count by repeating a point), the
        variables are placed by :func:`sensprune.sharding.shard_params`
        (replicated, or split over a ``'model'`` axis and gathered per layer),
        and the running max is reduced across devices inside the compiled
        kernels. The result is replicated and equals the single-device one.
        ``None``: the default device.
      fused: run the whole pass as one compiled program (:func:`fused_pass`):
        every chunk's forward and every layer's kernel inside one
        ``lax.scan`` over the chunks, and with a mesh one cross-device max at
        the end. One dispatch instead of ``chunks x (layers + 1)``, which is
        what a small net on a GPU waits on; it compiles the whole net at once
        (longer) and holds all of S on the device. Same results.
      contraction: strategy of the (max, x) contraction in the kernels, one of
        ``CONTRACTIONS`` (``'auto'``: ``'unrolled'`` on CPU, ``'reduce'``
        elsewhere). Same results, different speed.

    Returns:
      layer name -> :class:`LayerSensitivity`, maxima over all of ``data``.
    """
    _check_reduction(reduction)
    contraction = resolve_contraction(contraction)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    adapter = as_adapter(model, method, apply_kwargs)
    chunks = _chunks(data, int(chunk_size))
    first = _first(chunks)
    if layers is None:
        layers = adapter.find_layers(variables, first)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers is empty; pass None to use every prunable layer")
    if fused:
        stacked = jax.tree_util.tree_map(lambda *c: np.stack([np.asarray(a) for a in c]), first, *chunks)
        return fused_pass(adapter, variables, stacked, layers, reduction=reduction, mesh=mesh, contraction=contraction)
    geometry = {layer.name: _geometry(layer) for layer in layers}
    layer_step: Callable[..., Any] = _layer_step
    if mesh is not None:
        variables = sharding.shard_params(variables, mesh)
        layer_step = functools.partial(_sharded_layer_step, mesh=mesh, axis=tuple(mesh.axis_names))
    # Single device: plain layers keep a running max of ratios (host-side kernel prep and product);
    # plain convs run one compiled kernel per shape bucket (sensitivity_buckets), not per geometry.
    host = {layer.name: _host_kernel(variables["params"], layer) for layer in layers
            if mesh is None and layer.groups == 1}
    buckets = _pass_buckets(layers, single_device=mesh is None)  # the layers of host with groups == 1
    matrices = {name: k.reshape(-1, k.shape[-1]) for name, k in host.items()}
    for layer in layers:
        if layer.name in buckets:
            matrices[layer.name] = buckets_lib.pad_matrix(layer, buckets[layer.name], matrices[layer.name])
    split_kernels = {name: tuple(jax.device_put(split_weights(m))) for name, m in matrices.items()}
    indices = {layer.name: jax.device_put(buckets_lib.row_index(layer, buckets[layer.name]))
               for layer in layers if layer.name in buckets}
    capture = pass_capture(adapter, layers, single_device=mesh is None)
    result: dict[str, Any] = _zero_sensitivities(variables, [layer for layer in layers if layer.name not in host])
    result |= {layer.name: _zero_ratio(layer, matrices[layer.name], buckets.get(layer.name), reduction)
               for layer in layers if layer.name in matrices}
    if mesh is not None:
        result = sharding.replicate(result, mesh)
    for chunk in itertools.chain([first], chunks):
        if mesh is not None:
            chunk = jax.tree_util.tree_map(lambda a: sharding.shard_points(a, mesh)[0], chunk)
        inputs, negative, _ = capture(variables, chunk)
        negative = _sign_flags(negative)  # static sign split: one kernel branch compiled, not two
        for layer in layers:
            reduction_l = _layer_reduction(layer, reduction)
            step_kw = dict(contraction=contraction, split=negative[layer.name])
            previous = result[layer.name]
            if layer.name in buckets:
                result[layer.name] = _bucket_step(
                    buckets[layer.name], reduction_l, inputs[layer.name], indices[layer.name],
                    *split_kernels[layer.name], previous, **step_kw
                )
            elif layer.name in host:
                result[layer.name] = _ratio_step(
                    geometry[layer.name], reduction_l, *split_kernels[layer.name], inputs[layer.name], previous,
                    **step_kw,
                )
            else:
                kernel = paths.get_kernel(variables["params"], layer)
                result[layer.name] = layer_step(geometry[layer.name], reduction_l, kernel, inputs[layer.name],
                                                previous, **step_kw)
    for layer in layers:
        if layer.name in host:
            ratio, sums = jax.device_get(result[layer.name])
            if layer.name in buckets:
                ratio = buckets_lib.crop_ratio(layer, buckets[layer.name], ratio)
            result[layer.name] = sensitivity_from_ratio(layer, host[layer.name], ratio, sums)
    return result


def _zero_ratio(layer: Layer, matrix: np.ndarray, bucket: Optional[buckets_lib.Bucket], reduction: str) -> tuple:
    """The running value of :func:`_ratio_step` / :func:`_bucket_step` before any chunk:
    ``(ratio, window sums)``, the sums only for the ``'mean'`` channel sensitivity."""
    if _layer_reduction(layer, reduction) != "mean":
        return np.zeros(matrix.shape, np.float32), None
    channels = bucket.channels if bucket is not None else layer.in_channels
    return np.zeros(matrix.shape, np.float32), np.zeros(channels, np.float32)


def _host_kernel(params: Mapping[str, Any], layer: Layer) -> np.ndarray:
    """The layer's kernel as a float32 NumPy array in ``layer.kernel_shape`` (as :func:`paths.get_kernel`)."""
    leaf = np.asarray(paths.get_path(params, paths.kernel_path(layer)), np.float32)
    return np.ascontiguousarray(paths.kernel_view(leaf, layer))


def _sign_flags(negative: Mapping[str, jax.Array]) -> dict[str, bool | None]:
    """Layer -> whether its chunk input holds a negative entry, read to the host; None (the kernel
    decides per group) where this process cannot read the flag (e.g. not replicated across hosts)."""
    readable = {
        name: v for name, v in negative.items()
        if getattr(v, "is_fully_addressable", True) or getattr(v, "is_fully_replicated", False)
    }
    values = jax.device_get(readable)
    return {name: bool(values[name]) if name in values else None for name in negative}


def _layer_reduction(layer: Layer, reduction: str) -> str:
    """Dense-like layers (one output position): both reductions are the same, so use one kernel."""
    return reduction if layer.num_patches > 1 else "max"


def _zero_sensitivities(
    variables: Mapping[str, Any], layers: Sequence[Layer], xp: Any = np
) -> dict[str, LayerSensitivity]:
    """The identity of the running max (sensitivities are >= 0) for every layer.

    ``xp``: numpy outside a trace (``jnp.zeros`` there compiles one program per
    shape), ``jnp`` inside one (no large literals in the program)."""
    out = {}
    for layer in layers:
        shape = paths.get_kernel(variables["params"], layer).shape
        out[layer.name] = LayerSensitivity(xp.zeros(shape, xp.float32), xp.zeros(shape[-2], xp.float32))
    return out


def _chunk_sensitivities(
    variables: Mapping[str, Any],
    chunk: jax.Array,
    running: dict[str, LayerSensitivity],
    *,
    adapter: ModelAdapter,
    layers: tuple[Layer, ...],
    reduction: str,
    contraction: str,
) -> dict[str, LayerSensitivity]:
    """``running`` maxed with every layer's sensitivities over one chunk (traced)."""
    inputs = adapter.capture_inputs(variables, chunk, layers)
    out = {}
    for layer in layers:
        mine = layer_sensitivity(layer, paths.get_kernel(variables["params"], layer), inputs[layer.name],
                                 reduction=_layer_reduction(layer, reduction), contraction=contraction)
        out[layer.name] = max_sensitivity(running[layer.name], mine)
    return out


def _fused_impl(
    variables: Mapping[str, Any],
    chunks: jax.Array,
    *,
    adapter: ModelAdapter,
    layers: tuple[Layer, ...],
    reduction: str,
    contraction: str,
    mesh: Any,
) -> dict[str, LayerSensitivity]:
    """The whole pass over ``chunks [C, n, ...]``: a scan over chunks; with
    ``mesh``, every chunk split over all its devices and one ``pmax`` at the end."""
    step = functools.partial(
        _chunk_sensitivities, adapter=adapter, layers=layers, reduction=reduction, contraction=contraction
    )

    def scan(variables, chunks):
        body = lambda running, chunk: (step(variables, chunk, running), None)  # noqa: E731
        return lax.scan(body, _zero_sensitivities(variables, layers, jnp), chunks)[0]

    if mesh is None:
        return scan(variables, chunks)
    from jax.sharding import PartitionSpec as P

    axes = tuple(mesh.axis_names)

    def local(variables, chunks):
        return jax.tree.map(lambda v: lax.pmax(v, axes), scan(variables, chunks))

    # check_vma=False: as in _sharded_layer_step (replicated zeros start the scan; pmax replicates).
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, axes)), out_specs=P(), check_vma=False)(
        variables, chunks
    )


_FUSED_STATIC = ("adapter", "layers", "reduction", "contraction", "mesh")
_fused_program = jax.jit(_fused_impl, static_argnames=_FUSED_STATIC)


def fused_pass(
    model: Any,
    variables: Mapping[str, Any],
    chunks: Any,
    layers: Sequence[Layer],
    *,
    reduction: str = "mean",
    method: Any = None,
    mesh: Any = None,
    contraction: str = "auto",
    **apply_kwargs: Any,
) -> dict[str, LayerSensitivity]:
    """Sensitivities of ``layers`` over ``chunks [C, n, ...]`` (S in ``C`` equal
    chunks) as one jitted program: ``lax.scan`` over the chunks, each running
    the forward and every layer's kernel. With ``mesh`` each chunk is padded to
    a multiple of the device count (repeating its first point) and split over
    every device; the result is replicated.
    """
    _check_reduction(reduction)
    contraction = resolve_contraction(contraction)
    lead = (jax.tree_util.tree_leaves(chunks) or [np.zeros(())])[0]  # pytree points: every leaf [C, n, ...]
    if np.ndim(lead) < 2 or 0 in np.shape(lead)[:2]:
        raise ValueError(f"chunks must be [C, n, ...] with C, n >= 1, got shape {tuple(np.shape(lead))}")
    if mesh is not None:
        variables = sharding.shard_params(variables, mesh)
        chunks = jax.tree_util.tree_map(lambda a: sharding.shard_points(a, mesh, axis=1)[0], chunks)
    adapter = as_adapter(model, method, apply_kwargs)
    static = dict(adapter=adapter, layers=tuple(layers), reduction=reduction, contraction=contraction, mesh=mesh)
    try:
        hash(tuple(static.values()))
        program: Callable[..., Any] = functools.partial(_fused_program, **static)
    except TypeError:  # e.g. an rngs dict in apply_kwargs: a fresh jit
        program = jax.jit(functools.partial(_fused_impl, **static))
    return program(variables, chunks)


def _geometry(layer: Layer) -> Layer:
    """The layer without its identity: layers of equal geometry share one compiled kernel."""
    return dataclasses.replace(layer, path=(), order=0, index=())


@tiered_jit(static_argnames=("layer", "reduction", "contraction", "split"), quick_options=LIGHT,
            promote_after=KERNEL_PROMOTE_AFTER)
def _layer_step(
    layer: Layer,
    reduction: str,
    kernel: jax.Array,
    inputs: jax.Array,
    previous: LayerSensitivity,
    *,
    contraction: str = "auto",
    split: bool | None = None,
) -> LayerSensitivity:
    """One chunk's sensitivities of one layer, maxed with the running value."""
    return max_sensitivity(
        previous, layer_sensitivity(layer, kernel, inputs, reduction=reduction, contraction=contraction, split=split)
    )


def _running_max(previous: tuple, mine: tuple) -> tuple:
    """The running ``(ratio, window sums or None)`` of :func:`_ratio_step` / :func:`_bucket_step`
    maxed with one chunk's (traced; both steps share it)."""
    return jax.tree_util.tree_map(jnp.maximum, previous, mine)


@tiered_jit(static_argnames=("layer", "reduction", "contraction", "split"), quick_options=LIGHT,
            promote_after=KERNEL_PROMOTE_AFTER)
def _ratio_step(
    layer: Layer,
    reduction: str,
    w_split: jax.Array,
    positive: jax.Array,
    inputs: jax.Array,
    previous: tuple,
    *,
    contraction: str = "auto",
    split: bool | None = None,
) -> tuple:
    """One chunk's ``max g / |W|`` of one layer (:func:`layer_ratio`), maxed with the running value.

    The kernel's split and sign pattern come from the host, and ``|W| *`` the
    final ratio is taken there too (:func:`sensitivity_from_ratio`), so the
    compiled program is the contraction alone (fewer fusions to compile, no
    per-chunk kernel preparation)."""
    return _running_max(previous, layer_ratio(layer, w_split, positive, inputs, reduction=reduction,
                                              contraction=contraction, split=split))


@tiered_jit(static_argnames=("bucket", "reduction", "contraction", "split"), quick_options=LIGHT,
            promote_after=KERNEL_PROMOTE_AFTER)
def _bucket_step(
    bucket: buckets_lib.Bucket,
    reduction: str,
    rows: jax.Array,
    index: jax.Array,
    w_split: jax.Array,
    positive: jax.Array,
    previous: tuple,
    *,
    contraction: str = "auto",
    split: bool | None = None,
) -> tuple:
    """:func:`_ratio_step` of any conv of ``bucket`` (its rows, gather index and padded kernel)."""
    return _running_max(previous, rows_ratio(rows, index, w_split, positive, num_patches=bucket.patches,
                                             reduction=reduction, contraction=contraction, split=split))


@functools.partial(jax.jit, static_argnames=("layer", "reduction", "contraction", "split", "mesh", "axis"))
def _sharded_layer_step(
    layer: Layer,
    reduction: str,
    kernel: jax.Array,
    inputs: jax.Array,
    previous: LayerSensitivity,
    *,
    contraction: str = "auto",
    split: bool | None = None,
    mesh: Any,
    axis: tuple[str, ...],
) -> LayerSensitivity:
    """:func:`_layer_step` with ``inputs`` split over mesh axes ``axis`` (all of
    them): each device reduces its own points, then ``pmax`` over the axes (an
    all-reduce in the compiled program); kernel, running max and result are
    replicated."""
    from jax.sharding import PartitionSpec as P

    def local(kernel, inputs, previous):
        mine = layer_sensitivity(layer, kernel, inputs, reduction=reduction, contraction=contraction, split=split)
        return max_sensitivity(previous, jax.tree.map(lambda v: lax.pmax(v, axis), mine))

    # check_vma=False: the kernels' scans start from replicated zeros; the pmax makes the result replicated.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P(), check_vma=False)
    return sharded(kernel, inputs, previous)


def _capture(variables: Mapping[str, Any], x: jax.Array, adapter: ModelAdapter, layers: tuple[Layer, ...]):
    """Inputs of every layer for one chunk ``x`` (traced under jit)."""
    return adapter.capture_inputs(variables, x, layers)


_cached_capture = tiered_jit(_capture, static_argnames=("adapter", "layers"), promote_after=CAPTURE_PROMOTE_AFTER)


def _signed_capture(
    variables: Mapping[str, Any], x: Any, adapter: ModelAdapter, layers: tuple[Layer, ...], rows: tuple = ()
):
    """:func:`_capture`, plus per layer whether its input holds a negative entry (decides the sign
    split) and whether it equals one of the model's inputs (``x``'s leaves; the layers whose input
    channels filter methods protect). ``rows``: ``(name, geometry, bucket)`` of the bucketed convs,
    whose input comes laid out as the bucket's rows (:func:`sensitivity_buckets.to_rows`)."""
    inputs = adapter.capture_inputs(variables, x, layers)
    negative = {name: jnp.any(a < 0) for name, a in inputs.items()}
    flats = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree_util.tree_leaves(x)]
    reads_input = {}
    for name, a in inputs.items():
        flat = a.reshape(a.shape[0], -1)
        same = [jnp.array_equal(flat, f) for f in flats if f.shape == flat.shape]
        reads_input[name] = functools.reduce(jnp.logical_or, same, jnp.zeros((), bool))
    for name, layer, bucket in rows:
        inputs[name] = buckets_lib.to_rows(layer, bucket, inputs[name])
    return inputs, negative, reads_input


_cached_signed_capture = tiered_jit(_signed_capture, static_argnames=("adapter", "layers", "rows"),
                                    promote_after=CAPTURE_PROMOTE_AFTER)


def _bind_capture(
    impl: Callable[..., Any], cached: Callable[..., Any], adapter: ModelAdapter, layers: Sequence[Layer],
    **static: Any,
) -> Callable[..., Any]:
    """``cached`` (one jit shared across calls) bound to a hashable adapter, else a fresh jit of ``impl``."""
    frozen = tuple(layers)
    try:
        hash((adapter, frozen))
    except TypeError:
        return tiered_jit(functools.partial(impl, adapter=adapter, layers=frozen, **static),
                          promote_after=CAPTURE_PROMOTE_AFTER)
    return functools.partial(cached, adapter=adapter, layers=frozen, **static)


def _pass_buckets(layers: Sequence[Layer], single_device: bool) -> dict[str, buckets_lib.Bucket]:
    """Layer name -> shape bucket of the convs whose kernels the pass shares (single device only)."""
    return buckets_lib.assign([layer for layer in layers if layer.groups == 1]) if single_device else {}


def pass_capture(adapter: ModelAdapter, layers: Sequence[Layer], single_device: bool = True) -> Callable[..., Any]:
    """The capture program of :func:`compute_sensitivities`: jitted ``(variables, chunk) -> (layer
    inputs, layer -> any input < 0, layer -> input is a model input)``, the inputs of bucketed
    convs laid out as rows inside it (no layout program per geometry). Other users of the first
    chunk's layer inputs call this one too, so they hit the pass's compiled program."""
    by_name = {layer.name: layer for layer in layers}
    rows = tuple((name, _geometry(by_name[name]), bucket)
                 for name, bucket in _pass_buckets(layers, single_device).items())
    return _bind_capture(_signed_capture, _cached_signed_capture, adapter, layers, rows=rows)


def capture_function(adapter: ModelAdapter, layers: Sequence[Layer]) -> Callable[..., Any]:
    """Jitted ``(variables, chunk) -> layer inputs``; compiled once per model/shape.

    The capture (a forward pass) is compiled once per model; the sensitivity
    kernels are compiled once per distinct layer geometry (:func:`_layer_step`),
    so deep networks with repeated blocks compile a handful of kernels instead
    of one program per layer. Falls back to a fresh jit when the adapter is not
    hashable (e.g. an ``rngs`` dict in the apply keywords).
    """
    return _bind_capture(_capture, _cached_capture, adapter, layers)

