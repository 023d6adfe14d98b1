"""Checkpoints: a thin, strict wrapper over ``orbax.checkpoint.CheckpointManager``.

One checkpoint (a numbered step directory) holds the items

* ``params``, ``batch_stats``, ``opt_state``, ``masks``: array pytrees
  (``StandardSave``); masks are their own item so a pruned model loads without
  its optimizer;
* ``meta``: JSON (epoch, phase, seed, results so far, ...);
* ``index``: JSON written by this module: for every array item its leaves
  (name, shape, dtype) and a CRC32 of their bytes.

Multi-host: every process calls ``save`` / ``restore`` with the same values
(host-local arrays, or global arrays replicated or split over a mesh); ``save``
first turns them into whole host arrays (gathering split ones, a collective),
so a checkpoint holds the same full arrays whatever the mesh was. Orbax
coordinates the processes and writes arrays and the JSON items (``meta``,
``index``) from the primary process only.

Saving is synchronous: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and
renames it to ``<step>`` when complete, so a process killed at any moment
leaves either a complete step or a temporary directory that is never listed
(and is removed by the next :class:`Checkpointer` on that directory).

Restoring validates the target against the index before reading and the data
against the checksums after reading; any mismatch or unreadable file raises
:class:`CheckpointError` naming the directory, step and item (a
:class:`CorruptCheckpointError` when the files themselves are damaged:
unreadable, truncated, failing a checksum, garbage metadata).

:meth:`Checkpointer.restore_latest` falls back: it restores the newest *intact*
step, moving each newer corrupt one aside (into ``<directory>/corrupt/``, never
listed as a step again) with a warning, so a run resumes from the step before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from experiments.fileio import atomic_write
from sensprune.types import PyTree

__all__ = [
    "ARRAY_ITEMS",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "read_json",
    "restore_chain",
    "write_json",
]

ARRAY_ITEMS = ("params", "batch_stats", "opt_state", "masks")
_META = "meta"
_INDEX = "index"
_FORMAT = "sensprune-checkpoint/1"
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete or does not match what was expected."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged (as opposed to not matching the target)."""


# ----------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------


def _jsonable(obj: Any, where: str = "meta") -> Any:
    """``obj`` with numpy/jax scalars and arrays turned into JSON types."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(obj).tolist(), where)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string (JSON needs string keys)")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(f"{where}: value of type {type(obj).__name__} is not JSON-serializable")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON atomically (temp file, fsync, rename)."""
    data = json.dumps(_jsonable(obj, os.path.basename(os.fspath(path))), indent=1, allow_nan=True)
    atomic_write(path, lambda f: f.write(data.encode()))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """JSON content of ``path``; ``default`` if it does not exist.

    Raises:
      CheckpointError: the file exists but is not valid JSON.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read JSON file {path}: {e}") from e


# ----------------------------------------------------------------------------
# Leaf index
# ----------------------------------------------------------------------------


def _leaf_name(path: jax.tree_util.KeyPath) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    return [(_leaf_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(tree: PyTree) -> list[list[Any]]:
    """``[[name, shape, dtype], ...]`` of the leaves in flattening order."""
    out = []
    for name, leaf in _named_leaves(tree):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        dtype = getattr(leaf, "dtype", None)
        dtype = np.result_type(leaf) if dtype is None else dtype
        out.append([name, list(shape), str(np.dtype(dtype))])
    return out


def _crc32(tree: PyTree) -> int:
    """CRC32 of the leaves' bytes, taken in order of leaf name (so it does not
    depend on the containers a tree is restored into)."""
    crc = 0
    for name, leaf in sorted(_named_leaves(tree), key=lambda t: t[0]):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
    return crc


def _diff(
    expected: list[list[Any]], got: list[list[Any]], label: str, *, check_order: bool = True
) -> list[str]:
    """Human-readable differences between two leaf descriptions."""
    exp = {name: (tuple(s), d) for name, s, d in expected}
    act = {name: (tuple(s), d) for name, s, d in got}
    problems = []
    for name in exp:
        if name not in act:
            problems.append(f"leaf {name!r} is in the checkpoint but not in the {label}")
        elif exp[name] != act[name]:
            (s0, d0), (s1, d1) = exp[name], act[name]
            problems.append(
                f"leaf {name!r}: checkpoint has shape {s0} {d0}, {label} has shape {s1} {d1}"
            )
    for name in act:
        if name not in exp:
            problems.append(f"leaf {name!r} is in the {label} but not in the checkpoint")
    if check_order and not problems and [n for n, _, _ in expected] != [n for n, _, _ in got]:
        problems.append("same leaves in a different order (different containers)")
    return problems


def _host_arrays(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` as a whole NumPy array: what a process
    of a multi-host run saves. Orbax refuses host-local device arrays there
    (they look like pmap output), and split global arrays are gathered first
    (:func:`sensprune.sharding.gather`; every process must take part)."""
    from sensprune import sharding

    return jax.device_get(sharding.gather(tree))


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target for one leaf (keeps a given sharding, else this process's first device)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtype = getattr(leaf, "dtype", None)
    dtype = np.result_type(leaf) if dtype is None else dtype
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# ----------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------


_TMP_STEP = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # orbax's TMP_DIR_SUFFIX


def _remove_tmp_steps(directory: str) -> None:
    """Deletes step directories an interrupted save left behind (never listed
    as steps by orbax; removed so they cannot accumulate)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _TMP_STEP.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Numbered checkpoints of training state, masks and JSON metadata.

    Args:
      directory: root directory (created if missing).
      max_to_keep: newest steps kept (``None`` keeps all).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: Optional[int] = 2):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}: expected None or an integer >= 1")
        self._directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self._directory, exist_ok=True)
        if jax.process_index() == 0:  # multi-host: one process cleans up
            _remove_tmp_steps(self._directory)
        handlers: dict[str, Any] = {k: ocp.StandardCheckpointHandler() for k in ARRAY_ITEMS}
        handlers[_META] = ocp.JsonCheckpointHandler()
        handlers[_INDEX] = ocp.JsonCheckpointHandler()
        preservation = ocp.checkpoint_managers.LatestN(max_to_keep)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=False,  # done synchronously above
            create=True,
            preservation_policy=preservation,
        )
        self._manager = ocp.CheckpointManager(
            self._directory, item_handlers=handlers, options=options
        )

    @property
    def directory(self) -> str:
        return self._directory

    # -- bookkeeping ---------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (temporary directories excluded)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """Newest complete step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def wait(self) -> None:
        """Blocks until pending writes finished (saves are synchronous anyway)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- save ------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: PyTree,
        batch_stats: Optional[PyTree] = None,
        opt_state: Optional[PyTree] = None,
        masks: Optional[PyTree] = None,
        meta: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Writes checkpoint ``step`` and returns once it is complete on disk.

        ``None`` items are not saved (restoring them later raises); empty trees
        (e.g. ``batch_stats={}``) are recorded as empty. Steps must increase.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r}: expected an integer >= 0")
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"step={step}: checkpoints in {self._directory} already go up to step "
                f"{latest}; steps must increase"
            )
        meta_json = _jsonable({} if meta is None else dict(meta))
        trees = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state, "masks": masks}
        if jax.process_count() > 1:
            trees = {name: None if tree is None else _host_arrays(tree) for name, tree in trees.items()}
        index: dict[str, Any] = {"format": _FORMAT, "items": {}}
        args: dict[str, Any] = {}
        for name, tree in trees.items():
            if tree is None:
                continue
            leaves = _describe(tree)
            index["items"][name] = {"leaves": leaves, "crc32": _crc32(tree)}
            if leaves:
                args[name] = ocp.args.StandardSave(tree)
        args[_META] = ocp.args.JsonSave(meta_json)
        args[_INDEX] = ocp.args.JsonSave(index)
        saved = self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax declined to save step {step} in {self._directory}")

    # -- restore ---------------------------------------------------------------

    def _error(self, step: int, msg: str, corrupt: bool = True) -> CheckpointError:
        cls = CorruptCheckpointError if corrupt else CheckpointError
        return cls(f"checkpoint {self._directory} step {step}: {msg}")

    def _read_json(self, step: int, name: str) -> Any:
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
            )[name]
        except Exception as e:  # orbax/OS errors of many types
            raise self._error(step, f"cannot read item {name!r}: {type(e).__name__}: {_short(e)}") from e
        if out is None:
            raise self._error(step, f"item {name!r} is missing")
        return out

    def _resolve_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self._directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self._directory} (steps: {steps})"
            )
        return int(step)

    def index(self, step: Optional[int] = None) -> dict[str, Any]:
        """The leaf index of ``step`` (default: latest), validated."""
        step = self._resolve_step(step)
        index = self._read_json(step, _INDEX)
        if not isinstance(index, dict) or index.get("format") != _FORMAT:
            raise self._error(step, f"index has an unknown format (expected {_FORMAT!r})")
        return index

    def restore_meta(self, step: Optional[int] = None) -> dict[str, Any]:
        """Only the JSON ``meta`` of ``step`` (default: latest)."""
        step = self._resolve_step(step)
        return self._read_json(step, _META)

    def restore(
        self, step: Optional[int] = None, *, like: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Restores the items named in ``like`` plus ``meta``.

        Args:
          step: step to restore (default: the latest complete one).
          like: ``{item: target}`` for items among ``params``, ``batch_stats``,
            ``opt_state``, ``masks``. A target is a tree of arrays or
            ``jax.ShapeDtypeStruct`` (its structure, shapes and dtypes must
            match the checkpoint exactly; the result has its containers, e.g.
            optax NamedTuples) or ``None`` to restore as saved (nested
            dicts/lists of arrays).

        Returns:
          ``{item: tree, ..., 'meta': dict}``. An item saved as an empty tree
          comes back as its target (or ``{}``).

        Raises:
          FileNotFoundError: no such (complete) step.
          CheckpointError: an item is missing, does not match its target, cannot
            be read or fails its checksum.
        """
        unknown = sorted(set(like) - set(ARRAY_ITEMS))
        if unknown:
            raise ValueError(f"like: unknown item(s) {unknown}; allowed: {list(ARRAY_ITEMS)}")
        step = self._resolve_step(step)
        index = self.index(step)["items"]
        out: dict[str, Any] = {}
        args: dict[str, Any] = {}
        for name, target in like.items():
            if name not in index:
                raise self._error(step, f"item {name!r} was not saved (saved: {sorted(index)})", corrupt=False)
            saved = index[name]["leaves"]
            if target is not None:
                problems = _diff(saved, _describe(target), "target")
                if problems:
                    more = len(problems) - _MAX_LISTED
                    listed = "; ".join(problems[:_MAX_LISTED]) + (f"; ... {more} more" if more > 0 else "")
                    raise self._error(step, f"item {name!r} does not match the target: {listed}", corrupt=False)
            if not saved:
                out[name] = {} if target is None else target
                continue
            if target is None:
                args[name] = ocp.args.StandardRestore()
            else:
                args[name] = ocp.args.StandardRestore(jax.tree.map(_abstract, target))
        args[_META] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # tensorstore / orbax / OS errors of many types
            raise self._error(
                step, f"cannot read items {sorted(args)}: {type(e).__name__}: {_short(e)}"
            ) from e
        for name in args:
            if name == _META:
                continue
            tree = restored[name]
            if tree is None:
                raise self._error(step, f"item {name!r} is missing")
            if like[name] is None:
                problems = _diff(
                    index[name]["leaves"], _describe(tree), "restored data", check_order=False
                )
                if problems:
                    raise self._error(step, f"item {name!r} is inconsistent: {problems[0]}")
            if _crc32(tree) != index[name]["crc32"]:
                raise self._error(step, f"item {name!r} fails its checksum (corrupt data files)")
            out[name] = tree
        meta = restored[_META]
        if meta is None:
            raise self._error(step, "item 'meta' is missing")
        out[_META] = meta
        return out


    # -- fallback ----------------------------------------------------------------

    def quarantine(self, step: int, reason: str = "") -> Optional[str]:
        """Moves step ``step`` aside into ``<directory>/corrupt/`` (logged); returns its new path.

        Only process 0 moves files (multi-host); the others just log.
        """
        src = os.path.join(self._directory, str(step))
        logging.warning("checkpoint %s step %d is corrupt, moved aside (falling back to an older step): %s",
                        self._directory, step, reason)
        if jax.process_index() != 0 or not os.path.isdir(src):
            return None
        dest_dir = os.path.join(self._directory, "corrupt")
        os.makedirs(dest_dir, exist_ok=True)
        n = 0
        while os.path.exists(os.path.join(dest_dir, f"step{step}.{n}")):
            n += 1
        dest = os.path.join(dest_dir, f"step{step}.{n}")
        os.replace(src, dest)
        self._manager.reload()
        return dest

    def restore_latest(
        self, *, like: Mapping[str, Any], before: Optional[int] = None
    ) -> tuple[Optional[int], dict[str, Any]]:
        """The newest intact step (below ``before`` if given) and its items, or ``(None, {})``.

        Steps whose files are damaged (:class:`CorruptCheckpointError`) are
        moved aside with a warning and the next older one is tried; a target
        mismatch (a config or code change, not damage) still raises.
        ``like={}`` restores (and checks) only ``meta``.
        """
        for step in reversed(self.all_steps()):
            if before is not None and step >= before:
                continue
            try:
                return step, self.restore(step, like=like)
            except CorruptCheckpointError as e:
                self.quarantine(step, str(e))
            except FileNotFoundError:  # moved aside meanwhile (by process 0 of a multi-host run)
                continue
        return None, {}

    def restore_meta_latest(self) -> tuple[Optional[int], dict[str, Any]]:
        """``meta`` of the newest step whose meta is readable (newer unreadable ones moved aside)."""
        step, items = self.restore_latest(like={})
        return step, items.get(_META, {})


def restore_chain(ckpt: Checkpointer, like: Mapping[str, Any], last: int) -> tuple[Optional[int], dict[str, Any]]:
    """Where a chain of checkpoints ``1..last`` continues: ``(step, items)`` of its newest
    intact step, or ``(None, {})``. A finished chain (step ``last`` present) needs only
    its ``meta``: its arrays are not read, so damage there does not matter."""
    if ckpt.latest_step() == last:
        step, items = ckpt.restore_latest(like={})
        if step == last:
            return step, items
    return ckpt.restore_latest(like=like)


def _short(e: BaseException, limit: int = 400) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    return text if len(text) <= limit else text[:limit] + "..."

