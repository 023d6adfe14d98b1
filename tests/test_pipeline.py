"""The experiment package end to end: configs, validation, resume after SIGKILL."""

import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import pipeline
from experiments import results as results_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in glob.glob(str(ROOT / "configs" / "**" / "*.py"), recursive=True)
    if not p.endswith(("__init__.py", "common.py"))
)


def load_config(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return importlib.import_module(rel).get_config()


def tiny(config, *, dataset="digits", methods=None, ratios=(0.5,)):
    """Shrinks a config to a couple of steps on tiny data."""
    if dataset is not None:
        config.dataset.name = dataset
    for block in (config.training, config.retraining):
        block.num_epochs = 1
        block.max_steps_per_epoch = 2
        block.warmup = 0
        block.lr_milestones = ()
        block.batch_size = min(block.batch_size, 16)
    config.experiments.num_nets = 1
    config.experiments.spacing = (dict(type="manual", values=list(ratios)),)
    config.experiments.retrain_iterations = -1
    if methods is not None:
        config.experiments.methods = tuple(methods)
    config.coresets.size = 4
    config.coresets.chunk_size = 4
    config.eval_batch_size = 16
    config.dataset.max_test = 64  # evaluation runs the same program on fewer batches
    return config


def test_every_config_loads_and_validates():
    assert len(CONFIGS) >= 15
    for path in CONFIGS:
        config = load_config(path)
        steps = pipeline.validate_config(config)
        assert steps and all(0 < s.keep_ratio <= 1 for s in steps), path
        doc = importlib.import_module(os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")).__doc__
        assert f"--config={os.path.relpath(path, ROOT)}" in doc, f"{path}: docstring must give the command"


# Deep nets cost XLA's CPU compiler one to two minutes per train step (50-100+ layers);
# CI builds their experiments (data, model shapes, layers, |S|) and runs the pipeline on
# the small nets only. SENSPRUNE_SLOW_TESTS=1 runs every config through the pipeline.
HEAVY = {"resnet56", "resnet110", "wrn16_8", "resnet18", "resnet50", "resnet101", "vgg11_bn_imagenet",
         "vgg16_bn_imagenet", "wide_resnet50_2"}
RUN_ALL = os.environ.get("SENSPRUNE_SLOW_TESTS") == "1"
# The pipeline run of wide nets uses their layer structure (depth, pools, BatchNorm, head) at 1/8 of
# the channels: VGG16's 15M weights made its global top-k sorts, zeroing and train steps cost ~100 s of
# CPU; test_every_config_builds builds the full-width model of every config.
NARROW = {"vgg16_bn": dict(cfg=tuple(v if v == "M" else int(v) // 8 for v in models_lib.CFGS["D"]))}


def _synthetic(config):
    h, w, c = models_lib.input_shape(config.network)
    if "vgg" not in config.network and h >= 32:
        h = w = 16 if h == 32 else 64  # global pooling heads accept smaller images
    return f"synthetic:{h}x{w}x{c}:10"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_builds(path, tmp_path):
    config = tiny(load_config(path), dataset=None)
    config.dataset.name = _synthetic(config)
    exp = pipeline.build(config, tmp_path)
    assert exp.layers and exp.dense_size > 0 and exp.s_size >= 1
    assert exp.dense_flops > 0


def _smoke_config(path):
    """The config of ``path`` shrunk for the pipeline smoke run: its first method, synthetic data."""
    config = load_config(path)
    method = config.experiments.methods[0]
    if config.network in ("densenet22", "vgg16_bn"):
        # Many distinct layer geometries, each compiling a sensitivity kernel (minutes on CPU);
        # the pipeline path is the same for every method.
        method = "wt"
    return tiny(config, dataset=_synthetic(config), methods=[method])


def _smoke_groups():
    """CONFIGS grouped by equal smoke configs, one pipeline run per group: the digits and Fashion-MNIST
    MobileNet / ViT configs differ only in their dataset, which the smoke run replaces."""
    groups = {}
    for path in CONFIGS:
        key = json.dumps(_smoke_config(path).to_dict(), sort_keys=True, default=repr)
        groups.setdefault(key, []).append(path)
    return list(groups.values())


@pytest.mark.parametrize("paths", _smoke_groups(), ids=lambda ps: "+".join(os.path.relpath(p, ROOT) for p in ps))
def test_every_config_runs_a_couple_of_steps(paths, tmp_path, monkeypatch):
    config = _smoke_config(paths[0])
    if config.network in HEAVY and not RUN_ALL:
        pytest.skip(f"{config.network}: CPU compile too slow for CI (SENSPRUNE_SLOW_TESTS=1 runs it)")
    if config.network in NARROW:
        get_model = models_lib.get_model
        monkeypatch.setattr(models_lib, "get_model", lambda name, n, **kw: get_model(name, n, **NARROW[name], **kw))
    pruned = []
    prune = pipeline._prune
    monkeypatch.setattr(pipeline, "_prune", lambda *a, **k: pruned.append(prune(*a, **k)) or pruned[-1])
    results = pipeline.run(config, tmp_path)
    assert results.done.all()
    assert np.isfinite(results.error).all()
    (res,) = pruned
    assert results.sizes[0, 0, 0, 0] == pytest.approx(res.keep_ratio)
    if abs(results.sizes[0, 0, 0, 0] - 0.5) >= 0.05:  # only zeroing may put the target far out of reach
        assert not res.info["reachable"]
        # zeroing on (configs' default): a barely trained net (two steps, BatchNorm's running stats near
        # their init) can have more than half of its kernel entries dead on S (MobileNet: ~2/3 of the deep
        # pointwise convs), zeroed before the size counts, so the target is out of reach from below only
        assert config.coresets.zero_dead and res.info["zero_dead"]["kernel"] > 0
        assert results.sizes[0, 0, 0, 0] < 0.5
    assert (tmp_path / "results.npz").exists()


def test_bad_configs_fail_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline.train_lib, "train", no_training)
    base = lambda: tiny(load_config(ROOT / "configs" / "default.py"))  # noqa: E731
    cases = [
        (lambda c: setattr(c, "network", "lenet9"), "config.network='lenet9' is unknown; allowed: .*lenet300_100"),
        (lambda c: setattr(c.experiments, "methods", ("sipp", "magic")), r"methods\[1\]='magic' is unknown; allowed"),
        (lambda c: setattr(c.experiments, "mode", "sometimes"), "mode='sometimes'; allowed: train, retrain, cascade"),
        (lambda c: setattr(c.dataset, "name", "imagenet21k"), "imagenet21k"),
        (lambda c: setattr(c.experiments, "spacing", (dict(type="manual", values=[0.5, 1.5]),)), r"\(0, 1\]"),
        (lambda c: setattr(c.experiments, "spacing", (dict(type="manual", values=[0.0]),)), r"\(0, 1\]"),
        (lambda c: setattr(c.experiments, "spacing", (dict(type="zigzag"),)), "type must be one of"),
        (lambda c: setattr(c.training, "optimizer", "lion"), "optimizer"),
        (lambda c: setattr(c.coresets, "delta_s", 2.0), "delta_s must be in"),
        (lambda c: setattr(c, "prng_impl", "philox"), r"config.prng_impl='philox': expected one of .*rbg"),
        (lambda c: setattr(c.training, "max_steps_per_epoch", 0), "max_steps_per_epoch"),
        (lambda c: c.experiments.update(methods=("sipp",), method_options={"ft": {"joint": "mean"}}),
         r"method_options has 'ft', not in config.experiments.methods"),
        (lambda c: setattr(c.experiments, "method_options", {"sipp": {"joint": "mean"}}),
         r"config.experiments.method_options: \['joint'\] not options of method 'sipp'; allowed: none"),
    ]
    for mutate, message in cases:
        config = base()
        assert "sipp" in config.experiments.methods
        mutate(config)
        with pytest.raises(ValueError, match=message):
            pipeline.run(config, tmp_path / "bad")
    config = base()
    config.dataset.name = "mnist"
    config.dataset.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(data_lib.DataNotFoundError, match="mnist"):
        pipeline.run(config, tmp_path / "bad2")


def test_other_config_in_same_workdir_is_refused(tmp_path):
    config = tiny(load_config(ROOT / "configs" / "default.py"), methods=["sipp"])
    config.experiments.mode = "train"
    pipeline.run(config, tmp_path)
    config.training.learning_rate = 0.5
    with pytest.raises(ValueError, match="another config.*training"):
        pipeline.run(config, tmp_path)


def test_prune_only_mode_and_non_retrainable_methods(tmp_path):
    """svd is never retrained (same numbers in cascade and prune-only); wt is, in cascade only."""
    runs = {}
    for mode in ("cascade", "prune-only"):
        config = tiny(load_config(ROOT / "configs" / "default.py"), methods=["wt", "svd"], ratios=(0.5, 0.2))
        config.experiments.mode = mode
        runs[mode] = pipeline.run(config, tmp_path / mode)
    for res in runs.values():
        assert res.done.all()
        np.testing.assert_allclose(res.sizes[0, :, 0, :], [[0.5, 0.5], [0.2, 0.2]], rtol=0.03)
    svd, wt = runs["cascade"].methods.index("svd"), runs["cascade"].methods.index("wt")
    a, b = runs["cascade"], runs["prune-only"]
    np.testing.assert_allclose(a.error[..., svd], b.error[..., svd], atol=1e-7)
    np.testing.assert_allclose(a.flops[..., svd], b.flops[..., svd])
    assert (a.flops[..., svd] < 1).all()
    assert not np.allclose(a.loss[..., wt], b.loss[..., wt])  # wt retrained in cascade only


def _command(workdir):
    return [
        sys.executable, "-m", "experiments.main", "--config=configs/default.py", f"--workdir={workdir}",
        "--config.dataset.name=digits", "--config.training.num_epochs=3", "--config.retraining.num_epochs=2",
        "--config.training.lr_milestones=(2,)", "--config.retraining.lr_milestones=(1,)",
        "--config.experiments.methods=('sipp', 'pfp')", "--config.coresets.size=32",
    ]


@pytest.mark.skipif(not RUN_ALL, reason="slow duplicate (SENSPRUNE_SLOW_TESTS=1 runs it): CI kills and resumes "
                    "runs in test_faults (fault injection, exact results) and test_sharding (the launcher)")
def test_killed_run_resumes_to_identical_results(tmp_path):
    """SIGKILL mid-run, re-run the same command: results equal an uninterrupted run."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight = tmp_path / "straight"
    subprocess.run(_command(straight), cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    trigger = killed / "checkpoints" / "net0" / "rep0" / "pfp"
    deadline = time.time() + 600
    while not trigger.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = results_lib.Results.load_npz(killed / "results.npz")
    assert 0 < partial.done.sum() < partial.done.size  # really interrupted mid-way
    out = subprocess.run(_command(killed), cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                         timeout=900)
    assert "Commensurate accuracy" in out.stdout
    a = results_lib.Results.load_npz(straight / "results.npz")
    b = results_lib.Results.load_npz(killed / "results.npz")
    assert a.done.all() and b.done.all()
    for field in ("error", "error5", "loss", "sizes", "flops", "layer_kept"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-7, err_msg=field)
    for path in ("plots", "tensorboard", "report.md"):
        assert (killed / path).exists()


def test_method_options_reach_prune(tmp_path, monkeypatch):
    seen = []
    real = pipeline.sp.prune

    def spy(*args, **kwargs):
        seen.append((kwargs["method"], kwargs["method_options"], kwargs["fused_pass"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.sp, "prune", spy)
    config = tiny(load_config(ROOT / "configs" / "default.py"), methods=["ft", "wt"])
    config.experiments.method_options = {"ft": {"joint": "mean", "round_to": 4}}
    config.fused_pass = True
    results = pipeline.run(config, tmp_path)
    assert results.done.all()
    assert ("ft", {"joint": "mean", "round_to": 4}, True) in seen and ("wt", {}, True) in seen
