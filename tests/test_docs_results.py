"""experiments.docs_results: docs/results.md from a (tiny, fake) workdir of studies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import docs_results, docs_vit, docs_zeroing
from experiments.results import Results
from tests.test_docs_vit import _results as vit_results
from tests.test_docs_zeroing import _results as zeroing_results

ROOT = Path(__file__).resolve().parents[1]


def _study_results(accuracy_drop: float) -> Results:
    res = Results.empty(methods=("sipp", "wt", "pfp", "ft"), keep_ratios=(0.4, 0.1), num_nets=2)
    for net in range(2):
        res.record_dense(net, error=0.10 + 0.01 * net)
        for r, keep in enumerate(res.keep_ratios):
            for m, method in enumerate(res.methods):
                kept = 0.12 if (method == "ft" and keep == 0.1) else keep  # off the grid: shown in brackets
                res.record(net, r, 0, method, error=0.10 + accuracy_drop * (m + 1) * (1 - keep) + 0.01 * net,
                           sizes=kept, flops=kept)
    return res


def _png(path, size=(1200, 300)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, (255, 255, 255, 255)).save(path)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "runs"
    study = wd / "fashion_lenet300_100"
    study.mkdir(parents=True)
    _study_results(0.01).save_npz(study / "cascade_results.npz")
    _study_results(0.2).save_npz(study / "prune-only_results.npz")
    _png(study / "cascade_acc_param.png")
    rows = [{"network": "lenet300_100", "sweep": sweep, "method": "sipp_rand", "keep_ratio": 0.3, "s_size": size,
             "s_formula": 49, "draw": 0, "delta": 0.1, "layer": "linear0", "eps_median": 1.0, "err_median": 0.1,
             "err_p95": 0.4, "fraction_within": frac}
            for sweep, size, frac in (("ratio", 49, 0.995), ("s_size", 2, 0.75), ("s_size", 49, 1.0))]
    (wd / "guarantees").mkdir()
    (wd / "guarantees" / "guarantees.json").write_text(json.dumps(rows))
    _png(wd / "guarantees" / "s_sweep.png")
    ablation = {"dataset": "fashion_mnist", "dense_accuracy": 89.2, "keep_ratio": 0.1, "num_points": 128,
                "kernel_max_abs_diff": 7e-6, "raw_pixel_first_layer": 56.3,
                "rows": [{"score": "SiPP: max share over S", "WT's per-unit counts": 56.8,
                          "WT's per-layer counts": 31.4, "own global top-B": 42.6},
                         {"score": "WT: |w|", "WT's per-unit counts": 82.2, "WT's per-layer counts": 82.2,
                          "own global top-B": 82.2}],
                "sipp_in_one_layer": {"linear0": 56.5, "linear1": 69.9},
                "units_kept": {"sipp": {"linear0": [16, 37.0, 63, 0, 300], "linear1": [108, 141.0, 166, 0, 100]},
                               "wt": {"linear0": [0, 42.0, 391, 42, 300], "linear1": [0, 68.5, 124, 1, 100]}}}
    (wd / "sipp_ablation").mkdir()
    (wd / "sipp_ablation" / "ablation.json").write_text(json.dumps(ablation))
    return wd


def test_build_writes_page_and_small_images(workdir, tmp_path):
    out = tmp_path / "docs"
    path = docs_results.build(workdir, out)
    assert path == out / "results.md"
    text = path.read_text()
    assert "python -m experiments.docs_results --workdir=runs/studies --out=docs/" in text
    # Acceptance targets, computed from the npz files and the guarantee rows.
    assert "`pfp` " in text and "vs. `ft`" in text and "`sipp`" in text and "vs. `wt`" in text
    assert "smallest fraction over all nets, methods, keep ratios, keys and layers 0.9950 (met)" in text
    # The study's tables: unpruned mean ± std over the two nets, mean ± std cells, off-grid sizes in brackets.
    assert "## `fashion_lenet300_100`" in text and "Unpruned: 89.50 ± 0.50 % (2 nets)" in text
    assert "| method | 60 % | 90 % |" in text
    wt_cascade = 100 * (1 - (0.10 + 0.01 * 2 * 0.6 + np.array([0.0, 0.01])))
    assert f"| `wt` | {wt_cascade.mean():.1f} ± {wt_cascade.std():.1f} |" in text
    assert "(88.0 %)" in text  # ft kept 12 % at the 10 % column
    assert text.count("| `sipp` | ") == 3  # cascade, prune-only and the ablation's units table
    # Guarantee and ablation sections.
    assert "**49**: 1.0000" in text and "2: 0.7500" in text
    assert "| WT: \\|w\\| | 82.20 | 82.20 | 82.20 |" in text and "7e-06" in text
    # Only the figures that exist are copied, scaled down, and linked relative to the page.
    images = sorted(p.name for p in (out / "img").iterdir())
    assert images == ["fashion_lenet300_100_cascade_acc_param.png", "guarantees_s_sweep.png"]
    for name in images:
        assert f"](img/{name})" in text
        with Image.open(out / "img" / name) as im:
            assert im.width == docs_results.MAX_IMAGE_WIDTH and im.mode == "P"
    assert "prune-only_acc_param" not in text


def test_build_skips_missing_studies_and_refuses_an_empty_workdir(workdir, tmp_path):
    for sub in ("guarantees", "sipp_ablation"):
        for f in (workdir / sub).iterdir():
            f.unlink()
        (workdir / sub).rmdir()
    text = docs_results.build(workdir, tmp_path / "docs").read_text()
    assert "## `fashion_lenet300_100`" in text
    assert "## Sampling guarantees" not in text and "## Why prune-only" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no study outputs"):
        docs_results.build(empty, tmp_path / "docs")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        docs_results.build(tmp_path / "nope", tmp_path / "docs")


# ----------------------------------------------------------------------------
# The one command for every generated page (docs_results.render_all and its CLI)
# ----------------------------------------------------------------------------
def _old_pages(out):
    """Every page the command may write, each holding a marker that a rewrite would replace."""
    out.mkdir(parents=True, exist_ok=True)
    pages = ["results.md", *(page for page, _, _ in docs_results.TOPIC_PAGES)]
    for page in pages:
        (out / page).write_text(f"old {page}")
    return pages


@pytest.fixture
def newer_studies(tmp_path):
    """A workdir like this project's shared one: the ViT study (in ``reproduce.STUDIES``, not on
    results.md), a study without outputs yet, the zeroing runs next to it, no LeNet study."""
    wd = tmp_path / "runs" / "studies"
    (wd / "digits_vit").mkdir(parents=True)
    vit_results().save_npz(wd / "digits_vit" / "cascade_results.npz")
    (wd / "fashion_resnet20" / "runs").mkdir(parents=True)
    acc = {"sipp": [40.0, 20.0], "wt": [80.0, 60.0], "pfp": [25.0, 12.0], "ft": [28.0, 19.0]}
    for mode in ("off", "on"):
        (wd.parent / "zeroing" / mode).mkdir(parents=True)
        zeroing_results(acc, 50.0).save_npz(wd.parent / "zeroing" / mode / "results.npz")
    return wd


def test_render_all_writes_pages_with_outputs_and_leaves_the_rest(newer_studies, tmp_path):
    out = tmp_path / "docs"
    _old_pages(out)
    written = docs_results.render_all(newer_studies, out)
    assert written == {"results.md": False, "vit.md": True, "convnets.md": False, "lm.md": False,
                       "zeroing.md": True}
    for page in ("results.md", "convnets.md", "lm.md"):
        assert (out / page).read_text() == f"old {page}", page
    assert not (out / "img").exists()
    # The written pages are what each page's own generator writes from its folder.
    solo = tmp_path / "solo"
    assert docs_vit.render(newer_studies, solo) and docs_zeroing.render(newer_studies.parent / "zeroing", solo)
    for page in ("vit.md", "zeroing.md"):
        assert (out / page).read_text() == (solo / page).read_text() != f"old {page}", page
    assert "## `digits_vit`" in (out / "vit.md").read_text()


def test_render_all_rewrites_results_md_from_its_own_studies_only(workdir, tmp_path):
    out = tmp_path / "docs"
    pages = _old_pages(out)
    (workdir / "digits_vit").mkdir()
    vit_results().save_npz(workdir / "digits_vit" / "cascade_results.npz")
    written = docs_results.render_all(workdir, out)
    assert written == {page: page in ("results.md", "vit.md") for page in pages}
    text = (out / "results.md").read_text()
    assert "## `fashion_lenet300_100`" in text and "digits_vit" not in text  # vit.md shows it
    assert "## Sampling guarantees" in text
    assert docs_results.render(tmp_path / "nope", out) is False
    with pytest.raises(FileNotFoundError, match="does not exist"):
        docs_results.render_all(tmp_path / "nope", out)


def test_command_lists_written_and_untouched_pages(newer_studies, tmp_path):
    out = tmp_path / "docs"
    _old_pages(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.docs_results", f"--workdir={newer_studies}", f"--out={out}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"written: {out / 'vit.md'}" in run.stdout and f"written: {out / 'zeroing.md'}" in run.stdout
    assert f"left untouched (no study outputs): {out / 'results.md'}" in run.stdout
    assert (out / "results.md").read_text() == "old results.md"
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run(cmd[:3] + [f"--workdir={empty}", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and "no study outputs under" in run.stderr
