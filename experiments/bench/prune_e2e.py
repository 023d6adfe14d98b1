"""``sp.prune`` end to end vs its sensitivity pass.

Per model and method, ``sp.prune`` and ``sp.compute_sensitivities`` with the
reduction the method reads (SiPP: ``'mean'``, PFP: ``'max'``) are timed in the
same interleaved rounds; the allocation + keep-ratio search after the pass is
their difference of medians (``search_s``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

import sensprune as sp
from experiments.bench import common, timing

METHOD_REDUCTION = {"sipp": "mean", "pfp": "max"}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Options of the prune benchmark."""

    methods: tuple[str, ...] = ("sipp", "pfp")
    keep_ratio: float = 0.1
    chunk_size: int = 32
    contraction: str = "auto"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_REDUCTION]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected names from {sorted(METHOD_REDUCTION)}, got {list(self.methods)}")


def prune_call(setup: common.ModelSetup, method: str, cfg: PruneConfig) -> Callable[[], sp.PruneResult]:
    """``sp.prune`` of ``setup`` as a no-argument call (as a user calls it: layers found by prune)."""
    return lambda: sp.prune(
        setup.model, setup.variables, setup.data, method=method, keep_ratio=cfg.keep_ratio,
        key=jax.random.PRNGKey(0), delta=setup.delta, c_constant=common.C_CONSTANT, chunk_size=cfg.chunk_size,
        apply_kwargs={"train": False}, contraction=cfg.contraction,
    )


def pass_call(setup: common.ModelSetup, reduction: str, cfg: PruneConfig) -> Callable[[], Any]:
    """The pass ``sp.prune`` runs, as a no-argument call."""
    return lambda: sp.compute_sensitivities(
        setup.model, setup.variables, setup.data, reduction=reduction, chunk_size=cfg.chunk_size,
        layers=setup.layers, contraction=cfg.contraction, train=False,
    )


def bench_method(setup: common.ModelSetup, method: str, cfg: PruneConfig, budget: timing.Budget) -> dict[str, Any]:
    """Pass and prune of one method, interleaved; the search is their difference."""
    prune = prune_call(setup, method, cfg)
    cases = {"pass": timing.Case(pass_call(setup, METHOD_REDUCTION[method], cfg)),
             "prune": timing.Case(lambda: prune().masks)}
    times, _ = timing.measure(cases, budget)
    result = prune()
    pass_s, prune_s = times["pass"]["median_s"], times["prune"]["median_s"]
    return {
        "reduction": METHOD_REDUCTION[method], "pass": times["pass"], "prune": times["prune"],
        "search_s": prune_s - pass_s, "search_over_pass": (prune_s - pass_s) / pass_s,
        "prune_over_pass": prune_s / pass_s, "select_calls": int(result.info.get("searches", 0)),
        "achieved_keep_ratio": float(result.keep_ratio), "reachable": bool(result.info.get("reachable", True)),
    }


def run(name: str, cfg: PruneConfig, budget: timing.Budget, num_points: int = 0) -> dict[str, Any]:
    """The prune benchmark of one model, every method of ``cfg``."""
    setup = common.setup_model(name, num_points)
    return {
        **setup.describe(), "chunk_size": min(cfg.chunk_size, len(setup.data)), "keep_ratio": cfg.keep_ratio,
        "methods": {method: bench_method(setup, method, cfg, budget) for method in cfg.methods},
    }
