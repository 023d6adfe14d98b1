"""Data-parallel helpers over ``jax.make_mesh`` / ``NamedSharding`` (no ``pmap``).

The convention is one mesh axis named ``'data'``: batches are split along their
leading axis over it, everything else (params, masks, optimizer state,
sensitivities) is replicated. Jitted functions given inputs with these
shardings run SPMD on every device of the mesh; reductions over the batch axis
(a mean loss, a max over points) become cross-device all-reduces inside the
compiled program.

Optionally a second axis ``'model'`` (``data_mesh(model=k)``: a
``(devices // k, k)`` mesh): every param-shaped array (params, masks, optimizer
moments) is then split over it along its largest dimension that ``k`` divides
(:func:`param_spec`, the FSDP rule), so each device stores ``1/k`` of the
training state; batches stay split over ``'data'`` only and XLA gathers each
weight where it is used. The points of S are split over every axis
(:func:`point_sharding`): the sensitivity pass uses all devices either way.

Multi-host (one process per host after ``jax.distributed.initialize()``): the
mesh spans the devices of every process (``jax.devices()``). Arrays that every
process holds in full (params, a host array of S) go through
:func:`replicate` / :func:`shard_batch`; data each process loads only its part
of goes through :func:`process_rows` (which rows to load) and
:func:`global_batch_from_local` (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "batch_sharding",
    "constrain_params",
    "data_axis",
    "data_mesh",
    "gather",
    "global_batch_from_local",
    "mesh_size",
    "model_axis_size",
    "pad_to_multiple",
    "param_sharding",
    "param_spec",
    "point_sharding",
    "process_rows",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "shard_params",
    "shard_points",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"
PyTree = Any


def data_mesh(
    devices: Union[None, int, Sequence[jax.Device]] = None, axis: str = DATA_AXIS, *, model: int = 1
) -> Mesh:
    """A 1-D mesh over ``devices`` with one (``Auto``) axis named ``axis``; with
    ``model=k > 1`` a 2-D ``(n // k, k)`` mesh with axes ``(axis, 'model')``.

    Args:
      devices: ``None`` or ``-1`` for every device of every process
        (``jax.devices()``), an int ``n >= 1`` for the first ``n`` devices, or
        a sequence of devices.
      axis: name of the data axis.
      model: size of the ``'model'`` axis params are split over (1: none). It
        must divide the device count. ``jax.make_mesh`` orders the devices so
        that the model axis stays within a host where it can.
    """
    if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 1:
        raise ValueError(f"model={model!r}: expected an integer >= 1 (size of the 'model' mesh axis)")
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a non-empty string, got {axis!r}")
    available = jax.devices()
    if devices is None or (isinstance(devices, (int, np.integer)) and not isinstance(devices, bool) and devices == -1):
        chosen = list(available)
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices={devices}: expected -1 (all) or a count in [1, {len(available)}] "
                f"(jax.devices() has {len(available)})"
            )
        chosen = list(available[: int(devices)])
    else:
        chosen = list(devices)  # type: ignore[arg-type]  # a sequence of devices (bool/int handled above)
        if not chosen:
            raise ValueError("devices is an empty sequence; pass None for all devices")
    if model == 1:
        return jax.make_mesh((len(chosen),), (axis,), axis_types=(AxisType.Auto,), devices=chosen)
    if axis == MODEL_AXIS:
        raise ValueError(f"axis={axis!r} is the name of the model axis; choose another data-axis name")
    if len(chosen) % model:
        raise ValueError(f"model={model}: expected a divisor of the {len(chosen)} devices of the mesh")
    return jax.make_mesh(
        (len(chosen) // int(model), int(model)), (axis, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto), devices=chosen,
    )


def data_axis(mesh: Mesh) -> str:
    """The mesh axis batches are split over: ``'data'``, or the only axis of a 1-D mesh."""
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (e.g. sensprune.sharding.data_mesh()), got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    if DATA_AXIS in names:
        return DATA_AXIS
    if len(names) == 1:
        return names[0]
    raise ValueError(f"mesh has axes {names}; expected one named {DATA_AXIS!r} (or a 1-D mesh)")


def mesh_size(mesh: Mesh) -> int:
    """Number of shards of a batch: the size of the data axis."""
    return int(mesh.shape[data_axis(mesh)])


def model_axis_size(mesh: Mesh) -> int:
    """Size of the mesh's ``'model'`` axis (1 when it has none)."""
    return int(dict(mesh.shape).get(MODEL_AXIS, 1))


def param_spec(shape: Sequence[int], model_size: int) -> PartitionSpec:
    """Where a param-shaped array of ``shape`` lives on a mesh whose ``'model'``
    axis has ``model_size`` devices: split over it along its largest dimension
    that ``model_size`` divides (the last of equal ones), else replicated.

    With ``model_size == 1`` everything is replicated (``PartitionSpec()``).
    """
    if model_size <= 1:
        return PartitionSpec()
    candidates = [(size, i) for i, size in enumerate(shape) if size >= model_size and size % model_size == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    return PartitionSpec(*([None] * dim), MODEL_AXIS)


def param_sharding(leaf: Any, mesh: Mesh) -> NamedSharding:
    """The :class:`NamedSharding` of :func:`param_spec` for an array (or shape struct) ``leaf``."""
    return NamedSharding(mesh, param_spec(np.shape(leaf), model_axis_size(mesh)))


def _place(tree: PyTree, sharding_of: Any) -> PyTree:
    """Every array leaf of ``tree`` as a global array with ``sharding_of(leaf)``
    (left as is when it already has it); non-array leaves unchanged."""

    def put(leaf: Any) -> Any:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            return leaf
        sharding = sharding_of(leaf)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        return _put(leaf, sharding)

    return jax.tree.map(put, tree)


def shard_params(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` (params, masks, a train state, ...) placed by
    :func:`param_sharding`: replicated without a ``'model'`` axis, else split
    over it. Non-array leaves are unchanged. Multi-host: every process must
    pass the same values.
    """
    return _place(tree, lambda leaf: param_sharding(leaf, mesh))


def constrain_params(tree: PyTree, mesh: Mesh) -> PyTree:
    """Inside ``jit``: ``tree``'s leaves constrained to :func:`param_sharding`
    (``jax.lax.with_sharding_constraint``), e.g. the state a train step returns."""
    return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, param_sharding(leaf, mesh)), tree)


@functools.lru_cache(maxsize=None)
def _gather_fn(mesh: Mesh) -> Any:
    return jax.jit(lambda leaf: leaf, out_shardings=NamedSharding(mesh, PartitionSpec()))


def gather(tree: PyTree) -> PyTree:
    """``tree`` with every split array leaf (e.g. on a ``'model'`` axis)
    all-gathered to a replicated copy on its mesh, so any process can read it
    whole (``jax.device_get``). Other leaves are unchanged. Multi-host: a
    collective; every process must call it with the same tree.
    """

    def full(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or leaf.sharding.is_fully_replicated:
            return leaf
        if not isinstance(leaf.sharding, NamedSharding):
            if leaf.is_fully_addressable:
                return leaf
            raise ValueError(f"gather: cannot gather an array with sharding {leaf.sharding}; expected a NamedSharding")
        return _gather_fn(leaf.sharding.mesh)(leaf)

    return jax.tree.map(full, tree)


def point_sharding(mesh: Mesh) -> NamedSharding:
    """The points of S split over every axis of ``mesh`` (all devices), other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def shard_points(points: Any, mesh: Mesh, *, axis: int = 0) -> tuple[jax.Array, int]:
    """``points`` padded along ``axis`` (by repeating its first entry, which
    keeps maxima) to a multiple of the device count and split along it over
    every mesh axis; returns the global array and the number of real points.
    ``axis=1`` splits each chunk of a ``[C, n, ...]`` stack."""
    xp = jax.numpy if isinstance(points, jax.Array) else np  # device arrays stay on the device
    padded, n = pad_to_multiple(xp.moveaxis(xp.asarray(points), axis, 0), mesh.size)
    spec = PartitionSpec(*([None] * axis), tuple(mesh.axis_names))
    return _put(xp.moveaxis(padded, 0, axis), NamedSharding(mesh, spec)), n


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the data axis, other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(data_axis(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same full value on every process) as a global array with ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` replicated over ``mesh`` (non-array leaves unchanged).

    Multi-host: every process must pass the same values.
    """
    sharding = replicated_sharding(mesh)
    return _place(tree, lambda leaf: sharding)


def _leading(leaf: Any, what: str) -> int:
    shape = np.shape(leaf)
    if not shape:
        raise ValueError(f"{what}: expected arrays with a leading batch axis, got a scalar")
    return int(shape[0])


def pad_to_multiple(x: Any, multiple: int, *, mode: str = "edge") -> tuple[Any, int]:
    """Pads the leading axis of ``x`` (an array) to a multiple of ``multiple``.

    Args:
      mode: ``'edge'`` repeats the first row (keeps maxima unchanged),
        ``'zeros'`` appends zeros (weight them out).

    Returns:
      (padded array, number of real rows).
    """
    if mode not in ("edge", "zeros"):
        raise ValueError(f"mode={mode!r}: expected one of ['edge', 'zeros']")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple={multiple!r}: expected an integer >= 1")
    n = _leading(x, "pad_to_multiple")
    pad = -n % int(multiple)
    if not pad:
        return x, n
    xp = np if isinstance(x, np.ndarray) else jax.numpy
    extra = xp.repeat(x[:1], pad, axis=0) if mode == "edge" else xp.zeros((pad, *x.shape[1:]), x.dtype)
    return xp.concatenate([x, extra]), n


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Splits the leading axis of every leaf of ``batch`` over the data axis.

    Every leaf needs the same leading size, divisible by the data-axis size
    (pad first with :func:`pad_to_multiple` if needed). Multi-host: every
    process passes the full global batch (see :func:`global_batch_from_local`
    for process-local data).
    """
    shards = mesh_size(mesh)
    sizes = {_leading(leaf, "shard_batch") for leaf in jax.tree.leaves(batch)}
    if len(sizes) > 1:
        raise ValueError(f"shard_batch: leaves have different leading sizes {sorted(sizes)}; expected one batch size")
    for size in sizes:
        if size % shards:
            raise ValueError(
                f"shard_batch: batch size {size} is not divisible by the {shards} devices of mesh axis "
                f"{data_axis(mesh)!r}; use a batch size that is a multiple of {shards} or pad it "
                "(sensprune.sharding.pad_to_multiple)"
            )
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda leaf: _put(leaf, sharding), batch)


def process_rows(mesh: Mesh, global_size: int, process_index: Optional[int] = None) -> np.ndarray:
    """Global rows of a batch of ``global_size`` that ``process_index`` (default:
    this process) holds, ascending: the rows it should load for
    :func:`global_batch_from_local`.
    """
    shards = mesh_size(mesh)
    if global_size % shards:
        raise ValueError(
            f"global batch size {global_size} is not divisible by the {shards} devices of mesh axis "
            f"{data_axis(mesh)!r}"
        )
    me = jax.process_index() if process_index is None else int(process_index)
    per = global_size // shards
    axis_devices = np.asarray(mesh.devices).reshape(-1) if len(mesh.axis_names) == 1 else None
    if axis_devices is None:  # multi-axis mesh: position of each device along the data axis
        axis_pos = mesh.axis_names.index(data_axis(mesh))
        grid = np.moveaxis(np.asarray(mesh.devices), axis_pos, 0).reshape(shards, -1)
        positions = sorted({i for i in range(shards) for d in grid[i] if d.process_index == me})
    else:
        positions = [i for i, d in enumerate(axis_devices) if d.process_index == me]
    if not positions:
        return np.zeros((0,), np.int64)
    return np.concatenate([np.arange(i * per, (i + 1) * per) for i in sorted(positions)])


def global_batch_from_local(local: PyTree, mesh: Mesh, global_size: Optional[int] = None) -> PyTree:
    """A global batch (sharded over the data axis) from each process's rows.

    ``local`` holds, in order, the rows :func:`process_rows` names for this
    process (``jax.make_array_from_process_local_data``). ``global_size``
    defaults to the local size times the number of processes.
    """
    sharding = batch_sharding(mesh)

    def build(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        shape = None if global_size is None else (int(global_size), *leaf.shape[1:])
        return jax.make_array_from_process_local_data(sharding, leaf, shape)

    return jax.tree.map(build, local)
