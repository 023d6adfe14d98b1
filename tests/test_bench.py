"""Smoke tests of the benchmark package (``experiments/bench``) at tiny sizes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments.bench import (
    common,
    first_call,
    memory,
    mesh,
    passes,
    prune_e2e,
    report,
    shrink,
    timing,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = timing.Budget(repeats=2, min_repeats=1, budget_s=2.0)
ENV = {"device": "cpu:0 cpu", "backend": "cpu", "num_devices": 1, "jax": jax.__version__, "cpu_count": 2,
       "load_avg": [1.0, 1.0, 1.0]}


def _positive_times(entry):
    assert entry["median_s"] > 0 and entry["min_s"] > 0
    assert entry["repeats"] >= 1 and all(t > 0 for t in entry["times_s"])
    assert entry["min_s"] <= entry["median_s"]


def _payload(kind, results):
    return {"benchmark": kind, "command": f"python -m experiments.bench --benchmarks={kind}",
            "date": "2026-01-01 00:00 UTC", "env": ENV, "config": {}, "results": results, "note": f"note {kind}"}


def _rendered(kind, results):
    """The report section of ``results``; checks it names every model."""
    text = report.render_payload(_payload(kind, results))
    assert text.startswith(f"### {report.SECTIONS[kind][0]}")
    assert "| lenet300_100 |" in text or "| resnet20 |" in text
    return text


def test_timing_measure_medians_interleaved_and_compile_events():
    calls = []
    fn = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((8,))
    cases = {"a": timing.Case(lambda: (calls.append("a"), fn(x))[1]),
             "b": timing.Case(lambda: (calls.append("b"), time.sleep(0.06))[1])}
    with timing.CompileEvents() as events:
        times, outputs = timing.measure(cases, timing.Budget(repeats=3, min_repeats=3, budget_s=1e3))
    for name in cases:
        _positive_times(times[name])
        assert times[name]["repeats"] == 3 and times[name]["compile_s"] >= 0
    assert times["b"]["calls_per_sample"] == 1 and times["a"]["calls_per_sample"] > 1  # fast calls batched
    assert 0.05 < times["b"]["median_s"] < 1.0 and float(outputs["a"][0]) == 3.0
    assert times["b"]["cpu_median_s"] < 0.5 * times["b"]["median_s"]  # sleeping uses no CPU time
    summary = events.summary()
    assert summary["num_compiles"] >= 1 and summary["compile_s"] > 0 and summary["trace_s"] > 0
    assert any("lambda" in p["name"] for p in summary["programs"])
    with pytest.raises(ValueError):
        timing.Budget(repeats=0)


def test_run_fresh_reports_worker_errors():
    out = timing.run_fresh("experiments.bench.timing:no_such_worker", {}, timeout_s=120)
    assert "no_such_worker" in out["error"]


def test_passes_ratios_from_one_run():
    cfg = passes.PassConfig(chunk_size=8, fused=True, scaling_fractions=(1.0, 2.0), contraction="carry")
    m = passes.run("lenet300_100", cfg, TINY, num_points=16)
    assert m["contraction"] == "carry"  # the keyword reaches sp.compute_sensitivities (no module global)
    assert m["sample_size"] == 16 and m["sample_size_formula"] == 128 and m["num_chunks"] == 2  # delta 1e-12
    for name in ("sipp_pass", "pfp_pass", "forward_full", "forward_chunked", "sipp_pass_fused", "pfp_pass_fused"):
        _positive_times(m["passes"][name])
    med = {k: v["median_s"] for k, v in m["passes"].items()}
    assert m["ratios"]["sipp_over_forward_full"] == med["sipp_pass"] / med["forward_full"]  # same run's medians
    assert m["ratios"]["pfp_over_forward_chunked"] == med["pfp_pass"] / med["forward_chunked"]
    cpu = {k: v["cpu_median_s"] for k, v in m["passes"].items()}
    assert m["ratios"]["sipp_over_forward_full_cpu"] == cpu["sipp_pass"] / cpu["forward_full"]
    assert max(m["fused_max_rel_diff"].values()) < 1e-5
    assert [s["points"] for s in m["scaling"]] == [16, 32] and [s["chunks"] for s in m["scaling"]] == [2, 4]
    assert m["scaling"][0]["per_point_over_1x"] == 1.0
    _rendered("passes", {"lenet300_100": m})


def test_prune_search_is_prune_minus_pass():
    cfg = prune_e2e.PruneConfig(methods=("sipp",), chunk_size=16)
    m = prune_e2e.run("lenet300_100", cfg, TINY, num_points=16)
    e = m["methods"]["sipp"]
    _positive_times(e["pass"])
    _positive_times(e["prune"])
    assert e["reduction"] == "mean" and e["search_s"] == e["prune"]["median_s"] - e["pass"]["median_s"]
    assert e["select_calls"] >= 1 and abs(e["achieved_keep_ratio"] - 0.1) < 0.01
    with pytest.raises(ValueError):
        prune_e2e.PruneConfig(methods=("magnitude",))
    _rendered("prune", {"lenet300_100": m})


def test_first_call_breakdown_in_fresh_process():
    cfg = first_call.FirstCallConfig(chunk_size=16, num_points=16, repeats=1, timeout_s=300)
    m = first_call.run("lenet300_100", cfg)
    assert "error" not in m, m.get("error")
    b, ev = m["breakdown"], m["events"]
    assert b["first_call_s"] > 0 and b["tracing_s"] > 0 and b["compile_s"] > 0 and b["pass_execution_s"] > 0
    parts = b["tracing_s"] + b["lowering_s"] + b["compile_s"] + b["pass_execution_s"] + b["search_s"] + b["rest_s"]
    assert parts == pytest.approx(b["first_call_s"])
    # compiles of two threads (the pass, the zeroing's gradient program ahead) may overlap
    assert b["compile_s"] < 2 * b["first_call_s"] and b["search_s"] > 0
    assert ev["num_compiles"] >= 4 and ev["programs"] and all(p["compile_s"] > 0 for p in ev["programs"])
    assert m["steady"]["pass"]["compile_s"] < 0.5 * b["compile_s"]  # the pass's programs were cache hits
    assert m["env"]["device"].startswith("cpu")
    _rendered("first_call", {"lenet300_100": m})


def test_first_call_warm_cache_reads_every_program():
    """A second fresh process with the persistent cache a first one filled compiles nothing:
    every program of the first sp.prune call is a cache hit (no closure constants or
    per-process names in the cache keys)."""
    cfg = first_call.FirstCallConfig(chunk_size=16, num_points=16, repeats=1, timeout_s=300, cache="warm")
    m = first_call.run("lenet300_100", cfg)
    assert "error" not in m, m.get("error")
    ev = m["events"]
    assert m["cache"] == "warm" and m["first_call_cpu_s"] > 0 and m["cold_first_call_s"] > 0
    assert ev["num_compiles"] >= 4 and ev["cache_misses"] == 0 and ev["cache_hits"] == ev["num_compiles"]
    assert f"{ev['cache_hits']} hits, 0 misses" in _rendered("first_call", {"lenet300_100": m})
    with pytest.raises(ValueError, match="cache"):
        first_call.FirstCallConfig(cache="cold")


def test_train_step_masked_vs_unmasked():
    m = train_step.run("lenet300_100", train_step.StepConfig(batch_size=16, chunk_size=16), TINY, num_points=16)
    for kind in ("unmasked", "masked", "unmasked_donated", "masked_donated"):
        _positive_times(m[kind])
    assert m["masked_over_unmasked"] == m["masked"]["median_s"] / m["unmasked"]["median_s"]
    assert m["batch_size"] == 16 and 0.05 < m["mask_keep_ratio"] < 0.2
    ratio = m["cost_ratio_masked_over_unmasked"]
    assert ratio is None or (ratio["flops"] >= 1.0 and ratio["bytes_accessed"] > 0)
    _rendered("train_step", {"lenet300_100": m})


def test_memory_compiled_from_public_pieces():
    m = memory.run("lenet300_100", memory.MemoryConfig(chunk_size=16, num_points=16, rss_fractions=()))
    c = m["compiled"]
    for red in ("mean", "max"):
        assert c[f"sensitivity_{red}"]["num_kernels"] == 3  # 3 Dense geometries
        assert c[f"sensitivity_{red}"]["chunk_working_bytes"] > 0
    f = c["forward"]
    assert f["double"]["temp_plus_output_bytes"] > f["full"]["temp_plus_output_bytes"] > 0
    assert c["running_max_bytes"] == 4 * (784 * 300 + 300 * 100 + 100 * 10)
    _rendered("memory", {"lenet300_100": m})


@pytest.mark.slow
def test_mesh_two_forced_devices():
    cfg = mesh.MeshConfig(device_counts=(2,), chunk_size=16, num_points=16, repeats=1, budget_s=1.0, timeout_s=300)
    res = mesh.run(("lenet300_100",), cfg)
    assert list(res) == ["2"] and "error" not in res["2"], res["2"].get("error")
    assert res["2"]["devices"] == 2
    lenet = res["2"]["models"]["lenet300_100"]
    for name in ("sipp_pass", "pfp_pass", "train_step", "train_step_model2"):
        _positive_times(lenet[name])
    state = lenet["state_bytes_per_device"]  # the 'model' axis of 2 halves every kernel (784, 300, 100: even)
    assert 0.45 * state["replicated"] < state["model2"] < 0.55 * state["replicated"]
    _rendered("mesh", res)


def test_shrink_rows_and_width_control():
    res = shrink.run(("resnet20",), shrink.ShrinkConfig(batch=8), TINY, quick=True)
    assert len(res["rows"]) == 1 and res["controls"] == []
    r = res["rows"][0]
    assert r["model"] == "resnet20" and r["params_shrunk"] < r["params_dense"] and r["flop_ratio"] > 1.5
    assert r["shrunk_flop_ratio"] == pytest.approx(r["flop_ratio"], rel=1e-3)  # nothing left half-pruned
    assert r["speedup"] == pytest.approx(r["dense_s"] / r["shrunk_s"], rel=1e-9)
    cfg = shrink.ShrinkConfig(batch=2, width_kwargs={"width": 8}, control_fractions=(0.5, 0.25), round_to=4,
                              method_options={"joint": "mean", "round_to": 4})
    rows, control = shrink.bench_model("resnet20", (0.5,), cfg, timing.Budget(repeats=1, budget_s=1.0))
    assert [c["fraction"] for c in control] == [0.5, 0.25]  # of the default width 16: 8 and 4
    assert control[0]["flop_ratio"] == 1.0 and 3.0 < control[1]["flop_ratio"] < 4.5  # ~quadratic in width
    assert rows[0]["method_options"] == {"joint": "mean", "round_to": 4} and rows[0]["flop_ratio"] > 1.2
    _rendered("shrink", {"rows": res["rows"], "controls": control})


def test_shrink_vit_with_the_full_channel_groups():
    # sp.shrink on the whole dependency analysis (attention heads are channel groups since the heads merge; no
    # more leaving the attention out): MLP units (and any removed head) shrink, and the FLOP ratio counts every
    # layer in both dense and pruned FLOPs.
    res = shrink.run(("vit_tiny",), shrink.ShrinkConfig(method="ft", batch=4), TINY, quick=True)
    r = res["rows"][0]
    assert r["model"] == "vit_tiny" and r["method"] == "ft" and r["params_shrunk"] < r["params_dense"]
    assert r["shrunk_flop_ratio"] == pytest.approx(r["flop_ratio"], rel=1e-3)
    # quick ViT: 16 tokens + class token, width 16, MLP 32; q/k/v/out, fc1, fc2 per block, the patch conv, head
    attn, mlp = 17 * 4 * 16 * 16, 17 * 2 * 16 * 32
    dense_flops = 16 * 49 * 16 + attn + mlp + 16 * 10
    assert 1.0 < r["flop_ratio"] < dense_flops / (dense_flops - mlp - attn)  # patch conv and head stay
    assert "| vit_tiny | ft |" in report.render_payload(_payload("shrink", res))


def test_report_splices_generated_part_in_order_with_notes(tmp_path):
    timing_dict = timing.summarize([0.2, 0.1], 0.5, 1.0, 1)
    prune_results = {"lenet300_100": {"methods": {"sipp": {
        "pass": timing_dict, "prune": timing_dict, "search_s": 0.01, "search_over_pass": 0.1, "select_calls": 1,
        "achieved_keep_ratio": 0.1}}}}
    results = {"prune": prune_results, "first_call": {"resnet20": {"error": "boom"}}, "mesh": {"2": {"error": "x"}}}
    for kind, res in results.items():
        common.write_json(tmp_path / "in" / f"{kind}.json", _payload(kind, res))
    (tmp_path / "in" / "other.json").write_text("[1, 2]")  # not a benchmark: skipped
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\nintro\n\n{report.GENERATED_BEGIN}\nold\n{report.GENERATED_END}\n\n## Recorded\nkept\n")
    text = report.write_report(tmp_path / "in", doc)
    assert "old" not in text and "intro" in text and text.rstrip().endswith("kept")
    for kind in results:
        assert f"### {report.SECTIONS[kind][0]}" in text and f"--benchmarks={kind}`" in text
        assert f"**note {kind}**" in text  # a run's note stays next to its tables
    assert text.index("First sp.prune") < text.index("sp.prune end to end") < text.index("Data-parallel")
    assert "| resnet20 | failed (see JSON) |" in text and "| lenet300_100 | sipp | 150.0 ms |" in text
    assert report.write_report(tmp_path / "in", doc) == text  # idempotent
    fresh = report.write_report(tmp_path / "in", tmp_path / "new.md")
    assert fresh.startswith("# Benchmarks") and report.GENERATED_END in fresh


def test_cli_writes_json_under_out_only(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode != 0 and "--out" in missing.stderr
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--quick", "--benchmarks=prune", f"--out={out}", "--tag=t"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "prune_t.json").read_text())
    assert {"benchmark", "command", "date", "env", "config", "results"} <= set(res)
    assert res["benchmark"] == "prune" and list(res["results"]) == ["lenet300_100"]
    assert res["env"]["device"].startswith("cpu:0") and "sp.prune end to end" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "experiments.bench.report", f"--input={out}",
                           f"--output={tmp_path / 'doc.md'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| lenet300_100 | sipp |" in (tmp_path / "doc.md").read_text()
