"""Why prune-only SiPP loses to weight magnitude on LeNet300-100: an ablation.

  python -m experiments.sipp_ablation [--dataset=fashion_mnist] [--keep_ratio=0.1]
      [--workdir=runs/studies]
  python -m experiments.sipp_ablation --fast --dataset=mnist_embedded   # CI

Deterministic SiPP differs from WT (|w|) in two ways, and this separates them on a trained net,
without retraining:

1. the **score** inside a unit: the largest relative share max_x w_ij a_j(x) / z_i(x) of the
   same-sign pre-activation over S, instead of |w_ij|;
2. the **allocation**: one global top-B over those shares, which are normalised per unit, so
   every unit keeps about the same number of weights whatever its size, while WT's global top-B
   of |w| gives big units many weights and removes small ones.

Each row of the table ranks weights by one score and then keeps (a) the per-unit counts WT
chose, (b) the per-layer counts WT chose (ranking across the layer's units by the score), or
(c) the method's own global choice. Scores: SiPP's (max share), the mean share over S (what
the max over S costs), |w| * mean |a| (a data-informed magnitude) and |w|. The shares are
recomputed here with NumPy from the captured layer inputs, sign split included, and checked
against ``sensprune.compute_sensitivities``. A second check replaces the first layer's
normalised pixels by raw, nonnegative ones (the normalisation is affine, so the sign split
of background pixels is the only difference).

Trains (or restores) the net in ``WORKDIR/nets/lenet300_100`` (shared with ``experiments.guarantees``)
and writes ``WORKDIR/sipp_ablation/summary.md`` and ``WORKDIR/sipp_ablation/ablation.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

import sensprune as sp
from experiments import guarantees
from sensprune import paths

Scores = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Options:
    """What to compare."""

    dataset: str = "fashion_mnist"
    keep_ratio: float = 0.1
    num_points: int = 128
    seed: int = 0
    fast: bool = False


def relative_shares(inputs: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per point, each weight's share of its unit's same-sign, bias-free pre-activation.

    ``inputs`` [N, in], ``kernel`` [in, out]; returns [N', in, out] with N' = 2N when some input
    is negative (each point split into its positive and negative parts, as SiPP does). A share
    is 0 where the unit's same-sign pre-activation vanishes.
    """
    x = np.asarray(inputs, np.float64)
    if (x < 0).any():
        x = np.concatenate([np.maximum(x, 0.0), np.maximum(-x, 0.0)])
    w = np.asarray(kernel, np.float64)
    out = np.zeros((len(x), *w.shape))
    for sign in (1.0, -1.0):
        part = np.where(np.sign(w) == sign, w, 0.0)
        z = x @ part
        z = np.where(np.abs(z) <= np.finfo(np.float32).eps, np.inf, z)
        out += x[:, :, None] * part[None] / z[:, None, :]
    return out


def keep_top(score: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` largest entries of ``score`` (ties: first index)."""
    mask = np.zeros(score.size, bool)
    mask[np.argsort(-score.reshape(-1), kind="stable")[: int(count)]] = True
    return mask.reshape(score.shape)


def keep_top_per_unit(score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mask keeping, in every column (unit) j of ``score`` [in, out], its ``counts[j]`` largest entries."""
    order = np.argsort(-score, axis=0, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(score.shape[0])[:, None].repeat(score.shape[1], 1), axis=0)
    return ranks < np.asarray(counts)[None, :]


def _masked_params(params: Any, layers: Sequence[sp.Layer], masks: Mapping[str, np.ndarray]) -> Any:
    for layer in layers:
        kernel = np.asarray(paths.get_kernel(params, layer))
        params = paths.set_kernel(params, layer, kernel * masks[layer.name])
    return params


def ablation(exp: Any, variables: Mapping[str, Any], opts: Options) -> dict[str, Any]:
    """Accuracies of every (score, allocation) pair; see the module docstring."""
    layers = list(exp.layers)
    if any(layer.kind != "dense" for layer in layers):
        raise ValueError("sipp_ablation: the NumPy shares cover Dense layers only (use lenet300_100)")
    params = variables["params"]
    rng = np.random.default_rng(opts.seed)
    s_x = exp.dataset.valid.x[rng.choice(len(exp.dataset.valid), opts.num_points, replace=False)]

    def accuracy(p: Any) -> float:
        return guarantees._accuracy(exp, {**variables, "params": p})

    def prune(method: str) -> sp.PruneResult:
        return sp.prune(exp.model, variables, s_x, method=method, keep_ratio=opts.keep_ratio,
                        key=guarantees.make_key(opts.seed), layers=exp.layers, apply_kwargs={"train": False},
                        zero_dead=False)  # the plain selections the NumPy allocations are compared with

    own = {m: prune(m) for m in ("sipp", "wt")}
    kernels = {layer.name: np.asarray(paths.get_kernel(params, layer)) for layer in layers}
    inputs = {k: np.asarray(v).reshape(len(s_x), -1)
              for k, v in sp.capture_inputs(exp.model, variables, s_x, train=False).items()}
    shares = {name: relative_shares(inputs[name], kernels[name]) for name in kernels}
    sens = sp.compute_sensitivities(exp.model, variables, s_x, reduction="mean", layers=exp.layers, train=False)
    kernel_gap = max(float(np.max(np.abs(shares[n].max(0) - np.asarray(sens[n].weight)))) for n in kernels)
    scores: dict[str, Scores] = {
        "SiPP: max share over S": {n: s.max(0) for n, s in shares.items()},
        "mean share over S": {n: s.mean(0) for n, s in shares.items()},
        "|w| * mean |a|": {n: np.abs(kernels[n]) * np.abs(inputs[n]).mean(0)[:, None] for n in kernels},
        "WT: |w|": {n: np.abs(k) for n, k in kernels.items()},
    }
    # Weights kept per unit (column) of every layer, by each method's own choice.
    units = {
        m: {layer.name: (np.asarray(paths.get_kernel(own[m].params, layer)) != 0).sum(0) for layer in layers}
        for m in own
    }
    wt_layers = {layer.name: int(own["wt"].layer_kept[layer.name]) for layer in layers}
    allocations: dict[str, Callable[[str, np.ndarray], np.ndarray]] = {
        "WT's per-unit counts": lambda n, s: keep_top_per_unit(s, units["wt"][n]),
        "WT's per-layer counts": lambda n, s: keep_top(s, wt_layers[n]),
    }

    def kept_accuracy(score: Scores, allocation: str) -> float:
        alloc = allocations[allocation]
        return accuracy(_masked_params(params, layers, {n: alloc(n, s) for n, s in score.items()}))

    rows = [{"score": name, **{a: kept_accuracy(score, a) for a in allocations}} for name, score in scores.items()]
    rows[0]["own global top-B"] = accuracy(own["sipp"].params)
    rows[-1]["own global top-B"] = accuracy(own["wt"].params)
    # One layer at a time: SiPP's shares in layer l, |w| elsewhere (WT's per-layer counts).
    swaps = {
        layer.name: kept_accuracy({**scores["WT: |w|"], layer.name: scores["SiPP: max share over S"][layer.name]},
                                  "WT's per-layer counts")
        for layer in layers
    }
    # First layer on raw (nonnegative) pixels: shift the normalised inputs so the background is 0.
    first = layers[0].name
    raw = relative_shares(inputs[first] - inputs[first].min(), kernels[first]).max(0)
    raw_acc = kept_accuracy({**scores["WT: |w|"], first: raw}, "WT's per-layer counts")
    return {
        "dense_accuracy": accuracy(params), "keep_ratio": opts.keep_ratio, "num_points": len(s_x),
        "dataset": opts.dataset, "kernel_max_abs_diff": kernel_gap, "rows": rows,
        "sipp_in_one_layer": swaps, "raw_pixel_first_layer": raw_acc,
        "layer_kept": {m: dict(own[m].layer_kept) for m in own},
        "units_kept": {m: {n: [int(c.min()), float(np.median(c)), int(c.max()), int((c == 0).sum()), len(c)]
                           for n, c in u.items()} for m, u in units.items()},
    }


def summary(result: Mapping[str, Any]) -> str:
    """Markdown report of :func:`ablation`."""
    cols = ["WT's per-unit counts", "WT's per-layer counts", "own global top-B"]
    lines = [
        f"# Prune-only SiPP vs WT on LeNet300-100 ({result['dataset']}): ablation",
        "",
        f"Keep ratio {result['keep_ratio']} (90 % of parameters pruned), no retraining, |S| = "
        f"{result['num_points']}, dense accuracy {result['dense_accuracy']:.2f} %. Command: "
        "`python -m experiments.sipp_ablation`.",
        "",
        f"NumPy shares vs. `sensprune.compute_sensitivities`: max abs difference {result['kernel_max_abs_diff']:.1e}.",
        "",
        "Test accuracy (%) when weights are ranked by a score and kept with a given allocation:",
        "",
        "| score | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in result["rows"]:
        lines.append(f"| {row['score'].replace('|', chr(92) + '|')} | " + " | ".join(
            f"{row[c]:.2f}" if c in row else "-" for c in cols) + " |")
    lines += ["", "SiPP's shares in one layer only, |w| in the others (WT's per-layer counts):", "",
              "| layer | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.2f} |" for name, acc in result["sipp_in_one_layer"].items()]
    lines += ["", f"SiPP's shares of the first layer on raw, nonnegative pixels (|w| elsewhere, WT's per-layer "
              f"counts): {result['raw_pixel_first_layer']:.2f} % (normalised pixels: "
              f"{next(iter(result['sipp_in_one_layer'].values())):.2f} %).", "",
              "Weights kept per unit (min / median / max, units with none / units):", "",
              "| method | " + " | ".join(result["units_kept"]["sipp"]) + " |",
              "|---|" + "---|" * len(result["units_kept"]["sipp"])]
    for method, per_layer in result["units_kept"].items():
        lines.append(f"| {method} | " + " | ".join(
            f"{c[0]} / {c[1]:g} / {c[2]} ({c[3]} / {c[4]})" for c in per_layer.values()) + " |")
    return "\n".join(lines) + "\n"


def run(opts: Options, workdir: Path) -> Path:
    """Trains (or restores) the net, runs the ablation, writes the report into ``workdir/sipp_ablation/``;
    returns its path."""
    exp, variables = guarantees.trained_net(
        "lenet300_100", guarantees.Options(dataset=opts.dataset, fast=opts.fast), guarantees.nets_dir(workdir))
    result = ablation(exp, variables, opts)
    out = Path(workdir) / "sipp_ablation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    path = out / "summary.md"
    path.write_text(summary(result))
    return path


FLAGS = flags.FLAGS


def _define_flags() -> None:
    d = Options()
    flags.DEFINE_string("dataset", d.dataset, "data source (see experiments/data/sources.py), e.g. mnist_embedded")
    flags.DEFINE_float("keep_ratio", d.keep_ratio, "keep ratio, in (0, 1)")
    flags.DEFINE_integer("num_points", d.num_points, "|S|")
    flags.DEFINE_bool("fast", False, "a briefly trained net (CI)")
    flags.DEFINE_string("workdir", "runs/studies", "the trained net goes to WORKDIR/nets (shared with "
                        "guarantees, resumable), the report to WORKDIR/sipp_ablation")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0.0 < FLAGS.keep_ratio < 1.0:
        raise app.UsageError(f"--keep_ratio={FLAGS.keep_ratio}: expected a value in (0, 1)")
    opts = Options(dataset=FLAGS.dataset, keep_ratio=FLAGS.keep_ratio, num_points=FLAGS.num_points, fast=FLAGS.fast)
    path = run(opts, Path(FLAGS.workdir))
    logging.info("wrote %s", path)
    print(path.read_text())


if __name__ == "__main__":
    _define_flags()
    app.run(main)
