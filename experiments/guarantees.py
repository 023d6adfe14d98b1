"""Empirical check of the sampling guarantees of SiPP-rand, SiPP-hybrid and PFP-rand.

  python -m experiments.guarantees [--networks=lenet300_100,lenet5] [--dataset=fashion_mnist]
      [--workdir=runs/studies]
  python -m experiments.guarantees --fast --dataset=mnist_embedded   # a minute (what CI checks)

For a trained net (trained here with ``configs/fashion/<net>.py``, resumable) and each method, keep
ratio and random key, the net is pruned with failure probability ``delta``. The methods promise, per
layer, a relative error bound epsilon for every output unit (SiPP: one per row and weight sign; PFP:
one for the layer): the unit's bias-free pre-activation computed from the positive (negative) weights
on nonnegative inputs is approximated within a factor (1 +- epsilon) with probability >= 1 - delta.
On held-out test points (not in S), with each layer fed its *unpruned* input (the guarantee is
layer-wise), we measure that relative error for every (point, output position, sign, unit) and report:
the promised epsilon (median over rows), the observed error distribution (median, 95th percentile,
max) and the fraction of checks within the promised bound, which must be >= 1 - delta. Units that PFP
removed because no later layer reads them (propagation) are not checked.

A second sweep varies |S|, the number of points the empirical sensitivities are taken over (the
reference's sample-size study): with too few points the sensitivities of held-out points exceed the
empirical ones and the bound fails more often; the |S| formula (``sensprune.sample_size``) is marked.

Trains (or restores) the nets in ``WORKDIR/nets/<net>`` (shared with ``experiments.sipp_ablation``)
and writes ``WORKDIR/guarantees/summary.md`` (tables and the acceptance verdict),
``WORKDIR/guarantees/guarantees.json`` (every row) and
``WORKDIR/guarantees/{bound_vs_observed,fraction_within,s_sweep}.{pdf,png}``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sensprune as sp  # noqa: E402
from experiments import pipeline  # noqa: E402
from experiments import results as results_lib  # noqa: E402
from experiments import rng as rng_lib  # noqa: E402
from experiments import train as train_lib  # noqa: E402
from sensprune import patches  # noqa: E402

METHODS = ("sipp_rand", "sipp_hybrid", "pfp_rand")
CONFIGS = {"lenet300_100": "configs.fashion.lenet300_100", "lenet5": "configs.fashion.lenet5"}
_TOL = 1e-6  # |z| below this is not a relative-error check; slack on the bound
PRNG_IMPL = "rbg"  # the studies' keys (explicit, no global config): quick to compile, as the main job


def make_key(seed: int) -> jax.Array:
    """A typed ``jax.random`` key of the studies' implementation."""
    return rng_lib.make_key(seed, PRNG_IMPL)


def nets_dir(workdir: Path) -> Path:
    """Where the studies' trained nets are checkpointed (shared by guarantees and sipp_ablation)."""
    return Path(workdir) / "nets"


@dataclasses.dataclass(frozen=True)
class Options:
    """What to sweep."""

    networks: tuple[str, ...] = ("lenet300_100", "lenet5")
    dataset: str = "fashion_mnist"
    methods: tuple[str, ...] = METHODS
    keep_ratios: tuple[float, ...] = (0.5, 0.3, 0.15, 0.08)
    delta: float = 0.1
    draws: int = 3
    held_out: int = 500
    s_sizes: tuple[int, ...] = (2, 8, 32, 128, 512)
    s_keep_ratio: float = 0.15
    s_methods: tuple[str, ...] = ("sipp_rand", "pfp_rand")
    fast: bool = False


FAST = dict(keep_ratios=(0.3,), draws=1, held_out=100, s_sizes=(4, 64), s_methods=("sipp_rand",))


# ----------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------
def layer_check(layer: sp.Layer, kernel: Any, kernel_hat: Any, inputs: Any, eps: Any) -> dict[str, Any]:
    """Relative errors of the sign-split pre-activations of one layer against its promised ``eps``.

    Args:
      layer: the layer; ``kernel``/``kernel_hat``: unpruned and pruned kernels.
      inputs: the layer's (unpruned) inputs on held-out points ``[B, *input_shape]``.
      eps: promised bound, a scalar or ``[2, out]`` (row = (weight sign, unit)).

    Returns:
      dict with the error quantiles, the fraction within the bound and the number of checks.
    """
    a = np.asarray(patches.input_patches(layer, jnp.asarray(inputs)), np.float64)
    a = a.reshape(-1, a.shape[-1])
    a = np.concatenate([np.maximum(a, 0.0), np.maximum(-a, 0.0)])  # nonnegative pseudo-points
    w = np.asarray(patches.kernel_matrix(layer, jnp.asarray(kernel)), np.float64)
    w_hat = np.asarray(patches.kernel_matrix(layer, jnp.asarray(kernel_hat)), np.float64)
    removed = ~(w_hat != 0).any(0) & (w != 0).any(0)  # output units nothing downstream reads (PFP)
    bound = np.broadcast_to(np.asarray(eps, np.float64), (2, w.shape[1]))
    rels, within = [], []
    for sign, part in enumerate((w > 0, w < 0)):
        z = a @ np.where(part, w, 0.0)
        z_hat = a @ np.where(part, w_hat, 0.0)
        live = (np.abs(z) > _TOL) & ~removed[None, :]
        rel = np.abs(z_hat - z)[live] / np.abs(z)[live]
        rels.append(rel)
        within.append(rel <= np.broadcast_to(bound[sign][None, :], z.shape)[live] + _TOL)
    rel, ok = np.concatenate(rels), np.concatenate(within)
    finite = bound[np.isfinite(bound)]
    q = (lambda p: float(np.quantile(rel, p))) if rel.size else (lambda p: float("nan"))
    return {
        "layer": layer.name,
        "eps_median": float(np.median(finite)) if finite.size else float("inf"),
        "eps_max": float(finite.max()) if finite.size else float("inf"),
        "err_median": q(0.5),
        "err_p95": q(0.95),
        "err_max": q(1.0),
        "fraction_within": float(ok.mean()) if ok.size else 1.0,
        "checks": int(ok.size),
        "removed_units": int(removed.sum()),
    }


def check_pruned(layers: Sequence[sp.Layer], variables: Mapping[str, Any], result: sp.PruneResult,
                 inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`layer_check` of every layer with a promised epsilon."""
    eps = result.info["epsilon"]
    rows = []
    for layer in layers:
        bound = eps[layer.name] if isinstance(eps, Mapping) else eps
        rows.append(layer_check(layer, sp.paths.get_kernel(variables["params"], layer),
                                sp.paths.get_kernel(result.params, layer), inputs[layer.name], bound))
    return rows


# ----------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------
def trained_net(network: str, opts: Options, nets: Path):
    """(exp, variables) of a net trained with the study's config (resumable, checkpointed)."""
    import importlib

    config = importlib.import_module(CONFIGS[network]).get_config()
    config.dataset.name = opts.dataset
    config.experiments.mode = "train"
    config.experiments.num_nets = 1
    if opts.fast:
        config.training.num_epochs = 2
        config.training.lr_milestones = ()
        config.training.max_steps_per_epoch = 40
    exp = pipeline.build(config, Path(nets) / network)
    exp.workdir.mkdir(parents=True, exist_ok=True)
    with results_lib.TensorBoardLogger(exp.workdir / "tensorboard", enabled=False) as tb:
        state = pipeline.train_net(exp, 0, tb)
    return exp, pipeline._variables(state)


def _accuracy(exp, variables) -> float:
    m = train_lib.evaluate(variables, exp.model, exp.dataset.test, None,
                           int(exp.config.eval_batch_size))
    return 100.0 * (1.0 - m["error"])


def _prune(exp, variables, s_x, *, method, keep, key, delta):
    return sp.prune(exp.model, variables, s_x, method=method, keep_ratio=keep, key=key, delta=delta,
                    c_constant=float(exp.config.coresets.c_constant), layers=exp.layers,
                    apply_kwargs={"train": False})


def run_network(network: str, opts: Options, nets: Path) -> list[dict[str, Any]]:
    """Both sweeps on one network; one row per (sweep, method, keep, |S|, draw, layer)."""
    exp, variables = trained_net(network, opts, nets)
    dense_acc = _accuracy(exp, variables)
    rng = np.random.default_rng(0)
    valid = exp.dataset.valid.x  # small (in-memory) datasets only
    formula = sp.sample_size(exp.layers, opts.delta, float(exp.config.coresets.c_constant))
    held = exp.dataset.test.x[: opts.held_out]
    inputs = {k: np.asarray(v) for k, v in sp.capture_inputs(exp.model, variables, held, train=False).items()}
    jobs = [("ratio", m, k, formula) for m in opts.methods for k in opts.keep_ratios]
    jobs += [("s_size", m, opts.s_keep_ratio, n) for m in opts.s_methods for n in sorted({*opts.s_sizes, formula})]
    rows = []
    for sweep, method, keep, size in tqdm(jobs, desc=f"guarantees {network}", unit="setting"):
        for draw in range(opts.draws):
            s_x = valid[rng.choice(len(valid), size=min(size, len(valid)), replace=False)]
            res = _prune(exp, variables, s_x, method=method, keep=keep, key=make_key(1000 * draw + size),
                         delta=opts.delta)
            acc = _accuracy(exp, {**variables, "params": res.params})
            for row in check_pruned(exp.layers, variables, res, inputs):
                rows.append({"network": network, "sweep": sweep, "method": method, "keep_ratio": keep,
                             "achieved_keep": res.keep_ratio, "s_size": int(size), "s_formula": int(formula),
                             "draw": draw, "delta": opts.delta, "accuracy": acc, "dense_accuracy": dense_acc,
                             **row})
    return rows


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def _group(rows, keys):
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def summary(rows: Sequence[Mapping[str, Any]], opts: Options) -> tuple[str, bool]:
    """Markdown tables and the verdict: every (net, method, keep, layer) within >= 1 - delta."""
    target = 1.0 - opts.delta
    ratio_rows = [r for r in rows if r["sweep"] == "ratio"]
    lines = [
        "# Sampling guarantees: promised vs. observed relative error",
        "",
        f"delta = {opts.delta:g} (target fraction within the bound >= {target:g}); "
        f"{opts.draws} random key(s) per setting; {opts.held_out} held-out test points; |S| from the formula.",
        "Regenerate: `python -m experiments.guarantees`.",
        "",
        "| net | method | keep | layer | promised eps (median / max) | observed error (median / p95 / max) "
        "| fraction within | checks | accuracy % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    passed = True
    for (net, method, keep, layer), group in _group(ratio_rows, ("network", "method", "keep_ratio", "layer")).items():
        frac = min(g["fraction_within"] for g in group)
        passed &= frac >= target
        mean = lambda k: float(np.mean([g[k] for g in group]))  # noqa: E731
        lines.append(
            f"| {net} | `{method}` | {keep:g} | {layer} | {mean('eps_median'):.3g} / {mean('eps_max'):.3g} "
            f"| {mean('err_median'):.3g} / {mean('err_p95'):.3g} / {max(g['err_max'] for g in group):.3g} "
            f"| {frac:.4f}{'' if frac >= target else ' **below**'} | {sum(g['checks'] for g in group)} "
            f"| {mean('accuracy'):.2f} |"
        )
    lines += [
        "",
        f"**Verdict:** the smallest fraction within the bound over all settings is "
        f"{min((r['fraction_within'] for r in ratio_rows), default=float('nan')):.4f}; target >= {target:g}: "
        f"{'met' if passed else 'NOT met'}.",
        "",
        "## |S| sweep (keep ratio %g)" % opts.s_keep_ratio,
        "",
        "| net | method | |S| | fraction within (min over layers) | observed p95 error (max over layers) "
        "| accuracy % |",
        "|---|---|---|---|---|---|",
    ]
    s_rows = [r for r in rows if r["sweep"] == "s_size"]
    for (net, method, size), group in _group(s_rows, ("network", "method", "s_size")).items():
        mark = " (formula)" if size == group[0]["s_formula"] else ""
        lines.append(
            f"| {net} | `{method}` | {size}{mark} | {min(g['fraction_within'] for g in group):.4f} "
            f"| {max(g['err_p95'] for g in group):.3g} | {np.mean([g['accuracy'] for g in group]):.2f} |"
        )
    return "\n".join(lines) + "\n", passed


def plots(rows: Sequence[Mapping[str, Any]], opts: Options, out: Path) -> None:
    """bound_vs_observed, fraction_within and s_sweep figures (PDF + PNG)."""
    ratio_rows = [r for r in rows if r["sweep"] == "ratio"]
    nets = sorted({r["network"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in ratio_rows))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))

    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for m in methods:
            sel = [r for r in ratio_rows if r["network"] == net and r["method"] == m and np.isfinite(r["eps_median"])]
            if not sel:
                continue
            x = [r["eps_median"] for r in sel]
            ax.scatter(x, [r["err_p95"] for r in sel], s=14, color=colors[m], label=f"{m} (p95)")
            ax.scatter(x, [r["err_median"] for r in sel], s=14, color=colors[m], marker="x", alpha=0.6)
        lim = ax.get_xlim()
        ax.plot([1e-4, 1e3], [1e-4, 1e3], "k--", linewidth=1, label="observed = promised")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(max(lim[0], 1e-4), lim[1])
        _finish(ax, "promised epsilon (median over rows, per layer)", "observed relative error (x: median, o: p95)",
                net)
    _save(fig, out / "bound_vs_observed")

    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.0), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for m in methods:
            by_keep = _group([r for r in ratio_rows if r["network"] == net and r["method"] == m], ("keep_ratio",))
            ks = sorted(k[0] for k in by_keep)
            ax.plot([100 * (1 - k) for k in ks], [min(g["fraction_within"] for g in by_keep[(k,)]) for k in ks],
                    marker="o", color=colors[m], label=m)
        ax.axhline(1 - opts.delta, color="black", linestyle="--", linewidth=1, label="1 - delta")
        ax.set_ylim(min(0.8, 1 - 2 * opts.delta), 1.005)
        _finish(ax, "pruned parameters (%)", "fraction within bound (min over layers, keys)", net)
    _save(fig, out / "fraction_within")

    s_rows = [r for r in rows if r["sweep"] == "s_size"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for net, ls in zip(nets, ("-", ":", "--")):
        for m in dict.fromkeys(r["method"] for r in s_rows):
            by = _group([r for r in s_rows if r["network"] == net and r["method"] == m], ("s_size",))
            sizes = sorted(k[0] for k in by)
            c = colors.get(m, "gray")
            axes[0].plot(sizes, [min(g["fraction_within"] for g in by[(s,)]) for s in sizes], ls, marker="o",
                         color=c, label=f"{net} {m}")
            axes[1].plot(sizes, [np.mean([g["accuracy"] for g in by[(s,)]]) for s in sizes], ls, marker="o",
                         color=c, label=f"{net} {m}")
    axes[0].axhline(1 - opts.delta, color="black", linestyle="--", linewidth=1, label="1 - delta")
    for ax, label in zip(axes, ("fraction within bound (min over layers)", "test accuracy, prune-only (%)")):
        ax.set_xscale("log")
        _finish(ax, "|S| (points of the sensitivity set)", label)
    _save(fig, out / "s_sweep")


def _finish(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _save(fig, stem: Path) -> None:
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".pdf"))
    fig.savefig(stem.with_suffix(".png"), dpi=130)
    plt.close(fig)


def run(opts: Options, workdir: Path) -> tuple[Path, bool]:
    """Runs every network's sweeps and writes the report into ``workdir/guarantees/``; returns
    (summary path, verdict)."""
    if opts.fast:
        opts = dataclasses.replace(opts, **FAST)
    unknown = [n for n in opts.networks if n not in CONFIGS]
    if unknown:
        raise ValueError(f"--networks has {unknown}; allowed: {', '.join(CONFIGS)}")
    out = Path(workdir) / "guarantees"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for network in opts.networks:
        logging.info("guarantee sweeps on %s", network)
        rows += run_network(network, opts, nets_dir(workdir))
    (out / "guarantees.json").write_text(json.dumps(rows, indent=1))
    text, passed = summary(rows, opts)
    (out / "summary.md").write_text(text)
    plots(rows, opts, out)
    return out / "summary.md", passed


FLAGS = flags.FLAGS


def _define_flags() -> None:
    d = Options()
    flags.DEFINE_list("networks", list(d.networks), f"any of {', '.join(CONFIGS)}")
    flags.DEFINE_string("dataset", d.dataset, "data source (see experiments/data/sources.py), e.g. mnist_embedded")
    flags.DEFINE_list("methods", list(d.methods), "sampling methods with a promised epsilon")
    flags.DEFINE_list("keep_ratios", [str(k) for k in d.keep_ratios], "keep ratios of the main sweep")
    flags.DEFINE_float("delta", d.delta, "failure probability")
    flags.DEFINE_integer("draws", d.draws, "random keys per setting")
    flags.DEFINE_integer("held_out", d.held_out, "held-out test points checked")
    flags.DEFINE_list("s_sizes", [str(s) for s in d.s_sizes], "|S| values of the sample-size sweep")
    flags.DEFINE_bool("fast", False, "tiny sweep (CI)")
    flags.DEFINE_string("workdir", "runs/studies", "trained nets go to WORKDIR/nets (resumable), the report "
                        "to WORKDIR/guarantees")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = Options(
        networks=tuple(FLAGS.networks), dataset=FLAGS.dataset, methods=tuple(FLAGS.methods),
        keep_ratios=tuple(float(k) for k in FLAGS.keep_ratios), delta=FLAGS.delta, draws=FLAGS.draws,
        held_out=FLAGS.held_out, s_sizes=tuple(int(s) for s in FLAGS.s_sizes), fast=FLAGS.fast,
    )
    path, passed = run(opts, Path(FLAGS.workdir))
    print(path.read_text())
    print(f"written: {path.parent} ({'all within 1 - delta' if passed else 'some settings below 1 - delta'})")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
