"""Writes ``docs/convnets.md`` (and ``docs/img/convnets_*.png``) from the conv-net study's outputs.

  python -m experiments.docs_convnets --workdir=runs/studies --out=docs/

The study (issue #16, item 3) is ``python -m experiments.reproduce --study=fashion_convnets``: ResNet20 and a
small VGG on Fashion-MNIST, cascade with short retraining. It leaves ``WORKDIR/<study>/cascade_results.npz``
and ``cascade_acc_{param,flops}.png``; this module turns them into the page. Every number and every sentence
of the comparison is computed from those files (the paper's CIFAR-10 numbers are constants below), so edit
this module, not the page. Without any of the study's outputs :func:`render` leaves the page untouched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags

from experiments import docs_results, reproduce
from experiments import plot as plot_lib
from experiments import results as results_lib

MODE = "cascade"
STUDIES = reproduce.GROUPS["fashion_convnets"]
NET_NAMES = {"fashion_resnet20": "ResNet20", "fashion_vgg_small": "small VGG"}
DROPS = (0.5, 1.0)  # allowed accuracy drops (pp) of the commensurate-accuracy table
PLOTS = {"acc_param": "parameters", "acc_flops": "FLOPs"}  # plot -> its x axis (what was removed)
FILTER_BASELINES = ("ft", "softnet", "thinet", "uniform_filters")
PAGE = "convnets.md"


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """The PFP paper's re-run with the reference on CIFAR-10 (best result within -0.5 pp, prune + retrain)."""

    net: str
    method: str
    params_removed: float  # %
    flops_removed: float  # %
    drop: float | None = None  # accuracy change (pp), where the paper gives it


PAPER = (
    PaperRow("ResNet20", "pfp", 40.3, 30.1, -0.28),
    PaperRow("ResNet20", "ft", 39.7, 39.6),
    PaperRow("VGG16", "pfp", 94.9, 84.8, -0.47),
    PaperRow("VGG16", "ft", 79.1, 78.4),
    PaperRow("DenseNet22", "pfp", 40.2, 43.4),
    PaperRow("DenseNet22", "ft", 28.3, 29.5),
    PaperRow("WRN16-8", "pfp", 85.3, 80.7),
    PaperRow("WRN16-8", "ft", 82.3, 76.0),
)


@dataclasses.dataclass(frozen=True)
class Point:
    """The most-pruned keep ratio of one method whose accuracy is within an allowed drop of unpruned."""

    params_removed: float  # % of parameters removed (mean over nets)
    flops_removed: float  # % of FLOPs removed at the same keep ratio
    delta: float  # accuracy minus unpruned accuracy (pp)


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------
def best_within(res: results_lib.Results, method: str, drop: float) -> Point | None:
    """The keep ratio of ``method`` with the most parameters removed whose mean accuracy is at least the
    unpruned one minus ``drop`` pp (None: no finished ratio qualifies)."""
    m = res.methods.index(method)
    acc = np.nanmean(reproduce.accuracy_per_net(res)[:, :, m], axis=0) if res.done[..., m].any() else None
    dense = float(np.nanmean(reproduce.dense_accuracy(res)))
    if acc is None or not np.isfinite(dense):
        return None
    kept = plot_lib._nanreduce(np.nanmean, res.sizes[..., m], axis=(0, 2))
    flops = plot_lib._nanreduce(np.nanmean, res.flops[..., m], axis=(0, 2))
    ok = [r for r in range(len(acc)) if np.isfinite(acc[r]) and acc[r] >= dense - drop - 1e-9]
    if not ok:
        return None
    r = min(ok, key=lambda i: kept[i])
    return Point(100.0 * (1.0 - kept[r]), 100.0 * (1.0 - flops[r]), float(acc[r] - dense))


def _cell(point: Point | None) -> str:
    if point is None:
        return "—"
    return f"{point.params_removed:.1f} / {point.flops_removed:.1f} ({point.delta:+.2f})"


def commensurate_table(studies: Mapping[str, results_lib.Results]) -> list[str]:
    """Methods x (net, allowed drop): '% params / % FLOPs removed (accuracy change in pp)'."""
    methods = list(dict.fromkeys(m for res in studies.values() for m in res.methods))
    cols = [(name, drop) for name in studies for drop in DROPS]
    lines = ["| method | " + " | ".join(f"{NET_NAMES.get(n, n)}, ≥ −{d:g} pp" for n, d in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for method in methods:
        cells = [_cell(best_within(studies[n], method, d)) if method in studies[n].methods else "—" for n, d in cols]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def paper_table() -> list[str]:
    """The paper's CIFAR-10 numbers, nets as columns."""
    nets = list(dict.fromkeys(row.net for row in PAPER))
    lines = ["| method | " + " | ".join(nets) + " |", "|---|" + "---:|" * len(nets)]
    for method in dict.fromkeys(row.method for row in PAPER):
        cells = []
        for net in nets:
            row = next((r for r in PAPER if r.net == net and r.method == method), None)
            text = "—" if row is None else f"{row.params_removed:.1f} / {row.flops_removed:.1f}"
            cells.append(text if row is None or row.drop is None else f"{text} ({row.drop:+.2f})")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------
# The comparison, in sentences computed from the results
# ----------------------------------------------------------------------------
def _leader(res: results_lib.Results, methods: Sequence[str], drop: float, field: str) -> tuple[list[str], float]:
    """Methods (of ``methods``) removing the most ``field`` within ``drop``, and that amount (NaN: none)."""
    values = {m: getattr(p, field) for m in methods if m in res.methods and (p := best_within(res, m, drop))}
    if not values:
        return [], float("nan")
    top = max(values.values())
    return [m for m, v in values.items() if v >= top - 1e-9], top


def _names(methods: Sequence[str]) -> str:
    return " and ".join(f"`{m}`" for m in methods)


def _versus(res: results_lib.Results, a: str, b: str, drop: float) -> str | None:
    """One sentence comparing ``a`` with ``b`` at an allowed drop (None when neither is in the study)."""
    if a not in res.methods or b not in res.methods:
        return None
    pa, pb = best_within(res, a, drop), best_within(res, b, drop)
    if pa is None and pb is None:
        return f"neither `{a}` nor `{b}` stays within −{drop:g} pp at any keep ratio of the grid"
    if pa is None or pb is None:
        ok, no = (a, b) if pb is None else (b, a)
        return f"only `{ok}` stays within −{drop:g} pp at some keep ratio (`{no}` at none)"
    if abs(pa.params_removed - pb.params_removed) < 0.05:
        verdict = "the same share of parameters as"
    else:
        verdict = "more parameters than" if pa.params_removed > pb.params_removed else "fewer parameters than"
    return (f"`{a}` removes {pa.params_removed:.1f} % of the parameters / {pa.flops_removed:.1f} % of the FLOPs, "
            f"{verdict} `{b}` ({pb.params_removed:.1f} % / {pb.flops_removed:.1f} %)")


def pfp_among_filters(res: results_lib.Results) -> str | None:
    """A sentence on `pfp` against the filter baselines at equal keep ratios (equal parameter shares, as every
    filter method lands within a few tenths of a percent of the same target): at how many ratios it has the
    best accuracy, its margin at the smallest ratio, and the FLOPs it removes there (None: not comparable)."""
    baselines = [m for m in FILTER_BASELINES if m in res.methods]
    if "pfp" not in res.methods or not baselines:
        return None
    acc = np.nanmean(reproduce.accuracy_per_net(res), axis=0)  # [ratios, methods]
    flops = 100.0 * (1.0 - plot_lib._nanreduce(np.nanmean, res.flops, axis=(0, 2)))
    p, cols = res.methods.index("pfp"), [res.methods.index(m) for m in baselines]
    done = [r for r in range(len(res.keep_ratios)) if np.isfinite(acc[r, p]) and np.isfinite(acc[r, cols]).all()]
    if not done:
        return None
    wins = sum(acc[r, p] > acc[r, cols].max() for r in done)
    r = done[-1]
    best = cols[int(np.argmax(acc[r, cols]))]
    return (f"at equal keep ratios `pfp` has the best accuracy of the filter methods at {wins} of {len(done)} ratios; "
            f"at keep {res.keep_ratios[r]:.3g} it has {acc[r, p]:.2f} % against {acc[r, best]:.2f} % for the best "
            f"baseline (`{res.methods[best]}`), while removing {flops[r, p]:.1f} % of the FLOPs against "
            f"{min(flops[r, cols]):.1f}-{max(flops[r, cols]):.1f} % for the baselines (it removes the "
            "parameter-heavy late filters first)")


def findings(studies: Mapping[str, results_lib.Results], drop: float = DROPS[0]) -> list[str]:
    """Facts of the comparison, one bullet per net: the leaders within ``drop`` and the paper's pairs."""
    lines = []
    for name, res in studies.items():
        dense = reproduce.dense_accuracy(res)
        facts = [f"unpruned {np.nanmean(dense):.2f} %"]
        for field, what in (("params_removed", "parameters"), ("flops_removed", "FLOPs")):
            leaders, top = _leader(res, res.methods, drop, field)
            facts.append(f"most {what} removed within −{drop:g} pp: {_names(leaders)} ({top:.1f} %)" if leaders
                         else f"no method stays within −{drop:g} pp at any keep ratio of the grid")
        filters = [m for m in ("pfp", *FILTER_BASELINES) if m in res.methods]
        leaders, top = _leader(res, filters, drop, "params_removed")
        if leaders:
            facts.append(f"among the filter methods: {_names(leaders)} ({top:.1f} % of the parameters)")
        facts += [s for s in (_versus(res, "pfp", "ft", drop), pfp_among_filters(res), _versus(res, "sipp", "wt", drop))
                  if s]
        lines.append(f"- **{NET_NAMES.get(name, name)}** (`{name}`): " + "; ".join(facts) + ".")
    return lines


def paper_pattern() -> str:
    """The paper's own ResNet20 row, in words: PFP there also removes fewer FLOPs than FT at a similar share of
    parameters (from :data:`PAPER`)."""
    pfp, ft = (next(r for r in PAPER if r.net == "ResNet20" and r.method == m) for m in ("pfp", "ft"))
    return (f"The paper's ResNet20 row has the same shape as ours: at a similar share of parameters removed "
            f"(`pfp` {pfp.params_removed:.1f} %, `ft` {ft.params_removed:.1f} %), `pfp` removes fewer FLOPs "
            f"({pfp.flops_removed:.1f} % against {ft.flops_removed:.1f} %), because its sensitivities let the "
            "wide, parameter-heavy late layers go first.")


CAVEATS = (
    "The setting differs from the paper's in ways that bound what this can show: Fashion-MNIST instead of "
    "CIFAR-10 (28x28 grey images, an easier task), one net per architecture (no spread over seeds; a "
    "difference of a few tenths of a pp at a keep ratio is within the noise of one run on 10k test images), "
    "a 30k-image training subset with a few epochs instead of 182-300, and 60 retraining steps per keep ratio "
    "instead of full retraining, so methods whose pruned net needs more recovery are penalised more. The "
    "small VGG has 1.2M parameters, about a twelfth of VGG16's, so it is far less over-parameterised for "
    "its task than VGG16 on CIFAR-10, where the paper removes the most."
)


# ----------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------
def zeroing_setting(workdir: Path, name: str) -> bool | None:
    """Whether the study ``name`` ran with data-dependent zeroing (``coresets.zero_dead``; a run whose config
    predates the option ran without it); None when its config is missing."""
    path = workdir / name / "runs" / MODE / "config.json"
    if not path.exists():
        return None
    return bool(json.loads(path.read_text()).get("coresets", {}).get("zero_dead", False))


def zeroing_line(settings: Mapping[str, bool | None]) -> list[str]:
    """One sentence on the zeroing setting of each net (empty when no config was found)."""
    known = {n: z for n, z in settings.items() if z is not None}
    if not known:
        return []
    parts = [f"{'on' if z else 'off'} for {NET_NAMES.get(n, n)}" for n, z in known.items()]
    text = "Data-dependent zeroing (`coresets.zero_dead`, see [zeroing.md](zeroing.md)): " + ", ".join(parts) + "."
    if len(set(known.values())) > 1:
        text += (" The runs with it off predate it becoming the default; they were kept rather than re-run "
                 "(their dense nets and grids are the same kind), so compare across nets with that in mind.")
    return [text, ""]


def load(workdir: Path) -> dict[str, results_lib.Results]:
    """The study's finished nets: name -> cascade results (studies without outputs are left out)."""
    return {name: results_lib.Results.load_npz(path) for name in STUDIES
            if (path := workdir / name / f"{MODE}_results.npz").exists()}


def page(studies: Mapping[str, results_lib.Results], images: Mapping[str, Sequence[str]],
         zeroing: Mapping[str, bool | None] | None = None) -> str:
    """The markdown of the page; ``images``: study -> relative paths of its figures; ``zeroing``: study ->
    whether it ran with data-dependent zeroing (None: unknown)."""
    missing = [n for n in STUDIES if n not in studies]
    lines = [
        "# Conv nets on Fashion-MNIST: PFP, the filter baselines and the weight methods",
        "",
        "Issue #16, item 3: do the PFP paper's conv-net claims (at the same accuracy PFP removes more "
        "parameters and FLOPs than FT, SoftNet and ThiNet) hold with our implementation on real data? "
        "CIFAR-10 cannot be obtained offline here, so the study runs on Fashion-MNIST. This page is generated "
        "(do not edit it by hand):",
        "",
        "```bash",
        "python -m experiments.reproduce --study=fashion_convnets --workdir=runs/studies   # resumable",
        "python -m experiments.docs_convnets --workdir=runs/studies --out=docs/",
        "```",
        "",
        "Settings: `configs/fashion/resnet20.py` and `configs/fashion/vgg_small.py` (1 net each, cascade: prune, "
        "retrain 60 steps, prune further; keep ratios 70 % -> 15 %, |S| = 128, full 10k test set).",
        "",
        *zeroing_line(zeroing or {}),
    ]
    if missing:
        lines += [f"Not finished yet (left out): {', '.join(f'`{n}`' for n in missing)}.", ""]
    lines += [
        "## Commensurate accuracy",
        "",
        "Per method, the keep ratio with the most parameters removed whose test accuracy is within the "
        "allowed drop of the unpruned net's. Cells: % of parameters / % of FLOPs removed there (accuracy "
        "change vs. unpruned in pp); — where no keep ratio of the grid qualifies.",
        "",
        *commensurate_table(studies),
        "",
        "The paper (PFP, Liebenwein et al. 2020), the authors' re-run with the reference on CIFAR-10, "
        "best result within −0.5 pp, one-shot prune + full retrain: % parameters / % FLOPs removed "
        "(accuracy change where given).",
        "",
        *paper_table(),
        "",
        "## What matches the papers and what does not",
        "",
        f"Computed from the results (allowed drop {DROPS[0]:g} pp):",
        "",
        *findings(studies),
        "",
        paper_pattern(),
        "",
        CAVEATS,
        "",
    ]
    for name, res in studies.items():
        lines += [f"## {NET_NAMES.get(name, name)} (`{name}`)", "", *reproduce.accuracy_table(res), ""]
        lines += [f"![{name}: accuracy vs. {axis} removed]({path})"
                  for axis, path in zip(PLOTS.values(), images.get(name, ())) if path]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(workdir: Path, out: Path) -> bool:
    """Writes ``out/convnets.md`` and its figures from ``workdir``; False (nothing written) without outputs."""
    workdir, out = Path(workdir), Path(out)
    studies = load(workdir)
    if not studies:
        return False
    images: dict[str, list[str]] = {}
    for name in studies:
        images[name] = []
        for plot in PLOTS:
            src = workdir / name / f"{MODE}_{plot}.png"
            dst = out / "img" / f"convnets_{name}_{plot}.png"
            images[name].append(docs_results.copy_png(src, dst).relative_to(out).as_posix() if src.exists() else "")
    out.mkdir(parents=True, exist_ok=True)
    zeroing = {name: zeroing_setting(workdir, name) for name in studies}
    (out / PAGE).write_text(page(studies, images, zeroing))
    return True


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", "runs/studies", "the study's workdir (what its --workdir was)")
    flags.DEFINE_string("out", "docs", f"where {PAGE} and img/ are written")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not render(Path(FLAGS.workdir), Path(FLAGS.out)):
        raise SystemExit(f"no {MODE}_results.npz of {', '.join(STUDIES)} under {FLAGS.workdir}; "
                         f"run `python -m experiments.reproduce --study=fashion_convnets` first")
    print(f"written: {Path(FLAGS.out) / PAGE}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
