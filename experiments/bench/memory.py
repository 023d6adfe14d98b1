"""Memory of the sensitivity pass vs a forward over all of S.

* Compiled memory (XLA ``memory_analysis``) of the per-chunk work of the pass,
  rebuilt from public pieces the way the pass is structured: the capture
  program (``sp.capture_inputs`` under ``jax.jit``: a forward returning every
  layer's input) and one ``sp.layer_sensitivity`` kernel per distinct layer
  geometry; working set per chunk = captured inputs + max(capture temp,
  largest kernel temp). Next to it the forward at one chunk, |S| and 2|S|.
* Peak RSS growth of a fresh process running the SiPP pass over growing |S|
  (ascending), then single-batch forwards over the same sizes.
"""

from __future__ import annotations

import dataclasses
import resource
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import sensprune as sp
from experiments.bench import common, timing


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Options of the memory benchmark."""

    chunk_size: int = 32
    num_points: int = 0
    contraction: str = "auto"
    rss_fractions: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    timeout_s: float = 1800.0


def geometry(layer: sp.Layer) -> sp.Layer:
    """``layer`` without its identity (path, order): layers of equal geometry share one kernel."""
    return dataclasses.replace(layer, path=(), order=0)


def kernel_reduction(layer: sp.Layer, reduction: str) -> str:
    """One output position: both reductions agree, the pass compiles 'max'."""
    return reduction if layer.num_patches > 1 else "max"


def pass_memory(setup: common.ModelSetup, x_chunk: jax.Array, reduction: str, contraction: str) -> dict[str, Any]:
    """Compiled memory of the capture program and of the largest per-geometry kernel."""
    model, variables, layers = setup.model, setup.variables, setup.layers
    capture = jax.jit(lambda v, x: sp.capture_inputs(model, v, x, layers=layers, train=False))
    cap = common.memory_sizes(capture.lower(variables, x_chunk).compile())
    inputs = capture(variables, x_chunk)
    kernels: dict[Any, tuple[str, dict[str, Any]]] = {}
    for layer in layers:
        key = (geometry(layer), kernel_reduction(layer, reduction))
        if key in kernels:
            continue
        fn = jax.jit(lambda k, a, layer=layer, r=key[1]: sp.layer_sensitivity(layer, k, a, reduction=r,
                                                                             contraction=contraction))
        kernel = sp.paths.get_kernel(variables["params"], layer)
        kernels[key] = (layer.name, common.memory_sizes(fn.lower(kernel, inputs[layer.name]).compile()))
    worst_name, worst = max(kernels.values(), key=lambda v: v[1]["temp_size_in_bytes"] or 0)
    working = (cap["output_size_in_bytes"] or 0) + max(cap["temp_size_in_bytes"] or 0, worst["temp_size_in_bytes"] or 0)
    return {"capture": cap, "num_kernels": len(kernels), "largest_kernel": worst,
            "largest_kernel_layer": worst_name, "chunk_working_bytes": working}


def forward_memory(setup: common.ModelSetup, batch: int) -> dict[str, Any]:
    """Compiled memory of a plain forward over ``batch`` points."""
    shape = jax.ShapeDtypeStruct((batch, *setup.shape), jnp.float32)
    sizes = common.memory_sizes(common.forward_fn(setup).lower(setup.variables, shape).compile())
    return {**sizes, "batch": batch,
            "temp_plus_output_bytes": (sizes["temp_size_in_bytes"] or 0) + (sizes["output_size_in_bytes"] or 0)}


def compiled(name: str, cfg: MemoryConfig) -> dict[str, Any]:
    """Compiled memory of the pass (both reductions) and of forwards over a chunk, |S|, 2|S|."""
    setup = common.setup_model(name, cfg.num_points)
    chunk = min(cfg.chunk_size, len(setup.data))
    x_chunk = jnp.asarray(setup.data[:chunk])
    n = len(setup.data)
    running = sum(int(np.prod(sp.paths.get_kernel(setup.variables["params"], layer).shape)) * 4
                  for layer in setup.layers)
    return {
        **setup.describe(), "chunk_size": chunk, "running_max_bytes": running,
        "sensitivity_mean": pass_memory(setup, x_chunk, "mean", cfg.contraction),
        "sensitivity_max": pass_memory(setup, x_chunk, "max", cfg.contraction),
        "forward": {"chunk": forward_memory(setup, chunk), "full": forward_memory(setup, n),
                    "double": forward_memory(setup, 2 * n)},
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_peak_bytes() -> Any:
    """Peak bytes in use on the first accelerator (None on CPU, which keeps no such count)."""
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def rss_worker(args: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS after the pass over growing |S|, then after forwards."""
    cfg = MemoryConfig(**args["config"])
    setup = common.setup_model(args["model"], cfg.num_points)
    base = setup.data
    sizes = sorted({max(1, int(round(f * len(base)))) for f in cfg.rss_fractions})
    big = np.concatenate([base] * int(np.ceil(max(sizes) / len(base))))
    rows = {n: {"points": n} for n in sizes}
    start = peak_rss_bytes()
    for n in sizes:
        jax.block_until_ready(sp.compute_sensitivities(
            setup.model, setup.variables, big[:n], reduction="mean", chunk_size=min(cfg.chunk_size, len(base)),
            layers=setup.layers, contraction=cfg.contraction, train=False))
        rows[n] |= {"rss_after_pass_bytes": peak_rss_bytes(), "device_peak_after_pass_bytes": device_peak_bytes()}
    forward = common.forward_fn(setup)
    for n in sizes:
        jax.block_until_ready(forward(setup.variables, jnp.asarray(big[:n])))
        rows[n] |= {"rss_after_forward_bytes": peak_rss_bytes(),
                    "device_peak_after_forward_bytes": device_peak_bytes()}
    return {"rss_start_bytes": start, "rows": [rows[n] for n in sizes]}


def run(name: str, cfg: MemoryConfig) -> dict[str, Any]:
    """Compiled memory (this process) and peak RSS vs |S| (a fresh process) of one model."""
    out = {"compiled": compiled(name, cfg)}
    if cfg.rss_fractions:
        out["rss"] = timing.run_fresh("experiments.bench.memory:rss_worker",
                                      {"model": name, "config": dataclasses.asdict(cfg)}, timeout_s=cfg.timeout_s)
    return out
