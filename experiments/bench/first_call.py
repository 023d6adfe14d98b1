"""Where the first ``sp.prune`` call of a process spends its time (issue #18).

Each model runs in a fresh Python process (persistent compilation cache off,
or with ``cache='warm'`` on over a folder a first fresh process has just
filled, which is what a user's second process sees), which builds the model,
then calls ``sp.prune`` once (wall and process CPU time) while
``jax.monitoring`` listeners (:class:`timing.CompileEvents`) record every
trace, lowering to MLIR and XLA compile, per program. Then the same process
times steady calls of the pass and of ``sp.prune``, which splits the first
call into::

    first call = tracing + lowering + XLA compile (n programs)
               + execution of the pass (steady median)
               + keep-ratio search (steady prune - steady pass)
               + rest (first-run overheads: allocation, dispatch caches, ...)

The compile events of every thread are summed, so a program compiled in the
background (the zeroing's gradient program) makes "rest" negative by its overlap.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any, Mapping

import jax

from experiments.bench import common, prune_e2e, timing

CACHE_MODES = ("off", "warm")
LATER_CALLS = 4  # calls 2-5 of the process, timed one by one


@dataclasses.dataclass(frozen=True)
class FirstCallConfig:
    """Options of the first-call benchmark."""

    method: str = "sipp"
    keep_ratio: float = 0.1
    chunk_size: int = 32
    num_points: int = 0
    contraction: str = "auto"
    repeats: int = 3
    timeout_s: float = 1800.0
    cache: str = "off"  # persistent compilation cache: "off", or "warm" (filled by a first fresh process)

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")

    def prune_config(self) -> prune_e2e.PruneConfig:
        return prune_e2e.PruneConfig(methods=(self.method,), keep_ratio=self.keep_ratio,
                                     chunk_size=self.chunk_size, contraction=self.contraction)


def breakdown(first_s: float, events: Mapping[str, Any], pass_s: float, prune_s: float) -> dict[str, float]:
    """Splits the first call's wall time into its parts (seconds)."""
    search_s = prune_s - pass_s
    jit_s = events["trace_s"] + events["lower_s"] + events["compile_s"]
    return {
        "first_call_s": first_s, "tracing_s": events["trace_s"], "lowering_s": events["lower_s"],
        "compile_s": events["compile_s"], "pass_execution_s": pass_s, "search_s": search_s,
        "rest_s": first_s - jit_s - pass_s - search_s,
    }


def worker(args: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one model's first ``sp.prune`` call, then steady calls."""
    cfg = FirstCallConfig(**args["config"])
    if args.get("cache_dir"):
        enable_cache(args["cache_dir"])
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    start = time.perf_counter()
    setup = common.setup_model(args["model"], cfg.num_points)
    setup_s = time.perf_counter() - start
    prune_cfg = cfg.prune_config()
    prune = prune_e2e.prune_call(setup, cfg.method, prune_cfg)
    with timing.CompileEvents() as events:
        cpu_start = time.process_time()
        first_s, _ = timing.timed(lambda: prune().masks)
        first_cpu_s = time.process_time() - cpu_start
    summary = events.summary()
    # the next calls, as a keep-ratio sweep sees them: quick builds, then full ones (sensprune.compile_tiers)
    later_s = [timing.timed(lambda: prune().masks)[0] for _ in range(LATER_CALLS)]
    steady, _ = timing.measure(
        {"pass": timing.Case(prune_e2e.pass_call(setup, prune_e2e.METHOD_REDUCTION[cfg.method], prune_cfg)),
         "prune": timing.Case(lambda: prune().masks, prewarmed=True, expected_s=first_s)},
        timing.Budget(repeats=cfg.repeats, min_repeats=1, budget_s=1e9),
    )
    return {
        **setup.describe(), "method": cfg.method, "chunk_size": min(cfg.chunk_size, len(setup.data)),
        "setup_s": setup_s, "first_call_cpu_s": first_cpu_s, "later_calls_s": later_s, "cache": cfg.cache,
        "events": summary, "steady": steady,
        # a pass recompiled after prune would show here (its programs should be cache hits)
        "pass_recompile_s": steady["pass"]["compile_s"],
        "breakdown": breakdown(first_s, summary, steady["pass"]["median_s"], steady["prune"]["median_s"]),
        "env": common.environment(),
    }


def enable_cache(folder: str) -> None:
    """JAX's persistent compilation cache in ``folder``, every program stored (as the experiment
    package's ``compilation_cache_dir`` does; a library user needs only the first line)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(name: str, cfg: FirstCallConfig) -> dict[str, Any]:
    """:func:`worker` for ``name`` in a fresh process; with ``cfg.cache == 'warm'`` a first
    fresh process fills a new cache folder and a second one, measured, reads it."""
    args = {"model": name, "config": dataclasses.asdict(cfg)}
    if cfg.cache == "off":
        return timing.run_fresh("experiments.bench.first_call:worker", args, timeout_s=cfg.timeout_s)
    with tempfile.TemporaryDirectory(prefix="sensprune_cache_") as folder:
        filled = timing.run_fresh("experiments.bench.first_call:worker", {**args, "cache_dir": folder},
                                  timeout_s=cfg.timeout_s)
        if "error" in filled:
            return filled
        warm = timing.run_fresh("experiments.bench.first_call:worker", {**args, "cache_dir": folder},
                                timeout_s=cfg.timeout_s)
    return {**warm, "cold_first_call_s": filled.get("breakdown", {}).get("first_call_s")}
