"""One masked vs one unmasked train step (SGD + momentum + weight decay).

Steps come from ``experiments.steps.make_train_step`` (one step function: the
masks, if any, live in the state's optimizer); the masks from ``sp.prune`` at
the benchmark's keep ratio. Timed four ways in one set of
interleaved rounds: plain and masked, each once re-using the same input state
and once donating it (as ``train()`` runs them: each step consumes the
previous step's state). XLA's ``cost_analysis`` gives the load-independent
flops / bytes ratio of the two compiled steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import sensprune as sp
from experiments.bench import common, timing


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Options of the train-step benchmark (``batch_size`` 0: the reference's)."""

    batch_size: int = 0
    keep_ratio: float = 0.1
    mask_method: str = "sipp"
    chunk_size: int = 32


def train_config(family: str, batch_size: int) -> Any:
    """The training config (``experiments.train_config``) of the timed step."""
    from experiments.train_config import TrainConfig

    return TrainConfig(num_epochs=1, batch_size=batch_size, learning_rate=0.1 if family != "mnist" else 0.01,
                       momentum=0.9, weight_decay=1e-4, augment="none")


def lower(step: Callable[..., Any], *args: Any) -> Any:
    """``step.lower(*args)``, also when ``step`` is a ``functools.partial`` of a jitted function."""
    if isinstance(step, functools.partial):
        return step.func.lower(*step.args, *args, **step.keywords)
    return step.lower(*args)


def step_cost(step: Callable[..., Any], *args: Any) -> Optional[dict[str, float]]:
    """XLA ``cost_analysis()`` (flops, bytes accessed) of a compiled step, or None."""
    try:
        cost = lower(step, *args).compile().cost_analysis()
    except Exception:  # pragma: no cover - backend dependent
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def run(name: str, cfg: StepConfig, budget: timing.Budget, num_points: int = 0) -> dict[str, Any]:
    """The train-step benchmark of one model."""
    from experiments import steps as steps_lib
    from experiments import train_state as state_lib
    from experiments.optim import Optimizer

    setup = common.setup_model(name, num_points)
    batch = int(cfg.batch_size or setup.train_batch_size)
    masks = sp.prune(setup.model, setup.variables, setup.data, method=cfg.mask_method, keep_ratio=cfg.keep_ratio,
                     key=jax.random.PRNGKey(0), delta=setup.delta, chunk_size=cfg.chunk_size,
                     apply_kwargs={"train": False}, allow_dead_layers=True)  # timing only: a dead layer is fine
    tcfg = train_config(setup.family, batch)
    opt = Optimizer.create(tcfg, 1)
    states = {"unmasked": state_lib.state_from_params(setup.model, setup.variables, opt),
              "masked": state_lib.state_from_params(setup.model, setup.variables, opt, masks.masks)}
    # One step function for both: the state's optimizer says whether it is masked (compiled per state).
    options = steps_lib.StepOptions.create(tcfg)
    steps = {kind: steps_lib.make_train_step(options) for kind in states}
    donated = {kind: steps_lib.make_train_step(options, donate=True) for kind in states}
    rng = np.random.default_rng(2)
    bx = jnp.asarray(rng.normal(size=(batch, *setup.shape)).astype(np.float32))
    by = jnp.asarray(rng.integers(0, 10, size=(batch,)).astype(np.int32))
    key = jax.random.PRNGKey(2)
    live = {kind: jax.tree.map(jnp.copy, state) for kind, state in states.items()}

    def donated_call(kind: str) -> Any:
        live[kind], metrics = donated[kind](live[kind], bx, by, key)
        return metrics

    cases = {kind: timing.Case(lambda k=kind: steps[k](states[k], bx, by, key)) for kind in states}
    cases |= {f"{kind}_donated": timing.Case(lambda k=kind: donated_call(k)) for kind in states}
    times, _ = timing.measure(cases, budget)
    cost = {kind: step_cost(steps[kind], states[kind], bx, by, key) for kind in states}
    med = {k: v["median_s"] for k, v in times.items()}
    return {
        **setup.describe(), "batch_size": batch, "mask_method": cfg.mask_method,
        "mask_keep_ratio": float(masks.keep_ratio), **times,
        "masked_over_unmasked": med["masked"] / med["unmasked"],
        "donated_masked_over_unmasked": med["masked_donated"] / med["unmasked_donated"],
        "cost_analysis": cost,
        "cost_ratio_masked_over_unmasked": (
            {k: cost["masked"][k] / cost["unmasked"][k] for k in cost["masked"]}
            if cost["masked"] and cost["unmasked"] else None
        ),
    }
