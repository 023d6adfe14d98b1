"""Launches an experiment: train -> prune -> retrain -> evaluate, resumable.

  python -m experiments.main --config=configs/default.py --workdir=runs/default
  python -m experiments.main --config=configs/cifar/resnet20.py --workdir=runs/r20 \\
      --config.dataset.data_dir=/data/cifar --config.experiments.num_nets=1

The logic lives in :mod:`experiments.pipeline` (importable from a notebook);
this file only parses flags. Re-running the same command resumes.
"""

from __future__ import annotations

import logging as logging_std
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, results and plots.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of orbax/jax internals from the absl log."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/_src/"))
        return record.levelno >= logging_std.WARNING or not noisy


def distributed_args(config) -> dict:
    """Keyword arguments of ``jax.distributed.initialize`` set in ``config.distributed``
    (unset ones are left to JAX's cluster detection: TPU, SLURM, Open MPI, ...)."""
    given = dict(config.get("distributed") or {})
    unknown = sorted(set(given) - {"coordinator_address", "num_processes", "process_id"})
    if unknown:
        raise ValueError(f"config.distributed: unknown fields {unknown}; allowed: coordinator_address, num_processes, "
                         "process_id")
    out = {}
    if given.get("coordinator_address"):
        out["coordinator_address"] = str(given["coordinator_address"])
    processes, process_id = int(given.get("num_processes") or 0), int(given.get("process_id", -1))
    if processes < 0:
        raise ValueError(f"config.distributed.num_processes={processes}: expected >= 1 (0 = from the environment)")
    if processes:
        out["num_processes"] = processes
    if process_id >= 0:
        if processes and process_id >= processes:
            raise ValueError(f"config.distributed.process_id={process_id}: expected one of 0..{processes - 1}")
        out["process_id"] = process_id
    return out


def enable_compilation_cache(config) -> str | None:
    """Turns on JAX's persistent compilation cache at ``config.compilation_cache_dir`` ("" or
    missing: off), for every program however short its compile (the sensitivity kernels take
    0.1-1 s each, under JAX's default 1 s threshold). Called once, before anything compiles.
    Returns the folder used."""
    import jax

    folder = str(config.get("compilation_cache_dir", "") or "")
    if not folder:
        return None
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    config = _CONFIG.value  # its prng_impl names the PRNG of every key (no global JAX setting changes)
    enable_compilation_cache(config)  # once, at start-up (never changed mid-run)
    if config.get("multihost", False):  # one process per host
        jax.distributed.initialize(**distributed_args(config))
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # process 0 logs and writes results; the others only warn
    logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    from experiments import pipeline
    from experiments import workdir as workdir_lib

    try:
        pipeline.run(config, _WORKDIR.value)
    except (workdir_lib.WorkdirBusyError, PermissionError) as err:  # a clear line, no traceback
        raise SystemExit(f"error: {err}") from None
    workdir = os.path.abspath(_WORKDIR.value)
    report = os.path.join(workdir, "report.md")
    if jax.process_index() == 0 and os.path.exists(report):
        with open(report) as f:
            print(f.read())
        print(f"Results: {workdir}/results.npz\nPlots:   {workdir}/plots/\nReport:  {report}\n"
              f"TensorBoard: tensorboard --logdir {workdir}/tensorboard")


if __name__ == "__main__":
    app.run(main)
