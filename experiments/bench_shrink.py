"""Inference speed of shrunk (physically smaller) models vs the dense ones, next to the FLOP ratio.

    python -m experiments.bench_shrink [--quick] [--json=path] [--method=ft] [--batch=256]

For ResNet20 and VGG16 (CIFAR size, untrained weights: speed does not depend on
the values), each keep ratio is pruned with a filter method, shrunk with
:func:`sensprune.shrink`, and both networks are timed with ``jax.jit`` on the
default device: median wall time of ``repeats`` forward passes after a warm-up.
The FLOP ratio is ``dense FLOPs / pruned FLOPs`` (multiply-accumulates of the
Dense/Conv layers); the target is a speed-up of at least 0.8x the FLOP ratio.

A control follows (skip with ``--no_control``): each network built natively narrower (every width
times 0.75, 0.5, 0.25; no pruning, no interceptor), timed in the same round-robin as the dense and
shrunk nets. It shows how far the device turns fewer FLOPs
into less time when only channel counts change, which bounds what any shrinking can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import sensprune as sp
from experiments.models import get_model

FULL = {"resnet20": (0.5, 0.3, 0.15), "vgg16_bn": (0.5, 0.25, 0.1)}
QUICK = {"resnet20": (0.3,), "vgg16_bn": (0.25,)}


def _time_all(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall time of each function, timed round-robin so that drift hits all alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # compile + warm-up
        jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _narrow_kwargs(name: str, fraction: float) -> dict[str, Any]:
    """Zoo kwargs that scale every width of ``name`` (its default ``cfg`` or ``width``) by ``fraction``."""
    base = get_model(name, 10)
    if hasattr(base, "cfg"):  # VGG: a width per conv
        return {"cfg": tuple(v if v == "M" else max(1, round(v * fraction)) for v in base.cfg)}
    return {"width": max(1, round(base.width * fraction))}


def _narrow_net(name: str, fraction: float, x: np.ndarray) -> tuple[Callable[[], Any], int]:
    """A natively narrower zoo net (widths times ``fraction``): its timed forward and its FLOPs."""
    model = get_model(name, 10, **_narrow_kwargs(name, fraction))
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return (lambda: fn(variables, x)), sp.dense_flops(sp.find_layers(model, variables, x[:1], train=False))


def bench_model(
    name: str, keeps, *, method: str, batch: int, repeats: int, width_kwargs=None, round_to: int = 1,
    method_options=None, control_fractions=(),
) -> tuple[list[dict], list[dict]]:
    """Rows ``{model, keep_ratio, flop_ratio, dense_s, shrunk_s, speedup, ...}`` for one network, and
    control rows ``{model, fraction, flop_ratio, seconds, speedup, ...}``.

    The control is the same network built natively narrower (default widths times each of
    ``control_fractions``), with no pruning or
    shrinking: what XLA on this device makes of fewer FLOPs when nothing but the widths change (if a
    dense net with 4x fewer FLOPs is not 4x faster, a shrunk one cannot be either). Dense, shrunk and
    control nets are timed in one round-robin.
    """
    model = get_model(name, 10, **(width_kwargs or {}))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    dense_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    deps = sp.analyze_dependencies(model, variables, x[:1], train=False)
    dense_flops = sp.dense_flops(deps.layers)
    pruned = []
    for keep in keeps:
        res = sp.prune(
            model, variables, x[:16], method=method, keep_ratio=keep, key=jax.random.PRNGKey(0),
            apply_kwargs={"train": False}, chunk_size=16, method_options=method_options,
        )
        shrunk = sp.shrink(model, variables, res.masks, x=x[:2], deps=deps, train=False, round_to=round_to)
        pruned.append((res, shrunk))
    fns = [lambda: dense_fn(variables, x)]
    for _, shrunk in pruned:
        small_fn = jax.jit(lambda v, x, m=shrunk.model: m.apply(v, x, train=False))
        fns.append(lambda f=small_fn, v=shrunk.variables: f(v, x))
    narrow = [_narrow_net(name, fraction, x) for fraction in control_fractions]
    dense_s, *times = _time_all(fns + [fn for fn, _ in narrow], repeats)
    shrunk_times, control_times = times[: len(pruned)], times[len(pruned):]
    rows = []
    for (res, shrunk), shrunk_s in zip(pruned, shrunk_times):
        flop_ratio = res.flops_dense / max(res.flops, 1)
        # What the shrunk model really computes: channels of half-pruned groups stay, so it can be
        # more than the masked count.
        shrunk_flops = sum(
            int(np.prod(sp.paths.get_kernel(shrunk.params, layer).shape)) * layer.num_patches for layer in deps.layers
        )
        shrunk_flop_ratio = res.flops_dense / max(shrunk_flops, 1)
        speedup = dense_s / shrunk_s
        rows.append({
            "model": name, "method": method, "method_options": dict(method_options or {}), "keep_ratio": round(res.keep_ratio, 4), "batch": batch, "round_to": round_to,
            "params_dense": sp.count_params(variables["params"]), "params_shrunk": sp.count_params(shrunk.params),
            "flop_ratio": round(flop_ratio, 3), "shrunk_flop_ratio": round(shrunk_flop_ratio, 3), "dense_s": round(dense_s, 5), "shrunk_s": round(shrunk_s, 5),
            "speedup": round(speedup, 3), "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
        })
    controls = []
    for fraction, (_, flops), seconds in zip(control_fractions, narrow, control_times):
        ratio, speedup = dense_flops / flops, dense_s / seconds
        controls.append({"model": name, "fraction": fraction, "batch": batch, "flop_ratio": round(ratio, 3),
                         "seconds": round(seconds, 5), "speedup": round(speedup, 3),
                         "speedup_over_flop_ratio": round(speedup / ratio, 3)})
    return rows, controls


CONTROL_FRACTIONS = (0.75, 0.5, 0.25)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one keep ratio per model, small batch and widths")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--method", default="ft", help="filter method (ft, softnet, pfp, ...)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256, quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--models", default="resnet20,vgg16_bn", help="comma-separated subset of resnet20,vgg16_bn")
    parser.add_argument("--no_control", action="store_true", help="skip the natively narrower dense nets")
    parser.add_argument("--round_to", type=int, default=1, help="round kept channel counts up to a multiple (8: GPU)")
    parser.add_argument("--method_options", default="{}",
                        help='JSON options of the method, e.g. \'{"joint": "mean", "round_to": 8}\' for ft')
    args = parser.parse_args(argv)
    try:
        method_options = json.loads(args.method_options)
    except json.JSONDecodeError as err:
        parser.error(f"--method_options: not JSON ({err})")
    if not isinstance(method_options, dict):
        parser.error("--method_options: must be a JSON object")
    sp.registry.check_options(sp.get_method(args.method), method_options)
    batch = args.batch or (8 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)
    plan = QUICK if args.quick else FULL
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(plan))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(plan)}")
    plan = {name: plan[name] for name in names}
    widths = {"resnet20": {"width": 8}, "vgg16_bn": {"cfg": (8, "M", 16, "M", 16, "M", 32, "M", 32, "M")}} if args.quick else {}
    rows, controls = [], []
    print(f"{'model':10s} {'keep':>6s} {'params':>10s} {'FLOP x':>7s} {'shrunk FLOP x':>13s} {'dense ms':>9s} {'shrunk ms':>9s} "
          f"{'speed-up':>8s} {'/FLOP x':>7s}")
    for name, keeps in plan.items():
        control_fractions = () if args.quick or args.no_control else CONTROL_FRACTIONS
        model_rows, model_controls = bench_model(
            name, keeps, method=args.method, batch=batch, repeats=repeats, width_kwargs=widths.get(name),
            round_to=args.round_to, method_options=method_options, control_fractions=control_fractions,
        )
        for row in model_rows:
            rows.append(row)
            print(f"{row['model']:10s} {row['keep_ratio']:6.3f} {row['params_shrunk']:10d} {row['flop_ratio']:7.2f} {row['shrunk_flop_ratio']:13.2f} "
                  f"{1e3 * row['dense_s']:9.2f} {1e3 * row['shrunk_s']:9.2f} {row['speedup']:8.2f} "
                  f"{row['speedup_over_flop_ratio']:7.2f}", flush=True)
        controls += model_controls
    if controls:
        print(f"\ncontrol: dense nets built narrower (no pruning), timed with the rows above\n{'model':10s} {'widths':>6s} "
              f"{'FLOP x':>7s} {'ms':>9s} {'speed-up':>8s} {'/FLOP x':>7s}")
        for row in controls:
            print(f"{row['model']:10s} {row['fraction']:6.2f} {row['flop_ratio']:7.2f} {1e3 * row['seconds']:9.2f} "
                  f"{row['speedup']:8.2f} {row['speedup_over_flop_ratio']:7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"controls": controls, "device": f"{jax.devices()[0].platform} {jax.devices()[0].device_kind}",
                       "cpus": os.cpu_count(), "load_avg": list(os.getloadavg()), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
