"""The sensitivity pass vs one plain forward over the same points.

Per model: the SiPP pass (``reduction='mean'``), the PFP pass
(``reduction='max'``) and a jitted forward over S, once as a single batch of
|S| and once in chunks of ``chunk_size``, timed in the same interleaved
rounds, so every ratio comes from one run. Optionally the pass fused into one
program (``fused=True``) and the SiPP pass over multiples of |S|.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

import sensprune as sp
from experiments.bench import common, timing


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Options of the pass benchmark."""

    chunk_size: int = 32
    contraction: str = "auto"
    fused: bool = False
    scaling_fractions: tuple[float, ...] = ()


def pass_call(setup: common.ModelSetup, data: np.ndarray, reduction: str, cfg: PassConfig,
              fused: bool = False) -> Callable[[], Any]:
    """``sp.compute_sensitivities`` over ``data`` as a no-argument call."""
    return lambda: sp.compute_sensitivities(
        setup.model, setup.variables, data, reduction=reduction, chunk_size=cfg.chunk_size,
        layers=setup.layers, fused=fused, contraction=cfg.contraction, train=False,
    )


def padded_chunks(data: np.ndarray, chunk: int) -> list[np.ndarray]:
    """``data`` in chunks of ``chunk`` points, the last padded as the pass pads it (one shape)."""
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    last = chunks[-1]
    if len(last) < chunk:
        chunks[-1] = np.concatenate([last, np.repeat(last[:1], chunk - len(last), axis=0)])
    return chunks


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest elementwise relative difference between two sensitivity trees."""
    return float(max(
        np.max(np.abs(np.asarray(x) - np.asarray(y)) / (np.abs(np.asarray(y)) + 1e-6))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ))


def pass_cases(setup: common.ModelSetup, cfg: PassConfig) -> dict[str, timing.Case]:
    """The timed calls: both passes (warm-up over two chunks), the forward over |S| and in chunks."""
    data, chunk = setup.data, min(cfg.chunk_size, len(setup.data))
    warm_points = min(len(data), 2 * chunk)  # compiles every program of the pass
    forward = common.forward_fn(setup)
    chunks = padded_chunks(data, chunk)
    variables = setup.variables
    cases = {
        "sipp_pass": timing.Case(pass_call(setup, data, "mean", cfg), pass_call(setup, data[:warm_points], "mean", cfg),
                                 warm_points / len(data)),
        "pfp_pass": timing.Case(pass_call(setup, data, "max", cfg), pass_call(setup, data[:warm_points], "max", cfg),
                                warm_points / len(data)),
        "forward_full": timing.Case(lambda: forward(variables, data)),
        "forward_chunked": timing.Case(lambda: [forward(variables, c) for c in chunks],
                                       lambda: forward(variables, chunks[0]), 1.0 / len(chunks)),
    }
    if cfg.fused:  # one program for the whole pass: its first call compiles everything
        cases["sipp_pass_fused"] = timing.Case(pass_call(setup, data, "mean", cfg, fused=True))
        cases["pfp_pass_fused"] = timing.Case(pass_call(setup, data, "max", cfg, fused=True))
    return cases


def ratios(med: dict[str, float], cpu: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Pass / forward ratios of medians measured in the same rounds (``cpu``: CPU-time medians)."""
    out = {
        "sipp_over_forward_full": med["sipp_pass"] / med["forward_full"],
        "pfp_over_forward_full": med["pfp_pass"] / med["forward_full"],
        "sipp_over_forward_chunked": med["sipp_pass"] / med["forward_chunked"],
        "pfp_over_forward_chunked": med["pfp_pass"] / med["forward_chunked"],
        "pfp_over_sipp": med["pfp_pass"] / med["sipp_pass"],
    }
    if cpu:  # the same ratios in CPU time of the process (less disturbed by other load)
        out["sipp_over_forward_full_cpu"] = cpu["sipp_pass"] / cpu["forward_full"]
        out["pfp_over_forward_full_cpu"] = cpu["pfp_pass"] / cpu["forward_full"]
    for kind in ("sipp", "pfp"):
        if f"{kind}_pass_fused" in med:
            out[f"{kind}_fused_over_forward_full"] = med[f"{kind}_pass_fused"] / med["forward_full"]
            out[f"{kind}_fused_over_per_layer"] = med[f"{kind}_pass_fused"] / med[f"{kind}_pass"]
    return out


def scaling(setup: common.ModelSetup, cfg: PassConfig, budget: timing.Budget) -> list[dict[str, Any]]:
    """The SiPP pass over ``cfg.scaling_fractions`` times |S| (fixed chunk: no recompilation)."""
    n = len(setup.data)
    fractions = tuple(cfg.scaling_fractions)
    rng = np.random.default_rng(1)
    extra = rng.normal(size=(int(np.ceil(max(fractions))) * n, *setup.shape)).astype(np.float32)
    big = np.concatenate([setup.data, extra])
    sizes = [max(1, int(round(f * n))) for f in fractions]
    chunk = min(cfg.chunk_size, n)
    cases = {str(s): timing.Case(pass_call(setup, big[:s], "mean", cfg)) for s in sizes}
    times, _ = timing.measure(cases, budget)
    ref = sizes[int(np.argmin([abs(f - 1.0) for f in fractions]))]
    per_point_ref = times[str(ref)]["median_s"] / ref
    return [
        {"fraction": f, "points": s, "chunks": -(-s // min(chunk, s)), "median_s": times[str(s)]["median_s"],
         "repeats": times[str(s)]["repeats"], "per_point_s": times[str(s)]["median_s"] / s,
         "per_point_over_1x": times[str(s)]["median_s"] / s / per_point_ref}
        for f, s in zip(fractions, sizes, strict=True)
    ]


def run(name: str, cfg: PassConfig, budget: timing.Budget, num_points: int = 0) -> dict[str, Any]:
    """The pass benchmark of one model: timings, ratios of one run, optional scaling."""
    setup = common.setup_model(name, num_points)
    chunk = min(cfg.chunk_size, len(setup.data))
    times, outputs = timing.measure(pass_cases(setup, cfg), budget)
    med = {k: v["median_s"] for k, v in times.items()}
    cpu = {k: v["cpu_median_s"] for k, v in times.items() if "cpu_median_s" in v}
    out: dict[str, Any] = {
        **setup.describe(), "chunk_size": chunk, "num_chunks": -(-len(setup.data) // chunk),
        "contraction": cfg.contraction, "passes": times, "ratios": ratios(med, cpu),
    }
    if cfg.fused:
        out["fused_max_rel_diff"] = {
            "sipp": max_rel_diff(outputs["sipp_pass_fused"], outputs["sipp_pass"]),
            "pfp": max_rel_diff(outputs["pfp_pass_fused"], outputs["pfp_pass"]),
        }
    if cfg.scaling_fractions:
        out["scaling"] = scaling(setup, cfg, budget)
    return out
