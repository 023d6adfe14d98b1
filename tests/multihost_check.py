"""Worker of ``tests/test_sharding.py``'s multi-process check: one of several JAX
processes on this machine (``jax.distributed`` over localhost, CPU collectives
through gloo), each with forced host devices.

    python -m tests.multihost_check PROCESS_ID NUM_PROCESSES PORT

Runs the same checks as :mod:`tests.sharding_check` on a data mesh that spans
every process's devices, so global arrays are built from process-local data,
the running max of the sensitivity pass is reduced across processes and the
train/eval batches are gathered per process. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import jax


def main(process_id: int, num_processes: int, port: int) -> dict:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
        initialization_timeout=300,
    )
    from tests import sharding_check

    out = sharding_check.main()
    out["process"] = [jax.process_index(), jax.process_count(), jax.local_device_count()]
    return out


if __name__ == "__main__":
    result = main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    json.dump(result, sys.stdout)
    print()
    jax.distributed.shutdown()
