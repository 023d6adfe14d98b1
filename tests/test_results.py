"""Tests for experiments.results (npz round trip and TensorBoard logging)."""

import struct

import numpy as np
import pytest

from experiments.results import Results, TensorBoardLogger, load_or_empty, pruned_step

LAYOUT = dict(
    methods=["SiPP", "WT"],
    keep_ratios=[0.5, 0.2, 0.1],
    num_nets=2,
    num_repetitions=1,
    layer_names=["Dense_0", "Dense_1"],
)


def _filled() -> Results:
    res = Results.empty(**LAYOUT, layer_total={"Dense_0": 100, "Dense_1": 10})
    res.record(0, 1, 0, "WT", error=0.1, error5=0.01, loss=0.3, sizes=0.21, flops=0.3,
               layer_kept={"Dense_0": 20, "Dense_1": 1})
    res.record(1, 0, 0, 0, error=0.05, sizes=0.5)
    res.record_dense(0, error=0.02, error5=0.001, loss=0.1, sizes_total=110, flops_total=220)
    return res


def test_empty_is_nan_and_not_done():
    res = Results.empty(**LAYOUT)
    assert res.error.shape == (2, 3, 1, 2) and res.layer_kept.shape == (2, 3, 1, 2, 2)
    assert np.isnan(res.error).all() and not res.done.any()
    assert res.layer_total.shape == (2,)


def test_record_save_load_round_trip(tmp_path):
    res = _filled()
    path = res.save_npz(tmp_path / "results.npz")
    back = Results.load_npz(path, **LAYOUT)
    assert back.methods == ("SiPP", "WT") and back.layer_names == ("Dense_0", "Dense_1")
    for key in ("error", "error5", "loss", "sizes", "flops", "layer_kept", "keep_ratios",
                "layer_total"):
        np.testing.assert_array_equal(getattr(back, key), getattr(res, key))
    np.testing.assert_array_equal(back.done, res.done)
    assert back.done[0, 1, 0, 1] and back.done[1, 0, 0, 0] and back.done.sum() == 2
    assert back.error[0, 1, 0, 1] == 0.1 and back.layer_kept[0, 1, 0, 1].tolist() == [20, 1]
    assert back.dense["error"][0] == 0.02 and np.isnan(back.dense["error"][1])
    assert back.sizes_total == 110 and back.flops_total == 220
    assert back.is_done(0, 1, 0, "WT") and not back.is_done(0, 0, 0, "WT")


def test_atomic_save_leaves_no_tmp_file(tmp_path):
    res = _filled()
    res.save_npz(tmp_path / "results.npz")
    res.record(1, 2, 0, "WT", error=0.3)
    res.save_npz(tmp_path / "results.npz")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.npz"]
    assert Results.load_npz(tmp_path / "results.npz").error[1, 2, 0, 1] == 0.3


def test_failed_save_keeps_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = _filled().save_npz(tmp_path / "results.npz")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        _filled().save_npz(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.npz"]


def test_mismatch_errors(tmp_path):
    path = _filled().save_npz(tmp_path / "results.npz")
    with pytest.raises(ValueError, match=r"methods: stored \['SiPP', 'WT'\], config \['SiPP', 'PFP'\]"):
        Results.load_npz(path, methods=["SiPP", "PFP"])
    with pytest.raises(ValueError, match="keep_ratios"):
        Results.load_npz(path, keep_ratios=[0.5, 0.2])
    with pytest.raises(ValueError, match="num_nets"):
        load_or_empty(path, **{**LAYOUT, "num_nets": 3})
    assert load_or_empty(tmp_path / "none.npz", **LAYOUT).done.sum() == 0
    assert load_or_empty(path, **LAYOUT).done.sum() == 2


def test_record_errors():
    res = Results.empty(**LAYOUT)
    with pytest.raises(ValueError, match="method must be one of"):
        res.record(0, 0, 0, "PFP", error=0.1)
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        res.record(0, 0, 0, "WT", acc=0.9)
    with pytest.raises(ValueError, match=r"ratio_idx must be an integer in \[0, 3\)"):
        res.record(0, 3, 0, "WT", error=0.1)
    with pytest.raises(ValueError, match="layer_kept keys"):
        res.record(0, 0, 0, "WT", layer_kept={"Dense_0": 1})


# ----------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------
def _read_events(path):
    """Parse a TFRecord event file (CRCs not checked) into Event protos."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        start = offset + 12
        events.append(event_pb2.Event.FromString(data[start:start + length]))
        offset = start + length + 4
    return events


def _scalars(logdir):
    out = {}
    for f in logdir.rglob("events.out.tfevents.*"):
        for ev in _read_events(f):
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def _tags(logdir):
    return {v.tag for f in logdir.rglob("events.out.tfevents.*")
            for ev in _read_events(f) for v in ev.summary.value}


def test_tensorboard_scalars_round_trip(tmp_path):
    with TensorBoardLogger(tmp_path / "log", enabled=True) as tb:
        tb.log_test("WT", size=0.25, flops=0.4, error=0.1, error5=0.02, loss=float("nan"))
        tb.log_train("WT", {"loss": 0.5, "acc1": 0.8}, step=3, phase="retrain", unit="epoch")
        tb.log_layer_budget("WT", {"Dense_0": 20, "Dense_1": 5}, {"Dense_0": 100, "Dense_1": 10},
                            size=0.25)
        tb.log_config({"experiments": {"methods": ["WT"]}})
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        tb.log_figure("General/acc_param", fig)
    files = list((tmp_path / "log").rglob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    scalars = _scalars(tmp_path / "log")
    assert scalars["WT/test_error_vs_pruned_params"] == [(7500, pytest.approx(0.1))]
    assert scalars["WT/test_error_vs_pruned_flops"] == [(6000, pytest.approx(0.1))]
    assert scalars["WT/test_error5_vs_pruned_params"] == [(7500, pytest.approx(0.02))]
    assert "WT/test_loss_vs_pruned_params" not in scalars  # NaN skipped
    assert scalars["WT/retrain/loss_per_epoch"] == [(3, pytest.approx(0.5))]
    assert scalars["WT/layer_budget/Dense_0"] == [(7500, pytest.approx(20.0))]
    assert scalars["WT/layer_budget/Dense_1"] == [(7500, pytest.approx(50.0))]
    tags = _tags(tmp_path / "log")
    assert any(t.startswith("General/config") for t in tags)
    assert "General/acc_param" in tags


def test_tensorboard_disabled_writes_nothing(tmp_path):
    tb = TensorBoardLogger(tmp_path / "log", enabled=False)
    tb.log_test("WT", size=0.5, error=0.1)
    tb.close()
    assert not (tmp_path / "log").exists()


def test_pruned_step():
    assert pruned_step(1.0) == 0 and pruned_step(0.02) == 9800


def test_records_rebuild_a_deleted_or_corrupt_results_file(tmp_path):
    """Issue #17 item 2: results.npz is a cache of the per-run records (and vice versa)."""
    from experiments.results import CorruptResultsError

    path, records = tmp_path / "results.npz", tmp_path / "records"
    layout = dict(LAYOUT, layer_total={"Dense_0": 100, "Dense_1": 10})
    res = load_or_empty(path, records=records, **layout)
    res.record(0, 1, 0, "WT", error=0.1, error5=0.01, loss=0.3, sizes=0.21, flops=0.3,
               layer_kept={"Dense_0": 20, "Dense_1": 1})
    res.record(1, 0, 0, 0, error=0.05, sizes=0.5)
    res.record_dense(0, error=0.02, error5=0.001, loss=0.1, sizes_total=110, flops_total=220)
    res.save_npz(path)
    path.unlink()
    back = load_or_empty(path, records=records, **layout)
    np.testing.assert_array_equal(back.done, res.done)
    for key in ("error", "error5", "loss", "sizes", "flops", "layer_kept"):
        np.testing.assert_array_equal(getattr(back, key), getattr(res, key))
    assert back.dense["error"][0] == 0.02 and back.sizes_total == 110

    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CorruptResultsError, match="corrupt or truncated"):
        Results.load_npz(path)
    back = load_or_empty(path, records=records, **layout)
    np.testing.assert_array_equal(back.error, res.error)
    assert (tmp_path / "results.npz.corrupt").exists()

    # Records deleted instead: written again from results.npz.
    res.save_npz(path)
    import shutil

    shutil.rmtree(records)
    load_or_empty(path, records=records, **layout)
    assert len(list(records.glob("net*/rep*/*/ratio*.json"))) == int(res.done.sum())
