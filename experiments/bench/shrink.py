"""Inference speed of shrunk (physically smaller) models vs the dense ones, next to the FLOP ratio.

For ResNet20 and VGG16 (CIFAR size) and the ViT of the zoo (28x28x1), with
untrained weights (speed does not depend on the values), each keep ratio is
pruned with a filter method, shrunk with ``sp.shrink``, and the dense and
shrunk forwards (``jax.jit``) are timed in the same interleaved rounds. FLOP
ratio = dense FLOPs / pruned FLOPs (multiply-accumulates of every Dense/Conv/
DenseGeneral layer, those the method left dense included); target: a speed-up
of at least 0.8x the FLOP ratio. The ViT shrinks its MLP units and the
attention heads filter methods remove (heads are channel groups).

A control (``control_fractions``): each network built natively narrower
(every width times 0.75, 0.5, 0.25; no pruning), timed in the same rounds.
It shows how far the device turns fewer FLOPs into less time when only
channel counts change, which bounds what any shrinking can reach (for the ViT:
narrower MLPs, what filter pruning removes there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

import sensprune as sp
from experiments.bench import timing

# vit_tiny: filter methods reach about 0.51 while attention stays dense (MLP units only).
KEEP_RATIOS = {"resnet20": (0.5, 0.3, 0.15), "vgg16_bn": (0.5, 0.25, 0.1), "vit_tiny": (0.8, 0.65, 0.55)}
QUICK_KEEP_RATIOS = {"resnet20": (0.3,), "vgg16_bn": (0.25,), "vit_tiny": (0.7,)}
QUICK_WIDTHS = {"resnet20": {"width": 8}, "vgg16_bn": {"cfg": (8, "M", 16, "M", 16, "M", 32, "M", 32, "M")},
                "vit_tiny": {"hidden_size": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}}
CONTROL_FRACTIONS = (0.75, 0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class ShrinkConfig:
    """Options of the shrink benchmark."""

    method: str = "ft"
    batch: int = 256
    round_to: int = 1
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    control_fractions: tuple[float, ...] = CONTROL_FRACTIONS
    width_kwargs: Optional[Mapping[str, Any]] = None  # narrower zoo nets (smoke tests)


def narrow_kwargs(name: str, fraction: float) -> dict[str, Any]:
    """Zoo kwargs that scale every width of ``name`` (its ``cfg`` or ``width``) by ``fraction``."""
    from experiments.models import get_model

    base = get_model(name, 10)
    if hasattr(base, "mlp_dim"):  # ViT: the MLP widths (what filter methods remove while heads stay)
        return {"mlp_dim": max(1, round(base.mlp_dim * fraction))}
    if hasattr(base, "cfg"):  # VGG: a width per conv (a zoo model attribute, not a sensprune internal)
        return {"cfg": tuple(v if v == "M" else max(1, round(v * fraction)) for v in base.cfg)}
    return {"width": max(1, round(base.width * fraction))}


def narrow_net(name: str, fraction: float, x: np.ndarray) -> tuple[Callable[[], Any], int]:
    """A natively narrower zoo net: its timed forward and its FLOPs."""
    from experiments.models import get_model

    model = get_model(name, 10, **narrow_kwargs(name, fraction))
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return (lambda: fn(variables, x)), sp.dense_flops(sp.find_layers(model, variables, x[:1], train=False))


def shrunk_flops(shrunk: Any, layers: Any) -> int:
    """What the shrunk model computes (half-pruned groups keep their channels; ``layers``: all of them)."""
    return sum(int(np.prod(sp.paths.get_kernel(shrunk.params, layer).shape)) * layer.num_patches for layer in layers)


def bench_model(name: str, keeps: tuple[float, ...], cfg: ShrinkConfig,
                budget: timing.Budget) -> tuple[list[dict], list[dict]]:
    """Rows (one per keep ratio) and control rows of one network, timed in one set of rounds."""
    from experiments.models import get_model, input_shape

    model = get_model(name, 10, **dict(cfg.width_kwargs or {}))
    x = np.random.default_rng(0).standard_normal((cfg.batch, *input_shape(name))).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    dense = jax.jit(lambda v, x: model.apply(v, x, train=False))
    layers = sp.find_layers(model, variables, x[:1], train=False)
    deps = None
    cases = {"dense": timing.Case(lambda: dense(variables, x))}
    pruned = {}
    for keep in keeps:
        res = sp.prune(model, variables, x[:16], method=cfg.method, keep_ratio=keep, key=jax.random.PRNGKey(0),
                       apply_kwargs={"train": False}, chunk_size=16, method_options=dict(cfg.method_options) or None)
        if deps is None:  # the channel groups (attention heads included), once for every keep ratio
            deps = sp.analyze_dependencies(model, variables, x[:1], train=False)
        shrunk = sp.shrink(model, variables, res.masks, x=x[:2], deps=deps, train=False, round_to=cfg.round_to)
        fn = jax.jit(lambda v, x, m=shrunk.model: m.apply(v, x, train=False))
        cases[f"keep_{keep}"] = timing.Case(lambda f=fn, v=shrunk.variables: f(v, x))
        pruned[keep] = (res, shrunk)
    narrow = {}
    for fraction in cfg.control_fractions:
        fn, flops = narrow_net(name, fraction, x)
        cases[f"narrow_{fraction}"] = timing.Case(fn)
        narrow[fraction] = flops
    times, _ = timing.measure(cases, budget)
    dense_s = times["dense"]["median_s"]
    rows = []
    dense_flops = sp.dense_flops(layers)
    for keep, (res, shrunk) in pruned.items():
        flop_ratio = dense_flops / max(sp.flops(res.params, layers), 1)
        shrunk_s = times[f"keep_{keep}"]["median_s"]
        rows.append({
            "model": name, "method": cfg.method, "method_options": dict(cfg.method_options),
            "keep_ratio": round(res.keep_ratio, 4), "batch": cfg.batch, "round_to": cfg.round_to,
            "params_dense": sp.count_params(variables["params"]), "params_shrunk": sp.count_params(shrunk.params),
            "flop_ratio": round(flop_ratio, 3),
            "shrunk_flop_ratio": round(dense_flops / max(shrunk_flops(shrunk, layers), 1), 3),
            "dense_s": dense_s, "shrunk_s": shrunk_s, "speedup": dense_s / shrunk_s,
            "speedup_over_flop_ratio": dense_s / shrunk_s / flop_ratio, "repeats": times["dense"]["repeats"],
        })
    controls = [
        {"model": name, "fraction": fraction, "batch": cfg.batch, "flop_ratio": round(dense_flops / flops, 3),
         "seconds": times[f"narrow_{fraction}"]["median_s"],
         "speedup": dense_s / times[f"narrow_{fraction}"]["median_s"],
         "speedup_over_flop_ratio": dense_s / times[f"narrow_{fraction}"]["median_s"] / (dense_flops / flops)}
        for fraction, flops in narrow.items()
    ]
    return rows, controls


def run(names: tuple[str, ...], cfg: ShrinkConfig, budget: timing.Budget, quick: bool = False) -> dict[str, Any]:
    """Rows and controls of every network in ``names`` (``quick``: one keep ratio, narrow nets, no control)."""
    plan = QUICK_KEEP_RATIOS if quick else KEEP_RATIOS
    unknown = sorted(set(names) - set(plan))
    if unknown:
        raise ValueError(f"shrink models: unknown {unknown}; allowed: {', '.join(plan)}")
    sp.registry.check_options(sp.get_method(cfg.method), dict(cfg.method_options))
    rows, controls = [], []
    for name in names:
        model_cfg = dataclasses.replace(cfg, width_kwargs=QUICK_WIDTHS[name], control_fractions=()) if quick else cfg
        model_rows, model_controls = bench_model(name, plan[name], model_cfg, budget)
        rows += model_rows
        controls += model_controls
    return {"rows": rows, "controls": controls}
