"""experiments.docs_convnets: docs/convnets.md from a tiny synthetic workdir of the conv-net study."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments import docs_convnets
from experiments import plot as plot_lib
from experiments.results import Results

METHODS = ("pfp", "ft", "sipp", "wt")
KEEPS = (0.7, 0.4, 0.15)
DENSE_ACC = 90.0
# Accuracy (%) per method and keep ratio; achieved kept fraction of params and FLOPs per method.
ACC = {"pfp": (89.9, 89.6, 88.0), "ft": (89.8, 89.2, 87.0), "sipp": (90.1, 89.5, 89.3), "wt": (89.7, 89.0, 88.9)}
FLOPS = {"pfp": (0.6, 0.3, 0.1), "ft": (0.7, 0.4, 0.15), "sipp": (0.8, 0.5, 0.3), "wt": (0.8, 0.6, 0.4)}


def _results(methods=METHODS) -> Results:
    res = Results.empty(methods=methods, keep_ratios=KEEPS, num_nets=1)
    res.record_dense(0, error=1 - DENSE_ACC / 100)
    for m in methods:
        for r, keep in enumerate(KEEPS):
            res.record(0, r, 0, m, error=1 - ACC[m][r] / 100, sizes=keep, flops=FLOPS[m][r])
    return res


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1300, 400), (255, 255, 255)).save(path)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "runs"
    study = wd / "fashion_resnet20"
    study.mkdir(parents=True)
    _results().save_npz(study / "cascade_results.npz")
    _png(study / "cascade_acc_param.png")
    _png(study / "cascade_acc_flops.png")
    return wd


def test_best_within_matches_plot_commensurate_and_hand_values():
    res = _results()
    kept, kept_flops = plot_lib.commensurate(res, docs_convnets.DROPS)
    for m, method in enumerate(METHODS):
        for d, drop in enumerate(docs_convnets.DROPS):
            point = docs_convnets.best_within(res, method, drop)
            assert point is not None
            assert point.params_removed == pytest.approx(100 - kept[m, d])
            # FLOPs fall with the keep ratio here, so the point's FLOPs are also the smallest kept ones.
            assert point.flops_removed == pytest.approx(100 - kept_flops[m, d])
    # By hand: pfp within 0.5 pp down to keep 0.4 (89.6), within 1 pp still 0.4 (88.0 is -2).
    p = docs_convnets.best_within(res, "pfp", 0.5)
    assert (p.params_removed, p.flops_removed, p.delta) == pytest.approx((60.0, 70.0, -0.4))
    assert docs_convnets.best_within(res, "ft", 0.5).params_removed == pytest.approx(30.0)
    assert docs_convnets.best_within(res, "sipp", 1.0).params_removed == pytest.approx(85.0)


def test_best_within_none_when_nothing_qualifies_or_unfinished():
    res = _results()
    res.record(0, 0, 0, "ft", error=0.2, sizes=0.7, flops=0.7)  # 80 % at keep 0.7
    res.record(0, 1, 0, "ft", error=0.2, sizes=0.4, flops=0.4)
    res.record(0, 2, 0, "ft", error=0.2, sizes=0.15, flops=0.15)
    assert docs_convnets.best_within(res, "ft", 1.0) is None
    empty = Results.empty(methods=METHODS, keep_ratios=KEEPS, num_nets=1)
    empty.record_dense(0, error=0.1)
    assert docs_convnets.best_within(empty, "pfp", 0.5) is None


def test_findings_state_the_leaders_and_pairs():
    text = "\n".join(docs_convnets.findings({"fashion_resnet20": _results()}))
    # Within 0.5 pp: pfp 60 %, ft 30 %, sipp 60 % (89.5 at 0.4), wt 30 % -> pfp and sipp tie on parameters;
    # FLOPs: pfp 70 % at keep 0.4, sipp 50 %.
    assert "most parameters removed within −0.5 pp: `pfp` and `sipp` (60.0 %)" in text
    assert "most FLOPs removed within −0.5 pp: `pfp` (70.0 %)" in text
    assert "`pfp` removes 60.0 % of the parameters / 70.0 % of the FLOPs, more parameters than `ft` (30.0 % / 30.0 %)" \
        in text
    assert "`sipp` removes 60.0 % of the parameters / 50.0 % of the FLOPs, more parameters than `wt`" in text
    assert "unpruned 90.00 %" in text


def test_render_writes_page_tables_and_small_images(workdir, tmp_path):
    out = tmp_path / "docs"
    assert docs_convnets.render(workdir, out)
    text = (out / "convnets.md").read_text()
    assert "python -m experiments.docs_convnets --workdir=runs/studies --out=docs/" in text
    assert "Not finished yet (left out): `fashion_vgg_small`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `pfp` |") and "(" in line)
    assert row == "| `pfp` | 60.0 / 70.0 (-0.40) | 60.0 / 70.0 (-0.40) |"
    assert "| `pfp` | 40.3 / 30.1 (-0.28) | 94.9 / 84.8 (-0.47) | 40.2 / 43.4 | 85.3 / 80.7 |" in text
    assert "| `ft` | 39.7 / 39.6 | 79.1 / 78.4 | 28.3 / 29.5 | 82.3 / 76.0 |" in text
    for plot in docs_convnets.PLOTS:
        image = out / "img" / f"convnets_fashion_resnet20_{plot}.png"
        assert f"](img/{image.name})" in text
        with Image.open(image) as im:
            assert im.width <= 900 and im.mode == "P"


def test_render_without_outputs_leaves_page_untouched(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "convnets.md").write_text("old\n")
    assert not docs_convnets.render(tmp_path / "empty", out)
    assert (out / "convnets.md").read_text() == "old\n"
    assert not (out / "img").exists()


def test_commensurate_table_marks_methods_missing_from_a_net():
    studies = {"fashion_resnet20": _results(), "fashion_vgg_small": _results(("pfp", "ft"))}
    lines = docs_convnets.commensurate_table(studies)
    assert lines[0].count("pp") == 4
    sipp = next(line for line in lines if line.startswith("| `sipp` |"))
    assert sipp.endswith("| — | — |")
    assert np.isfinite(docs_convnets.best_within(studies["fashion_vgg_small"], "ft", 1.0).params_removed)


def _config(workdir, name, coresets):
    path = workdir / name / "runs" / "cascade" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"coresets": coresets}))


def test_page_states_each_nets_zeroing_setting(workdir, tmp_path):
    _config(workdir, "fashion_resnet20", {"size": 128})  # predates the option: ran without zeroing
    vgg = workdir / "fashion_vgg_small"
    vgg.mkdir()
    _results().save_npz(vgg / "cascade_results.npz")
    _config(workdir, "fashion_vgg_small", {"size": 128, "zero_dead": True})
    assert docs_convnets.zeroing_setting(workdir, "fashion_resnet20") is False
    assert docs_convnets.zeroing_setting(workdir, "fashion_vgg_small") is True
    assert docs_convnets.zeroing_setting(workdir, "nope") is None
    out = tmp_path / "docs"
    assert docs_convnets.render(workdir, out)
    text = (out / "convnets.md").read_text()
    assert "`coresets.zero_dead`" in text and "off for ResNet20, on for small VGG." in text
    assert "predate it becoming the default" in text
    assert docs_convnets.zeroing_line({"fashion_vgg_small": True}) == [
        "Data-dependent zeroing (`coresets.zero_dead`, see [zeroing.md](zeroing.md)): on for small VGG.", ""]
    assert docs_convnets.zeroing_line({"fashion_vgg_small": None}) == []


def test_pfp_among_filters_counts_wins_and_reports_the_smallest_ratio():
    text = docs_convnets.pfp_among_filters(_results())
    # pfp beats ft at all three ratios; at keep 0.15: 88.00 vs 87.00, FLOPs removed 90.0 vs 85.0 %
    assert "best accuracy of the filter methods at 3 of 3 ratios" in text
    assert "at keep 0.15 it has 88.00 % against 87.00 % for the best baseline (`ft`)" in text
    assert "removing 90.0 % of the FLOPs against 85.0-85.0 %" in text
    assert docs_convnets.pfp_among_filters(_results(("sipp", "wt"))) is None
    assert "`pfp` removes fewer FLOPs (30.1 % against 39.6 %)" in docs_convnets.paper_pattern()
