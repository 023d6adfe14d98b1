"""Data-parallel scaling: the passes and a train step on a mesh over N devices.

One fresh process per device count with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (on a CPU the forced
devices share the same cores: this measures sharding overhead and load
balance, not added compute). Per model: the SiPP / PFP pass with
``mesh=sharding.data_mesh()``, a data-parallel train step, on one device also
the pass without a mesh, and on an even count the step with the parameters
split over a ``'model'`` axis of 2 (state bytes per device).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

import sensprune as sp
from experiments.bench import common, timing, train_step


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Options of the mesh benchmark."""

    device_counts: tuple[int, ...] = (1, 2, 4)
    chunk_size: int = 32
    num_points: int = 0
    contraction: str = "auto"
    repeats: int = 7
    min_repeats: int = 1
    budget_s: float = 45.0
    timeout_s: float = 1800.0


def device0_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays held by the first device of their sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        first = min(leaf.sharding.device_set, key=lambda d: d.id)
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
    return total


def step_case(setup: common.ModelSetup, mesh: Any, batch: tuple[np.ndarray, np.ndarray]) -> tuple[timing.Case, int]:
    """A data-parallel train step on ``mesh`` and its state bytes per device."""
    from experiments import steps as steps_lib
    from experiments import train_state as state_lib
    from experiments.optim import Optimizer

    cfg = train_step.train_config(setup.family, setup.train_batch_size)
    state = state_lib.shard_state(
        state_lib.state_from_params(setup.model, setup.variables, Optimizer.create(cfg, 1)), mesh)
    step = steps_lib.make_train_step(steps_lib.StepOptions.create(cfg, mesh=mesh))
    bx, by = sp.sharding.shard_batch(batch, mesh)
    key = sp.sharding.replicate(jax.random.PRNGKey(2), mesh)
    return timing.Case(lambda: step(state, bx, by, key)), device0_bytes(state)


def bench_model(name: str, cfg: MeshConfig) -> dict[str, Any]:
    """Passes and train steps of one model on the mesh of this process's devices."""
    setup = common.setup_model(name, cfg.num_points)
    mesh = sp.sharding.data_mesh()
    chunk = min(cfg.chunk_size, len(setup.data))

    def pass_case(reduction: str, mesh_: Any) -> timing.Case:
        return timing.Case(lambda: sp.compute_sensitivities(
            setup.model, setup.variables, setup.data, reduction=reduction, chunk_size=chunk, layers=setup.layers,
            mesh=mesh_, contraction=cfg.contraction, train=False))

    rng = np.random.default_rng(2)
    batch = (rng.normal(size=(setup.train_batch_size, *setup.shape)).astype(np.float32),
             rng.integers(0, 10, size=(setup.train_batch_size,)).astype(np.int32))
    cases = {"sipp_pass": pass_case("mean", mesh), "pfp_pass": pass_case("max", mesh)}
    cases["train_step"], replicated = step_case(setup, mesh, batch)
    state_bytes = {"replicated": replicated}
    if jax.device_count() == 1:
        cases["sipp_pass_no_mesh"] = pass_case("mean", None)
    if jax.device_count() % 2 == 0 and setup.train_batch_size % (jax.device_count() // 2) == 0:
        cases["train_step_model2"], state_bytes["model2"] = step_case(setup, sp.sharding.data_mesh(model=2), batch)
    times, _ = timing.measure(cases, timing.Budget(cfg.repeats, cfg.min_repeats, cfg.budget_s))
    return {"points": len(setup.data), "chunk_size": chunk, "train_batch": setup.train_batch_size,
            "state_bytes_per_device": state_bytes, **times}


def worker(args: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process with forced host devices: every model of ``args``."""
    cfg = MeshConfig(**args["config"])
    return {"devices": jax.device_count(), "device": str(jax.devices()[0]),
            "models": {name: bench_model(name, cfg) for name in args["models"]}}


def device_env(count: int) -> dict[str, str]:
    """Environment of a worker with ``count`` forced host devices."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    # Long collective timeouts: on a loaded CPU the devices reach an all-reduce far apart.
    env = {"XLA_FLAGS": (f"{flags} --xla_force_host_platform_device_count={int(count)} "
                         "--xla_cpu_collective_timeout_seconds=900 "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=900").strip()}
    if count > 1 and "PJRT_NPROC" not in os.environ:
        # XLA:CPU runs every forced device's work, and each device's wait in an all-reduce, on one pool
        # sized by the core count: with fewer threads than waiting devices, the device that must arrive
        # gets none (ResNet20 on 2 cores hung until the rendezvous timeout). 4 threads per device.
        env["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * int(count)))
    return env


def run(names: tuple[str, ...], cfg: MeshConfig) -> dict[str, Any]:
    """:func:`worker` in one fresh process per device count."""
    args = {"models": list(names), "config": dataclasses.asdict(cfg)}
    return {str(c): timing.run_fresh("experiments.bench.mesh:worker", args, env=device_env(int(c)),
                                     timeout_s=cfg.timeout_s)
            for c in cfg.device_counts}
