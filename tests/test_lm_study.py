"""The scanned-LM study's helpers and its docs page (experiments/lm_study.py, experiments/docs_lm.py)."""

import json

import jax
import numpy as np
import pytest

from experiments import docs_lm, lm_study
from experiments.models.scanned_lm import ScannedLM, unroll_params


def test_windows_are_next_token_pairs():
    ids = np.arange(23, dtype=np.int32)
    w = lm_study.windows(ids, 5)
    assert w.shape == (4, 6)
    np.testing.assert_array_equal(w[1], np.arange(5, 11))  # inputs w[:, :-1], targets shifted by one


def test_load_text_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        lm_study.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "t.txt").write_text("abca")
    ids, alphabet = lm_study.load_text(str(tmp_path / "t.txt"))
    assert alphabet == ["a", "b", "c"] and ids.tolist() == [0, 1, 2, 0]


def test_stack_masks_inverts_unroll():
    model = ScannedLM(vocab=8, dim=8, depth=3, heads=2, mlp_dim=16, max_len=4)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))["params"]
    flat = unroll_params(params, 3)
    masks = jax.tree_util.tree_map(lambda a: np.asarray(a) > 0, flat)
    stacked = lm_study.stack_masks(masks, 3)
    plain = jax.tree_util.tree_map(lambda a: np.asarray(a) > 0, unroll_params(params, 3))
    assert jax.tree_util.tree_structure(stacked) != jax.tree_util.tree_structure(plain)
    np.testing.assert_array_equal(stacked["blocks"]["mlp_in"]["kernel"][2], plain["blocks_2"]["mlp_in"]["kernel"])
    assert stacked["blocks"]["query"]["kernel"].shape == (3, 8, 2, 4)


def test_docs_page_renders_only_from_outputs(tmp_path):
    out = tmp_path / "docs"
    assert not docs_lm.render(tmp_path / "nothing", out) and not out.exists()
    results = {
        "options": {"depth": 2, "dim": 48, "heads": 4, "mlp_dim": 96, "train_steps": 400, "text": "t.txt",
                    "seq_len": 32, "num_points": 64, "retrain_steps": 60},
        "vocab": 60, "windows": [900, 100], "dense_params": 1000, "dense_ppl": 4.5,
        "rows": {
            "sipp@0.6": {"method": "sipp", "target": 0.6, "keep_ratio": 0.6, "kept_params": 600,
                         "ppl_pruned": 5.25, "ppl_retrained": 4.75, "note": ""},
            "pfp@0.3": {"method": "pfp", "target": 0.3, "refused": "smallest reachable keep ratio is 0.53"},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert docs_lm.render(tmp_path, out)
    text = (out / "lm.md").read_text()
    assert "| sipp | 0.60 | 0.6000 | 600 / 1000 | 5.25 | 4.75 |" in text
    assert "refused: smallest reachable keep ratio is 0.53" in text and "**4.50**" in text
    assert "python -m experiments.lm_study" in text
