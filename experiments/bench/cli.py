"""The benchmark command line: which benchmarks, which models, where the JSON goes.

  python -m experiments.bench --out=DIR [--benchmarks=passes,prune,train_step,memory,first_call,mesh,shrink]
                              [--models=lenet300_100,resnet20,resnet56] [--tag=NAME] [--quick] ...

Each benchmark writes ``DIR/<benchmark>[_<tag>].json``
(``{benchmark, command, date, env, config, results}``) and the run prints
their tables (:mod:`experiments.bench.report`). Nothing is written into the
source tree unless ``--out`` points there.
"""

from __future__ import annotations

import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import app, flags, logging

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
from sensprune.sensitivity import CONTRACTIONS

BENCHMARKS = ("passes", "prune", "train_step", "memory", "first_call", "mesh", "shrink")
DEFAULT_BENCHMARKS = ("passes", "prune", "train_step", "memory", "first_call", "mesh")
QUICK = {  # smoke run: LeNet only, |S| = 16 in one chunk, 2 rounds
    "models": ["lenet300_100"], "repeats": 2, "min_repeats": 1, "budget_s": 5.0, "num_points": 16, "chunk_size": 16,
    "scaling_fractions": ["1", "2"], "methods": ["sipp"], "device_counts": ["2"], "rss_fractions": ["1", "2"],
    "first_call_repeats": 1, "shrink_models": ["resnet20"],
}


def define_flags() -> None:
    """The absl flags of ``python -m experiments.bench``."""
    f = flags
    f.DEFINE_string("out", None, "Directory of the JSON results (required; outside the source tree).")
    f.DEFINE_string("note", "", "Free text stored with the results and shown next to their tables "
                    "(e.g. 'smoke run on a shared, busy CPU').")
    f.DEFINE_string("tag", "", "Suffix of the JSON file names (e.g. the model when one process runs per model).")
    f.DEFINE_list("benchmarks", list(DEFAULT_BENCHMARKS), f"Which to run, of {', '.join(BENCHMARKS)}.")
    f.DEFINE_list("models", ["lenet300_100", "resnet20", "resnet56"], "Networks (experiments.models names).")
    f.DEFINE_integer("repeats", 7, "Steady rounds per measurement (at most; see --budget_s).")
    f.DEFINE_integer("min_repeats", 1, "Steady rounds per measurement (at least).")
    f.DEFINE_float("budget_s", 45.0, "No further round once a measurement's steady time would pass this.")
    f.DEFINE_integer("chunk_size", 32, "Points per chunk of the sensitivity pass.")
    f.DEFINE_integer("num_points", 0, "|S| (0: the reference's sample_size formula).")
    f.DEFINE_float("keep_ratio", 0.1, "Keep ratio of the prune calls.")
    f.DEFINE_enum("contraction", "auto", list(CONTRACTIONS), "Strategy of the (max, x) contraction of the pass.")
    f.DEFINE_list("methods", ["sipp", "pfp"], "[prune] methods timed end to end.")
    f.DEFINE_list("pfp_models", ["lenet300_100", "resnet20"], "[prune] models whose PFP prune is timed "
                  "(each PFP select propagates channels eagerly: ~1 min per select on ResNet56, 2 CPUs).")
    f.DEFINE_list("fused_models", ["lenet300_100", "resnet20"], "[passes] models also timed with the fused pass.")
    f.DEFINE_list("scaling_models", ["lenet300_100", "resnet20"], "[passes] models timed over multiples of |S|.")
    f.DEFINE_list("scaling_fractions", ["0.25", "0.5", "1", "2"], "[passes] multiples of |S|.")
    f.DEFINE_list("device_counts", ["1", "2", "4"], "[mesh] forced host device counts (one process each).")
    f.DEFINE_list("device_models", ["lenet300_100", "resnet20"], "[mesh] models.")
    f.DEFINE_list("memory_models", ["lenet300_100", "resnet20", "resnet56"], "[memory] models.")
    f.DEFINE_list("rss_fractions", ["0.5", "1", "2", "4"], "[memory] multiples of |S| for peak RSS ('' = none).")
    f.DEFINE_list("first_call_models", ["lenet300_100", "resnet20", "resnet56"], "[first_call] models.")
    f.DEFINE_string("first_call_method", "sipp", "[first_call] method of the first sp.prune call.")
    f.DEFINE_integer("first_call_repeats", 3, "[first_call] steady rounds after the first call.")
    f.DEFINE_enum("first_call_cache", "off", ["off", "warm"], "[first_call] persistent compilation cache: "
                  "off, or warm (a first fresh process fills a new cache folder, a second one is measured).")
    f.DEFINE_list("shrink_models", ["resnet20", "vgg16_bn"], "[shrink] models.")
    f.DEFINE_string("shrink_method", "ft", "[shrink] filter method.")
    f.DEFINE_integer("shrink_batch", 256, "[shrink] batch size (quick: 8).")
    f.DEFINE_integer("shrink_round_to", 1, "[shrink] round kept channel counts up to a multiple (8: GPU).")
    f.DEFINE_string("shrink_method_options", "{}", "[shrink] JSON options of the method, e.g. "
                    "'{\"joint\": \"mean\", \"round_to\": 8}'.")
    f.DEFINE_bool("shrink_control", True, "[shrink] also time natively narrower dense nets.")
    f.DEFINE_bool("quick", False, "Smoke run: lenet300_100, |S| = 16, 2 rounds (flags given explicitly win).")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every option of one run: the flags (same names), with ``--quick`` presets applied."""

    out: str
    note: str
    tag: str
    benchmarks: list[str]
    models: list[str]
    repeats: int
    min_repeats: int
    budget_s: float
    chunk_size: int
    num_points: int
    keep_ratio: float
    contraction: str
    methods: list[str]
    pfp_models: list[str]
    fused_models: list[str]
    scaling_models: list[str]
    scaling_fractions: list[str]
    device_counts: list[str]
    device_models: list[str]
    memory_models: list[str]
    rss_fractions: list[str]
    first_call_models: list[str]
    first_call_method: str
    first_call_repeats: int
    first_call_cache: str
    shrink_models: list[str]
    shrink_method: str
    shrink_batch: int
    shrink_round_to: int
    shrink_method_options: str
    shrink_control: bool
    quick: bool

    @property
    def budget(self) -> timing.Budget:
        return timing.Budget(self.repeats, self.min_repeats, self.budget_s)

    def floats(self, name: str) -> tuple[float, ...]:
        """A list flag of numbers as floats ('' entries dropped)."""
        return tuple(float(x) for x in getattr(self, name) if str(x))


def options_from_flags(fv: flags.FlagValues) -> Options:
    """Flag values as :class:`Options` (``--quick`` presets where a flag was not given)."""
    values = {f.name: fv[f.name].value for f in dataclasses.fields(Options)}
    if values["quick"]:
        values |= {k: v for k, v in QUICK.items() if not fv[k].present}
        if not fv["shrink_batch"].present:
            values["shrink_batch"] = 8
        for key in ("pfp_models", "fused_models", "scaling_models", "device_models", "memory_models",
                    "first_call_models"):
            if not fv[key].present:
                values[key] = list(values["models"])
    return validate(Options(**values))


def validate(opts: Options) -> Options:
    """Raises ``app.UsageError`` on bad options."""
    if not opts.out:
        raise app.UsageError("--out=DIR is required (the benchmarks write their JSON there)")
    unknown = sorted(set(opts.benchmarks) - set(BENCHMARKS))
    if unknown:
        raise app.UsageError(f"--benchmarks: unknown {unknown}; available: {', '.join(BENCHMARKS)}")
    if opts.repeats < 1 or opts.min_repeats < 1 or opts.chunk_size < 1 or opts.num_points < 0:
        raise app.UsageError("--repeats, --min_repeats, --chunk_size must be >= 1 and --num_points >= 0")
    if any(int(c) < 1 for c in opts.device_counts):
        raise app.UsageError(f"--device_counts={list(opts.device_counts)}: expected positive integers")
    return opts


def _per_model(names: Sequence[str], fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name in names:
        start = time.perf_counter()
        out[name] = fn(name) | {"runtime_s": time.perf_counter() - start}
        logging.info("%s done in %.0fs", name, out[name]["runtime_s"])
    return out


def run_benchmark(kind: str, opts: Options) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, results) of one benchmark."""
    models, budget = list(opts.models), opts.budget
    if kind == "passes":
        def one(name: str) -> dict[str, Any]:
            cfg = passes.PassConfig(chunk_size=opts.chunk_size, contraction=opts.contraction,
                                    fused=name in opts.fused_models,
                                    scaling_fractions=(opts.floats("scaling_fractions")
                                                       if name in opts.scaling_models else ()))
            return passes.run(name, cfg, budget, opts.num_points)
        return {"fused_models": opts.fused_models, "scaling_models": opts.scaling_models}, _per_model(models, one)
    if kind == "prune":
        def one(name: str) -> dict[str, Any]:
            methods = tuple(m for m in opts.methods if m != "pfp" or name in opts.pfp_models)
            cfg = prune_e2e.PruneConfig(methods=methods, keep_ratio=opts.keep_ratio, chunk_size=opts.chunk_size,
                                        contraction=opts.contraction)
            return prune_e2e.run(name, cfg, budget, opts.num_points)
        return {"methods": opts.methods, "pfp_models": opts.pfp_models}, _per_model(models, one)
    if kind == "train_step":
        cfg = train_step.StepConfig(keep_ratio=opts.keep_ratio, chunk_size=opts.chunk_size)
        return dataclasses.asdict(cfg), _per_model(models, lambda n: train_step.run(n, cfg, budget, opts.num_points))
    if kind == "memory":
        cfg = memory.MemoryConfig(chunk_size=opts.chunk_size, num_points=opts.num_points,
                                  contraction=opts.contraction, rss_fractions=opts.floats("rss_fractions"))
        return dataclasses.asdict(cfg), _per_model(list(opts.memory_models), lambda n: memory.run(n, cfg))
    if kind == "first_call":
        cfg = first_call.FirstCallConfig(method=opts.first_call_method, keep_ratio=opts.keep_ratio,
                                         chunk_size=opts.chunk_size, num_points=opts.num_points,
                                         contraction=opts.contraction, repeats=opts.first_call_repeats,
                                         cache=opts.first_call_cache)
        return dataclasses.asdict(cfg), _per_model(list(opts.first_call_models), lambda n: first_call.run(n, cfg))
    if kind == "mesh":
        cfg = mesh.MeshConfig(device_counts=tuple(int(c) for c in opts.device_counts), chunk_size=opts.chunk_size,
                              num_points=opts.num_points, contraction=opts.contraction, repeats=opts.repeats,
                              min_repeats=opts.min_repeats, budget_s=opts.budget_s)
        return dataclasses.asdict(cfg) | {"models": opts.device_models}, mesh.run(tuple(opts.device_models), cfg)
    cfg = shrink.ShrinkConfig(method=opts.shrink_method, batch=opts.shrink_batch, round_to=opts.shrink_round_to,
                              method_options=_json_object(opts.shrink_method_options),
                              control_fractions=shrink.CONTROL_FRACTIONS if opts.shrink_control else ())
    config = dataclasses.asdict(cfg) | {"models": opts.shrink_models, "quick": opts.quick}
    return config, shrink.run(tuple(opts.shrink_models), cfg, budget, quick=opts.quick)


def _json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise app.UsageError(f"--shrink_method_options: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise app.UsageError("--shrink_method_options: must be a JSON object")
    return value


def output_path(out: str, kind: str, tag: str) -> Path:
    """``out/<kind>[_<tag>].json``."""
    return Path(out) / (f"{kind}_{tag}.json" if tag else f"{kind}.json")


def models_of(kind: str, opts: Options) -> list[str]:
    """The models benchmark ``kind`` runs on."""
    per_kind = {"memory": opts.memory_models, "first_call": opts.first_call_models, "mesh": opts.device_models,
                "shrink": opts.shrink_models}
    return list(per_kind.get(kind, opts.models))


def run_all(opts: Options, argv: Sequence[str]) -> list[Path]:
    """Runs every selected benchmark; writes and returns their JSON paths."""
    written = []
    command = "python -m experiments.bench " + " ".join(shlex.quote(a) for a in argv[1:])
    for kind in opts.benchmarks:
        logging.info("[%s] %s", kind, ", ".join(models_of(kind, opts)))
        start = time.perf_counter()
        config, results = run_benchmark(kind, opts)
        payload = {
            "benchmark": kind, "command": command, "note": opts.note,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "env": common.environment(), "config": dict(config, budget=dataclasses.asdict(opts.budget)),
            "results": results, "runtime_s": time.perf_counter() - start,
        }
        written.append(common.write_json(output_path(opts.out, kind, opts.tag), payload))
        print(report.render_payload(payload), flush=True)
    return written


def main(argv: Sequence[str]) -> None:
    """absl entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = options_from_flags(flags.FLAGS)
    for path in run_all(opts, sys.argv):
        logging.info("wrote %s", path)
