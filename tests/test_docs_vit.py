"""experiments.docs_vit: docs/vit.md from a (tiny, fake) workdir of studies."""

import numpy as np

from experiments import docs_vit
from experiments.results import Results

LAYERS = ("patch_embed", "block0/attn/query", "block0/attn/out", "block0/mlp/fc1", "block0/mlp/fc2", "head")
TOTAL = {"patch_embed": 49 * 64, "block0/attn/query": 64 * 64, "block0/attn/out": 64 * 64,
         "block0/mlp/fc1": 64 * 128, "block0/mlp/fc2": 128 * 64, "head": 640}


def _results() -> Results:
    res = Results.empty(methods=("sipp", "pfp"), keep_ratios=(0.6, 0.3), num_nets=1, layer_names=LAYERS,
                        layer_total=TOTAL, flops_total=1e6)
    res.record_dense(0, error=0.05)
    for r, keep in enumerate(res.keep_ratios):
        for method in res.methods:
            if method == "pfp":  # MLP units only: attention, patch conv and head stay whole; stops at 0.45
                size = max(keep, 0.45)
                kept = {n: TOTAL[n] * (0.5 if "mlp" in n else 1.0) for n in LAYERS}
            else:
                size, kept = keep, {n: TOTAL[n] * keep for n in LAYERS}
            res.record(0, r, 0, method, error=0.05 + 0.1 * (1 - keep), sizes=size, flops=size, layer_kept=kept)
    return res


def test_missing_study_leaves_page_untouched(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "vit.md").write_text("old")
    assert docs_vit.render(tmp_path / "runs", out) is False
    assert (out / "vit.md").read_text() == "old"


def test_page_has_the_vit_table_and_the_lenet_companion(tmp_path):
    wd = tmp_path / "runs"
    for name in ("digits_vit", "digits_lenet300_100"):
        (wd / name).mkdir(parents=True)
        _results().save_npz(wd / name / "cascade_results.npz")
    assert docs_vit.render(wd, tmp_path / "docs")
    text = (tmp_path / "docs" / "vit.md").read_text()
    assert "## `digits_vit`" in text and "## `digits_lenet300_100`" in text and "fashion_vit" not in text
    assert "| method | keep 0.6 | keep 0.3 |" in text
    # accuracy 100 * (1 - 0.05 - 0.1 * (1 - keep)); pruned % of params / FLOPs; pfp stopped at 55 % pruned
    assert "| `sipp` | 91.00 ± 0.00<br>40.0 / 40.0 | 88.00 ± 0.00<br>70.0 / 70.0 |" in text
    assert "| `pfp` | 91.00 ± 0.00<br>40.0 / 40.0 | 88.00 ± 0.00<br>55.0 / 55.0 |" in text
    assert ("`pfp` left 4 of 6 layers dense at every keep ratio: the 2 attention projections, `patch_embed`, "
            "`head`.") in text
    assert "`sipp` left" not in text  # only filter methods get the note
    assert docs_vit.dense_layers_line(_results(), "sipp") is None  # pruned every layer: no note
    assert docs_vit.dense_layers_line(_results(), "wt") is None  # not in the study
    assert f"{int(np.sum(list(TOTAL.values()))):,} kernel entries" in text
