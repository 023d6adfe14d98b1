"""experiments.docs_zeroing: the on/off page from two results files, untouched without them."""

from experiments import docs_zeroing
from experiments import results as results_lib


def _results(acc: dict[str, list[float]], kept: float) -> results_lib.Results:
    res = results_lib.Results.empty(methods=list(acc), keep_ratios=[0.1, 0.05], num_nets=2,
                                    layer_names=["a", "b"], layer_total=[100, 10])
    res.dense["error"][:] = 0.1
    for m, values in enumerate(acc.values()):
        for r, a in enumerate(values):
            res.record(0, r, 0, m, error=1 - a / 100, sizes=0.1, layer_kept={"a": kept, "b": 5})
            res.record(1, r, 0, m, error=1 - (a + 2) / 100, sizes=0.1, layer_kept={"a": kept + 2, "b": 5})
    return res


def test_render_writes_the_tables_and_leaves_the_page_without_results(tmp_path):
    out = tmp_path / "docs"
    assert not docs_zeroing.render(tmp_path / "missing", out) and not out.exists()
    acc_off = {"sipp": [40.0, 20.0], "wt": [80.0, 60.0], "pfp": [25.0, 12.0], "ft": [28.0, 19.0]}
    acc_on = {"sipp": [46.0, 27.0], "wt": [80.0, 60.0], "pfp": [25.0, 12.0], "ft": [28.0, 19.0]}
    for mode, acc, kept in (("off", acc_off, 50.0), ("on", acc_on, 60.0)):
        (tmp_path / mode).mkdir()
        _results(acc, kept).save_npz(tmp_path / mode / "results.npz")
    assert docs_zeroing.render(tmp_path, out)
    page = (out / "zeroing.md").read_text()
    # sipp at keep 0.1: 41 % off (mean of 40 and 42), 47 % on: +6 pp; SiPP - WT = 41 - 81 off, 47 - 81 on
    assert "| `sipp` | 0.1 | 41.00 | 47.00 | +6.00 | 90.00 / 90.00 |" in page
    assert "| `sipp` - `wt`, zeroing off | -40.00 | -40.00 |" in page
    assert "| `sipp` - `wt`, zeroing on | -34.00 | -33.00 |" in page
    assert "| `sipp` | 0.1 | 51 -> 61 | 5 -> 5 |" in page
    assert "`sipp` - `wt` goes from -40.00 to -34.00 pp; `pfp` - `ft` goes from -3.00 to -3.00 pp" in page
    assert "--config.coresets.zero_dead" in page
