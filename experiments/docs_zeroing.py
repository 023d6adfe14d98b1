"""docs/zeroing.md: prune-only accuracy with the reference's data-dependent zeroing on vs. off (issue #16).

  python -m experiments.docs_zeroing --workdir=runs/zeroing --out=docs/

``WORKDIR/on`` and ``WORKDIR/off`` are two pipeline workdirs of the same config (``COMMANDS``), differing
only in ``coresets.zero_dead``. Without both ``results.npz`` the page is left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from absl import app, flags

from experiments import reproduce
from experiments import results as results_lib

MODES = ("off", "on")
PAIRS = (("sipp", "wt"), ("pfp", "ft"))
COMMANDS = """```bash
for z in on off; do
  zd=$([ $z = on ] && echo True || echo False)
  nice -n 10 python -m experiments.main --config=configs/fashion/lenet300_100.py --workdir=runs/zeroing/$z \\
    --config.experiments.mode=prune-only --config.experiments.methods=sipp,wt,pfp,ft \\
    --config.experiments.num_nets=3 --config.coresets.zero_dead=$zd
done
python -m experiments.docs_zeroing --workdir=runs/zeroing --out=docs/
```"""


# Measured on this code (issue #15): mobilenet_small on the embedded digits, SGD (lr 0.05, momentum 0.9, batch 64),
# 64 validation points as S, eval-mode BatchNorm, the loss gradient (with labels).
BATCHNORM_NOTE = (
    "Zeroing removes what has an exactly zero gradient on S for the model *as pruning evaluates it*: BatchNorm "
    "in eval mode, normalising with its running statistics. When those statistics do not match the weights, "
    "many units are dead on S although nothing is wrong with the zeroing. After two SGD steps, `mobilenet_small` "
    "(`configs/digits/mobilenet.py`) has 66 % of its kernel entries with an exactly zero loss gradient on 64 "
    "points; a direct `jax.grad` of the loss agrees with `sensprune.zeroing.dead_params` entry by entry. The "
    "running statistics are still mostly their start values (momentum 0.9: two updates keep 81 % of the initial "
    "mean 0 and variance 1; `block2/pw`'s running variance is about 0.93), while a deep pointwise-conv channel "
    "varies little over S (standard deviation 0.002 to 0.005) around a mean other than the running one (0.02 "
    "against 0.10 in `block2/pw`, collected before the weight updates): the normalised channel is "
    "almost constant, and for 16 to 61 channels of each BatchNorm from `block1/pw` on it is negative on every "
    "point, so the ReLU after it never fires and everything that only feeds such channels has a zero gradient (the "
    "depthwise kernels and grouped convs are not the cause). With batch statistics (train mode) no channel is "
    "dead, and after recalibrating the running statistics on S (train-mode passes, weights unchanged) no kernel "
    "entry has a zero gradient. After 150 steps (the last 30 at learning rate 0.005) the statistics have caught "
    "up: no kernel entry has a zero gradient either. Smoke tests on barely trained BatchNorm nets should pass "
    "`zero_dead=False` or recalibrate the statistics before pruning."
)


def _load(workdir: Path) -> dict[str, results_lib.Results] | None:
    paths = {mode: Path(workdir) / mode / "results.npz" for mode in MODES}
    if not all(p.exists() for p in paths.values()):
        return None
    return {mode: results_lib.Results.load_npz(p) for mode, p in paths.items()}


def _acc(res: results_lib.Results, method: str) -> np.ndarray:
    """Mean top-1 accuracy (%) over nets per keep ratio (NaN where the method is absent)."""
    if method not in res.methods:
        return np.full(len(res.keep_ratios), np.nan)
    return np.nanmean(reproduce.accuracy_per_net(res)[:, :, res.methods.index(method)], axis=0)


def _pruned(res: results_lib.Results, method: str) -> np.ndarray:
    if method not in res.methods:
        return np.full(len(res.keep_ratios), np.nan)
    sizes = np.asarray(res.sizes, float)[..., res.methods.index(method)]  # [nets, ratios, reps]
    return 100.0 * (1.0 - np.nanmean(sizes, axis=(0, 2)))


def accuracy_lines(runs: dict[str, results_lib.Results]) -> list[str]:
    """One row per (method, keep ratio): accuracy and pruned parameters with zeroing off and on."""
    off, on = runs["off"], runs["on"]
    lines = ["| method | keep | acc. off (%) | acc. on (%) | on - off (pp) | pruned off / on (%) |",
             "|---|---|---|---|---|---|"]
    for method in off.methods:
        a_off, a_on = _acc(off, method), _acc(on, method)
        p_off, p_on = _pruned(off, method), _pruned(on, method)
        for r, keep in enumerate(off.keep_ratios):
            lines.append(f"| `{method}` | {keep:.3g} | {a_off[r]:.2f} | {a_on[r]:.2f} | {a_on[r] - a_off[r]:+.2f} "
                         f"| {p_off[r]:.2f} / {p_on[r]:.2f} |")
    return lines


def pair_lines(runs: dict[str, results_lib.Results]) -> list[str]:
    """The paper's comparisons, SiPP - WT and PFP - FT (pp of accuracy), per keep ratio, off and on."""
    ratios = runs["off"].keep_ratios
    lines = ["| comparison | " + " | ".join(f"keep {k:.3g}" for k in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for a, b in PAIRS:
        for mode in MODES:
            gap = _acc(runs[mode], a) - _acc(runs[mode], b)
            lines.append(f"| `{a}` - `{b}`, zeroing {mode} | " + " | ".join(f"{g:+.2f}" for g in gap) + " |")
    return lines


def layer_lines(runs: dict[str, results_lib.Results], keeps: Sequence[float] = (0.1, 0.05)) -> list[str]:
    """Kept kernel entries per layer (mean over nets) at ``keeps``, off -> on: where the budget went."""
    off = runs["off"]
    lines = ["| method | keep | " + " | ".join(f"`{n}` off -> on" for n in off.layer_names) + " |",
             "|---|---|" + "---|" * len(off.layer_names)]
    for method in off.methods:
        for keep in keeps:
            r = reproduce._ratio_index(off, keep)
            if r is None:
                continue
            kept = {mode: np.nanmean(np.asarray(runs[mode].layer_kept, float)[:, r, :, runs[mode].methods.index(
                method)], axis=(0, 1)) for mode in MODES if method in runs[mode].methods}
            if len(kept) < len(MODES):
                continue
            cells = [f"{a:.0f} -> {b:.0f}" for a, b in zip(kept["off"], kept["on"])]
            lines.append(f"| `{method}` | {keep:.3g} | " + " | ".join(cells) + " |")
    return lines


def summary_line(runs: dict[str, results_lib.Results], keep: float = 0.1) -> str:
    """One sentence: how the SiPP - WT and PFP - FT gaps move at ``keep`` (empty if it is not on the grid)."""
    r = reproduce._ratio_index(runs["off"], keep)
    if r is None:
        return ""
    parts = []
    for a, b in PAIRS:
        off, on = (float(_acc(runs[m], a)[r] - _acc(runs[m], b)[r]) for m in MODES)
        parts.append(f"`{a}` - `{b}` goes from {off:+.2f} to {on:+.2f} pp")
    return f"At keep {keep:g}, turning zeroing on: " + "; ".join(parts) + "."


def render(workdir: Path, out: Path) -> bool:
    """Writes ``out/zeroing.md`` from ``workdir/{on,off}/results.npz``; False (page untouched) if missing."""
    runs = _load(Path(workdir))
    if runs is None:
        return False
    nets = runs["on"].num_nets
    dense = np.nanmean(reproduce.dense_accuracy(runs["on"]))
    text = [
        "# Data-dependent zeroing: prune-only, on vs. off",
        "",
        "Generated by `python -m experiments.docs_zeroing`; do not edit by hand.",
        "",
        "After selecting, the reference zeroes every kernel entry and bias of exactly zero loss gradient over S "
        "and counts the size after that, inside its keep-ratio search (`sp.prune(zero_dead=True)`, the default; "
        "see [usage.md](usage.md)). This study prunes the same trained nets with it on and off, without "
        f"retraining: LeNet300-100 on Fashion-MNIST, {nets} nets (unpruned {dense:.2f} %), |S| from the config.",
        "",
        "## Accuracy (mean over nets)",
        "",
        *accuracy_lines(runs),
        "",
        "## SiPP vs. WT and PFP vs. FT (accuracy difference, pp)",
        "",
        " ".join(summary_line(runs, keep) for keep in (0.1, 0.05)),
        "",
        *pair_lines(runs),
        "",
        "## Kept kernel entries per layer (mean over nets)",
        "",
        *layer_lines(runs),
        "",
        "## BatchNorm nets shortly after initialisation",
        "",
        BATCHNORM_NOTE,
        "",
        "## Command",
        "",
        COMMANDS,
        "",
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zeroing.md").write_text("\n".join(text))
    return True


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    written = render(Path(FLAGS.workdir), Path(FLAGS.out))
    print(f"written: {Path(FLAGS.out) / 'zeroing.md'}" if written else f"no results under {FLAGS.workdir}; page left")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/zeroing", "holds on/ and off/ pipeline workdirs")
    flags.DEFINE_string("out", "docs", "folder of zeroing.md")
    app.run(main)
