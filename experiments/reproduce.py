"""Reproduction runs of the fidelity study: configs -> pipeline -> tables, plots and acceptance checks.

  python -m experiments.reproduce --study=fashion_lenet300_100 [--workdir=runs/studies]
  python -m experiments.reproduce --study=all
  python -m experiments.reproduce --study=fashion_convnets   # ResNet20 + small VGG, cascade (~1 h on 2 cores)
  python -m experiments.reproduce --study=embedded_lenet300_100 --fast   # a couple of minutes (what CI checks)

Each study runs its config in two modes, ``cascade`` (prune, retrain, prune further) and ``prune-only``
(every ratio pruned from the trained nets, no retraining), in ``WORKDIR/<study>/runs/<mode>`` (resumable:
run the same command again after an interruption), then writes into ``WORKDIR/<study>/``:

- ``summary.md``: accuracy (mean ± std over nets) per method and keep ratio with the achieved pruned
  parameters and FLOPs, for both modes, and the acceptance checks of the study;
- ``<mode>_report.md``: the pipeline's full report (commensurate-accuracy tables included);
- ``<mode>_acc_param.{pdf,png}``, ``<mode>_acc_flops.{pdf,png}``: accuracy vs. pruned parameters / FLOPs
  with the spread (min-max) over nets;
- ``<mode>_results.npz``: the raw results.

Nothing is written into the source tree; ``python -m experiments.docs_results --workdir=WORKDIR``
turns a workdir of studies into ``docs/results.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import common  # noqa: E402
from experiments import pipeline  # noqa: E402
from experiments import plot as plot_lib  # noqa: E402
from experiments import results as results_lib  # noqa: E402

MODES = ("cascade", "prune-only")
# Roughly halving keep ratios down to 2 %, with 10 % (90 % pruned) on the grid for the acceptance checks.
FIDELITY_SPACING = (common.geometric(0.4, 0.025, 5), common.manual(0.02))


@dataclasses.dataclass(frozen=True)
class Study:
    """A config (module path under ``configs/``) and the overrides that make it a study."""

    config: str
    description: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    modes: tuple[str, ...] = MODES


STUDIES: dict[str, Study] = {
    "fashion_lenet300_100": Study(
        "configs.fashion.lenet300_100", "LeNet300-100 on full Fashion-MNIST, all methods, 3 nets"),
    "fashion_lenet300_100_long": Study(
        "configs.fashion.lenet300_100",
        "LeNet300-100 on full Fashion-MNIST, weight methods with 4x longer retraining (8 epochs per ratio), 3 nets",
        {"experiments.methods": ("sipp", "sipp_hybrid", "wt", "snip"), "retraining.num_epochs": 8,
         "retraining.lr_milestones": (5, 7)},
        modes=("cascade",)),
    "fashion_lenet5": Study("configs.fashion.lenet5", "LeNet5 on full Fashion-MNIST, all methods, 3 nets"),
    "fashion_resnet20": Study(
        "configs.fashion.resnet20",
        "ResNet20 (1-channel input) on a 30k subset of Fashion-MNIST, conv-net methods, short retraining, 1 net",
        modes=("cascade",)),
    "fashion_vgg_small": Study(
        "configs.fashion.vgg_small",
        "small VGG (8 convs, BN) on a 30k subset of Fashion-MNIST, conv-net methods, short retraining, 1 net",
        modes=("cascade",)),
    "embedded_lenet300_100": Study(
        "configs.default", "LeNet300-100 on the embedded MNIST digits (the main job's data), all methods, 3 nets",
        {"experiments.num_nets": 3, "experiments.spacing": FIDELITY_SPACING}),
    "digits_vit": Study(
        "configs.digits.vit", "ViT-tiny on the embedded MNIST digits: SiPP, PFP, WT, FT, short Adam retraining, 1 net",
        modes=("cascade",)),
    "digits_lenet300_100": Study(
        "configs.default", "LeNet300-100 on the embedded MNIST digits at the ViT study's keep ratios: SiPP, PFP, WT, "
        "FT, 1 net", {"experiments.methods": ("sipp", "pfp", "wt", "ft"),
                      "experiments.spacing": (common.geometric(0.6, 0.06, 4),)},
        modes=("cascade",)),
    "fashion_vit": Study(
        "configs.fashion.vit", "ViT-tiny on full Fashion-MNIST: SiPP, PFP, WT, FT, one retraining epoch, 1 net",
        modes=("cascade",)),
}

# Names that run several studies in turn (each resumable on its own).
GROUPS: dict[str, tuple[str, ...]] = {"fashion_convnets": ("fashion_resnet20", "fashion_vgg_small")}

# CI's fast version: one net, two ratios, a few steps; same code path, same outputs.
FAST_OVERRIDES = {
    "experiments.num_nets": 1,
    "experiments.methods": ("sipp", "pfp", "wt", "ft", "svd"),
    "experiments.spacing": (common.manual(0.4, 0.1),),
    "training.num_epochs": 2,
    "training.lr_milestones": (),
    "training.max_steps_per_epoch": 40,
    "retraining.num_epochs": 1,
    "retraining.lr_milestones": (),
    "retraining.max_steps_per_epoch": 10,
    "coresets.size": 64,
}


def study_names(study: str) -> list[str]:
    """The studies ``--study`` names: one study, a group of :data:`GROUPS`, or ``'all'``."""
    if study == "all":
        return list(STUDIES)
    if study in GROUPS:
        return list(GROUPS[study])
    if study in STUDIES:
        return [study]
    raise ValueError(f"--study={study!r} is unknown; allowed: {', '.join([*STUDIES, *GROUPS, 'all'])}")


def _set(config: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def study_config(name: str, mode: str, *, fast: bool = False, extra: Mapping[str, Any] | None = None) -> Any:
    """The pipeline config of one study and mode."""
    if name not in STUDIES:
        raise ValueError(f"--study={name!r} is unknown; allowed: {', '.join(STUDIES)}, all")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    study = STUDIES[name]
    config = importlib.import_module(study.config).get_config()
    overrides = {**study.overrides, **(FAST_OVERRIDES if fast else {}), **dict(extra or {})}
    for key, value in overrides.items():
        _set(config, key, value)
    config.experiments.mode = mode
    return config


# ----------------------------------------------------------------------------
# Tables and acceptance checks
# ----------------------------------------------------------------------------
def _mean(values: np.ndarray, axis) -> np.ndarray:
    return plot_lib._nanreduce(np.nanmean, values, axis=axis)


def accuracy_per_net(res: results_lib.Results) -> np.ndarray:
    """Top-1 accuracy (%) ``[nets, ratios, methods]`` (mean over repetitions)."""
    return 100.0 * (1.0 - _mean(res.error, axis=2))


def dense_accuracy(res: results_lib.Results) -> np.ndarray:
    """Unpruned top-1 accuracy (%) per net."""
    return 100.0 * (1.0 - np.asarray(res.dense["error"], float))


def accuracy_table(res: results_lib.Results) -> list[str]:
    """Markdown: one row per method, one column per keep ratio; 'acc ± std (pruned % params / FLOPs)'."""
    acc = accuracy_per_net(res)
    pruned = 100.0 * (1.0 - _mean(res.sizes, axis=(0, 2)))
    pruned_f = 100.0 * (1.0 - _mean(res.flops, axis=(0, 2)))
    dense = dense_accuracy(res)
    head = "| method | " + " | ".join(f"keep {r:.3g}" for r in res.keep_ratios) + " |"
    lines = [
        f"Unpruned: {np.nanmean(dense):.2f} ± {np.nanstd(dense):.2f} % over {len(dense)} net(s). "
        "Cells: test accuracy % (mean ± std over nets), below it the achieved pruned % of parameters / FLOPs.",
        "",
        head,
        "|---|" + "---|" * len(res.keep_ratios),
    ]
    for m, name in enumerate(res.methods):
        cells = []
        for r in range(len(res.keep_ratios)):
            a = acc[:, r, m]
            a = a[np.isfinite(a)]
            if a.size == 0:
                cells.append(plot_lib.DASH)
                continue
            cells.append(f"{a.mean():.2f} ± {a.std():.2f}<br>{pruned[r, m]:.1f} / {pruned_f[r, m]:.1f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def _ratio_index(res: results_lib.Results, keep: float) -> int | None:
    idx = int(np.argmin(np.abs(np.asarray(res.keep_ratios) - keep)))
    return idx if abs(res.keep_ratios[idx] - keep) < 1e-6 else None


def _mean_acc(res: results_lib.Results, method: str, r: int) -> float:
    if method not in res.methods:
        return float("nan")
    return float(np.nanmean(accuracy_per_net(res)[:, r, res.methods.index(method)]))


def retrain_check(res: results_lib.Results, method: str = "sipp", min_pruned: float = 90.0,
                  max_drop: float = 1.0) -> tuple[bool | None, list[str]]:
    """After retraining, ``method`` with >= ``min_pruned`` % of params pruned stays within ``max_drop`` pp."""
    if method not in res.methods:
        return None, [f"- `{method}` not in this study."]
    m = res.methods.index(method)
    dense = float(np.nanmean(dense_accuracy(res)))
    pruned = 100.0 * (1.0 - _mean(res.sizes, axis=(0, 2)))[:, m]
    rows = [r for r in range(len(res.keep_ratios)) if np.isfinite(pruned[r]) and pruned[r] >= min_pruned - 0.5]
    if not rows:
        return None, [f"- no finished keep ratio of `{method}` with >= {min_pruned:g} % pruned."]
    lines, verdict = [], None
    for r in rows:
        acc = _mean_acc(res, method, r)
        ok = acc >= dense - max_drop - 1e-6  # accuracies are multiples of 1/#test points; float slack
        if r == rows[0]:
            verdict = ok
        lines.append(f"- `{method}` at {pruned[r]:.1f} % pruned: {acc:.2f} % vs. unpruned {dense:.2f} % "
                     f"(drop {dense - acc:+.2f} pp; target <= {max_drop:g} pp: {'met' if ok else 'NOT met'})")
    return verdict, lines


def pairwise_check(
    res: results_lib.Results, keep: float, pairs: Sequence[tuple[str, str]]
) -> tuple[bool | None, list[str]]:
    """``a`` is at least as accurate as ``b`` at keep ratio ``keep`` (mean over nets), for each pair."""
    r = _ratio_index(res, keep)
    if r is None:
        return None, [f"- keep ratio {keep:g} is not on this study's grid."]
    lines, verdicts = [], []
    for a, b in pairs:
        acc_a, acc_b = _mean_acc(res, a, r), _mean_acc(res, b, r)
        if not (np.isfinite(acc_a) and np.isfinite(acc_b)):
            lines.append(f"- `{a}` vs `{b}`: not both finished.")
            continue
        ok = acc_a >= acc_b - 1e-6
        verdicts.append(ok)
        lines.append(f"- at {100 * (1 - keep):.0f} % pruned (keep {keep:g}): `{a}` {acc_a:.2f} % vs. `{b}` "
                     f"{acc_b:.2f} % ({'met' if ok else 'NOT met'})")
    return (all(verdicts) if verdicts else None), lines


def summary(name: str, results: Mapping[str, results_lib.Results]) -> str:
    """Markdown summary of one study: tables of both modes and the acceptance checks."""
    study = STUDIES[name]
    lines = [f"# {name}: {study.description}", ""]
    lines += ["Regenerate: `python -m experiments.reproduce --study=" + name + "`.", ""]
    checks = ["## Acceptance checks", ""]
    if "cascade" in results:
        _, c = retrain_check(results["cascade"])
        title = "After retraining (cascade), SiPP with >= 90 % of parameters pruned within 1 pp of unpruned:"
        checks += [title, *c, ""]
    if "prune-only" in results:
        _, c = pairwise_check(results["prune-only"], 0.1, [("sipp", "wt"), ("pfp", "ft")])
        checks += ["Prune-only at 90 % pruned: SiPP >= WT and PFP >= FT (mean over nets):", *c, ""]
    lines += checks
    for mode in MODES:
        if mode not in results:
            continue
        res = results[mode]
        title = "after retraining (cascade)" if mode == "cascade" else "prune-only (no retraining)"
        lines += [f"## Accuracy {title}", "", *accuracy_table(res), "",
                  f"Plots: `{mode}_acc_param.png`, `{mode}_acc_flops.png`; full report: `{mode}_report.md`.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------
def write_plots(res: results_lib.Results, out: Path, mode: str, title: str) -> list[Path]:
    """Accuracy vs. pruned parameters and vs. pruned FLOPs (spread over nets), PDF + PNG."""
    written = []
    for axis in ("param", "flops"):
        fig = plot_lib._metric_figure(res, "acc", axis, title)
        for ext, kw in (("pdf", {}), ("png", {"dpi": 130})):
            path = out / f"{mode}_acc_{axis}.{ext}"
            fig.savefig(path, **kw)
            written.append(path)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------
def run_study(name: str, workdir: Path, *, fast: bool = False, modes: Sequence[str] | None = None,
              extra: Mapping[str, Any] | None = None,
              run_fn: Callable[[Any, Path], results_lib.Results] = pipeline.run) -> Path:
    """Runs (or resumes) the modes of a study in ``workdir/<name>/runs/<mode>`` and writes its tables
    and plots into ``workdir/<name>/``; returns the summary path."""
    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in modes or STUDIES[name].modes:
        config = study_config(name, mode, fast=fast, extra=extra)
        run_dir = out / "runs" / mode
        logging.info("study %s, mode %s -> %s", name, mode, run_dir)
        results[mode] = run_fn(config, run_dir)
        shutil.copyfile(run_dir / "results.npz", out / f"{mode}_results.npz")
        (out / f"{mode}_report.md").write_text(plot_lib.make_report(results[mode]))
        write_plots(results[mode], out, mode, f"{name} ({mode})")
    path = out / "summary.md"
    path.write_text(summary(name, results))
    return path


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("study", "fashion_lenet300_100", f"one of {', '.join([*STUDIES, *GROUPS])}, or 'all'")
    flags.DEFINE_string("workdir", "runs/studies", "study outputs and the pipeline work directories "
                        "(resumable); WORKDIR/<study>/ gets the tables and plots")
    flags.DEFINE_bool("fast", False, "one net, two ratios, a few steps (CI's smoke version)")
    flags.DEFINE_list("modes", None, "modes to run (default: the study's)")
    flags.DEFINE_integer("num_nets", -1, "override the study's number of trained nets (-1: keep)")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    names = study_names(FLAGS.study)
    for name in names:
        extra = {"experiments.num_nets": FLAGS.num_nets} if FLAGS.num_nets > 0 else None
        path = run_study(name, Path(FLAGS.workdir), fast=FLAGS.fast, modes=FLAGS.modes, extra=extra)
        print(path.read_text())
        print(f"written: {path.parent}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
