"""Writes ``docs/results.md`` (and the figures it shows, ``docs/img/*.png``) from a workdir of studies, and
with it every other generated page of study results.

  python -m experiments.docs_results --workdir=runs/studies --out=docs/

The studies write into one workdir (``--workdir``, ``runs/studies`` by default) and nothing into the
source tree; this command reads what they left there and turns it into the page we publish:

- ``WORKDIR/<study>/{cascade,prune-only}_results.npz`` and ``*_acc_param.png`` (``experiments.reproduce``)
  of the studies in ``STUDY_COMMANDS``;
- ``WORKDIR/guarantees/guarantees.json`` and ``{bound_vs_observed,s_sweep}.png`` (``experiments.guarantees``);
- ``WORKDIR/sipp_ablation/ablation.json`` (``experiments.sipp_ablation``).

Studies that are missing from the workdir are left out of the page; without any of them the page is left
untouched. Every number on the page comes from those files, so edit this module, not ``docs/results.md``.
Figures are copied as palette PNGs at most ``MAX_IMAGE_WIDTH`` pixels wide so that the docs stay small.

The same command then renders the per-topic pages (``TOPIC_PAGES``: ``docs_vit``, ``docs_convnets``,
``docs_lm``, ``docs_zeroing``, each ``render(workdir, out) -> bool``) from their studies' folders; a page
whose study outputs are missing is left untouched, and the command lists what it wrote and what it left.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import app, flags

from experiments import reproduce
from experiments import results as results_lib

MAX_IMAGE_WIDTH = 900
# (study, mode, plot) shown as images; the other plots stay in the workdir.
FIGURES = (
    ("fashion_lenet300_100", "cascade", "acc_param"),
    ("fashion_lenet300_100", "prune-only", "acc_param"),
    ("fashion_lenet5", "cascade", "acc_param"),
)
GUARANTEE_FIGURES = ("bound_vs_observed", "s_sweep")
STUDY_COMMANDS = (
    ("fashion_lenet300_100", "all 18 methods, cascade + prune-only, 3 nets (about 1 h on 2 cores)"),
    ("fashion_lenet300_100_long", "SiPP, SiPP-hybrid, WT, SNIP with 8 retraining epochs per ratio"),
    ("fashion_lenet5", "LeNet5, all 18 methods, 3 nets (about 1.5 h on 2 cores)"),
    ("embedded_lenet300_100", "the main job's data (embedded MNIST digits), 3 nets"),
)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def copy_png(src: Path, dst: Path, max_width: int = MAX_IMAGE_WIDTH) -> Path:
    """Copies a PNG, scaled down to ``max_width`` and stored with a 256-colour palette."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        image.quantize(colors=256).save(dst, optimize=True)
    return dst


def _pct(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "—"


# The per-topic pages: (page, module with ``render(workdir, out) -> bool``, its workdir relative to
# --workdir). The zeroing study's two pipeline workdirs sit next to the studies' (runs/zeroing/{on,off}).
TOPIC_PAGES = (
    ("vit.md", "experiments.docs_vit", "."),
    ("convnets.md", "experiments.docs_convnets", "."),
    ("lm.md", "experiments.docs_lm", "lm"),
    ("zeroing.md", "experiments.docs_zeroing", "../zeroing"),
)


def _load_study(workdir: Path, name: str) -> dict[str, results_lib.Results]:
    folder = workdir / name
    return {mode: results_lib.Results.load_npz(folder / f"{mode}_results.npz")
            for mode in reproduce.MODES if (folder / f"{mode}_results.npz").exists()}


def _pruned_label(keep: float) -> str:
    return f"{100 * (1 - keep):.3g} %"


def accuracy_table(res: results_lib.Results) -> list[str]:
    """Methods x keep ratios: accuracy mean ± std over nets; the achieved pruned % where it is off the grid."""
    acc = reproduce.accuracy_per_net(res)
    pruned = 100.0 * (1.0 - reproduce._mean(res.sizes, axis=(0, 2)))
    lines = ["| method | " + " | ".join(_pruned_label(k) for k in res.keep_ratios) + " |",
             "|---|" + "---:|" * len(res.keep_ratios)]
    for m, method in enumerate(res.methods):
        cells = []
        for r, keep in enumerate(res.keep_ratios):
            a = acc[:, r, m]
            a = a[np.isfinite(a)]
            if a.size == 0:
                cells.append("—")
                continue
            cell = f"{a.mean():.1f} ± {a.std():.1f}" if a.size > 1 else f"{a.mean():.1f}"
            if abs(pruned[r, m] - 100 * (1 - keep)) > 1.0:
                cell += f" ({pruned[r, m]:.1f} %)"
            cells.append(cell)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def _dense_line(res: results_lib.Results) -> str:
    dense = reproduce.dense_accuracy(res)
    dense = dense[np.isfinite(dense)]
    spread = f" ± {dense.std():.2f}" if dense.size > 1 else ""
    return f"{dense.mean():.2f}{spread} % ({dense.size} net{'s' if dense.size != 1 else ''})"


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------
def targets_section(studies: Mapping[str, Mapping[str, results_lib.Results]],
                    rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The acceptance targets, each with what every study measured."""
    lines = ["## Acceptance targets", ""]
    retrain, pairs = [], []
    for name, results in studies.items():
        if "cascade" in results:
            verdict, text = reproduce.retrain_check(results["cascade"])
            if verdict is not None:
                retrain.append(f"  - `{name}`: {text[0][2:]}")
        if "prune-only" in results:
            _, text = reproduce.pairwise_check(results["prune-only"], 0.1, [("pfp", "ft"), ("sipp", "wt")])
            pairs += [f"  - `{name}`: {t[2:]}" for t in text]
    if retrain:
        lines += ["- **SiPP after retraining (cascade), >= 90 % of parameters pruned, within 1 pp of unpruned:**",
                  *retrain]
    if pairs:
        lines += ["- **Prune-only at 90 % pruned: PFP >= FT and SiPP >= WT** (mean over nets):", *pairs]
    if rows:
        ratio = [r for r in rows if r["sweep"] == "ratio"]
        delta = float(ratio[0]["delta"]) if ratio else float("nan")
        worst = min((r["fraction_within"] for r in ratio), default=float("nan"))
        verdict = "met" if worst >= 1 - delta else "NOT met"
        lines += [f"- **Guarantees: at least 1 - delta = {1 - delta:g} of the checks within the promised bound:** "
                  f"smallest fraction over all nets, methods, keep ratios, keys and layers {worst:.4f} ({verdict})."]
    return lines + [""]


def study_section(name: str, results: Mapping[str, results_lib.Results], images: Mapping[str, str]) -> list[str]:
    """Tables (and figures, where copied) of one reproduction study."""
    study = reproduce.STUDIES.get(name)
    title = study.description if study else name
    lines = [f"## `{name}`: {title}", ""]
    titles = {"cascade": "after retraining (cascade)", "prune-only": "prune-only (no retraining)"}
    for mode, res in results.items():
        lines += [f"Test accuracy (%) {titles[mode]}, mean ± std over nets, by nominal fraction of parameters "
                  f"pruned (in brackets: the achieved fraction where it is more than 1 pp off). "
                  f"Unpruned: {_dense_line(res)}.", "", *accuracy_table(res), ""]
        if mode in images:
            lines += [f"![{name}, {mode}: accuracy vs. pruned parameters]({images[mode]})", ""]
    return lines


def guarantees_section(rows: Sequence[Mapping[str, Any]], images: Sequence[str]) -> list[str]:
    """Promised vs. observed error per (net, method) and the |S| sweep."""
    ratio = [r for r in rows if r["sweep"] == "ratio"]
    delta = float(ratio[0]["delta"]) if ratio else float("nan")
    draws = 1 + max((int(r["draw"]) for r in rows), default=0)
    lines = [
        "## Sampling guarantees (`experiments.guarantees`)",
        "",
        f"Each net is pruned by the sampling methods with delta = {delta:g} ({draws} random key(s) per setting, "
        "|S| from the size formula). On held-out test points each layer is fed its unpruned input, and every "
        "(point, position, sign, unit) relative error of the bias-free pre-activation is compared with the "
        "epsilon the method promised. Ranges are over keep ratios and layers.",
        "",
        "| net | method | keep ratios | promised eps (median) | observed error (median) | observed p95 "
        "| fraction within (min) |",
        "|---|---|---|---|---|---|---:|",
    ]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in ratio:
        groups.setdefault((r["network"], r["method"]), []).append(r)

    def span(values: Sequence[float]) -> str:
        v = [x for x in values if np.isfinite(x)]
        return f"{min(v):.3g} – {max(v):.3g}" if v else "—"

    for (net, method), g in groups.items():
        keeps = ", ".join(f"{k:g}" for k in sorted({r["keep_ratio"] for r in g}, reverse=True))
        lines.append(f"| {net} | `{method}` | {keeps} | {span([r['eps_median'] for r in g])} "
                     f"| {span([r['err_median'] for r in g])} | {span([r['err_p95'] for r in g])} "
                     f"| {min(r['fraction_within'] for r in g):.4f} |")
    sweep = [r for r in rows if r["sweep"] == "s_size"]
    if sweep:
        keep = sweep[0]["keep_ratio"]
        lines += ["", f"Sample-size sweep (keep ratio {keep:g}): fraction of checks within the bound (min over "
                  "layers and keys) for each |S|; **bold**: the size the formula gives.", "",
                  "| net | method | |S|: fraction within |", "|---|---|---|"]
        by: dict[tuple[str, str], dict[int, list[Mapping[str, Any]]]] = {}
        for r in sweep:
            by.setdefault((r["network"], r["method"]), {}).setdefault(int(r["s_size"]), []).append(r)
        for (net, method), sizes in by.items():
            cells = []
            for size in sorted(sizes):
                g = sizes[size]
                label = f"**{size}**" if size == int(g[0]["s_formula"]) else str(size)
                cells.append(f"{label}: {min(x['fraction_within'] for x in g):.4f}")
            lines.append(f"| {net} | `{method}` | " + ", ".join(cells) + " |")
    lines.append("")
    for image in images:
        what = Path(image).stem.removeprefix("guarantees_").replace("_", " ")
        lines += [f"![guarantees: {what}]({image})", ""]
    return lines


def ablation_section(result: Mapping[str, Any]) -> list[str]:
    """Score vs. allocation: why prune-only SiPP trails WT."""
    cols = ["WT's per-unit counts", "WT's per-layer counts", "own global top-B"]
    lines = [
        "## Why prune-only SiPP trails WT (`experiments.sipp_ablation`)",
        "",
        f"LeNet300-100 on `{result['dataset']}`, one trained net (unpruned {result['dense_accuracy']:.2f} %), "
        f"keep ratio {result['keep_ratio']:g}, |S| = {result['num_points']}, no retraining. Each row ranks the "
        "weights by one score and keeps them with one allocation: the per-unit or per-layer counts WT chose, "
        "or the method's own global top-B. SiPP's score is a weight's largest share of its unit's same-sign "
        "pre-activation over S; the shares are recomputed with NumPy and match "
        f"`compute_sensitivities` to {result['kernel_max_abs_diff']:.0e}.",
        "",
        "| score | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in result["rows"]:
        score = row["score"].replace("|", "\\|")
        lines.append(f"| {score} | " + " | ".join(_pct(row[c], 2) if c in row else "—" for c in cols) + " |")
    swaps = result["sipp_in_one_layer"]
    lines += ["", "SiPP's score in one layer only (|w| in the others, WT's per-layer counts): "
              + ", ".join(f"`{n}` {a:.2f} %" for n, a in swaps.items())
              + f"; the first layer's score on raw, nonnegative pixels instead of normalised ones: "
              f"{result['raw_pixel_first_layer']:.2f} % (normalised: {next(iter(swaps.values())):.2f} %).", ""]
    units = result["units_kept"]
    layer_names = list(next(iter(units.values())))
    lines += ["Weights kept per unit, min / median / max (units left with none / units):", "",
              "| method | " + " | ".join(f"`{n}`" for n in layer_names) + " |",
              "|---|" + "---|" * len(layer_names)]
    for method, per_layer in units.items():
        lines.append(f"| `{method}` | " + " | ".join(
            f"{c[0]} / {c[1]:g} / {c[2]} ({c[3]} / {c[4]})" for c in per_layer.values()) + " |")
    return lines + [""]


# ----------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------
def _inputs(workdir: Path) -> tuple[dict[str, dict[str, results_lib.Results]], Any, Any]:
    """The page's studies (those of ``STUDY_COMMANDS`` only: other studies in the workdir have their own
    pages), guarantee rows and ablation found in ``workdir`` (None where missing)."""
    studies = {name: res for name, _ in STUDY_COMMANDS if (res := _load_study(workdir, name))}
    guarantee_rows = None
    if (workdir / "guarantees" / "guarantees.json").exists():
        guarantee_rows = json.loads((workdir / "guarantees" / "guarantees.json").read_text())
    ablation = None
    if (workdir / "sipp_ablation" / "ablation.json").exists():
        ablation = json.loads((workdir / "sipp_ablation" / "ablation.json").read_text())
    return studies, guarantee_rows, ablation


def build(workdir: str | Path, out: str | Path) -> Path:
    """Writes ``out/results.md`` and ``out/img/*.png`` from ``workdir``; returns the page's path."""
    workdir, out = Path(workdir), Path(out)
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir={workdir} does not exist; run the study commands first")
    img = out / "img"
    studies, guarantee_rows, ablation = _inputs(workdir)
    if not (studies or guarantee_rows or ablation):
        raise FileNotFoundError(f"no study outputs under {workdir} (expected <study>/*_results.npz of "
                                f"{', '.join(n for n, _ in STUDY_COMMANDS)}, guarantees/guarantees.json or "
                                "sipp_ablation/ablation.json)")

    lines = [
        "# Results",
        "",
        "What the fidelity studies measured. This page is generated: "
        "`python -m experiments.docs_results --workdir=runs/studies --out=docs/` rebuilds it (and `img/`) "
        "from the studies' outputs, so do not edit it by hand. The studies (each resumable; Fashion-MNIST "
        "from Debian's `dataset-fashion-mnist` package; see [experiments.md](experiments.md)):",
        "",
        "```bash",
        *[f"python -m experiments.reproduce --study={n} --workdir=runs/studies   # {what}"
          for n, what in STUDY_COMMANDS],
        "python -m experiments.guarantees --workdir=runs/studies      # promised vs. observed error, |S| sweep",
        "python -m experiments.sipp_ablation --workdir=runs/studies   # why prune-only SiPP < WT",
        "```",
        "",
        "Accuracies are on the full test set; the last digit varies with the CPU and the JAX build.",
        "",
    ]
    lines += targets_section(studies, guarantee_rows)
    for name, results in studies.items():
        images = {}
        for study, mode, plot in FIGURES:
            src = workdir / name / f"{mode}_{plot}.png"
            if study == name and mode in results and src.exists():
                images[mode] = copy_png(src, img / f"{name}_{mode}_{plot}.png").relative_to(out).as_posix()
        lines += study_section(name, results, images)
    if guarantee_rows:
        images = [copy_png(workdir / "guarantees" / f"{stem}.png", img / f"guarantees_{stem}.png")
                  .relative_to(out).as_posix()
                  for stem in GUARANTEE_FIGURES if (workdir / "guarantees" / f"{stem}.png").exists()]
        lines += guarantees_section(guarantee_rows, images)
    if ablation:
        lines += ablation_section(ablation)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def render(workdir: Path, out: Path) -> bool:
    """Writes ``out/results.md`` like :func:`build`; False (page untouched) without any of its studies' outputs."""
    if not Path(workdir).is_dir() or not any(_inputs(Path(workdir))):
        return False
    build(workdir, out)
    return True


def render_all(workdir: str | Path, out: str | Path) -> dict[str, bool]:
    """Renders ``results.md`` and every page of ``TOPIC_PAGES`` whose study outputs are in ``workdir``
    (each topic from its folder relative to ``workdir``); page name -> written (False: left untouched)."""
    workdir, out = Path(workdir), Path(out)
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir={workdir} does not exist; run the study commands first")
    written = {"results.md": render(workdir, out)}
    for page, module, folder in TOPIC_PAGES:
        # Imported here: docs_convnets imports this module (copy_png).
        written[page] = bool(importlib.import_module(module).render(workdir / folder, out))
    return written


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", "runs/studies", "the studies' workdir (what their --workdir was)")
    flags.DEFINE_string("out", "docs", "where the pages (results.md, ...) and img/ are written")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    written = render_all(FLAGS.workdir, FLAGS.out)
    out = Path(FLAGS.out)
    for page, done in written.items():
        print(f"written: {out / page}" if done else f"left untouched (no study outputs): {out / page}")
    if not any(written.values()):
        raise SystemExit(f"no study outputs under {FLAGS.workdir}: run the study commands first "
                         "(docs/experiments.md)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
