"""Experiment results: numpy arrays saved as npz, and TensorBoard logging.

Axes of the metric arrays are ``[nets, keep_ratios, repetitions, methods]``
(``layer_kept`` has a trailing ``layers`` axis). Entries that have not run yet
are NaN and ``done`` is False there.

Durability: with ``records`` set (:func:`load_or_empty`, as the pipeline does)
every :meth:`Results.record` / :meth:`Results.record_dense` also writes a small
JSON record under ``records/`` (``net<n>/rep<r>/<method>/ratio<i>.json``,
``net<n>/dense.json``, each written atomically). ``results.npz`` is a cache of
them: a deleted, unreadable or corrupt ``results.npz`` is rebuilt from the
records with every finished run's numbers (a corrupt one is moved aside to
``results.npz.corrupt``).

Conventions: ``error`` and ``error5`` are top-1 / top-5 test error as
fractions in [0, 1] (accuracy = 1 - error); ``loss`` is the mean test loss;
``sizes`` and ``flops`` are the *kept* fractions of prunable parameters and of
FLOPs actually achieved (pruned fraction = 1 - kept); ``layer_kept`` holds the
number of kept weights per layer and ``layer_total`` the dense count per layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from experiments.fileio import atomic_write

FORMAT_VERSION = 1
METRICS = ("error", "error5", "loss", "sizes", "flops")
DENSE_METRICS = ("error", "error5", "loss")
_ARRAY_KEYS = (*METRICS, "layer_kept", "done")
RECORD_FORMAT = "sensprune-record/1"


class CorruptResultsError(ValueError):
    """A results file exists but cannot be read (truncated, overwritten, not an npz)."""


@dataclasses.dataclass
class Results:
    """All metrics of one experiment (see the module docstring for axes)."""

    methods: tuple[str, ...]
    keep_ratios: np.ndarray
    layer_names: tuple[str, ...]
    layer_total: np.ndarray
    error: np.ndarray
    error5: np.ndarray
    loss: np.ndarray
    sizes: np.ndarray
    flops: np.ndarray
    layer_kept: np.ndarray
    done: np.ndarray
    dense: dict[str, np.ndarray]
    sizes_total: float = float("nan")
    flops_total: float = float("nan")
    # Where record()/record_dense() also write durable per-run JSON records (None: nowhere).
    records_dir: Path | None = dataclasses.field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def empty(
        cls,
        *,
        methods: Sequence[str],
        keep_ratios: Sequence[float],
        num_nets: int,
        num_repetitions: int = 1,
        layer_names: Sequence[str] = (),
        layer_total: Sequence[float] | Mapping[str, float] | None = None,
        sizes_total: float = float("nan"),
        flops_total: float = float("nan"),
    ) -> "Results":
        """All-NaN results for the given experiment layout."""
        methods = tuple(str(m) for m in methods)
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods must be unique, got {methods}")
        for name, value in (("num_nets", num_nets), ("num_repetitions", num_repetitions)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        layer_names = tuple(str(n) for n in layer_names)
        shape = (int(num_nets), len(keep_ratios), int(num_repetitions), len(methods))
        nan = lambda s: np.full(s, np.nan, dtype=np.float64)  # noqa: E731
        return cls(
            methods=methods,
            keep_ratios=np.asarray(keep_ratios, dtype=np.float64),
            layer_names=layer_names,
            layer_total=_layer_vector(layer_total, layer_names, "layer_total"),
            **{m: nan(shape) for m in METRICS},
            layer_kept=nan((*shape, len(layer_names))),
            done=np.zeros(shape, dtype=bool),
            dense={m: nan((int(num_nets),)) for m in DENSE_METRICS},
            sizes_total=float(sizes_total),
            flops_total=float(flops_total),
        )

    # ------------------------------------------------------------ properties
    @property
    def num_nets(self) -> int:
        return self.error.shape[0]

    @property
    def num_repetitions(self) -> int:
        return self.error.shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def method_index(self, method: str | int) -> int:
        """Index of ``method`` (a name or an index)."""
        if isinstance(method, (int, np.integer)) and not isinstance(method, bool):
            if not 0 <= method < len(self.methods):
                raise ValueError(f"method index must be in [0, {len(self.methods)}), got {method}")
            return int(method)
        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, got {method!r}")
        return self.methods.index(method)

    def is_done(self, net: int, ratio_idx: int, rep: int, method: str | int) -> bool:
        return bool(self.done[net, ratio_idx, rep, self.method_index(method)])

    # ---------------------------------------------------------------- record
    def record(
        self,
        net: int,
        ratio_idx: int,
        rep: int,
        method: str | int,
        *,
        mark_done: bool = True,
        **metrics: Any,
    ) -> None:
        """Store metrics of one run; ``layer_kept`` may be a name->count mapping."""
        index = (net, ratio_idx, rep, self.method_index(method))
        self._check_index(index)
        allowed = (*METRICS, "layer_kept")
        for name, value in metrics.items():
            if name not in allowed:
                raise ValueError(f"unknown metric {name!r}; allowed: {allowed}")
            if name == "layer_kept":
                self.layer_kept[index] = _layer_vector(value, self.layer_names, "layer_kept")
            elif value is not None:
                getattr(self, name)[index] = float(value)
        if mark_done:
            self.done[index] = True
        if self.records_dir is not None and mark_done:
            self._write_record(index)

    def record_dense(
        self,
        net: int,
        *,
        sizes_total: float | None = None,
        flops_total: float | None = None,
        **metrics: float | None,
    ) -> None:
        """Store the unpruned net's metrics (and optionally the dense counts)."""
        if not 0 <= net < self.num_nets:
            raise ValueError(f"net must be in [0, {self.num_nets}), got {net}")
        for name, value in metrics.items():
            if name not in DENSE_METRICS:
                raise ValueError(f"unknown dense metric {name!r}; allowed: {DENSE_METRICS}")
            if value is not None:
                self.dense[name][net] = float(value)
        if sizes_total is not None:
            self.sizes_total = float(sizes_total)
        if flops_total is not None:
            self.flops_total = float(flops_total)
        if self.records_dir is not None:
            from experiments.checkpoint import write_json

            write_json(self.records_dir / f"net{int(net)}" / "dense.json", {
                "format": RECORD_FORMAT, "net": int(net),
                **{k: _json_float(self.dense[k][net]) for k in DENSE_METRICS},
                "sizes_total": _json_float(self.sizes_total), "flops_total": _json_float(self.flops_total),
            })

    # ---------------------------------------------------------------- records
    def _record_path(self, net: int, ratio_idx: int, rep: int, method: str) -> Path:
        return self.records_dir / f"net{net}" / f"rep{rep}" / method / f"ratio{ratio_idx}.json"

    def _write_record(self, index: tuple[int, int, int, int]) -> None:
        from experiments.checkpoint import write_json

        net, i, rep, m = (int(v) for v in index)
        write_json(self._record_path(net, i, rep, self.methods[m]), {
            "format": RECORD_FORMAT, "net": net, "ratio_idx": i, "rep": rep, "method": self.methods[m],
            "keep_ratio": float(self.keep_ratios[i]),
            **{k: _json_float(getattr(self, k)[index]) for k in METRICS},
            "layer_kept": [_json_float(v) for v in self.layer_kept[index]],
        })

    def backfill_records(self) -> int:
        """Writes the record of every finished cell that has none; returns how many."""
        count = 0
        for index in zip(*np.nonzero(self.done)):
            net, i, rep, m = (int(v) for v in index)
            if not self._record_path(net, i, rep, self.methods[m]).exists():
                self._write_record((net, i, rep, m))
                count += 1
        return count

    def replay_records(self, records_dir: str | os.PathLike) -> int:
        """Fills every cell (and dense entry) that has a record under ``records_dir``;
        returns the number of cells filled. Records of another layout (a method or
        keep ratio not in this experiment) are skipped."""
        from experiments.checkpoint import CheckpointError, read_json

        root = Path(records_dir)
        count = 0
        for path in sorted(root.glob("net*/dense.json")):
            try:
                rec = read_json(path)
            except CheckpointError:
                continue
            net = rec.get("net") if isinstance(rec, dict) else None
            if isinstance(net, int) and 0 <= net < self.num_nets:
                for k in DENSE_METRICS:
                    if rec.get(k) is not None:
                        self.dense[k][net] = float(rec[k])
                for k in ("sizes_total", "flops_total"):
                    if rec.get(k) is not None:
                        setattr(self, k, float(rec[k]))
        for path in sorted(root.glob("net*/rep*/*/ratio*.json")):
            try:
                rec = read_json(path)
            except CheckpointError:
                continue
            if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
                continue
            net, i, rep, method = rec.get("net"), rec.get("ratio_idx"), rec.get("rep"), rec.get("method")
            if method not in self.methods or not all(isinstance(v, int) for v in (net, i, rep)):
                continue
            index = (net, i, rep, self.methods.index(method))
            if any(not 0 <= v < n for v, n in zip(index, self.done.shape)):
                continue
            if not np.isclose(float(rec.get("keep_ratio", np.nan)), self.keep_ratios[i], rtol=1e-9, atol=1e-12):
                continue
            for k in METRICS:
                getattr(self, k)[index] = np.nan if rec.get(k) is None else float(rec[k])
            kept = rec.get("layer_kept") or []
            if len(kept) == self.num_layers:
                self.layer_kept[index] = [np.nan if v is None else float(v) for v in kept]
            self.done[index] = True
            count += 1
        return count

    def _check_index(self, index: tuple[int, int, int, int]) -> None:
        names = ("net", "ratio_idx", "rep", "method")
        for name, i, n in zip(names, index, self.done.shape):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
                raise ValueError(f"{name} must be an integer in [0, {n}), got {i!r}")

    # ---------------------------------------------------------------- checks
    def check_matches(
        self,
        *,
        methods: Sequence[str] | None = None,
        keep_ratios: Sequence[float] | None = None,
        num_nets: int | None = None,
        num_repetitions: int | None = None,
        layer_names: Sequence[str] | None = None,
        source: str = "results",
    ) -> None:
        """Raise ValueError if this layout differs from the expected one."""
        problems = []
        if methods is not None and tuple(methods) != self.methods:
            problems.append(f"methods: stored {list(self.methods)}, config {list(methods)}")
        if keep_ratios is not None:
            want = np.asarray(keep_ratios, dtype=np.float64)
            if want.shape != self.keep_ratios.shape or not np.allclose(
                want, self.keep_ratios, rtol=1e-9, atol=1e-12
            ):
                problems.append(
                    f"keep_ratios: stored {np.round(self.keep_ratios, 4).tolist()}, "
                    f"config {np.round(want, 4).tolist()}"
                )
        if num_nets is not None and num_nets != self.num_nets:
            problems.append(f"num_nets: stored {self.num_nets}, config {num_nets}")
        if num_repetitions is not None and num_repetitions != self.num_repetitions:
            problems.append(f"num_repetitions: stored {self.num_repetitions}, config {num_repetitions}")
        if layer_names is not None and tuple(layer_names) != self.layer_names:
            problems.append(f"layer_names: stored {list(self.layer_names)}, config {list(layer_names)}")
        if problems:
            raise ValueError(
                f"{source} does not match the experiment config (use a fresh workdir or "
                "restore the config):\n  " + "\n  ".join(problems)
            )

    # --------------------------------------------------------------- save/load
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (the npz content)."""
        arrays = {k: getattr(self, k) for k in _ARRAY_KEYS}
        arrays.update({f"dense_{k}": v for k, v in self.dense.items()})
        arrays.update(
            methods=np.asarray(self.methods, dtype=str),
            keep_ratios=self.keep_ratios,
            layer_names=np.asarray(self.layer_names, dtype=str),
            layer_total=self.layer_total,
            sizes_total=np.float64(self.sizes_total),
            flops_total=np.float64(self.flops_total),
            format_version=np.int64(FORMAT_VERSION),
        )
        return arrays

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then os.replace."""
        path = Path(path)
        atomic_write(path, lambda f: np.savez(f, **self.to_arrays()))
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike, **expected: Any) -> "Results":
        """Load from npz; keyword args are passed to :meth:`check_matches`."""
        path = Path(path)
        try:
            results = cls._read_npz(path)
        except (CorruptResultsError, FileNotFoundError, PermissionError):
            raise
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise CorruptResultsError(
                f"{path} is corrupt or truncated ({type(err).__name__}: {str(err)[:200]}); a pipeline rerun in "
                "its workdir rebuilds it from the per-run records (records/)"
            ) from None
        results.check_matches(source=str(path), **expected)
        return results

    @classmethod
    def _read_npz(cls, path: Path) -> "Results":
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*_ARRAY_KEYS, "methods", "keep_ratios") if k not in data.files]
            if missing:
                raise CorruptResultsError(f"{path} is not a results file: missing keys {missing}")
            results = cls(
                methods=tuple(str(m) for m in data["methods"]),
                keep_ratios=data["keep_ratios"].astype(np.float64),
                layer_names=tuple(str(n) for n in data["layer_names"]),
                layer_total=data["layer_total"].astype(np.float64),
                **{k: data[k].astype(np.float64) for k in METRICS},
                layer_kept=data["layer_kept"].astype(np.float64),
                done=data["done"].astype(bool),
                dense={k: data[f"dense_{k}"].astype(np.float64) for k in DENSE_METRICS},
                sizes_total=float(data["sizes_total"]),
                flops_total=float(data["flops_total"]),
            )
        return results


def load_or_empty(
    path: str | os.PathLike,
    *,
    records: str | os.PathLike | None = None,
    write_records: bool = True,
    **layout: Any,
) -> Results:
    """Load ``path`` if it exists (checking it matches ``layout``), else
    ``Results.empty(**layout)``.

    With ``records`` (a folder): a corrupt ``path`` is moved aside (to
    ``<path>.corrupt``) instead of failing, every record found there is
    replayed into the results (so a deleted or corrupt results file loses
    nothing), and later ``record`` calls write records there too (unless
    ``write_records`` is False, e.g. on the non-primary processes of a
    multi-host run).
    """
    path = Path(path)
    keys = ("methods", "keep_ratios", "num_nets", "num_repetitions", "layer_names")
    results = None
    if path.exists():
        try:
            results = Results.load_npz(path, **{k: layout[k] for k in keys if k in layout})
        except CorruptResultsError as err:
            if records is None:
                raise
            from absl import logging

            if write_records:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            logging.warning("%s; rebuilding it from %s", err, records)
    if results is None:
        results = Results.empty(**layout)
    if records is not None:
        results.replay_records(records)
        if write_records:
            results.records_dir = Path(records)
            results.backfill_records()  # cells only results.npz knew of (e.g. records/ deleted)
    return results


def _json_float(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _layer_vector(
    value: Sequence[float] | Mapping[str, float] | np.ndarray | None,
    layer_names: tuple[str, ...],
    field: str,
) -> np.ndarray:
    """Per-layer values as a float vector ordered like ``layer_names``."""
    if value is None:
        return np.full(len(layer_names), np.nan)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(layer_names))
        missing = [n for n in layer_names if n not in value]
        if unknown or missing:
            raise ValueError(
                f"{field} keys must be the layer names {list(layer_names)}; "
                f"unknown {unknown}, missing {missing}"
            )
        return np.asarray([float(value[n]) for n in layer_names], dtype=np.float64)
    vector = np.asarray(value, dtype=np.float64)
    if vector.shape != (len(layer_names),):
        raise ValueError(f"{field} must have shape ({len(layer_names)},), got {vector.shape}")
    return vector


# --------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------
def pruned_step(kept_fraction: float) -> int:
    """TensorBoard step for a kept fraction: round(pruned fraction * 1e4)."""
    return int(round((1.0 - float(kept_fraction)) * 1e4))


def _default_enabled() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no jax / no backend: single process
        return True


class TensorBoardLogger:
    """Thin tensorboardX wrapper; every call is a no-op when disabled.

    Tags: ``<method>/test_{error,error5,loss}_vs_pruned_{params,flops}`` (step =
    round(pruned fraction * 1e4)), ``<method>/<phase>/<metric>_per_<unit>`` for
    training curves, ``<method>/layer_budget/<layer>`` (kept %, step as for
    test scalars), ``General/config`` and other ``General/*`` texts and figures.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None):
        self.logdir = Path(logdir)
        self.enabled = _default_enabled() if enabled is None else bool(enabled)
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.logdir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Write one scalar (NaN and None are skipped)."""
        if self._writer is None or value is None or not np.isfinite(float(value)):
            return
        self._writer.add_scalar(tag, float(value), int(step))

    def log_test(
        self,
        method: str,
        *,
        size: float,
        flops: float | None = None,
        error: float | None = None,
        error5: float | None = None,
        loss: float | None = None,
    ) -> None:
        """Test metrics against pruned parameters (and FLOPs if given)."""
        axes = [("params", size)] + ([("flops", flops)] if flops is not None else [])
        for axis, kept in axes:
            step = pruned_step(kept)
            for name, value in (("error", error), ("error5", error5), ("loss", loss)):
                self.scalar(f"{method}/test_{name}_vs_pruned_{axis}", value, step)

    def log_train(
        self,
        method: str,
        metrics: Mapping[str, float],
        step: int,
        *,
        phase: str = "train",
        unit: str = "step",
    ) -> None:
        """Training curves, e.g. ``phase='retrain'``, ``unit='epoch'``."""
        if phase not in ("train", "retrain"):
            raise ValueError(f"phase must be 'train' or 'retrain', got {phase!r}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        for name, value in metrics.items():
            self.scalar(f"{method}/{phase}/{name}_per_{unit}", value, step)

    def log_layer_budget(
        self,
        method: str,
        kept: Mapping[str, float],
        total: Mapping[str, float],
        *,
        size: float,
    ) -> None:
        """Per-layer kept weights in % of the layer's dense count."""
        step = pruned_step(size)
        for name, count in kept.items():
            if name not in total:
                raise ValueError(f"layer {name!r} of kept has no entry in total")
            if total[name]:
                self.scalar(f"{method}/layer_budget/{name}", 100.0 * count / total[name], step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, int(step))

    def log_config(self, config: Any) -> None:
        """The experiment config as a markdown code block (``General/config``)."""
        if isinstance(config, Mapping) and not hasattr(config, "to_yaml"):
            body = json.dumps(config, indent=2, default=str, sort_keys=True)
        else:
            body = str(config)
        self.log_text("General/config", "```\n" + body + "\n```")

    def log_figure(self, tag: str, figure: Any, step: int = 0) -> None:
        """A matplotlib figure as an image (the figure is closed)."""
        if self._writer is not None:
            self._writer.add_figure(tag, figure, int(step), close=True)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
