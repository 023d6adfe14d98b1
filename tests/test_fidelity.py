"""The fidelity study's commands (experiments.reproduce, experiments.guarantees) in their fast versions."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import guarantees, reproduce
from experiments import results as results_lib
from sensprune.types import Layer


def _dense_layer(n_in=6, n_out=4):
    return Layer(path=("d",), kind="dense", kernel_shape=(n_in, n_out), use_bias=True,
                 input_shape=(n_in,), output_shape=(n_out,))


def test_layer_check_measures_relative_error_by_hand():
    rng = np.random.default_rng(0)
    layer = _dense_layer()
    w = rng.standard_normal((6, 4))
    x = rng.standard_normal((50, 6))
    # Every weight scaled by 1.1: each sign-split pre-activation is off by exactly 10 %.
    row = guarantees.layer_check(layer, w, 1.1 * w, x, 0.2)
    assert row["err_median"] == pytest.approx(0.1) and row["err_max"] == pytest.approx(0.1)
    assert row["fraction_within"] == 1.0 and row["checks"] > 0
    assert guarantees.layer_check(layer, w, 1.1 * w, x, 0.05)["fraction_within"] == 0.0
    # Per-row bounds [2, out]: only the positive-weight rows of unit 0 get a loose bound.
    eps = np.full((2, 4), 0.05)
    eps[0, 0] = 1.0
    frac = guarantees.layer_check(layer, w, 1.1 * w, x, eps)["fraction_within"]
    assert 0.0 < frac < 0.5
    # A unit whose whole column was removed (PFP propagation) is not checked.
    w_hat = w.copy()
    w_hat[:, 1] = 0.0
    row = guarantees.layer_check(layer, w, w_hat, x, 0.0)
    assert row["removed_units"] == 1 and row["fraction_within"] == 1.0


def test_layer_check_conv_identity_is_exact():
    layer = Layer(path=("c",), kind="conv", kernel_shape=(3, 3, 2, 5), use_bias=False, input_shape=(6, 6, 2),
                  output_shape=(6, 6, 5), strides=(1, 1), padding=((1, 1), (1, 1)), input_dilation=(1, 1),
                  kernel_dilation=(1, 1))
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 3, 2, 5)).astype(np.float32)
    row = guarantees.layer_check(layer, w, w, rng.standard_normal((3, 6, 6, 2)), 0.0)
    assert row["err_max"] == 0.0 and row["fraction_within"] == 1.0 and row["checks"] > 3 * 36


def test_reproduce_fast_writes_tables_plots_and_checks(tmp_path):
    extra = {"experiments.methods": ("sipp", "pfp", "wt", "ft"), "coresets.size": 32,
             "training.max_steps_per_epoch": 20, "retraining.max_steps_per_epoch": 5}
    path = reproduce.run_study("embedded_lenet300_100", tmp_path, fast=True, extra=extra)
    assert path.parent == tmp_path / "embedded_lenet300_100"
    assert (path.parent / "runs" / "cascade" / "results.npz").exists()  # the resumable pipeline workdir
    text = path.read_text()
    assert "## Acceptance checks" in text
    assert "SiPP with >= 90 % of parameters pruned" in text and "`sipp` at 90.0 % pruned" in text
    assert "`sipp`" in text and "vs. `wt`" in text and "`pfp`" in text and "vs. `ft`" in text
    for mode in ("cascade", "prune-only"):
        for ext in ("pdf", "png"):
            assert (path.parent / f"{mode}_acc_param.{ext}").stat().st_size > 1000
            assert (path.parent / f"{mode}_acc_flops.{ext}").exists()
        res = results_lib.Results.load_npz(path.parent / f"{mode}_results.npz")
        assert res.done.all() and list(res.keep_ratios) == pytest.approx([0.4, 0.1])
        assert "Commensurate accuracy" in (path.parent / f"{mode}_report.md").read_text()
    for method in extra["experiments.methods"]:
        assert text.count(f"| `{method}` |") == 2  # one row per mode
    with pytest.raises(ValueError, match="unknown; allowed: fashion_lenet300_100"):
        reproduce.study_config("nope", "cascade")


def test_guarantees_fast_sweep(tmp_path):
    opts = guarantees.Options(networks=("lenet300_100",), dataset="mnist_embedded", fast=True)
    path, passed = guarantees.run(opts, tmp_path)
    assert path == tmp_path / "guarantees" / "summary.md" and (tmp_path / "nets" / "lenet300_100").is_dir()
    rows = json.loads((path.parent / "guarantees.json").read_text())
    assert {r["sweep"] for r in rows} == {"ratio", "s_size"}
    assert {r["method"] for r in rows if r["sweep"] == "ratio"} == set(guarantees.METHODS)
    for r in rows:
        assert 0.0 <= r["fraction_within"] <= 1.0 and r["checks"] > 0
        assert r["err_median"] <= r["err_p95"] <= r["err_max"]
    text = path.read_text()
    assert "**Verdict:**" in text and ("met" in text)
    assert passed == all(r["fraction_within"] >= 1 - opts.delta for r in rows if r["sweep"] == "ratio")
    for stem in ("bound_vs_observed", "fraction_within", "s_sweep"):
        assert (path.parent / f"{stem}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="allowed: lenet300_100, lenet5"):
        guarantees.run(guarantees.Options(networks=("vgg",)), tmp_path)


def test_relative_shares_by_hand_and_keep_helpers():
    from experiments import sipp_ablation as ab

    w = np.array([[1.0, -2.0], [3.0, 1.0], [-1.0, 1.0]])
    x = np.array([[1.0, 1.0, 2.0]])  # nonnegative: no sign split
    s = ab.relative_shares(x, w)[0]
    # unit 0: positive part 1*1 + 3*1 = 4, negative part -1*2 = -2; unit 1: positive 1 + 2 = 3, negative -2
    np.testing.assert_allclose(s, [[1 / 4, 1.0], [3 / 4, 1 / 3], [1.0, 2 / 3]])
    split = ab.relative_shares(np.array([[1.0, -1.0, 0.0]]), w)
    assert split.shape == (2, 3, 2)  # the point becomes its positive and its negative part
    np.testing.assert_allclose(split[1][1], [1.0, 1.0])  # negative part: input 1 alone carries both units
    score = np.array([[3.0, 0.0], [1.0, 5.0], [2.0, 4.0]])
    np.testing.assert_array_equal(ab.keep_top(score, 2), [[False, False], [False, True], [False, True]])
    np.testing.assert_array_equal(ab.keep_top_per_unit(score, np.array([1, 2])),
                                  [[True, False], [False, True], [False, True]])


def test_study_keys_are_explicit_rbg_keys():
    import jax

    key = guarantees.make_key(3)
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert "rbg" in str(jax.random.key_impl(key))
    from experiments import sipp_ablation

    for module in (reproduce, guarantees, sipp_ablation):  # no global PRNG setting changed at run time
        assert "jax_default_prng_impl" not in Path(module.__file__).read_text()


def test_sipp_ablation_fast_writes_the_table(tmp_path):
    from experiments import sipp_ablation as ab

    opts = ab.Options(dataset="mnist_embedded", num_points=32, fast=True)
    path = ab.run(opts, tmp_path)
    text = path.read_text()
    assert "| SiPP: max share over S |" in text and "| WT: \\|w\\| |" in text
    result = json.loads((tmp_path / "sipp_ablation" / "ablation.json").read_text())
    assert result["kernel_max_abs_diff"] < 1e-4  # the NumPy shares are SiPP's sensitivities
    wt_row = result["rows"][-1]
    # |w| ranked under WT's own allocation reproduces WT exactly, whichever way it is allocated.
    assert wt_row["WT's per-unit counts"] == wt_row["WT's per-layer counts"] == wt_row["own global top-B"]
    assert set(result["sipp_in_one_layer"]) == {"linear0", "linear1", "linear2"}
