"""Benchmarks of the sensitivity pass, pruning, masked training and compile times.

  python -m experiments.bench [--models=lenet300_100,resnet20,resnet56] [--repeats=7]
                              [--json=bench.json] [--chunk_size=32] [--quick]
                              [--device_counts=1,2,4] [--max_contraction=auto|unrolled|carry|reduce]

Everything is measured side by side in one process. Every timed call ends with
``jax.block_until_ready``; steady times are MEDIANS over up to ``--repeats``
rounds after one warm-up (compile) call. Functions compared with each other are
timed in interleaved rounds (order alternating between rounds), so drifting
background load hits all of them alike. A round is not repeated once
``--budget_s`` of steady time would be exceeded (but at least ``--min_repeats``
rounds run); the tables say how many rounds each median is over. Calls faster
than 50 ms are repeated back to back within a sample (timeit style).

Per model (random init, BatchNorm models evaluated with ``train=False``, S =
``--num_points`` or ``sample_size(layers, delta, C=3, batch_size)`` random
N(0, 1) points, i.e. normalised-image-like inputs with negative entries, so the
layers that read the raw input take the input sign-split path):

1. the SiPP pass (``reduction='mean'``), the PFP / rand pass
   (``reduction='max'``) and one plain jitted forward over the same points,
   once as a single batch of |S| and once in chunks of ``chunk_size``;
2. the keep-ratio search of ``sipp`` and ``pfp`` (allocation + selection,
   repeated ``select`` calls) on a fresh :class:`sensprune.PruneContext` whose
   sensitivity cache is pre-filled, so exactly what :func:`sensprune.prune`
   does after its pass (PFP only for ``--pfp_models``: its selection is slow
   on deep nets); optionally ``prune`` end to end (``--prune_models``);
3. one masked vs one unmasked train step (SGD + momentum + weight decay);
4. compile times (first call minus the median steady call);
5. the SiPP pass over 1/4, 1/2, 1 and 2 times |S| (``--scaling_models``);
6. compiled memory (``memory_analysis()``) of the per-chunk sensitivity
   function and of the forward;
4b. compile time of each jitted function separately (the capture program,
   every per-geometry layer kernel of both passes, the forwards, the train
   steps), as trace+lower and XLA compile from empty caches;
7. data-parallel scaling: the passes and a train step on a mesh over 1, 2, 4
   forced host devices (``--device_counts``, one subprocess each with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N``);
8. peak memory (RSS growth) of the pass vs a single-batch forward as |S|
   grows (``--memory_models``, in the first device-count subprocess).

The device the numbers come from is printed in the header and table [1] and
stored in the JSON (``env.device``, ``env.devices``).
``--max_contraction`` picks the CPU strategy of the (max, x) contraction
(``sensprune.sensitivity.MAX_CONTRACTION``) to compare kernels.

Results go to a readable table on stdout and to ``--json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import sensprune as sp
from sensprune import paths

# (delta, batch size of |S|, train batch size) of the reference's experiments.
REFERENCE = {
    "mnist": (1e-12, 64, 64),
    "cifar": (1e-16, 128, 128),
    "imagenet": (1e-16, 256, 256),
}
DEFAULT_MODELS = ("lenet300_100", "resnet20", "resnet56")
SCALING_FRACTIONS = (0.25, 0.5, 1.0, 2.0)
C_CONSTANT = 3.0
QUICK = dict(  # one chunk (halves the compiles), no PFP search (its first call compiles ~10 s of eager ops)
    models=("lenet300_100",), repeats=2, min_repeats=1, budget_s=5.0, num_points=16, chunk_size=16,
    scaling_models=("lenet300_100",), scaling_fractions=(1.0,), prune_models=(), methods=("sipp",),
    device_counts=(2,), device_models=("lenet300_100",), memory_models=("lenet300_100",), memory_fractions=(1.0, 2.0),
)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], inner: int = 1) -> tuple[float, Any]:
    """Seconds per call of ``fn`` over ``inner`` back-to-back calls (all outputs blocked on)."""
    start = time.perf_counter()
    outs = [fn() for _ in range(inner)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - start) / inner, outs[-1]


@dataclasses.dataclass
class Case:
    """One function to time.

    ``warm`` is the first (compiling) call; it does ``warm_fraction`` of the
    work of ``run`` (e.g. 2 of 8 chunks), so compile time is
    ``first - warm_fraction * median``.
    """

    run: Callable[[], Any]
    warm: Optional[Callable[[], Any]] = None
    warm_fraction: float = 1.0
    prewarmed: bool = False  # already called once: no warm-up call, no compile time
    expected_s: Optional[float] = None  # rough steady time if known (skips calibration when >= 1 s)


MIN_SAMPLE_S = 0.05  # fast calls are repeated back to back until a sample takes this long


def measure(
    cases: Mapping[str, Case], repeats: int, min_repeats: int, budget_s: float
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Warm-up call of each case, then interleaved rounds of steady calls.

    Calls faster than ``MIN_SAMPLE_S`` are timed ``inner`` times back to back
    per sample (timeit style; the reported time is per call).

    Returns (name -> timing dict, name -> output of the last steady call).
    """
    names = list(cases)
    first: dict[str, Optional[float]] = {}
    inner: dict[str, int] = {}
    for name in names:
        case = cases[name]
        first[name] = None if case.prewarmed else _timed(case.warm or case.run)[0]
        guess = first[name] if first[name] is not None else (case.expected_s or 0.0)
        if guess < 1.0:  # possibly fast: calibrate with one steady call
            guess = _timed(case.run)[0]
        inner[name] = max(1, min(1000, int(np.ceil(MIN_SAMPLE_S / max(guess, 1e-7)))))
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    spent = 0.0
    for r in range(max(1, repeats)):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t, outputs[name] = _timed(cases[name].run, inner[name])
            times[name].append(t)
            spent += t * inner[name]
        done = r + 1
        if done >= max(1, min_repeats) and spent / done * (done + 1) > budget_s:
            break
    result = {}
    for name in names:
        med = statistics.median(times[name])
        compile_s = None if first[name] is None else max(0.0, first[name] - cases[name].warm_fraction * med)
        result[name] = {
            "median_s": med,
            "min_s": min(times[name]),
            "times_s": times[name],
            "repeats": len(times[name]),
            "calls_per_sample": inner[name],
            "first_call_s": first[name],
            "compile_s": compile_s,
        }
    return result, outputs


def _single_sample(seconds: float) -> dict[str, Any]:
    """Timing dict of a single (first) call used as the only sample."""
    return {
        "median_s": seconds, "min_s": seconds, "times_s": [seconds], "repeats": 1,
        "calls_per_sample": 1, "first_call_s": seconds, "compile_s": None,
    }


# ----------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------


def _memory(compiled: Any) -> dict[str, Optional[int]]:
    """Sizes of ``compiled.memory_analysis()`` (None where unavailable)."""
    try:
        stats = compiled.memory_analysis()
    except Exception as err:  # pragma: no cover - backend dependent
        logging.warning("memory_analysis unavailable: %s", err)
        stats = None
    keys = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
        "peak_memory_in_bytes",
    )
    out = {}
    for k in keys:
        v = getattr(stats, k, None) if stats is not None else None
        out[k] = None if v is None else int(v)
    return out


def _sensitivity_memory(model, variables, layers, reduction, x_chunk, sens) -> dict[str, Any]:
    """Compiled memory of the per-chunk work of :func:`sensprune.compute_sensitivities`.

    Lowers the pass's own jitted functions (``sensprune.sensitivity``
    internals), so these are cache hits of the executables the pass ran:

    * per-layer design (``_capture_function`` + ``_layer_step``): the capture
      program (a forward that returns every layer's input for the chunk) and
      the largest per-layer kernel; the chunk's working set is estimated as
      ``captured inputs + max(capture temp, largest layer-step temp)``;
    * single-program design (``_chunk_function``): that program's temp + output.

    Falls back to compiling a one-chunk pass under ``jax.jit`` (slow for deep
    nets; skipped above 30 layers).
    """
    from sensprune import sensitivity as lib

    apply = {"train": False}
    layers = tuple(layers)
    try:
        if hasattr(lib, "_capture_function") and hasattr(lib, "_layer_step"):
            capture = lib._capture_function(model, layers, None, apply)
            cap = _memory(capture.func.lower(variables, x_chunk, **capture.keywords).compile())
            inputs = capture(variables, x_chunk)
            steps: dict[Any, tuple[str, dict]] = {}
            for layer in layers:
                geo = lib._geometry(layer) if hasattr(lib, "_geometry") else layer
                if geo not in steps:
                    kernel = paths.get_kernel(variables["params"], layer)
                    compiled = lib._layer_step.lower(
                        geo, _kernel_reduction(layer, reduction), kernel, inputs[layer.name], sens[layer.name]
                    ).compile()
                    steps[geo] = (layer.name, _memory(compiled))
            worst_name, worst = max(steps.values(), key=lambda v: v[1]["temp_size_in_bytes"] or 0)
            working = (cap["output_size_in_bytes"] or 0) + max(
                cap["temp_size_in_bytes"] or 0, worst["temp_size_in_bytes"] or 0
            )
            return {
                "design": "capture + per-layer kernels",
                "capture": cap,
                "num_layer_kernels": len(steps),
                "layer_step_max": worst,
                "layer_step_max_layer": worst_name,
                "chunk_working_bytes": working,
            }
        if hasattr(lib, "_chunk_function"):
            fn = lib._chunk_function(model, layers, reduction, None, apply)
            single = _memory(fn.func.lower(variables, x_chunk, **fn.keywords).compile())
            return {
                "design": "single per-chunk program",
                "chunk_program": single,
                "chunk_working_bytes": (single["temp_size_in_bytes"] or 0) + (single["output_size_in_bytes"] or 0),
            }
    except Exception as err:  # internals changed: fall through to the public route
        logging.warning("could not lower the pass's own jitted functions (%s); using a one-chunk jit", err)
    if len(layers) > 30:
        logging.warning("skipping compiled memory of the sensitivity pass (%d layers)", len(layers))
        return {"design": "unavailable", "chunk_working_bytes": None}
    one_chunk = jax.jit(
        lambda v, x: sp.compute_sensitivities(
            model, v, x, reduction=reduction, chunk_size=x.shape[0], layers=layers, train=False
        )
    )
    single = _memory(one_chunk.lower(variables, x_chunk).compile())
    return {
        "design": "one-chunk pass under jax.jit (recompiled)",
        "chunk_program": single,
        "chunk_working_bytes": (single["temp_size_in_bytes"] or 0) + (single["output_size_in_bytes"] or 0),
    }


def _kernel_reduction(layer: Any, reduction: str) -> str:
    """The reduction the pass compiles for ``layer`` (one output position: 'max' for both)."""
    return reduction if layer.num_patches > 1 else "max"


def _lower_compile(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, float]:
    """Seconds to trace+lower and to XLA-compile ``fn`` (a jitted function) on
    ``args``, from empty caches (``jax.clear_caches()`` first)."""
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = fn.lower(*args, **kwargs)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def _compile_breakdown(model, variables, layers, x_chunk, data, sens, forward, steps) -> dict[str, Any]:
    """Compile time of each jitted function of the pass, the forward and the
    train steps, measured separately (``steps``: name -> (step, state, args)).

    The pass compiles one capture program per model and one kernel per
    distinct (layer geometry, reduction); the table sums the kernels.
    """
    from sensprune import sensitivity as lib

    out: dict[str, Any] = {}
    layers = tuple(layers)
    try:
        capture = lib._capture_function(model, layers, None, {"train": False})
        out["capture"] = _lower_compile(capture.func, variables, x_chunk, **capture.keywords)
        inputs = capture(variables, x_chunk)
        for reduction, label in (("mean", "sipp_kernels"), ("max", "pfp_kernels")):
            kernels: dict[Any, dict[str, Any]] = {}
            for layer in layers:
                geo, red = lib._geometry(layer), _kernel_reduction(layer, reduction)
                if (geo, red) in kernels:
                    continue
                kernel = paths.get_kernel(variables["params"], layer)
                t = _lower_compile(lib._layer_step, geo, red, kernel, inputs[layer.name], sens[reduction][layer.name])
                kernels[(geo, red)] = {"layer": layer.name, "reduction": red, **t}
            items = list(kernels.values())
            out[label] = {
                "count": len(items),
                "lower_s": sum(k["lower_s"] for k in items),
                "compile_s": sum(k["compile_s"] for k in items),
                "total_s": sum(k["total_s"] for k in items),
                "max_total_s": max(k["total_s"] for k in items),
                "kernels": items,
            }
    except Exception as err:  # pragma: no cover - sensitivity internals changed
        logging.warning("compile breakdown of the pass unavailable: %s", err)
    out["forward_chunk"] = _lower_compile(forward, variables, x_chunk)
    out["forward_full"] = _lower_compile(forward, variables, jnp.asarray(data))
    for name, (step, state, args) in steps.items():
        try:
            out[name] = _lower_compile(step.func, state, *args, **step.keywords)
        except Exception as err:  # pragma: no cover - training internals changed
            logging.warning("compile time of %s unavailable: %s", name, err)
    jax.clear_caches()
    return out


def _step_cost(step: Any, state: Any, *args: Any) -> Optional[dict[str, float]]:
    """XLA ``cost_analysis()`` (flops, bytes accessed) of a jitted train step.

    ``make_train_step`` returns ``functools.partial(jitted_fn, **static)``; the
    lowering is a cache hit of the executable that was timed. None if the
    shape of that API or the backend does not allow it.
    """
    try:
        compiled = step.func.lower(state, *args, **step.keywords).compile()
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}
    except Exception as err:  # pragma: no cover - depends on jax / training internals
        logging.warning("cost_analysis of the train step unavailable: %s", err)
        return None


def _kernel_mask_tree(params, layers, masks: Mapping[str, np.ndarray]):
    tree = sp.ones_like_masks(params)
    for layer in layers:
        tree = paths.set_kernel(tree, layer, jnp.asarray(masks[layer.name], bool))
    return tree


def _search(model, variables, layers, data, method, keep_ratio, key, sens, chunk_size, delta):
    """What :func:`sensprune.prune` does after its sensitivity pass: the
    keep-ratio search over ``select`` calls on a fresh context (sensitivities
    taken from ``sens``, reduction -> result)."""
    spec = sp.get_method(method)
    ctx = sp.PruneContext(
        model=model,
        variables=variables,
        layers=list(layers),
        data=data,
        delta=delta,
        c_constant=C_CONSTANT,
        chunk_size=chunk_size,
        apply_kwargs={"train": False},
    )
    for reduction, value in sens.items():
        ctx.cache[("sensitivity", reduction)] = value
    total = sp.count_params(variables["params"])
    selection, _, size, ok, calls = sp.search_selection(ctx, spec, keep_ratio * total, key)
    return {
        "ctx": ctx,
        "selection": selection,
        "select_calls": calls,
        "keep_ratio": size / total,
        "reachable": bool(ok),
    }


def _train_config(family: str, batch_size: int):
    from experiments.train_config import TrainConfig

    return TrainConfig(
        num_epochs=1,
        batch_size=batch_size,
        learning_rate=0.1 if family != "mnist" else 0.01,
        momentum=0.9,
        weight_decay=1e-4,
        augment="none",
    )


# ----------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------


def bench_model(name: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    from experiments import steps as steps_lib
    from experiments import train_state as state_lib
    from experiments.optim import Optimizer
    from experiments.models import MODEL_DATASET_FAMILY, get_model, input_shape

    family = MODEL_DATASET_FAMILY[name]
    delta, s_batch, train_batch = REFERENCE[family]
    repeats, min_rep, budget = opts["repeats"], opts["min_repeats"], opts["budget_s"]
    chunk = int(opts["chunk_size"])
    shape = input_shape(name)
    model = get_model(name, 10 if family != "imagenet" else 1000)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(
        jax.random.PRNGKey(0)
    )
    variables = jax.device_get(variables)
    rng = np.random.default_rng(0)
    probe = rng.normal(size=(1, *shape)).astype(np.float32)
    layers = tuple(sp.find_layers(model, variables, probe, train=False))
    formula_points = sp.sample_size(list(layers), delta, C_CONSTANT, s_batch)
    n_points = int(opts["num_points"] or formula_points)
    data = rng.normal(size=(n_points, *shape)).astype(np.float32)
    chunk = min(chunk, n_points)
    n_chunks = -(-n_points // chunk)
    n_params = sp.count_params(variables["params"])
    logging.info(
        "%s: %d prunable layers, %d params, |S| = %d (formula: delta=%g, C=%g, batch %d -> %d), "
        "chunk_size %d (%d chunks)",
        name, len(layers), n_params, n_points, delta, C_CONSTANT, s_batch, formula_points,
        chunk, n_chunks,
    )
    out: dict[str, Any] = {
        "family": family,
        "num_layers": len(layers),
        "num_params": n_params,
        "sample_size": n_points,
        "sample_size_formula": formula_points,
        "delta": delta,
        "c_constant": C_CONSTANT,
        "sample_batch_size": s_batch,
        "chunk_size": chunk,
        "num_chunks": n_chunks,
        "data": "random normal N(0,1) (has negative entries: input sign split in layers reading the input)",
        "load_avg_start": list(os.getloadavg()),
    }

    # 1. sensitivity passes vs forward -------------------------------------
    def pass_fn(reduction: str, x: np.ndarray, fused: bool = False) -> Callable[[], Any]:
        return lambda: sp.compute_sensitivities(
            model, variables, x, reduction=reduction, chunk_size=chunk, layers=layers, fused=fused, train=False
        )

    warm_points = min(n_points, 2 * chunk)  # compiles the chunk function and the running max
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    chunks = [data[i : i + chunk] for i in range(0, n_points, chunk)]
    if chunks[-1].shape[0] < chunk:  # pad as the pass does: fixed shape, one compile
        last = chunks[-1]
        chunks[-1] = np.concatenate([last, np.repeat(last[:1], chunk - last.shape[0], axis=0)])

    def forward_chunked():
        return [forward(variables, c) for c in chunks]

    cases = {
        "sipp_pass": Case(pass_fn("mean", data), pass_fn("mean", data[:warm_points]), warm_points / n_points),
        "pfp_pass": Case(pass_fn("max", data), pass_fn("max", data[:warm_points]), warm_points / n_points),
        "forward_full": Case(lambda: forward(variables, data)),
        "forward_chunked": Case(forward_chunked, lambda: forward(variables, chunks[0]), 1.0 / len(chunks)),
    }
    fused = name in opts.get("fused_models", ())
    if fused:  # the whole pass as one program (one scan over the chunks): its compile covers every chunk
        cases["sipp_pass_fused"] = Case(pass_fn("mean", data, fused=True))
        cases["pfp_pass_fused"] = Case(pass_fn("max", data, fused=True))
    logging.info("%s: [1] sensitivity passes and forward (compiling, then up to %d rounds)", name, repeats)
    timing, outputs = measure(cases, repeats, min_rep, budget)
    sens = {"mean": outputs["sipp_pass"], "max": outputs["pfp_pass"]}
    med = {k: v["median_s"] for k, v in timing.items()}
    out["passes"] = timing
    out["ratios"] = {
        "sipp_over_forward_full": med["sipp_pass"] / med["forward_full"],
        "pfp_over_forward_full": med["pfp_pass"] / med["forward_full"],
        "sipp_over_forward_chunked": med["sipp_pass"] / med["forward_chunked"],
        "pfp_over_forward_chunked": med["pfp_pass"] / med["forward_chunked"],
        "pfp_over_sipp": med["pfp_pass"] / med["sipp_pass"],
    }
    if fused:
        for kind, ref in (("sipp", "mean"), ("pfp", "max")):
            out["ratios"][f"{kind}_fused_over_forward_full"] = med[f"{kind}_pass_fused"] / med["forward_full"]
            out["ratios"][f"{kind}_fused_over_per_layer"] = med[f"{kind}_pass_fused"] / med[f"{kind}_pass"]
            out.setdefault("fused_max_rel_diff", {})[kind] = float(max(
                np.max(np.abs(np.asarray(a) - np.asarray(b)) / (np.abs(np.asarray(b)) + 1e-6))
                for a, b in zip(jax.tree.leaves(outputs[f"{kind}_pass_fused"]), jax.tree.leaves(sens[ref]))
            ))
    logging.info("%s: SiPP pass %.3fs, PFP pass %.3fs, forward %.4fs (one batch) / %.4fs (chunks)",
                 name, med["sipp_pass"], med["pfp_pass"], med["forward_full"], med["forward_chunked"])

    # 6. compiled memory -----------------------------------------------------
    logging.info("%s: [6] compiled memory", name)
    x_chunk = jnp.asarray(chunks[0])
    memory = {
        "sensitivity_mean": _sensitivity_memory(model, variables, layers, "mean", x_chunk, sens["mean"]),
        "sensitivity_max": _sensitivity_memory(model, variables, layers, "max", x_chunk, sens["max"]),
        "forward_chunk": _memory(forward.lower(variables, x_chunk).compile()),
        "forward_full": _memory(forward.lower(variables, jnp.asarray(data)).compile()),
        "forward_2x_full": _memory(
            forward.lower(variables, jax.ShapeDtypeStruct((2 * n_points, *shape), jnp.float32)).compile()
        ),
    }
    sens_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(sens["mean"])))
    memory["running_max_bytes"] = sens_bytes
    memory["batch_sizes"] = {"sensitivity": chunk, "forward_chunk": chunk,
                             "forward_full": n_points, "forward_2x_full": 2 * n_points}
    out["memory"] = memory

    # 2. allocation + keep-ratio search vs the pass ------------------------------
    key = jax.random.PRNGKey(0)
    keep_ratio = float(opts["keep_ratio"])
    prune_out: dict[str, Any] = {}
    searches = {}
    method_passes = {"sipp": ("mean", "sipp_pass"), "pfp": ("max", "pfp_pass")}
    for method in opts["methods"]:
        if method == "pfp" and name not in opts["pfp_models"]:
            logging.info("%s: [2] skipping the pfp search (not in --pfp_models)", name)
            continue
        reduction, pass_name = method_passes[method]
        logging.info("%s: [2] %s keep-ratio search (keep_ratio %.3f)", name, method, keep_ratio)
        # warm-up also checks that the pre-filled cache is what the context uses
        t_first = time.perf_counter()
        warm = _search(model, variables, layers, data, method, keep_ratio, key, sens, chunk, delta)
        t_first = time.perf_counter() - t_first
        if warm["ctx"].sensitivities(reduction) is not sens[reduction]:
            logging.warning("PruneContext did not use the pre-filled sensitivities; search times include a pass")
        searches[method] = warm
        if t_first > budget:  # too slow to repeat: the first call is the sample
            ts = {"search": _single_sample(t_first)}
        else:
            ts, _ = measure(
                {"search": Case(
                    lambda m=method: _search(model, variables, layers, data, m, keep_ratio, key, sens, chunk, delta)["selection"].masks,
                    prewarmed=True, expected_s=t_first,
                )},
                repeats, min_rep, budget,
            )
        entry = {
            "search": ts["search"],
            "search_first_call_s": t_first,  # includes one-off compiles of the selection's jax ops
            "select_calls": warm["select_calls"],
            "select_per_call_s": ts["search"]["median_s"] / warm["select_calls"],
            "achieved_keep_ratio": warm["keep_ratio"],
            "reachable": warm["reachable"],
            "pass_s": med[pass_name],
            "search_over_pass": ts["search"]["median_s"] / med[pass_name],
        }
        if name in opts["prune_models"]:
            logging.info("%s: [2] %s: prune end to end", name, method)
            e2e, _ = measure(
                {"prune": Case(lambda m=method: sp.prune(
                    model, variables, data, method=m, keep_ratio=keep_ratio, key=key, delta=delta,
                    c_constant=C_CONSTANT, chunk_size=chunk, layers=layers, apply_kwargs={"train": False},
                ).masks, prewarmed=True, expected_s=med[pass_name] + ts["search"]["median_s"])},  # all compiled above
                repeats, min_rep, budget,
            )
            entry["prune_e2e"] = e2e["prune"]
            entry["prune_e2e_minus_pass_s"] = e2e["prune"]["median_s"] - med[pass_name]
        prune_out[method] = entry
    out["prune"] = prune_out

    # 3. masked vs unmasked train step -------------------------------------------
    logging.info("%s: [3] train steps (batch %d)", name, train_batch)
    cfg = _train_config(family, train_batch)
    state = state_lib.create_state(model, jax.random.PRNGKey(1), shape, Optimizer.create(cfg, 1))
    if not searches:  # e.g. --methods=pfp on a model outside --pfp_models
        searches["sipp"] = _search(model, variables, layers, data, "sipp", keep_ratio, key, sens, chunk, delta)
    mask_method = "sipp" if "sipp" in searches else next(iter(searches))
    masks = _kernel_mask_tree(state.params, layers, searches[mask_method]["selection"].masks)
    state_masked = state_lib.state_from_params(model, state_lib.variables_of(state), state.tx, masks)
    step = step_masked = steps_lib.make_train_step(steps_lib.StepOptions.create(cfg))  # masking: in the state
    bx = jnp.asarray(rng.normal(size=(train_batch, *shape)).astype(np.float32))
    by = jnp.asarray(rng.integers(0, 10, size=(train_batch,)).astype(np.int32))
    tkey = jax.random.PRNGKey(2)
    # As train() runs them: each step donates its input state and the next step takes the output.
    donated = {
        "unmasked": steps_lib.make_train_step(steps_lib.StepOptions.create(cfg), donate=True),
        "masked": steps_lib.make_train_step(steps_lib.StepOptions.create(cfg), donate=True),
    }
    live = {"unmasked": jax.tree.map(jnp.copy, state), "masked": jax.tree.map(jnp.copy, state_masked)}

    def donated_step(kind: str):
        live[kind], metrics = donated[kind](live[kind], bx, by, tkey)
        return metrics

    t, _ = measure(
        {
            "unmasked": Case(lambda: step(state, bx, by, tkey)),
            "masked": Case(lambda: step_masked(state_masked, bx, by, tkey)),
            "unmasked_donated": Case(lambda: donated_step("unmasked")),
            "masked_donated": Case(lambda: donated_step("masked")),
        },
        2 * repeats, min_rep, budget,  # ratio wanted to ~1%: more rounds (budget-capped)
    )
    cost = {"unmasked": _step_cost(step, state, bx, by, tkey), "masked": _step_cost(step_masked, state_masked, bx, by, tkey)}
    cost_ratio = None
    if cost["unmasked"] and cost["masked"]:
        cost_ratio = {k: cost["masked"][k] / cost["unmasked"][k] for k in cost["masked"]}
    out["train_step"] = {
        "cost_analysis": cost,
        "cost_ratio_masked_over_unmasked": cost_ratio,
        "batch_size": train_batch,
        "mask_method": mask_method,
        "mask_keep_ratio": searches[mask_method]["keep_ratio"],
        **t,
        "masked_over_unmasked": t["masked"]["median_s"] / t["unmasked"]["median_s"],
        "masked_over_unmasked_min": t["masked"]["min_s"] / t["unmasked"]["min_s"],
        "donated_masked_over_unmasked": t["masked_donated"]["median_s"] / t["unmasked_donated"]["median_s"],
    }

    # 4. compile times -------------------------------------------------------------
    out["compile_s"] = {
        "sipp_pass": timing["sipp_pass"]["compile_s"],
        "pfp_pass": timing["pfp_pass"]["compile_s"],
        "forward_full": timing["forward_full"]["compile_s"],
        "forward_chunk": timing["forward_chunked"]["compile_s"],
        "train_step": t["unmasked"]["compile_s"],
        "train_step_masked": t["masked"]["compile_s"],
    }

    # 5. scaling with |S| ----------------------------------------------------------
    if name in opts["scaling_models"]:
        logging.info("%s: [5] scaling of the SiPP pass with |S|", name)
        fractions = tuple(opts["scaling_fractions"])
        copies = int(np.ceil(max(fractions)))
        big = np.concatenate([data] + [rng.normal(size=data.shape).astype(np.float32) for _ in range(copies)])
        sizes = [max(1, int(round(f * n_points))) for f in fractions]
        cases = {str(n): Case(pass_fn("mean", big[:n])) for n in sizes}
        st, _ = measure(cases, repeats, min_rep, budget)
        ref = sizes[int(np.argmin([abs(f - 1.0) for f in fractions]))]
        per_point_1x = st[str(ref)]["median_s"] / ref
        out["scaling"] = [
            {
                "fraction": f,
                "points": n,
                "chunks": -(-n // min(chunk, n)),
                "median_s": st[str(n)]["median_s"],
                "repeats": st[str(n)]["repeats"],
                "per_point_s": st[str(n)]["median_s"] / n,
                "per_point_over_1x": st[str(n)]["median_s"] / n / per_point_1x,
            }
            for f, n in zip(fractions, sizes)
        ]
    # 4b. compile time of each jitted function, separately (clears caches: runs last) ----
    logging.info("%s: [4b] compile time per jitted function", name)
    out["compile_breakdown"] = _compile_breakdown(
        model, variables, layers, x_chunk, data, sens, forward,
        {"train_step": (step, state, (bx, by, tkey)), "train_step_masked": (step_masked, state_masked, (bx, by, tkey))},
    )
    out["load_avg_end"] = list(os.getloadavg())
    return out


# ----------------------------------------------------------------------------
# Scaling with forced host devices and memory with |S| (subprocesses)
# ----------------------------------------------------------------------------


def _setup(name: str, num_points: int) -> dict[str, Any]:
    """Model, variables (seed 0), layers and ``num_points`` N(0, 1) points (0: formula size)."""
    from experiments.models import MODEL_DATASET_FAMILY, get_model, input_shape

    family = MODEL_DATASET_FAMILY[name]
    delta, s_batch, train_batch = REFERENCE[family]
    shape = input_shape(name)
    model = get_model(name, 10 if family != "imagenet" else 1000)
    variables = jax.device_get(
        jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(jax.random.PRNGKey(0))
    )
    rng = np.random.default_rng(0)
    layers = tuple(sp.find_layers(model, variables, rng.normal(size=(1, *shape)).astype(np.float32), train=False))
    n = int(num_points or sp.sample_size(list(layers), delta, C_CONSTANT, s_batch))
    return dict(model=model, variables=variables, layers=layers, shape=shape, family=family, rng=rng,
                data=rng.normal(size=(n, *shape)).astype(np.float32), train_batch=train_batch)


def _rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first accelerator so far (None on CPU, which keeps no such count)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _device_worker(args: Mapping[str, Any]) -> dict[str, Any]:
    """Runs in a subprocess with ``--xla_force_host_platform_device_count``: times
    the SiPP/PFP passes and a train step on a data mesh over every device; with
    ``memory_fractions``, also the peak RSS of the pass vs a single-batch
    forward as |S| grows."""
    from experiments import steps as steps_lib
    from experiments import train_state as state_lib
    from experiments.optim import Optimizer
    from sensprune import sharding

    if args.get("max_contraction"):
        from sensprune import sensitivity

        sensitivity.MAX_CONTRACTION = args["max_contraction"]
    mesh = sharding.data_mesh()
    out: dict[str, Any] = {"devices": jax.device_count(), "device": str(jax.devices()[0]), "models": {}}
    for name in args["models"]:
        m = _setup(name, args["num_points"])
        model, variables, layers, data = m["model"], m["variables"], m["layers"], m["data"]
        chunk = min(int(args["chunk_size"]), len(data))

        def pass_fn(reduction, x, mesh_=mesh):
            return lambda: sp.compute_sensitivities(
                model, variables, x, reduction=reduction, chunk_size=chunk, layers=layers, mesh=mesh_, train=False
            )

        cfg = _train_config(m["family"], m["train_batch"])
        state = state_lib.shard_state(
            state_lib.create_state(model, jax.random.PRNGKey(1), m["shape"], Optimizer.create(cfg, 1)), mesh)
        step = steps_lib.make_train_step(steps_lib.StepOptions.create(cfg, mesh=mesh))
        bx, by = sharding.shard_batch(
            (m["rng"].normal(size=(m["train_batch"], *m["shape"])).astype(np.float32),
             m["rng"].integers(0, 10, size=(m["train_batch"],)).astype(np.int32)), mesh)
        tkey = sharding.replicate(jax.random.PRNGKey(2), mesh)
        cases = {
            "sipp_pass": Case(pass_fn("mean", data)),
            "pfp_pass": Case(pass_fn("max", data)),
            "train_step": Case(lambda: step(state, bx, by, tkey)),
        }
        if jax.device_count() == 1:
            cases["sipp_pass_no_mesh"] = Case(pass_fn("mean", data, None))
        state_bytes = {"replicated": _device0_bytes(state)}
        if jax.device_count() % 2 == 0 and m["train_batch"] % (jax.device_count() // 2) == 0:
            # The same step with params / optimizer state split over a 'model' axis of 2 devices.
            mesh2 = sharding.data_mesh(model=2)
            state2 = state_lib.shard_state(state, mesh2)
            step2 = steps_lib.make_train_step(steps_lib.StepOptions.create(cfg, mesh=mesh2))
            bx2, by2 = sharding.shard_batch(jax.device_get((bx, by)), mesh2)
            tkey2 = sharding.replicate(jax.random.PRNGKey(2), mesh2)
            cases["train_step_model2"] = Case(lambda: step2(state2, bx2, by2, tkey2))
            state_bytes["model2"] = _device0_bytes(state2)
        timing, _ = measure(cases, args["repeats"], args["min_repeats"], args["budget_s"])
        entry: dict[str, Any] = {"points": len(data), "chunk_size": chunk, "train_batch": m["train_batch"],
                                 "state_bytes_per_device": state_bytes, **timing}
        if args.get("memory_fractions") and name in args.get("memory_models", ()):
            entry["memory_vs_points"] = _memory_vs_points(m, chunk, args["memory_fractions"])
        out["models"][name] = entry
    return out


def _device0_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays that live on the first device of their sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        first = min(leaf.sharding.device_set, key=lambda d: d.id)
        total += sum(shard.data.nbytes for shard in leaf.addressable_shards if shard.device == first)
    return total


def _memory_vs_points(m: Mapping[str, Any], chunk: int, fractions: Sequence[float]) -> list[dict[str, Any]]:
    """Peak RSS after the SiPP pass over growing |S| (ascending), then after a
    single-batch forward over the same sizes, plus the forward's compiled
    temp+output bytes. The pass should stay flat; the forward grows."""
    model, variables, layers, base = m["model"], m["variables"], m["layers"], m["data"]
    sizes = sorted({max(1, int(round(f * len(base)))) for f in fractions})
    big = np.concatenate([base] * int(np.ceil(max(sizes) / len(base))))
    rows: dict[int, dict[str, Any]] = {n: {"points": n} for n in sizes}
    start = _rss_bytes()
    for n in sizes:
        jax.block_until_ready(sp.compute_sensitivities(
            model, variables, big[:n], reduction="mean", chunk_size=chunk, layers=layers, train=False))
        rows[n]["rss_after_pass_bytes"] = _rss_bytes()
        rows[n]["device_peak_after_pass_bytes"] = _device_peak_bytes()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for n in sizes:
        compiled = forward.lower(variables, jnp.asarray(big[:n])).compile()
        mem = _memory(compiled)
        rows[n]["forward_temp_output_bytes"] = (mem["temp_size_in_bytes"] or 0) + (mem["output_size_in_bytes"] or 0)
        jax.block_until_ready(compiled(variables, jnp.asarray(big[:n])))
        rows[n]["rss_after_forward_bytes"] = _rss_bytes()
        rows[n]["device_peak_after_forward_bytes"] = _device_peak_bytes()
    for n in sizes:
        rows[n]["rss_start_bytes"] = start
    return [rows[n] for n in sizes]


def device_scaling(
    models: Sequence[str], counts: Sequence[int], opts: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`_device_worker` in one subprocess per device count (forced host
    devices: on a CPU they share the same cores, so this measures sharding
    overhead and load balance rather than added compute)."""
    import subprocess
    import sys

    out: dict[str, Any] = {}
    for count in counts:
        env = dict(os.environ)
        flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
        # Long collective timeouts: on a loaded CPU the devices reach an all-reduce far apart.
        env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={int(count)} "
                            "--xla_cpu_collective_timeout_seconds=900 "
                            "--xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
        if int(count) > 1 and "PJRT_NPROC" not in os.environ:
            # XLA:CPU runs every forced device's work, and each device's wait in an all-reduce, on one
            # intra-op pool sized by the core count: with fewer cores than waiting devices the device
            # that must arrive gets no thread (ResNet20 on 2 cores hung until the rendezvous timeout).
            env["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * int(count)))
        args = dict(opts, models=list(models), memory_fractions=opts["memory_fractions"] if count == counts[0] else ())
        code = "import json, sys; from experiments.bench import _device_worker; print(json.dumps(_device_worker(json.loads(sys.argv[1]))))"
        logging.info("[7] %d forced host device(s): %s", count, ", ".join(models))
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
        if proc.returncode != 0:
            logging.warning("device worker (%d devices) failed: %s", count, proc.stderr[-2000:])
            out[str(count)] = {"error": proc.stderr[-2000:]}
            continue
        out[str(count)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _fmt_t(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + _fmt_t(-seconds)
    if seconds >= 10:
        return f"{seconds:.1f}s"
    if seconds >= 1:
        return f"{seconds:.2f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds * 1e6:.0f}us"


def _fmt_b(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def format_report(results: Mapping[str, Any]) -> str:
    env = results["env"]
    models = results["models"]
    lines = [
        f"sensprune benchmark: device {env.get('device', env['device_kind'])} (kind {env['device_kind']}, "
        f"backend {env['backend']}, {env['num_devices']} device(s)), "
        f"max contraction {env.get('max_contraction', 'auto')}, jax {env['jax']}, "
        f"flax {env['flax']}, {env['cpu_count']} CPUs (usable {env['cpus_usable']}), "
        f"load avg {_load(env['load_avg_start'])} at start, {_load(env['load_avg_end'])} at end, "
        f"total {results['total_runtime_s']:.0f}s",
        "Inputs: random N(0,1) points (normalised-image-like, with negatives: layers reading the "
        "input take the sign-split path). Times: medians of steady calls (reps = rounds), "
        "interleaved, block_until_ready.",
        "",
        f"[1] Sensitivity pass over S vs one plain jitted forward over the same points (device: "
        f"{env.get('device', env['device_kind'])})",
    ]
    rows = []
    for name, m in models.items():
        p, r = m["passes"], m["ratios"]
        rows.append([
            name, m["sample_size"], m["chunk_size"], _fmt_t(p["sipp_pass"]["median_s"]),
            _fmt_t(p["pfp_pass"]["median_s"]), _fmt_t(p["forward_full"]["median_s"]),
            _fmt_t(p["forward_chunked"]["median_s"]), f"{r['sipp_over_forward_full']:.0f}x",
            f"{r['pfp_over_forward_full']:.0f}x", f"{r['sipp_over_forward_chunked']:.0f}x",
            f"{r['pfp_over_forward_chunked']:.0f}x", f"{r['pfp_over_sipp']:.2f}",
            p["sipp_pass"]["repeats"],
        ])
    lines.append(_table(
        ["model", "|S|", "chunk", "SiPP pass (mean)", "PFP pass (max)", "fwd |S| 1 batch",
         "fwd chunks", "SiPP/fwd1", "PFP/fwd1", "SiPP/fwdc", "PFP/fwdc", "PFP/SiPP", "reps"], rows))
    fused_rows = [
        [name, _fmt_t(m["passes"]["sipp_pass_fused"]["median_s"]), _fmt_t(m["passes"]["pfp_pass_fused"]["median_s"]),
         f"{m['ratios']['sipp_fused_over_per_layer']:.2f}", f"{m['ratios']['pfp_fused_over_per_layer']:.2f}",
         f"{m['ratios']['sipp_fused_over_forward_full']:.1f}x", f"{m['ratios']['pfp_fused_over_forward_full']:.1f}x",
         _fmt_t(m["passes"]["sipp_pass_fused"].get("compile_s")),
         f"{max(m['fused_max_rel_diff'].values()):.1e}"]
        for name, m in models.items() if "sipp_pass_fused" in m["passes"]
    ]
    if fused_rows:
        lines += ["", "[1b] The pass fused into one program (compute_sensitivities(..., fused=True): one scan over "
                  "the chunks, one dispatch) vs the per-layer pass above"]
        lines.append(_table(["model", "SiPP fused", "PFP fused", "SiPP fused/per-layer", "PFP fused/per-layer",
                             "SiPP fused/fwd1", "PFP fused/fwd1", "SiPP fused compile", "max rel diff"], fused_rows))
    lines += ["", f"[2] After the pass: allocation + keep-ratio search (keep_ratio {results['config']['keep_ratio']}), "
              "fresh PruneContext with cached sensitivities"]
    rows = []
    for name, m in models.items():
        for method, e in m["prune"].items():
            e2e = e.get("prune_e2e")
            rows.append([
                name, method, _fmt_t(e["search"]["median_s"]), _fmt_t(e.get("search_first_call_s")), e["select_calls"],
                _fmt_t(e["select_per_call_s"]), _fmt_t(e["pass_s"]), f"{e['search_over_pass']:.3f}",
                _fmt_t(e2e["median_s"]) if e2e else "-",
                _fmt_t(e["prune_e2e_minus_pass_s"]) if e2e else "-",
                f"{e['achieved_keep_ratio']:.4f}", e["search"]["repeats"],
            ])
    lines.append(_table(
        ["model", "method", "search", "1st search", "select calls", "per select", "pass", "search/pass",
         "prune e2e", "e2e - pass", "kept", "reps"], rows))
    skipped = [n for n in models if "pfp" in results["config"]["methods"] and "pfp" not in models[n]["prune"]]
    if skipped:
        lines.append(f"(pfp search not timed for {', '.join(skipped)}: not in --pfp_models)")
    lines.append(
        "PFP's select includes group-wise channel propagation (the dependency map is analysed once per "
        "context); '1st search' includes one-off compiles."
    )
    lines += ["", "[3] One train step (SGD momentum 0.9, wd 1e-4): masked vs unmasked (target <= 1.05x)"]
    rows = []
    for name, m in models.items():
        t = m["train_step"]
        cr = t.get("cost_ratio_masked_over_unmasked")
        ratio = t.get("donated_masked_over_unmasked")
        donated = (
            [_fmt_t(t["unmasked_donated"]["median_s"]), _fmt_t(t["masked_donated"]["median_s"]), f"{ratio:.3f}"]
            if ratio is not None else ["n/a"] * 3
        )
        rows.append([
            name, t["batch_size"], _fmt_t(t["unmasked"]["median_s"]), _fmt_t(t["masked"]["median_s"]),
            f"{t['masked_over_unmasked']:.3f}", f"{t['masked_over_unmasked_min']:.3f}", *donated,
            ("yes" if (ratio if ratio is not None else t["masked_over_unmasked"]) <= 1.05 else "NO")
            + (" (1 sample)" if t["unmasked"]["repeats"] < 2 else ""),
            t["unmasked"]["repeats"],
            f"{cr['flops']:.3f}" if cr else "n/a", f"{cr['bytes_accessed']:.3f}" if cr else "n/a",
        ])
    lines.append(_table(
        ["model", "batch", "unmasked", "masked", "ratio (median)", "ratio (min)", "unmasked, donated",
         "masked, donated", "ratio, donated", "<=1.05", "reps", "XLA flops ratio", "XLA bytes ratio"], rows))
    lines.append(
        "Donated: as train() runs them, each step reusing the previous state's buffers (the target is judged "
        "on these). XLA ratios: masked / unmasked flops and bytes accessed of the compiled steps "
        "(cost_analysis; load-independent)."
    )
    lines += ["", "[4] Compile time (first call - median steady call)"]
    rows = []
    for name, m in models.items():
        c = m["compile_s"]
        rows.append([name] + [_fmt_t(c[k]) for k in (
            "sipp_pass", "pfp_pass", "forward_full", "forward_chunk", "train_step", "train_step_masked")])
    lines.append(_table(
        ["model", "SiPP chunk fn", "PFP chunk fn", "fwd |S|", "fwd chunk", "train step", "masked step"], rows))
    lines += ["", "[4b] Compile time per jitted function (trace+lower / XLA compile, from empty caches)"]
    rows = []
    for name, m in models.items():
        for key, label in (("capture", "capture (forward returning layer inputs)"), ("sipp_kernels", "SiPP layer kernels"),
                           ("pfp_kernels", "PFP layer kernels"), ("forward_chunk", "forward (chunk)"),
                           ("forward_full", "forward (|S|)"), ("train_step", "train step"),
                           ("train_step_masked", "masked train step")):
            e = m.get("compile_breakdown", {}).get(key)
            if e:
                count = e.get("count", 1)
                rows.append([name, label, count, _fmt_t(e["lower_s"]), _fmt_t(e["compile_s"]), _fmt_t(e["total_s"]),
                             _fmt_t(e.get("max_total_s", e["total_s"]))])
    lines.append(_table(["model", "function", "programs", "trace+lower", "XLA compile", "total", "largest"], rows))
    scaling = [(n, m["scaling"]) for n, m in models.items() if "scaling" in m]
    if scaling:
        lines += ["", "[5] Scaling of the SiPP pass (mean) with |S| (fixed chunk size, no recompilation)"]
        rows = []
        for name, sc in scaling:
            for s in sc:
                rows.append([name, f"{s['fraction']:g}x", s["points"], s["chunks"], _fmt_t(s["median_s"]),
                             _fmt_t(s["per_point_s"]), f"{s['per_point_over_1x']:.2f}", s["repeats"]])
        lines.append(_table(
            ["model", "|S| factor", "points", "chunks", "time", "time/point", "per-point vs 1x", "reps"], rows))
    lines += ["", "[6] Compiled memory (XLA memory_analysis): per-chunk sensitivity work vs forward"]
    rows = []
    for name, m in models.items():
        mem = m["memory"]
        b = mem["batch_sizes"]
        for reduction, label in (("mean", "SiPP"), ("max", "PFP")):
            e = mem[f"sensitivity_{reduction}"]
            if "capture" in e:
                if reduction == "mean":
                    c = e["capture"]
                    rows.append([name, "capture (all layer inputs)", b["sensitivity"], _fmt_b(c["temp_size_in_bytes"]),
                                 _fmt_b(c["argument_size_in_bytes"]), _fmt_b(c["output_size_in_bytes"]), "-"])
                s = e["layer_step_max"]
                rows.append([name, f"{label} largest layer kernel ({e['num_layer_kernels']} compiled)",
                             b["sensitivity"], _fmt_b(s["temp_size_in_bytes"]), _fmt_b(s["argument_size_in_bytes"]),
                             _fmt_b(s["output_size_in_bytes"]), "-"])
            elif "chunk_program" in e:
                c = e["chunk_program"]
                rows.append([name, f"{label} per-chunk program", b["sensitivity"], _fmt_b(c["temp_size_in_bytes"]),
                             _fmt_b(c["argument_size_in_bytes"]), _fmt_b(c["output_size_in_bytes"]), "-"])
            rows.append([name, f"{label} pass working set per chunk", b["sensitivity"], "-", "-", "-",
                         _fmt_b(e["chunk_working_bytes"])])
        for key, label in (("forward_chunk", "fwd chunk"), ("forward_full", "fwd |S|"), ("forward_2x_full", "fwd 2|S|")):
            e = mem[key]
            rows.append([name, label, b[key], _fmt_b(e["temp_size_in_bytes"]), _fmt_b(e["argument_size_in_bytes"]),
                         _fmt_b(e["output_size_in_bytes"]), _fmt_b((e["temp_size_in_bytes"] or 0) + (e["output_size_in_bytes"] or 0))])
        rows.append([name, "running max (per reduction)", "-", "-", "-", _fmt_b(mem["running_max_bytes"]), "-"])
    lines.append(_table(["model", "function", "batch", "temp", "arguments", "output", "temp+output"], rows))
    lines.append(
        "The pass does the same per-chunk work for every chunk and keeps only a running max the "
        "size of the kernels, so its memory is (per-chunk working set + running max), independent "
        "of |S|; a single-batch forward's memory grows linearly with the batch."
    )
    lines += _device_lines(results.get("devices"))
    return "\n".join(lines)


def _device_lines(devices: Optional[Mapping[str, Any]]) -> list[str]:
    """Tables [7] (scaling with forced host devices) and [8] (peak RSS vs |S|)."""
    if not devices:
        return []
    lines = ["", "[7] Data-parallel scaling: mesh over N forced host devices (one process each; on a CPU they "
             "share the same cores)"]
    rows = []
    base: dict[tuple[str, str], float] = {}
    for count, res in devices.items():
        if "error" in res:
            rows.append([f"{count}", "-", "worker failed (see JSON)", "-", "-", "-", "-", "-", "-", "-"])
            continue
        for name, e in res["models"].items():
            for key in ("sipp_pass", "pfp_pass", "train_step"):
                med = e[key]["median_s"]
                base.setdefault((name, key), med)
            rows.append([
                count, name, res["device"], e["points"],
                *(f"{_fmt_t(e[k]['median_s'])} ({base[(name, k)] / e[k]['median_s']:.2f}x)"
                  for k in ("sipp_pass", "pfp_pass", "train_step")),
                _fmt_t(e["sipp_pass_no_mesh"]["median_s"]) if "sipp_pass_no_mesh" in e else "-",
                _fmt_t(e["train_step_model2"]["median_s"]) if "train_step_model2" in e else "-",
                " / ".join(_fmt_b(e.get("state_bytes_per_device", {}).get(k)) for k in ("replicated", "model2")
                           if k in e.get("state_bytes_per_device", {})) or "-",
            ])
    lines.append(_table(["devices", "model", "device", "|S|", "SiPP pass (speed-up)", "PFP pass (speed-up)",
                         "train step (speed-up)", "SiPP no mesh", "train step, model axis 2",
                         "state per device (replicated / model 2)"], rows))
    mem_rows = []
    for res in devices.values():
        for name, e in res.get("models", {}).items():
            for r in e.get("memory_vs_points", []):
                mem_rows.append([name, r["points"], _fmt_b(r["rss_after_pass_bytes"] - r["rss_start_bytes"]),
                                 _fmt_b(r["rss_after_forward_bytes"] - r["rss_start_bytes"]),
                                 _fmt_b(r["forward_temp_output_bytes"]),
                                 _fmt_b(r.get("device_peak_after_pass_bytes")),
                                 _fmt_b(r.get("device_peak_after_forward_bytes"))])
    if mem_rows:
        lines += ["", "[8] Peak memory vs |S| (peak RSS growth of one process; passes first, ascending |S|, then "
                  "single-batch forwards)"]
        lines.append(_table(["model", "|S|", "peak RSS growth after pass", "after forward", "forward temp+output (XLA)",
                             "accelerator peak after pass", "after forward"], mem_rows))
        lines.append("The pass works chunk by chunk, so its peak stays flat as |S| grows; a single-batch forward's "
                     "activations grow linearly.")
    return lines


def _load(avg: Sequence[float]) -> str:
    return "/".join(f"{a:.2f}" for a in avg)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import flax

    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    return {
        "device": f"{dev.platform}:{dev.id} {dev.device_kind}",
        "devices": [str(d) for d in jax.devices()],
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "flax": flax.__version__,
        "sensprune": sp.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "load_avg_start": list(os.getloadavg()),
    }


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    repeats: int = 7,
    min_repeats: int = 1,
    budget_s: float = 45.0,
    chunk_size: int = 32,
    num_points: int = 0,
    keep_ratio: float = 0.1,
    scaling_models: Sequence[str] = ("lenet300_100", "resnet20"),
    scaling_fractions: Sequence[float] = SCALING_FRACTIONS,
    prune_models: Sequence[str] = ("lenet300_100",),
    methods: Sequence[str] = ("sipp", "pfp"),
    pfp_models: Sequence[str] = ("lenet300_100", "resnet20"),
    fused_models: Sequence[str] = ("lenet300_100", "resnet20"),
    device_counts: Sequence[int] = (1, 2, 4),
    device_models: Sequence[str] = ("lenet300_100", "resnet20"),
    memory_models: Sequence[str] = ("resnet20",),
    memory_fractions: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    max_contraction: str = "auto",
    quick: bool = False,
    json_path: Optional[str] = None,
) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes ``json_path``; returns the results."""
    from experiments.models import MODELS

    for name in models:
        if name not in MODELS:
            raise ValueError(f"--models: unknown network {name!r}; available: {', '.join(sorted(MODELS))}")
    if not methods:
        raise ValueError("--methods: give at least one of sipp, pfp")
    for method in methods:
        if method not in ("sipp", "pfp"):
            raise ValueError(f"--methods: expected names from ['sipp', 'pfp'], got {method!r}")
    if repeats < 1 or min_repeats < 1 or chunk_size < 1 or num_points < 0:
        raise ValueError("repeats, min_repeats and chunk_size must be >= 1 and num_points >= 0")
    from sensprune import sensitivity

    if max_contraction not in sensitivity.CONTRACTIONS:
        raise ValueError(f"--max_contraction={max_contraction!r}: expected one of {list(sensitivity.CONTRACTIONS)}")
    if any(int(c) < 1 for c in device_counts):
        raise ValueError(f"--device_counts={list(device_counts)}: expected positive integers")
    sensitivity.MAX_CONTRACTION = max_contraction
    opts = dict(
        models=list(models), repeats=repeats, min_repeats=min_repeats, budget_s=budget_s,
        chunk_size=chunk_size, num_points=num_points, keep_ratio=keep_ratio,
        scaling_models=list(scaling_models), scaling_fractions=[float(f) for f in scaling_fractions],
        prune_models=list(prune_models), methods=list(methods), pfp_models=list(pfp_models), quick=quick,
        fused_models=list(fused_models),
        device_counts=[int(c) for c in device_counts], device_models=list(device_models),
        memory_models=list(memory_models), memory_fractions=[float(f) for f in memory_fractions],
        max_contraction=max_contraction,
    )
    start = time.perf_counter()
    env = _environment()
    env["max_contraction"] = max_contraction
    logging.info("benchmark on %s (%s), jax %s, %s CPUs, load avg %s",
                 env["device_kind"], env["backend"], env["jax"], env["cpu_count"], _load(env["load_avg_start"]))
    results: dict[str, Any] = {"env": env, "config": opts, "models": {}}
    for name in models:
        t0 = time.perf_counter()
        results["models"][name] = bench_model(name, opts)
        results["models"][name]["runtime_s"] = time.perf_counter() - t0
        logging.info("%s done in %.0fs", name, results["models"][name]["runtime_s"])
    if device_counts and device_models:
        worker = dict(repeats=repeats, min_repeats=min_repeats, budget_s=budget_s, num_points=num_points,
                      chunk_size=chunk_size, max_contraction=max_contraction,
                      memory_fractions=[float(f) for f in memory_fractions], memory_models=list(memory_models))
        results["devices"] = device_scaling(device_models, [int(c) for c in device_counts], worker)
    env["load_avg_end"] = list(os.getloadavg())
    results["total_runtime_s"] = time.perf_counter() - start
    report = format_report(results)
    results["report"] = report
    print(report, flush=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=_json_default))
        logging.info("wrote %s", path)
    return results


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_list("models", list(DEFAULT_MODELS), "Networks to benchmark (experiments.models names).")
    flags.DEFINE_integer("repeats", 7, "Steady rounds per measurement (at most; see --budget_s).")
    flags.DEFINE_integer("min_repeats", 1, "Steady rounds per measurement (at least).")
    flags.DEFINE_float("budget_s", 45.0, "Stop repeating a measurement once another round would "
                       "take its steady time over this many seconds.")
    flags.DEFINE_integer("chunk_size", 32, "Points per chunk of the sensitivity pass.")
    flags.DEFINE_integer("num_points", 0, "|S| (0: the reference's sample_size formula).")
    flags.DEFINE_float("keep_ratio", 0.1, "Keep ratio of the keep-ratio search / prune calls.")
    flags.DEFINE_list("scaling_models", ["lenet300_100", "resnet20"], "Models whose SiPP pass is timed at 1/4..2x |S|.")
    flags.DEFINE_list("scaling_fractions", [str(f) for f in SCALING_FRACTIONS], "Multiples of |S| for [5].")
    flags.DEFINE_list("prune_models", ["lenet300_100"], "Models also timed with prune() end to end.")
    flags.DEFINE_list("pfp_models", ["lenet300_100", "resnet20"], "Models whose PFP keep-ratio search is timed: each "
                      "PFP select propagates channels with eager forwards (~1 min per select on ResNet56, 2 CPUs).")
    flags.DEFINE_list("methods", ["sipp", "pfp"], "Methods whose keep-ratio search is timed ([2]).")
    flags.DEFINE_list("fused_models", ["lenet300_100", "resnet20"], "Models whose pass is also timed fused into one "
                      "program ([1b]; compiles the whole net at once).")
    flags.DEFINE_list("device_counts", ["1", "2", "4"], "Forced host device counts of the data-parallel scaling "
                      "table [7] (one subprocess each; '' = skip).")
    flags.DEFINE_list("device_models", ["lenet300_100", "resnet20"], "Models of [7].")
    flags.DEFINE_list("memory_models", ["resnet20"], "Models of [8] (peak RSS vs |S|, in the first device worker).")
    flags.DEFINE_list("memory_fractions", ["0.5", "1", "2", "4"], "Multiples of |S| for [8].")
    flags.DEFINE_enum("max_contraction", "auto", ["auto", "unrolled", "carry", "reduce"],
                      "Strategy of the sensitivity (max, x) contraction (sensprune.sensitivity.MAX_CONTRACTION).")
    flags.DEFINE_string("json", "bench.json", "Where to write the results ('' = nowhere).")
    flags.DEFINE_bool("quick", False, "Smoke test: lenet300_100 only, 2 repeats, |S| = 16 in one chunk, SiPP search only, no prune() end to end.")


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    kwargs = dict(
        models=f.models, repeats=f.repeats, min_repeats=f.min_repeats, budget_s=f.budget_s,
        chunk_size=f.chunk_size, num_points=f.num_points, keep_ratio=f.keep_ratio,
        scaling_models=f.scaling_models, scaling_fractions=[float(x) for x in f.scaling_fractions],
        prune_models=f.prune_models, methods=f.methods, pfp_models=f.pfp_models, fused_models=f.fused_models,
        device_counts=[int(c) for c in f.device_counts], device_models=f.device_models,
        memory_models=f.memory_models, memory_fractions=[float(x) for x in f.memory_fractions],
        max_contraction=f.max_contraction,
    )
    if f.quick:
        kwargs.update(QUICK)
    run_benchmark(**kwargs, quick=f.quick, json_path=f.json or None)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
