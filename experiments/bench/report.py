"""Markdown tables of the benchmark JSON; regenerates ``docs/benchmarks.md``.

  python -m experiments.bench.report --input=DIR --output=docs/benchmarks.md

Reads every ``DIR/*.json`` written by ``python -m experiments.bench`` and
replaces the part of ``--output`` between the ``GENERATED_BEGIN`` and
``GENERATED_END`` markers (the rest of the file, e.g. recorded results of
earlier runs, is kept; a missing file or one without markers gets the
generated part appended).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

GENERATED_BEGIN = "<!-- GENERATED_BEGIN: python -m experiments.bench.report -->"
GENERATED_END = "<!-- GENERATED_END -->"
ORDER = ("first_call", "passes", "prune", "train_step", "memory", "mesh", "shrink")


def fmt_t(seconds: Optional[float]) -> str:
    """Seconds as a short human time (``-`` for None)."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + fmt_t(-seconds)
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_b(n: Optional[int]) -> str:
    """Bytes in binary units (``n/a`` for None)."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    esc = _cell
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(payload: Mapping[str, Any]) -> str:
    """Where and how the numbers were measured."""
    env = payload["env"]
    load = "/".join(f"{x:.2f}" for x in env.get("load_avg", []))
    note = f" **{payload['note']}**" if payload.get("note") else ""
    return (f"`{payload['command']}` — {payload['date']}, {env['device']} ({env['backend']}, "
            f"{env['num_devices']} device(s)), jax {env['jax']}, {env['cpu_count']} CPUs, load avg {load}.{note}")


def _ratio(ratios: Mapping[str, float], key: str) -> str:
    """A ratio as ``6.1x``, or ``-`` where the JSON predates it."""
    return f"{ratios[key]:.1f}x" if key in ratios else "-"


def _passes(results: Mapping[str, Any]) -> list[str]:
    rows, fused, scaling = [], [], []
    for name, m in results.items():
        p, r = m["passes"], m["ratios"]
        rows.append([name, m["sample_size"], m["chunk_size"], fmt_t(p["sipp_pass"]["median_s"]),
                     fmt_t(p["pfp_pass"]["median_s"]), fmt_t(p["forward_full"]["median_s"]),
                     fmt_t(p["forward_chunked"]["median_s"]), f"{r['sipp_over_forward_full']:.1f}x",
                     f"{r['pfp_over_forward_full']:.1f}x", f"{r['sipp_over_forward_chunked']:.1f}x",
                     f"{r['pfp_over_forward_chunked']:.1f}x", _ratio(r, "sipp_over_forward_full_cpu"),
                     _ratio(r, "pfp_over_forward_full_cpu"), p["sipp_pass"]["repeats"]])
        if "sipp_pass_fused" in p:
            fused.append([name, fmt_t(p["sipp_pass_fused"]["median_s"]), fmt_t(p["pfp_pass_fused"]["median_s"]),
                          f"{r['sipp_fused_over_per_layer']:.2f}", f"{r['pfp_fused_over_per_layer']:.2f}",
                          fmt_t(p["sipp_pass_fused"]["compile_s"]), f"{max(m['fused_max_rel_diff'].values()):.1e}"])
        scaling += [[name, f"{s['fraction']:g}x", s["points"], s["chunks"], fmt_t(s["median_s"]),
                     fmt_t(s["per_point_s"]), f"{s['per_point_over_1x']:.2f}"] for s in m.get("scaling", [])]
    out = [table(["model", "|S|", "chunk", "SiPP pass", "PFP pass", "fwd |S| one batch", "fwd in chunks",
                  "SiPP / fwd", "PFP / fwd", "SiPP / fwd chunks", "PFP / fwd chunks", "SiPP / fwd CPU",
                  "PFP / fwd CPU", "reps"], rows)]
    if fused:
        out += ["", "Fused pass (`fused=True`, one program) vs the per-layer pass:", "",
                table(["model", "SiPP fused", "PFP fused", "SiPP fused / per-layer", "PFP fused / per-layer",
                       "SiPP fused compile", "max rel diff"], fused)]
    if scaling:
        out += ["", "SiPP pass over multiples of \\|S\\| (fixed chunk size):", "",
                table(["model", "|S| factor", "points", "chunks", "time", "time / point", "per point vs 1x"],
                      scaling)]
    return out


def _prune(results: Mapping[str, Any]) -> list[str]:
    rows = [[name, method, fmt_t(e["pass"]["median_s"]), fmt_t(e["prune"]["median_s"]), fmt_t(e["search_s"]),
             f"{e['search_over_pass']:.2f}", e["select_calls"], f"{e['achieved_keep_ratio']:.4f}",
             e["prune"]["repeats"]]
            for name, m in results.items() for method, e in m["methods"].items()]
    return [table(["model", "method", "pass", "prune end to end", "search (prune - pass)", "search / pass",
                   "select calls", "kept", "reps"], rows)]


def _train_step(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, t in results.items():
        cr = t.get("cost_ratio_masked_over_unmasked")
        rows.append([name, t["batch_size"], fmt_t(t["unmasked"]["median_s"]), fmt_t(t["masked"]["median_s"]),
                     f"{t['masked_over_unmasked']:.3f}", fmt_t(t["unmasked_donated"]["median_s"]),
                     fmt_t(t["masked_donated"]["median_s"]), f"{t['donated_masked_over_unmasked']:.3f}",
                     f"{cr['flops']:.3f}" if cr else "n/a", f"{cr['bytes_accessed']:.3f}" if cr else "n/a",
                     t["unmasked"]["repeats"]])
    return [table(["model", "batch", "unmasked", "masked", "ratio", "unmasked, donated", "masked, donated",
                   "ratio, donated", "XLA flops ratio", "XLA bytes ratio", "reps"], rows)]


def _memory(results: Mapping[str, Any]) -> list[str]:
    rows, rss = [], []
    for name, m in results.items():
        c = m["compiled"]
        for red, label in (("mean", "SiPP"), ("max", "PFP")):
            e = c[f"sensitivity_{red}"]
            rows.append([name, label, c["chunk_size"], fmt_b(e["capture"]["temp_size_in_bytes"]),
                         f"{fmt_b(e['largest_kernel']['temp_size_in_bytes'])} ({e['num_kernels']} kernels)",
                         fmt_b(e["chunk_working_bytes"]), fmt_b(c["running_max_bytes"])])
        f = c["forward"]
        rows.append([name, "forward", f"{f['chunk']['batch']} / {f['full']['batch']} / {f['double']['batch']}", "-",
                     "-", " / ".join(fmt_b(f[k]["temp_plus_output_bytes"]) for k in ("chunk", "full", "double")), "-"])
        r = m.get("rss", {})
        start = r.get("rss_start_bytes", 0)
        rss += [[name, row["points"], fmt_b(row["rss_after_pass_bytes"] - start),
                 fmt_b(row["rss_after_forward_bytes"] - start), fmt_b(row.get("device_peak_after_pass_bytes")),
                 fmt_b(row.get("device_peak_after_forward_bytes"))] for row in r.get("rows", [])]
    header = ["model", "function", "batch", "capture temp", "largest kernel temp",
              "working set per chunk (forward: temp+output)", "running max"]
    out = [table(header, rows)]
    if rss:
        out += ["", "Peak RSS growth of a fresh process (passes first, ascending \\|S\\|, then one-batch forwards):",
                "", table(["model", "|S|", "after pass", "after forward", "device peak after pass",
                           "after forward"], rss)]
    return out


def _first_call(results: Mapping[str, Any]) -> list[str]:
    rows, programs = [], []
    for name, m in results.items():
        if "error" in m:
            rows.append([name, "failed (see JSON)"] + ["-"] * 11)
            continue
        b, ev = m["breakdown"], m["events"]
        cpu = m.get("first_call_cpu_s")
        later = " / ".join(fmt_t(t) for t in m["later_calls_s"]) if "later_calls_s" in m else "-"
        rows.append([name, m["sample_size"], m.get("cache", "off"), fmt_t(b["first_call_s"]),
                     fmt_t(cpu) if cpu is not None else "-", later,
                     fmt_t(b["tracing_s"]), fmt_t(b["lowering_s"]),
                     f"{fmt_t(b['compile_s'])} ({ev['num_compiles']} programs)", fmt_t(b["pass_execution_s"]),
                     fmt_t(b["search_s"]), fmt_t(b["rest_s"]), fmt_t(m["setup_s"])])
        cached = (f" (persistent cache: {ev.get('cache_hits', 0)} hits, {ev.get('cache_misses', 0)} misses)"
                  if m.get("cache", "off") != "off" else "")
        programs.append(f"{name}{cached}: " + ", ".join(f"`{p['name']}` x{p['count']} {fmt_t(p['compile_s'])}"
                                                        for p in ev["programs"][:6]))
    return [table(["model", "|S|", "compilation cache", "first sp.prune", "(its process CPU time)",
                   "calls 2-5", "tracing",
                   "lowering", "XLA compile", "pass execution",
                   "keep-ratio search", "rest", "(model set-up, before)"], rows),
            "", "Largest compiles (program, compiles, XLA time):", ""] + [f"- {p}" for p in programs]


def _mesh(results: Mapping[str, Any]) -> list[str]:
    rows, base = [], {}
    for count, res in results.items():
        if "error" in res:
            rows.append([count, "-", "worker failed (see JSON)"] + ["-"] * 5)
            continue
        for name, e in res["models"].items():
            cells = []
            for key in ("sipp_pass", "pfp_pass", "train_step"):
                base.setdefault((name, key), e[key]["median_s"])
                cells.append(f"{fmt_t(e[key]['median_s'])} ({base[(name, key)] / e[key]['median_s']:.2f}x)")
            rows.append([count, name, e["points"], *cells,
                         fmt_t(e["train_step_model2"]["median_s"]) if "train_step_model2" in e else "-",
                         " / ".join(fmt_b(v) for v in e["state_bytes_per_device"].values())])
    return [table(["devices", "model", "|S|", "SiPP pass (speed-up)", "PFP pass (speed-up)",
                   "train step (speed-up)", "train step, model axis 2", "state per device (replicated / model 2)"],
                  rows)]


def _shrink(results: Mapping[str, Any]) -> list[str]:
    rows = [[r["model"], r.get("method", "-"), r["keep_ratio"], r["params_shrunk"], f"{r['flop_ratio']:.2f}",
             f"{r['shrunk_flop_ratio']:.2f}", fmt_t(r["dense_s"]), fmt_t(r["shrunk_s"]), f"{r['speedup']:.2f}",
             f"{r['speedup_over_flop_ratio']:.2f}"]
            for r in results["rows"]]
    out = [table(["model", "method", "keep", "params", "FLOP ratio", "shrunk FLOP ratio", "dense", "shrunk", "speed-up",
                  "speed-up / FLOP ratio"], rows)]
    if results["controls"]:
        out += ["", "Control: dense nets built natively narrower (no pruning), timed in the same rounds:", "",
                table(["model", "widths", "FLOP ratio", "time", "speed-up", "speed-up / FLOP ratio"],
                      [[c["model"], f"x{c['fraction']}", f"{c['flop_ratio']:.2f}", fmt_t(c["seconds"]),
                        f"{c['speedup']:.2f}", f"{c['speedup_over_flop_ratio']:.2f}"] for c in results["controls"]])]
    return out


SECTIONS: dict[str, tuple[str, Callable[[Mapping[str, Any]], list[str]]]] = {
    "first_call": ("First sp.prune call of a fresh process", _first_call),
    "passes": ("Sensitivity pass vs one forward over the same points (medians, same rounds)", _passes),
    "prune": ("sp.prune end to end vs its pass", _prune),
    "train_step": ("Masked vs unmasked train step", _train_step),
    "memory": ("Memory: pass vs forward", _memory),
    "mesh": ("Data-parallel mesh over forced host devices", _mesh),
    "shrink": ("Shrunk vs dense inference", _shrink),
}


def render_payload(payload: Mapping[str, Any]) -> str:
    """One benchmark's JSON as a markdown section."""
    title, render = SECTIONS[payload["benchmark"]]
    return "\n".join([f"### {title}", "", provenance(payload), "", *render(payload["results"]), ""])


def load(input_dir: Path) -> list[dict[str, Any]]:
    """Every benchmark JSON in ``input_dir``, in section order then file name."""
    payloads = []
    for path in sorted(Path(input_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("benchmark") in SECTIONS:
            payloads.append(data)
    return sorted(payloads, key=lambda p: ORDER.index(p["benchmark"]))


def render(payloads: Sequence[Mapping[str, Any]]) -> str:
    """The generated part of docs/benchmarks.md."""
    parts = [GENERATED_BEGIN, "",
             "Generated by `python -m experiments.bench.report` from the JSON of `python -m experiments.bench`.", ""]
    parts += [render_payload(p) for p in payloads] or ["(no benchmark JSON found)", ""]
    return "\n".join(parts + [GENERATED_END])


def splice(document: str, generated: str) -> str:
    """``document`` with its generated part replaced (appended if it has none)."""
    if GENERATED_BEGIN in document and GENERATED_END in document:
        head, rest = document.split(GENERATED_BEGIN, 1)
        tail = rest.split(GENERATED_END, 1)[1]
        return head + generated + tail
    return (document.rstrip() + "\n\n" if document.strip() else "# Benchmarks\n\n") + generated + "\n"


def write_report(input_dir: Path, output: Path) -> str:
    """Regenerates ``output`` from the JSON in ``input_dir``; returns the new text."""
    output = Path(output)
    text = splice(output.read_text() if output.exists() else "", render(load(input_dir)))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def main(argv: Sequence[str]) -> None:
    """absl entry point."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    write_report(Path(flags.FLAGS.input), Path(flags.FLAGS.output))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("input", None, "Directory of the benchmark JSON.", required=True)
    flags.DEFINE_string("output", "docs/benchmarks.md", "Markdown file to regenerate (its generated part).")
    app.run(main)
