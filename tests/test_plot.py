"""Tests for experiments.plot."""

import subprocess
import sys

import numpy as np
import pytest

from experiments.plot import TABLE_HEADER, commensurate, make_plots, make_report
from experiments.results import Results

RATIOS = [0.5, 0.3, 0.1, 0.05]


def _synthetic() -> Results:
    """2 nets, 4 ratios, 1 rep, 3 methods, 3 layers, with some NaNs."""
    layers = ["conv1", "conv2", "fc"]
    res = Results.empty(methods=["A", "B", "C"], keep_ratios=RATIOS, num_nets=2,
                        layer_names=layers, layer_total=[100, 200, 50])
    rng = np.random.default_rng(0)
    for net in range(2):
        res.record_dense(net, error=0.1 + 0.002 * net, error5=0.01, loss=0.3)
        for r, ratio in enumerate(RATIOS):
            for m in range(3):
                if (net, r, m) in {(1, 3, 0), (0, 2, 2)}:
                    continue  # not run yet -> NaN
                if m == 2 and r == 3:
                    continue  # method C never reached the last ratio
                kept = ratio * np.array([1.2, 0.9, 1.0]) * np.array([100, 200, 50])
                res.record(net, r, 0, m, error=0.1 + 0.05 * (1 - ratio) * (m + 1) * rng.random(),
                           error5=0.01 + 0.01 * (1 - ratio), loss=0.3 + (1 - ratio),
                           sizes=ratio, flops=min(1.0, 1.3 * ratio), layer_kept=kept)
    return res


def test_make_plots_creates_all_files(tmp_path):
    paths = make_plots(_synthetic(), tmp_path / "plots", "lenet")
    names = sorted(p.name for p in paths)
    expected = [f"lenet_{m}_{a}.pdf" for m in ("acc", "acc5", "loss") for a in ("param", "flops")]
    expected += ["lenet_layer_budget.pdf", "lenet_layer_pr.pdf", "lenet_acc_param.png"]
    assert names == sorted(expected)
    for p in paths:
        assert p.exists() and p.stat().st_size > 0


def test_make_plots_all_nan(tmp_path):
    res = Results.empty(methods=["A"], keep_ratios=RATIOS, num_nets=1, layer_names=["fc"])
    paths = make_plots(res, tmp_path, "empty")
    assert len(paths) == 9 and all(p.stat().st_size > 0 for p in paths)
    report = make_report(res)
    assert "| A |" in report and "—" in report


def test_report_contains_methods_and_header():
    report = make_report(_synthetic())
    assert TABLE_HEADER in report
    for name in ("A", "B", "C"):
        assert f"| {name} |" in report
    assert "Commensurate accuracy" in report
    assert "Unpruned" in report


def _hand_made() -> Results:
    """Dense 90 %. A: 90, 90, 89.5, 80 at sizes 50/30/10/5. B: 90, 89.5, 85, 80."""
    res = Results.empty(methods=["A", "B"], keep_ratios=[0.5, 0.3, 0.1, 0.05], num_nets=2)
    errors = {"A": [0.10, 0.10, 0.105, 0.20], "B": [0.10, 0.105, 0.15, 0.20]}
    for net in range(2):
        res.record_dense(net, error=0.10)
        for m, errs in errors.items():
            for r, (ratio, err) in enumerate(zip(res.keep_ratios, errs)):
                res.record(net, r, 0, m, error=err, sizes=ratio, flops=ratio / 2)
    return res


def test_commensurate_numbers():
    sizes, flops = commensurate(_hand_made(), drops=(0, 0.5, 1, 2, 5))
    np.testing.assert_allclose(sizes[0], [30, 10, 10, 10, 10])  # A
    np.testing.assert_allclose(sizes[1], [50, 30, 30, 30, 10])  # B
    np.testing.assert_allclose(flops, sizes / 2)
    report = make_report(_hand_made())
    assert "| A | 30.00 | 10.00 | 10.00 | 10.00 | 10.00 |" in report
    assert "| B | 50.00 | 30.00 | 30.00 | 30.00 | 10.00 |" in report


def test_commensurate_none_reached_is_dash():
    res = _hand_made()
    res.error[..., 1] = 0.5  # B never gets close to dense
    report = make_report(res)
    assert "| B | — | — | — | — | — |" in report


def test_cli(tmp_path):
    _synthetic().save_npz(tmp_path / "results.npz")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.plot", f"--workdir={tmp_path}"],
        capture_output=True, text=True, check=True,
    )
    assert TABLE_HEADER in out.stdout
    assert (tmp_path / "report.md").read_text() == out.stdout.rstrip("\n") + "\n"
    assert (tmp_path / "plots" / "results_acc_param.png").stat().st_size > 0


@pytest.mark.parametrize("bad", ["missing"])
def test_cli_missing_results(tmp_path, bad):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.plot", f"--workdir={tmp_path / bad}"],
        capture_output=True, text=True,
    )
    assert out.returncode != 0 and "results.npz" in out.stderr


# --------------------------------------------------------------------------
# Issue #17 items 9 and 11: the CLI regenerates the run's own plots; readable plots and report.
# --------------------------------------------------------------------------
def test_cli_regenerates_the_runs_own_plots_and_report(tmp_path):
    import json

    from experiments.plot import run_tag, write_outputs

    run = tmp_path / "default"
    run.mkdir()
    res = _synthetic()
    res.save_npz(run / "results.npz")
    (run / "config.json").write_text(json.dumps({
        "network": "lenet300_100", "dataset": {"name": "mnist_embedded"}, "seed": 0,
        "experiments": {"mode": "cascade"},
        "training": {"num_epochs": 15, "batch_size": 64, "learning_rate": 0.05, "lr_milestones": [10]},
        "retraining": {"num_epochs": 3, "batch_size": 64, "learning_rate": 0.01, "lr_milestones": [2]}}))
    assert run_tag(run) == "default"  # a pipeline workdir: its name, as the pipeline names the plots
    write_outputs(res, run)
    before = sorted(p.name for p in (run / "plots").iterdir())
    assert before and all(name.startswith("default_") for name in before)
    out = subprocess.run([sys.executable, "-m", "experiments.plot", f"--workdir={run}"],
                         capture_output=True, text=True, check=True)
    assert sorted(p.name for p in (run / "plots").iterdir()) == before  # no second set
    report = (run / "report.md").read_text()
    assert report == out.stdout.rstrip("\n") + "\n"
    assert report.startswith("# Pruning results: lenet300_100 on mnist_embedded")
    assert "mode: **cascade**" in report and "Training: 15 epochs" in report and "Retraining: 3 epochs" in report
    assert "plots/default_acc_param.png" in report and "plots/default_*.pdf" in report
    # A folder without a run's config.json or plots: the default prefix.
    assert run_tag(tmp_path) == "results"


def test_method_families_colours_markers_and_every_budget_ratio():
    from configs.common import ALL_METHODS
    from experiments.plot import _budget_ratios, family, method_styles

    styles = method_styles(ALL_METHODS)
    assert len(set(styles.values())) == len(ALL_METHODS)  # no two methods look alike
    for fam in {family(m) for m in ALL_METHODS}:
        members = [m for m in ALL_METHODS if family(m) == fam]
        assert len({styles[m][1] for m in members}) == len(members)  # distinct markers within a family
    assert family("sipp_rand") == "SiPP" and family("pfp_top") == "PFP" and family("ft") == "filter baselines"
    # Families differ in hue: SiPP blue-dominant, PFP red-dominant.
    r, g, b, _ = styles["sipp"][0]
    assert b > r
    r, g, b, _ = styles["pfp"][0]
    assert r > b
    res = _synthetic()
    assert _budget_ratios(res) == [0, 1, 2, 3]  # every keep ratio with data
