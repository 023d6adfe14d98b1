"""The workdir of a run: exclusive lock, writability, config comparison, list flags.

* :func:`open_workdir` (used by :func:`experiments.pipeline.run`) creates the
  workdir, checks up front that it is writable and takes an exclusive
  ``fcntl`` lock on ``<workdir>/.lock`` for the whole run: a second run in the
  same workdir stops at once with :class:`WorkdirBusyError` naming the process
  id that holds it. The OS releases the lock when that process dies (SIGKILL
  included), so a stale lock file never blocks a resume.
* :func:`config_diff` lists every differing field of two (nested) configs with
  both values, for the "workdir holds another config" error.
* :func:`normalize_lists` accepts comma-separated lists on the command line for
  list fields: ``--config.experiments.methods=sipp,pfp`` (methods),
  ``--config.experiments.spacing=0.5,0.2,0.1`` (manual keep ratios),
  ``--config.training.lr_milestones=30,60`` (milestones).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "LOCK_NAME",
    "WorkdirBusyError",
    "check_writable",
    "config_diff",
    "lock",
    "normalize_lists",
    "open_workdir",
]

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another process runs in this workdir."""


# ----------------------------------------------------------------------------
# Writability
# ----------------------------------------------------------------------------
def check_writable(workdir: str | os.PathLike) -> None:
    """Raises ``PermissionError`` naming the path unless ``workdir`` (created if
    missing) and what a run writes in it can be written."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"--workdir {workdir} is not writable ({err.strerror or err}); a run writes checkpoints, "
            "results, plots and logs there: fix its permissions or use another --workdir"
        ) from None
    for name in ("results.npz", "config.json", "report.md", "records", "checkpoints", "plots", "tensorboard"):
        path = workdir / name
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise PermissionError(
                f"--workdir {workdir}: {path} is not writable; fix its permissions or use another --workdir"
            )


# ----------------------------------------------------------------------------
# Lock
# ----------------------------------------------------------------------------
def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text.split()[0] if text else "unknown"


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Holds an exclusive lock on ``workdir`` (``fcntl.flock`` on ``<workdir>/.lock``).

    Raises:
      WorkdirBusyError: another process holds it (the message names its pid).
    """
    path = Path(workdir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirBusyError(
                f"--workdir {Path(workdir)} is in use by another run (process id {_holder(path)}, lock {path}); "
                "wait for it to finish, stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_workdir(workdir: str | os.PathLike, *, primary: bool = True) -> Iterator[Path]:
    """Creates and checks ``workdir``, then holds its lock (primary process only:
    the processes of one multi-host run share it)."""
    if not primary:
        yield Path(workdir)
        return
    check_writable(workdir)
    with lock(workdir):
        yield Path(workdir)


# ----------------------------------------------------------------------------
# Config comparison
# ----------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: tree}


_MISSING = "<absent>"


def config_diff(stored: Mapping[str, Any], current: Mapping[str, Any],
                ignore: Sequence[str] = ()) -> list[str]:
    """``'section.field: workdir <a>, config <b>'`` for every differing leaf field
    (fields under a top-level key in ``ignore`` are skipped)."""
    a, b = _flatten(stored), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignore:
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if _normal(va) != _normal(vb):
            out.append(f"{key}: workdir {_show(va)}, config {_show(vb)}")
    return out


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = value if value == _MISSING else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------
# Comma-separated lists on the command line
# ----------------------------------------------------------------------------
def _split(items: Any) -> list[str] | None:
    """A tuple/str of names with commas inside split into names; None if not strings."""
    if isinstance(items, str):
        items = (items,)
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        return None
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def _numbers(items: Any) -> list[float] | None:
    """Numbers (or numeric strings, comma-separated) as floats; None if anything else."""
    if isinstance(items, (int, float, str)) and not isinstance(items, bool):
        items = (items,)
    if not isinstance(items, (list, tuple)) or not items:
        return None
    out = []
    for item in items:
        if isinstance(item, bool):
            return None
        if isinstance(item, (int, float)):
            out.append(float(item))
        elif isinstance(item, str):
            try:
                out.extend(float(p) for p in item.split(",") if p.strip())
            except ValueError:
                return None
        else:
            return None
    return out


def normalize_lists(config: Any) -> Any:
    """Turns command-line list values into the config's list form, in place.

    ``experiments.methods``: ``('sipp,pfp',)`` -> ``('sipp', 'pfp')``.
    ``experiments.spacing``: numbers ``(0.5, 0.2)`` or ``'0.5,0.2'`` -> one
    manual segment ``({'type': 'manual', 'values': [0.5, 0.2]},)``.
    ``training/retraining.lr_milestones``: ``'30,60'`` -> ``(30, 60)``.
    """
    exp = config.experiments
    methods = _split(exp.methods)
    if methods is not None and tuple(methods) != tuple(exp.methods):
        exp.methods = tuple(methods)
    values = _numbers(exp.spacing)
    if values is not None:
        exp.spacing = (dict(type="manual", values=values),)
    for block in ("training", "retraining"):
        if block in config and "lr_milestones" in config[block]:
            ms = config[block].lr_milestones
            nums = _numbers(ms) if isinstance(ms, str) or (
                isinstance(ms, (list, tuple)) and any(isinstance(m, str) for m in ms)) else None
            if nums is not None:
                config[block].lr_milestones = tuple(int(m) for m in nums)
    return config
