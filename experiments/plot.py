"""PDF plots and the markdown report of an experiment's results.

CLI: ``python -m experiments.plot --workdir=DIR`` reads ``DIR/results.npz``,
regenerates the run's own plots in ``DIR/plots/`` (same file names as the run
wrote), the report ``DIR/report.md`` and prints the report. Partially filled
results (NaN entries) are fine.

Methods are drawn in colour groups by family (SiPP blues, PFP reds, weight
baselines greens, filter baselines purples, low rank orange), each member of a
family with its own marker; legends sit beside the axes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.results import Results  # noqa: E402

ALLOWED_DROPS = (0.0, 0.5, 1.0, 2.0, 5.0)
TABLE_HEADER = (
    "| Method | Target keep ratio | Top-1 acc. (%) | Top-5 acc. (%) | Pruned params (%) "
    "| Pruned FLOPs (%) | Runs |"
)
DASH = "—"

# metric key -> (file stem, y label, transform from stored value)
_METRICS = {
    "acc": ("error", "Test top-1 accuracy (%)", lambda e: 100.0 * (1.0 - e)),
    "acc5": ("error5", "Test top-5 accuracy (%)", lambda e: 100.0 * (1.0 - e)),
    "loss": ("loss", "Test loss", lambda v: v),
}
_AXES = {"param": ("sizes", "Pruned parameters (%)"), "flops": ("flops", "Pruned FLOPs (%)")}


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------
def _nanreduce(fn, x: np.ndarray, axis) -> np.ndarray:
    """``fn`` over ``axis`` without 'all-NaN slice' warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return fn(x, axis=axis)


def _per_net(values: np.ndarray) -> np.ndarray:
    """[nets, ratios, reps, methods] -> [nets, ratios, methods] mean over reps."""
    return _nanreduce(np.nanmean, values, axis=2)


def curve(results: Results, values: np.ndarray, x_key: str, method: int):
    """(x, mean, lo, hi) over keep ratios for one method; NaN-free rows only.

    x is the mean achieved pruned % (``100 * (1 - kept)``); mean/lo/hi are the
    mean, min and max of ``values`` over nets and repetitions.
    """
    y = values[..., method]
    x = 100.0 * (1.0 - getattr(results, x_key)[..., method])
    flat_y = y.transpose(1, 0, 2).reshape(y.shape[1], -1)
    flat_x = x.transpose(1, 0, 2).reshape(x.shape[1], -1)
    mean = _nanreduce(np.nanmean, flat_y, axis=1)
    lo = _nanreduce(np.nanmin, flat_y, axis=1)
    hi = _nanreduce(np.nanmax, flat_y, axis=1)
    xm = _nanreduce(np.nanmean, flat_x, axis=1)
    ok = np.isfinite(mean) & np.isfinite(xm)
    order = np.argsort(xm[ok])
    return xm[ok][order], mean[ok][order], lo[ok][order], hi[ok][order]


def _dense_value(results: Results, key: str) -> float:
    """Mean over nets of the unpruned net's ``key`` (NaN if unknown)."""
    values = results.dense[key]
    return float(_nanreduce(np.nanmean, values, axis=0)) if np.isfinite(values).any() else math.nan


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------
def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# Method families: one colour map each (shades tell members apart), markers differ within a family.
FAMILIES = (
    ("SiPP", "Blues", ("sipp", "sipp_rand", "sipp_hybrid")),
    ("PFP", "Reds", ("pfp", "pfp_rand", "pfp_top")),
    ("weight baselines", "Greens", ("wt", "snip", "uniform", "random")),
    ("filter baselines", "Purples", ("ft", "softnet", "thinet", "norm_l1", "norm_l2", "norm_l1l2",
                                     "uniform_filters")),
    ("low rank", "Oranges", ("svd",)),
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def family(method: str) -> str:
    """The family a method is plotted in (by name; unknown names: by prefix, else 'other')."""
    for name, _, members in FAMILIES:
        if method in members:
            return name
    for name, _, members in FAMILIES:
        if any(method.startswith(m.split("_")[0]) for m in members[:1]):
            return name
    return "other"


def method_styles(methods: Sequence[str]) -> dict[str, tuple]:
    """method -> (colour, marker): families in colour groups (shades of one map), a distinct
    marker for each member of a family."""
    cmaps = {name: cmap for name, cmap, _ in FAMILIES}
    groups: dict[str, list[str]] = {}
    for m in methods:
        groups.setdefault(family(m), []).append(m)
    styles = {}
    for fam, members in groups.items():
        cmap = plt.get_cmap(cmaps.get(fam, "Greys"))
        n = len(members)
        for k, m in enumerate(members):
            shade = 0.65 if n == 1 else 0.95 - 0.5 * k / (n - 1)  # dark to light, never near-white
            styles[m] = (cmap(shade), _MARKERS[k % len(_MARKERS)])
    return styles


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


def _metric_figure(results: Results, metric: str, axis: str, tag: str):
    stored, ylabel, transform = _METRICS[metric]
    x_key, xlabel = _AXES[axis]
    values = transform(getattr(results, stored))
    many = len(results.methods) > 6
    fig, ax = plt.subplots(figsize=(8.2 if many else 7.4, 4.6))
    any_data = False
    styles = method_styles(results.methods)
    for m, name in enumerate(results.methods):
        color, marker = styles[name]
        x, mean, lo, hi = curve(results, values, x_key, m)
        if x.size == 0:
            continue
        any_data = True
        ax.plot(x, mean, marker=marker, markersize=4.5, color=color, label=name, linewidth=1.3,
                markeredgecolor="black", markeredgewidth=0.3)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
    dense = _dense_value(results, stored)
    if np.isfinite(dense):
        ax.axhline(transform(dense), color="black", linestyle="--", linewidth=1, label="Unpruned")
        any_data = True
    if not any_data:
        _no_data(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(tag)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: never over the curves
        ax.legend(fontsize="x-small" if many else "small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, ncol=2 if len(results.methods) > 14 else 1)
    fig.tight_layout()
    return fig


def _layer_fractions(results: Results) -> np.ndarray:
    """Kept % per layer, mean over nets and reps: [ratios, methods, layers]."""
    total = np.where(results.layer_total > 0, results.layer_total, np.nan)
    kept = 100.0 * results.layer_kept / total
    return _nanreduce(np.nanmean, kept, axis=(0, 2))


def _budget_ratios(results: Results, count: int | None = None) -> list[int]:
    """Ratio indices that have per-layer data (every one; up to ``count`` evenly spread if given)."""
    have = np.flatnonzero(np.isfinite(_layer_fractions(results)).any(axis=(1, 2)))
    if count is None or have.size <= count:
        return have.tolist()
    picks = np.linspace(0, have.size - 1, count).round().astype(int)
    return have[np.unique(picks)].tolist()


def _layer_budget_figure(results: Results, tag: str, ratio_indices: Sequence[int] | None):
    frac = _layer_fractions(results)
    indices = list(_budget_ratios(results) if ratio_indices is None else ratio_indices)
    num_layers = max(results.num_layers, 1)
    ncols = min(2, max(len(indices), 1))
    nrows = max(1, math.ceil(len(indices) / ncols))
    width = max(6.0, (0.35 + 0.04 * len(results.methods)) * num_layers * ncols + 2.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.2 * nrows + 0.6), squeeze=False)
    if not indices:
        _no_data(axes[0, 0])
    styles = method_styles(results.methods)
    bar = 0.8 / max(len(results.methods), 1)
    pos = np.arange(results.num_layers)
    for ax, r in zip(axes.flat, indices):
        for m, name in enumerate(results.methods):
            ax.bar(pos + (m - (len(results.methods) - 1) / 2) * bar, np.nan_to_num(frac[r, m]),
                   width=bar, color=styles[name][0], label=name, edgecolor="black", linewidth=0.2)
        ax.set_title(f"keep ratio {results.keep_ratios[r]:.3g}", fontsize="small")
        ax.set_xticks(pos)
        ax.set_xticklabels(results.layer_names, rotation=60, ha="right", fontsize="x-small")
        ax.set_ylabel("Kept weights (%)")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[max(len(indices), 1):]:
        ax.axis("off")
    fig.suptitle(f"{tag}: per-layer budget")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(indices):]
    ncol = 2 if len(labels) > 14 else 1
    if indices and handles and spare:  # one legend for all panels, in the free panel
        spare[0].legend(handles, labels, loc="center", fontsize="x-small", ncol=ncol, title="method")
        fig.tight_layout()
    elif indices and handles:  # beside the panels
        fig.tight_layout()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small",
                   ncol=ncol)
    else:
        fig.tight_layout()
    return fig


def _layer_pr_figure(results: Results, tag: str):
    frac = _layer_fractions(results)
    n = max(len(results.methods), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = _colors(max(results.num_layers, 1))
    for m, name in enumerate(results.methods):
        ax = axes.flat[m]
        x = 100.0 * (1.0 - _nanreduce(np.nanmean, results.sizes[..., m], axis=(0, 2)))
        drawn = False
        for layer, lname in enumerate(results.layer_names):
            y = 100.0 - frac[:, m, layer]
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                order = np.argsort(x[ok])
                ax.plot(x[ok][order], y[ok][order], marker=".", color=colors[layer], label=lname)
                drawn = True
        if not drawn:
            _no_data(ax)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("Pruned parameters (%)")
        ax.set_ylabel("Layer prune ratio (%)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(results.methods):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    height = 3.4 * nrows  # inches: legend and title get a fixed strip, not a fraction
    top = 1 - 0.45 / height
    if handles:
        rows = math.ceil(len(labels) / 6)
        bottom = (0.15 + 0.2 * rows) / height
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize="x-small",
                   bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, bottom, 1, top))
    else:
        fig.tight_layout(rect=(0, 0, 1, top))
    fig.suptitle(f"{tag}: per-layer prune ratio")
    return fig


def _save(fig, path: Path, written: list[Path], **kwargs) -> None:
    fig.savefig(path, bbox_inches="tight", **kwargs)  # legends beside the axes included
    written.append(path)


def make_plots(
    results: Results,
    out_dir: str | Path,
    tag: str,
    *,
    budget_ratios: Sequence[int] | None = None,
) -> list[Path]:
    """Write the metric, layer-budget and layer prune-ratio plots; return paths.

    ``budget_ratios`` picks the keep-ratio indices of the layer-budget grid
    (default: up to 4 evenly spread ratios with data).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for axis in _AXES:
        for metric in _METRICS:
            fig = _metric_figure(results, metric, axis, tag)
            _save(fig, out / f"{tag}_{metric}_{axis}.pdf", written)
            if (metric, axis) == ("acc", "param"):
                _save(fig, out / f"{tag}_{metric}_{axis}.png", written, dpi=150)
            plt.close(fig)
    for name, fig in (
        ("layer_budget", _layer_budget_figure(results, tag, budget_ratios)),
        ("layer_pr", _layer_pr_figure(results, tag)),
    ):
        _save(fig, out / f"{tag}_{name}.pdf", written)
        plt.close(fig)
    return written


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else DASH


def _mean_std(per_net: np.ndarray) -> str:
    """'mean ± std' over nets (population std) of a [nets] vector."""
    finite = per_net[np.isfinite(per_net)]
    if finite.size == 0:
        return DASH
    return f"{finite.mean():.2f} ± {finite.std():.2f}"


def _accuracy_table(results: Results) -> list[str]:
    acc = 100.0 * (1.0 - _per_net(results.error))  # [nets, ratios, methods]
    acc5 = 100.0 * (1.0 - _per_net(results.error5))
    pruned_p = 100.0 * (1.0 - _nanreduce(np.nanmean, results.sizes, axis=(0, 2)))
    pruned_f = 100.0 * (1.0 - _nanreduce(np.nanmean, results.flops, axis=(0, 2)))
    runs = results.done.sum(axis=(0, 2))
    total = results.num_nets * results.num_repetitions
    lines = [TABLE_HEADER, "|" + "---|" * 7]
    dense = 100.0 * (1.0 - results.dense["error"])
    dense5 = 100.0 * (1.0 - results.dense["error5"])
    lines.append(f"| Unpruned | 1 | {_mean_std(dense)} | {_mean_std(dense5)} | 0.00 | 0.00 | |")
    for m, name in enumerate(results.methods):
        for r, ratio in enumerate(results.keep_ratios):
            lines.append(
                f"| {name} | {ratio:.4g} | {_mean_std(acc[:, r, m])} | {_mean_std(acc5[:, r, m])} "
                f"| {_fmt(pruned_p[r, m])} | {_fmt(pruned_f[r, m])} | {runs[r, m]}/{total} |"
            )
    return lines


def commensurate(results: Results, drops: Sequence[float] = ALLOWED_DROPS):
    """Smallest kept % of params and of FLOPs per method and allowed drop.

    Returns ``(sizes, flops)``, each ``[methods, drops]`` (NaN: none reached).
    A keep ratio qualifies when its top-1 accuracy (mean over nets and reps) is
    at least the dense accuracy (mean over nets) minus ``drop`` percentage
    points; sizes/FLOPs are the means over nets and reps at that ratio.
    """
    acc = 100.0 * (1.0 - _nanreduce(np.nanmean, results.error, axis=(0, 2)))  # [ratios, methods]
    size = 100.0 * _nanreduce(np.nanmean, results.sizes, axis=(0, 2))
    flops = 100.0 * _nanreduce(np.nanmean, results.flops, axis=(0, 2))
    dense = 100.0 * (1.0 - _dense_value(results, "error"))
    out_s = np.full((len(results.methods), len(drops)), np.nan)
    out_f = np.full_like(out_s, np.nan)
    if not np.isfinite(dense):
        return out_s, out_f
    for d, drop in enumerate(drops):
        ok = np.isfinite(acc) & (acc >= dense - drop - 1e-9)  # [ratios, methods]
        s = np.where(ok, size, np.nan)
        f = np.where(ok, flops, np.nan)
        out_s[:, d] = _nanreduce(np.nanmin, s, axis=0)
        out_f[:, d] = _nanreduce(np.nanmin, f, axis=0)
    return out_s, out_f


def _commensurate_tables(results: Results, drops: Sequence[float]) -> list[str]:
    sizes, flops = commensurate(results, drops)
    dense = 100.0 * (1.0 - _dense_value(results, "error"))
    lines = [
        f"Dense top-1 accuracy (mean over nets): {_fmt(dense)} %. A cell gives the smallest "
        "kept % reached with accuracy >= dense - drop (mean over nets); "
        f"{DASH} if none.",
        "",
    ]
    header = "| Method | " + " | ".join(f"drop ≤ {d:g} %" for d in drops) + " |"
    rule = "|---|" + "---|" * len(drops)
    for title, table in (("Kept parameters (%)", sizes), ("Kept FLOPs (%)", flops)):
        lines += [f"**{title}**", "", header, rule]
        for m, name in enumerate(results.methods):
            lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in table[m]) + " |")
        lines.append("")
    return lines


def _schedule(block: dict) -> str:
    if not isinstance(block, dict):
        return DASH
    epochs = block.get("num_epochs", "?")
    parts = [f"{epochs} epoch{'' if epochs == 1 else 's'}", f"batch {block.get('batch_size', '?')}",
             f"{block.get('optimizer', 'sgd')} lr {block.get('learning_rate', '?')}"]
    if block.get("lr_milestones"):
        parts.append(f"x{block.get('lr_gamma', 0.1)} at epochs {', '.join(str(m) for m in block['lr_milestones'])}")
    if block.get("warmup"):
        parts.append(f"{block['warmup']} warmup epochs")
    return ", ".join(parts)


def _context_lines(results: Results, config: dict | None, plots: str | None, tag: str | None) -> list[str]:
    """What the report is about: network, dataset, mode, schedules, keep ratios, where the plots are."""
    lines = []
    if config:
        exp = config.get("experiments") or {}
        dataset = (config.get("dataset") or {}).get("name", DASH)
        lines += [
            f"- Network: **{config.get('network', DASH)}**; dataset: **{dataset}**; "
            f"mode: **{exp.get('mode', DASH)}**; seed {config.get('seed', DASH)}",
            f"- Training: {_schedule(config.get('training'))}",
            f"- Retraining: {_schedule(config.get('retraining'))}",
        ]
    lines.append(f"- Keep ratios: {', '.join(f'{r:.4g}' for r in results.keep_ratios)}")
    if plots and tag:
        lines += [
            f"- Plots: `{plots}/{tag}_*.pdf` (accuracy, top-5 accuracy and loss against pruned "
            f"parameters and FLOPs; per-layer budget `{tag}_layer_budget.pdf` and prune ratios "
            f"`{tag}_layer_pr.pdf`)",
            "",
            f"![Top-1 accuracy against pruned parameters]({plots}/{tag}_acc_param.png)",
        ]
    return lines + [""]


def make_report(
    results: Results,
    drops: Sequence[float] = ALLOWED_DROPS,
    *,
    config: dict | None = None,
    plots: str | None = None,
    tag: str | None = None,
) -> str:
    """Markdown report: what it is about (``config``: the run's config.json as a
    dict; ``plots``/``tag``: where the plots are, relative to the report), the
    accuracy table and the commensurate-accuracy report."""
    title = "# Pruning results"
    if config and config.get("network"):
        title += f": {config['network']} on {(config.get('dataset') or {}).get('name', '?')}"
    lines = [
        title,
        "",
        *_context_lines(results, config, plots, tag),
        f"Methods: {', '.join(results.methods)}; nets: {results.num_nets}; "
        f"repetitions: {results.num_repetitions}; keep ratios: {len(results.keep_ratios)}; "
        f"finished runs: {int(results.done.sum())}/{results.done.size}.",
        "",
        "## Accuracy per keep ratio (mean ± std over nets)",
        "",
        *_accuracy_table(results),
        "",
        "## Commensurate accuracy",
        "",
        *_commensurate_tables(results, drops),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def run_tag(workdir: str | Path) -> str:
    """The plot-file prefix of a workdir: the one its plots already use, else the
    workdir's name for a pipeline run (it has a config.json, as
    :func:`experiments.pipeline.run` names them), else ``'results'``."""
    workdir = Path(workdir).resolve()
    stems = {p.name[: -len("_acc_param.pdf")] for p in (workdir / "plots").glob("*_acc_param.pdf")}
    if len(stems) == 1:
        return stems.pop()
    if (workdir / "config.json").exists():
        return workdir.name or "results"
    return "results"


def write_outputs(results: Results, workdir: str | Path, tag: str | None = None) -> str:
    """Plots into ``<workdir>/plots/<tag>_*`` and ``<workdir>/report.md`` (with the
    run's config.json as context); returns the report."""
    from experiments.fileio import atomic_write

    workdir = Path(workdir)
    tag = tag or run_tag(workdir)
    config = None
    if (workdir / "config.json").exists():
        import json

        try:
            config = json.loads((workdir / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    make_plots(results, workdir / "plots", tag)
    report = make_report(results, config=config, plots="plots", tag=tag)
    atomic_write(workdir / "report.md", lambda f: f.write(report.encode()))
    return report


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    workdir = Path(flags.FLAGS.workdir)
    path = workdir / "results.npz"
    if not path.exists():
        raise SystemExit(f"--workdir: {path} does not exist")
    results = Results.load_npz(path)
    report = write_outputs(results, workdir, flags.FLAGS.tag)
    print(report)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Experiment folder holding results.npz.")
    flags.DEFINE_string("tag", None, "File-name prefix of the plots (default: the prefix the run's own plots "
                        "use, i.e. the workdir's name for a pipeline run; 'results' otherwise).")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
