"""Smoke test of the benchmark script (``python -m experiments.bench --quick``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive_times(entry):
    assert entry["median_s"] > 0 and entry["min_s"] > 0
    assert entry["repeats"] >= 1 and all(t > 0 for t in entry["times_s"])


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--quick", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[1] Sensitivity pass" in proc.stdout and "[6] Compiled memory" in proc.stdout
    assert "[4b] Compile time per jitted function" in proc.stdout and "[7] Data-parallel scaling" in proc.stdout

    res = json.loads(out.read_text())
    assert {"env", "config", "models", "total_runtime_s", "report"} <= set(res)
    assert res["env"]["device_kind"] and res["env"]["jax"] and res["env"]["cpu_count"] >= 1
    assert res["env"]["device"].startswith("cpu:0") and res["env"]["device"] in proc.stdout
    assert list(res["models"]) == ["lenet300_100"]
    m = res["models"]["lenet300_100"]
    assert m["sample_size"] == 16 and m["sample_size_formula"] == 128  # delta 1e-12, batch 64

    for name in ("sipp_pass", "pfp_pass", "forward_full", "forward_chunked"):
        _positive_times(m["passes"][name])
        assert m["passes"][name]["compile_s"] >= 0
    assert all(v > 0 for v in m["ratios"].values())
    for name in ("sipp_pass_fused", "pfp_pass_fused"):  # [1b]: the pass as one program, same numbers
        _positive_times(m["passes"][name])
    assert max(m["fused_max_rel_diff"].values()) < 1e-5 and "[1b] The pass fused" in proc.stdout

    sipp = m["prune"]["sipp"]
    _positive_times(sipp["search"])
    assert sipp["select_calls"] >= 1 and sipp["pass_s"] > 0 and 0 < sipp["achieved_keep_ratio"] <= 1

    train = m["train_step"]
    _positive_times(train["masked"])
    _positive_times(train["unmasked"])
    assert train["masked_over_unmasked"] > 0 and train["batch_size"] == 64
    ratio = train["cost_ratio_masked_over_unmasked"]
    assert ratio is None or (ratio["flops"] >= 1.0 and ratio["bytes_accessed"] > 0)

    assert set(m["compile_s"]) == {
        "sipp_pass", "pfp_pass", "forward_full", "forward_chunk", "train_step", "train_step_masked"
    }
    assert all(v >= 0 for v in m["compile_s"].values())

    assert m["scaling"] and all(s["median_s"] > 0 and s["per_point_s"] > 0 for s in m["scaling"])

    mem = m["memory"]
    for key in ("sensitivity_mean", "sensitivity_max"):
        assert mem[key]["chunk_working_bytes"] is None or mem[key]["chunk_working_bytes"] > 0
    for key in ("forward_chunk", "forward_full", "forward_2x_full"):
        assert set(mem[key]) >= {"temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"}
    assert mem["running_max_bytes"] > 0

    breakdown = m["compile_breakdown"]  # each jitted function compiled on its own
    assert breakdown["sipp_kernels"]["count"] == 3 and breakdown["pfp_kernels"]["count"] == 3  # 3 Dense geometries
    for key in ("capture", "sipp_kernels", "forward_chunk", "forward_full", "train_step", "train_step_masked"):
        assert breakdown[key]["compile_s"] > 0 and breakdown[key]["lower_s"] > 0

    workers = res["devices"]  # --quick: one subprocess with 2 forced host devices
    assert list(workers) == ["2"] and workers["2"]["devices"] == 2
    lenet = workers["2"]["models"]["lenet300_100"]
    for name in ("sipp_pass", "pfp_pass", "train_step", "train_step_model2"):
        _positive_times(lenet[name])
    state = lenet["state_bytes_per_device"]  # the 'model' axis of 2 halves every kernel (784, 300, 100: even)
    assert 0.45 * state["replicated"] < state["model2"] < 0.55 * state["replicated"]
    memory = lenet["memory_vs_points"]
    assert [r["points"] for r in memory] == [16, 32]
    assert memory[1]["forward_temp_output_bytes"] > memory[0]["forward_temp_output_bytes"]


def test_bench_shrink_quick_rows_and_width_control(tmp_path):
    import json

    from experiments import bench_shrink

    rows = bench_shrink.main(["--quick", "--models=resnet20", f"--json={tmp_path / 'shrink.json'}"])
    assert len(rows) == 1 and rows[0]["model"] == "resnet20"
    r = rows[0]
    assert r["params_shrunk"] < r["params_dense"] and r["flop_ratio"] > 1.5
    assert r["shrunk_flop_ratio"] == pytest.approx(r["flop_ratio"], rel=1e-3)  # nothing left half-pruned
    assert r["speedup"] == pytest.approx(r["dense_s"] / r["shrunk_s"], rel=1e-2)
    saved = json.loads((tmp_path / "shrink.json").read_text())
    assert saved["rows"][0]["keep_ratio"] == r["keep_ratio"] and "cpu" in saved["device"]
    rows, control = bench_shrink.bench_model(
        "resnet20", (0.5,), method="ft", batch=2, repeats=1, width_kwargs={"width": 8}, control_fractions=(0.5, 0.25),
        method_options={"joint": "mean", "round_to": 4}, round_to=4,
    )
    assert [c["fraction"] for c in control] == [0.5, 0.25]  # of the default width 16: 8 and 4
    assert control[0]["flop_ratio"] == 1.0 and 3.0 < control[1]["flop_ratio"] < 4.5  # ~quadratic in width
    assert rows[0]["method_options"] == {"joint": "mean", "round_to": 4} and rows[0]["flop_ratio"] > 1.2
