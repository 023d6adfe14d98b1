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
