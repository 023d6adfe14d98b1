"""Worker of ``tests/test_sharding.py``'s multi-process check: one of several JAX
processes on this machine (``jax.distributed`` over localhost, CPU collectives
through gloo), each with forced host devices.

    python -m tests.multihost_check PROCESS_ID NUM_PROCESSES PORT [SHARED_CHECKPOINT_DIR]

Runs the same checks as :mod:`tests.sharding_check` on a data mesh that spans
every process's devices, so global arrays are built from process-local data,
the running max of the sensitivity pass is reduced across processes and the
train/eval batches are gathered per process; with a checkpoint directory, the
trained state also goes through an orbax save / restore by all processes. Prints
one JSON line.
"""

from __future__ import annotations

import json
import sys

import jax


def checkpoint_round_trip(directory: str, state) -> dict:
    """Every process saves the same host-local copy of ``state`` (as the pipeline does) into one
    shared directory, then restores it; orbax writes from the primary process."""
    from experiments import checkpoint
    from experiments import train_state as S
    from tests.sharding_check import _max_diff

    local = S.local_state(state)
    items = dict(params=local.params, batch_stats=local.batch_stats, opt_state=local.opt_state)
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(1, **items, meta={"process_count": jax.process_count()})
        back = ckpt.restore(like=items)
        steps = ckpt.all_steps()
    return {"steps": steps, "max_diff": _max_diff(items, {k: back[k] for k in items}), "meta": back["meta"]}


def main(process_id: int, num_processes: int, port: int, checkpoint_dir: str | None = None) -> dict:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
        initialization_timeout=300,
    )
    from tests import sharding_check

    states: dict = {}
    out = sharding_check.main(keep=states)
    out["process"] = [jax.process_index(), jax.process_count(), jax.local_device_count()]
    if checkpoint_dir:
        out["checkpoint"] = checkpoint_round_trip(checkpoint_dir, states["trained_on_mesh"])
    return out


if __name__ == "__main__":
    result = main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *(sys.argv[4:5]))
    json.dump(result, sys.stdout)
    print()
    jax.distributed.shutdown()
