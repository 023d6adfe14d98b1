"""The one timing helper of the benchmarks.

* :func:`measure`: one warm-up (compiling) call per case, then interleaved
  rounds of steady calls (order alternating between rounds, so drifting
  background load hits every case alike), each ending in
  ``jax.block_until_ready``; medians are quoted (wall time, and the process's
  CPU time, which a shared, loaded machine disturbs less). Calls faster than
  ``MIN_SAMPLE_S`` are repeated back to back within a sample (timeit style).
* :class:`CompileEvents`: tracing / lowering / XLA-compile durations of every
  program jax builds while it is active (``jax.monitoring`` listeners).
* :func:`run_fresh`: runs a worker function in a fresh Python process (first
  call numbers, forced host device counts) and returns its JSON result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from sensprune import compile_tiers

MIN_SAMPLE_S = 0.05  # fast calls are repeated back to back until a sample takes this long
REPO_ROOT = Path(__file__).resolve().parents[2]

# jax.monitoring duration events of jit (jax/_src/dispatch.py), with a ``fun_name`` keyword.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # persistent compilation cache read
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"  # persistent cache on, program not in it


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to repeat: at most ``repeats`` rounds, at least ``min_repeats``;
    no further round once the steady time would pass ``budget_s``."""

    repeats: int = 7
    min_repeats: int = 1
    budget_s: float = 45.0

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.min_repeats < 1 or self.budget_s <= 0:
            raise ValueError(f"repeats and min_repeats must be >= 1 and budget_s > 0, got {self}")


@dataclasses.dataclass
class Case:
    """One function to time.

    ``warm`` is the first (compiling) call; it does ``warm_fraction`` of the
    work of ``run`` (e.g. 2 of 8 chunks), so compile time is
    ``first - warm_fraction * median``. ``prewarmed``: already called, no
    warm-up call and no compile time. ``expected_s``: rough steady time if
    known (skips the calibration call when >= 1 s).
    """

    run: Callable[[], Any]
    warm: Optional[Callable[[], Any]] = None
    warm_fraction: float = 1.0
    prewarmed: bool = False
    expected_s: Optional[float] = None


def timed(fn: Callable[[], Any], inner: int = 1) -> tuple[float, Any]:
    """Seconds per call of ``fn`` over ``inner`` back-to-back calls (all outputs blocked on), last output."""
    start = time.perf_counter()
    outs = [fn() for _ in range(inner)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - start) / inner, outs[-1]


def calls_per_sample(seconds: float) -> int:
    """Back-to-back calls per sample so that a sample takes about ``MIN_SAMPLE_S``."""
    return max(1, min(1000, int(np.ceil(MIN_SAMPLE_S / max(seconds, 1e-7)))))


def summarize(times: list[float], first_s: Optional[float], warm_fraction: float, inner: int,
              cpu_times: Optional[list[float]] = None) -> dict[str, Any]:
    """Timing dict: median/min of the steady samples, first call, compile estimate;
    with ``cpu_times`` also the median CPU time of the process per call (all threads)."""
    med = statistics.median(times)
    compile_s = None if first_s is None else max(0.0, first_s - warm_fraction * med)
    out = {
        "median_s": med, "min_s": min(times), "times_s": list(times), "repeats": len(times),
        "calls_per_sample": inner, "first_call_s": first_s, "compile_s": compile_s,
    }
    if cpu_times:
        out["cpu_median_s"] = statistics.median(cpu_times)
    return out


def single_sample(seconds: float) -> dict[str, Any]:
    """Timing dict of one (first) call used as the only sample."""
    return summarize([seconds], seconds, 1.0, 1) | {"compile_s": None}


def _warm_up(case: Case) -> tuple[Optional[float], int]:
    """First call (None if prewarmed) and the calls per sample of ``case``. Steady calls time the
    full builds a long job ends up on (``sensprune.compile_tiers``): every program seen is promoted
    and compiled by one more call before any is timed."""
    first = None if case.prewarmed else timed(case.warm or case.run)[0]
    compile_tiers.settle()
    timed(case.run)
    guess = first if first is not None else (case.expected_s or 0.0)
    if guess < 1.0:  # possibly fast: calibrate with one steady call
        guess = timed(case.run)[0]
    return first, calls_per_sample(guess)


def measure(cases: Mapping[str, Case], budget: Budget) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Warm-up call of each case, then interleaved rounds of steady calls.

    Returns (name -> timing dict, name -> output of the last steady call).
    """
    names = list(cases)
    warm = {name: _warm_up(cases[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    spent = 0.0
    for r in range(budget.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            inner = warm[name][1]
            cpu_start = time.process_time()
            t, outputs[name] = timed(cases[name].run, inner)
            cpu[name].append((time.process_time() - cpu_start) / inner)
            times[name].append(t)
            spent += t * inner
        done = r + 1
        if done >= budget.min_repeats and spent / done * (done + 1) > budget.budget_s:
            break
    result = {
        name: summarize(times[name], warm[name][0], cases[name].warm_fraction, warm[name][1], cpu[name])
        for name in names
    }
    return result, outputs


# ----------------------------------------------------------------------------
# Compile events
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class CompileEvents:
    """Collects jit's trace / lower / compile durations while active::

        with CompileEvents() as events:
            fn()
        events.summary()
    """

    events: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)
    cache_events: list[str] = dataclasses.field(default_factory=list)

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in (TRACE_EVENT, LOWER_EVENT, COMPILE_EVENT):
            self.events.append((event, str(kwargs.get("fun_name", "?")), float(duration)))

    def _cache_listener(self, event: str, **kwargs: Any) -> None:
        if event in (CACHE_HIT_EVENT, CACHE_MISS_EVENT):
            self.cache_events.append(event)

    def __enter__(self) -> "CompileEvents":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        jax.monitoring.register_event_listener(self._cache_listener)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
        jax.monitoring.unregister_event_listener(self._cache_listener)

    def total(self, event: str) -> float:
        """Sum of the durations of ``event``."""
        return float(sum(d for e, _, d in self.events if e == event))

    def summary(self, top: int = 50) -> dict[str, Any]:
        """Totals, the number of XLA compiles, and the ``top`` programs by compile time
        (programs of the same name are merged: ``count`` compiles)."""
        programs: dict[str, dict[str, float]] = {}
        for event, name, seconds in self.events:
            if event != COMPILE_EVENT:
                continue
            entry = programs.setdefault(name, {"name": name, "count": 0, "compile_s": 0.0})
            entry["count"] += 1
            entry["compile_s"] += seconds
        ranked = sorted(programs.values(), key=lambda p: -p["compile_s"])
        return {
            "trace_s": self.total(TRACE_EVENT),
            "lower_s": self.total(LOWER_EVENT),
            "compile_s": self.total(COMPILE_EVENT),
            "num_traces": sum(1 for e, _, _ in self.events if e == TRACE_EVENT),
            "num_compiles": sum(1 for e, _, _ in self.events if e == COMPILE_EVENT),
            "num_program_names": len(programs),
            "cache_hits": self.cache_events.count(CACHE_HIT_EVENT),
            "cache_misses": self.cache_events.count(CACHE_MISS_EVENT),
            "programs": ranked[:top],
        }


# ----------------------------------------------------------------------------
# Fresh processes
# ----------------------------------------------------------------------------

_WORKER_CODE = (
    "import importlib, json, sys\n"
    "module, name = sys.argv[1].split(':')\n"
    "result = getattr(importlib.import_module(module), name)(json.loads(sys.argv[2]))\n"
    "print(json.dumps(result, default=float))\n"
)


def run_fresh(
    target: str,
    args: Mapping[str, Any],
    *,
    env: Optional[Mapping[str, str]] = None,
    timeout_s: Optional[float] = None,
) -> dict[str, Any]:
    """``target`` (``'package.module:function'``, taking and returning a JSON-able
    dict) in a fresh Python process, with ``env`` added to this process's
    environment. A failure gives ``{'error': <stderr tail>}``."""
    full_env = dict(os.environ, **dict(env or {}))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER_CODE, target, json.dumps(dict(args))],
            env=full_env, capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s}s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
