"""Data-parallel runs (``sensprune.sharding``): 4 forced host devices give the
same numbers as 1, and arrays are sharded as intended.

The multi-device checks run in one subprocess (``tests/sharding_check.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: this process already has
its single CPU device.
"""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sensprune import sharding

ROOT = Path(__file__).resolve().parents[1]


def _once_per_session(tmp_path_factory, worker_id: str, name: str, compute):
    """``compute()`` (a JSON-able result) run by one pytest-xdist worker and read by the others,
    instead of once per worker; without xdist (``worker_id == 'master'``) simply ``compute()``."""
    if worker_id == "master":
        return compute()
    shared = tmp_path_factory.getbasetemp().parent  # one folder for all workers of this session
    path = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker computes; the others wait, then read
        if not path.exists():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, worker_id):
    return _once_per_session(tmp_path_factory, worker_id, "four_devices", _run_four_devices)


def _run_four_devices():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored_count")
    # Forced host devices meet in in-process all-reduces; on an overloaded machine one may reach
    # it much later than the others: wait instead of aborting (the default is far shorter).
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4 " + " ".join(
        f"--xla_cpu_collective{kind}_timeout_seconds=900" for kind in ("", "_call_terminate"))).strip()
    # A device waiting in an all-reduce holds an intra-op thread; size the pool for all 4 (2-core CI).
    env.setdefault("PJRT_NPROC", "16")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_check"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mesh_has_four_devices(four_devices):
    assert four_devices["devices"] == 4 and four_devices["mesh_shape"] == {"data": 4}


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_sensitivities_match_one_device(four_devices, net, reduction):
    r = four_devices["sens"][f"{net}/{reduction}"]
    assert r["layers"] and r["positive"]
    assert r["max_rel"] < 1e-5  # same points, different grouping per device: float reassociation only
    assert r["replicated"]  # the cross-device max leaves a full copy on every device
    assert r["fused_max_rel"] < 1e-5 and r["fused_replicated"]  # one program, one pmax at the end


@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_prune_masks_match_one_device(four_devices, method):
    r = four_devices["prune"][method]
    assert r["same_masks"]
    assert r["keep"][0] == r["keep"][1]


def test_batch_is_split_over_the_data_axis(four_devices):
    b = four_devices["batch"]  # 8 images of 8x8x1 on 4 devices
    assert b["spec"] == "P('data',)"
    assert b["shard_shapes"] == [[2, 8, 8, 1]] and b["label_shard_shapes"] == [[2]]
    assert b["num_shards"] == 4 and b["devices"] == 4
    assert four_devices["process_rows"] == list(range(8))  # one process holds every row
    assert four_devices["padded"] == [8, 6, True]


def test_masked_training_matches_one_device(four_devices):
    t = four_devices["train"]
    assert t["steps"] == [5, 5]
    assert t["params_moved"] > 1e-3  # the steps did something
    assert t["params_max_diff"] < 1e-5
    assert t["batch_stats_max_diff"] < 1e-5  # BatchNorm statistics over the global batch
    assert t["opt_state_max_diff"] < 1e-5
    assert t["state_replicated"] and t["pruned_stay_zero"]


def test_pruned_evaluation_matches_one_device(four_devices):
    e = four_devices["eval"]  # 37 examples, batch 10 (12 on 4 devices), padding weighted out
    assert e["one"]["error"] == pytest.approx(e["many"]["error"], abs=1e-7)
    assert e["one"]["error5"] == pytest.approx(e["many"]["error5"], abs=1e-7)
    assert e["one"]["loss"] == pytest.approx(e["many"]["loss"], rel=1e-5)


def test_model_axis_splits_the_state_and_matches_one_device(four_devices):
    m = four_devices["model_axis"]  # 2 x 2 mesh: params, masks, optimizer state split over 'model'
    assert m["mesh_shape"] == {"data": 2, "model": 2}
    assert m["sens_max_rel"] < 1e-5 and all(m["same_masks"].values())
    t = m["train"]
    assert t["steps"] == 5 and t["pruned_stay_zero"] and t["specs_match"]
    assert max(t["params_max_diff"], t["batch_stats_max_diff"], t["opt_state_max_diff"]) < 1e-5
    # Largest dimension divisible by 2: conv output channels (8, 12, 16), the dense kernel's 16 inputs.
    conv_specs = {f"Conv_{i}": "P(None, None, None, 'model')" for i in range(3)}
    assert t["kernel_specs"] == conv_specs | {"Dense_0": "P('model',)"}
    assert t["kernel_shard_shapes"] == {"Conv_0": [[3, 3, 1, 4]], "Conv_1": [[3, 3, 8, 6]],
                                        "Conv_2": [[3, 3, 12, 8]], "Dense_0": [[8, 5]]}
    assert m["local_whole"] and m["local_max_diff"] < 1e-5  # local_state gathers the split arrays
    assert m["eval"]["one"]["error"] == pytest.approx(m["eval"]["many"]["error"], abs=1e-7)
    assert m["eval"]["one"]["loss"] == pytest.approx(m["eval"]["many"]["loss"], rel=1e-5)


def test_indivisible_batches_are_refused(four_devices):
    err = four_devices["errors"]
    assert "batch size 6 is not divisible by the 4 devices of mesh axis 'data'" in err["shard_batch"]
    assert "pad_to_multiple" in err["shard_batch"]
    assert "global batch size 10 is not divisible by the 4 devices" in err["process_rows"]
    assert "'batch_size'=6: expected a multiple of the 4 devices" in err["train_batch"]


# ----------------------------------------------------------------------------
# Two JAX processes (jax.distributed over localhost) with 2 devices each
# ----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, worker_id):
    """The checks of ``sharding_check`` on a 4-device mesh spanning 2 processes
    (``tests/multihost_check.py``); one JSON result per process."""
    return _once_per_session(tmp_path_factory, worker_id, "two_processes",
                             lambda: _run_two_processes(tmp_path_factory))


def _run_two_processes(tmp_path_factory):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored_count")
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    ckpt = str(tmp_path_factory.mktemp("multihost") / "ckpt")
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.multihost_check", str(i), "2", port, ckpt], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-4000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    return outs


def test_two_processes_match_one_device(two_processes):
    for i, r in enumerate(two_processes):
        assert r["process"] == [i, 2, 2] and r["devices"] == 4 and r["mesh_shape"] == {"data": 4}
        for key, sens in r["sens"].items():
            assert sens["layers"] and sens["replicated"] and sens["max_rel"] < 1e-5, key
            assert sens["fused_replicated"] and sens["fused_max_rel"] < 1e-5, key
        for method, p in r["prune"].items():
            assert p["same_masks"] and p["keep"][0] == p["keep"][1], method
        t = r["train"]
        assert t["steps"] == [5, 5] and t["params_moved"] > 1e-3
        assert max(t["params_max_diff"], t["batch_stats_max_diff"], t["opt_state_max_diff"]) < 1e-5
        assert t["state_replicated"] and t["pruned_stay_zero"]
        assert r["eval"]["one"]["error"] == pytest.approx(r["eval"]["many"]["error"], abs=1e-7)
        assert r["eval"]["one"]["loss"] == pytest.approx(r["eval"]["many"]["loss"], rel=1e-5)
        m = r["model_axis"]  # the model axis inside each process, the data axis across them
        assert m["mesh_shape"] == {"data": 2, "model": 2} and m["sens_max_rel"] < 1e-5
        assert all(m["same_masks"].values()) and m["train"]["specs_match"] and m["train"]["pruned_stay_zero"]
        assert max(m["train"]["params_max_diff"], m["train"]["opt_state_max_diff"]) < 1e-5
        assert m["local_whole"] and m["local_max_diff"] < 1e-5  # gathered across processes
        assert m["eval"]["one"]["error"] == pytest.approx(m["eval"]["many"]["error"], abs=1e-7)


def test_two_processes_share_one_orbax_checkpoint(two_processes):
    for r in two_processes:  # both saved and restored the same step of one directory
        c = r["checkpoint"]
        assert c["steps"] == [1] and c["max_diff"] == 0.0 and c["meta"]["process_count"] == 2


def test_two_processes_hold_their_own_rows(two_processes):
    for i, r in enumerate(two_processes):
        b = r["batch"]  # 8 rows on 4 devices, 2 of them in this process
        assert b["shard_shapes"] == [[2, 8, 8, 1]] and b["num_shards"] == 2 and b["devices"] == 4
        assert r["process_rows"] == list(range(4 * i, 4 * i + 4))
    assert two_processes[0]["train"]["params_max_diff"] == two_processes[1]["train"]["params_max_diff"]


# ----------------------------------------------------------------------------
# Helpers on this process's single device
# ----------------------------------------------------------------------------


def test_data_mesh_defaults_and_errors():
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert sharding.data_mesh(1).size == 1 and sharding.data_mesh(-1).size == jax.device_count()
    assert sharding.data_mesh(axis="batch").axis_names == ("batch",)
    with pytest.raises(ValueError, match=r"devices=5: expected -1 \(all\) or a count in \[1, 1\]"):
        sharding.data_mesh(5)
    with pytest.raises(ValueError, match="devices=0"):
        sharding.data_mesh(0)
    with pytest.raises(ValueError, match="devices is an empty sequence"):
        sharding.data_mesh([])
    with pytest.raises(ValueError, match="axis must be a non-empty string"):
        sharding.data_mesh(axis="")


def test_data_axis_of_other_meshes():
    assert sharding.data_axis(sharding.data_mesh(axis="batch")) == "batch"  # the only axis
    two = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("x", "y"))
    with pytest.raises(ValueError, match=r"mesh has axes \('x', 'y'\); expected one named 'data'"):
        sharding.data_axis(two)
    named = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("model", "data"))
    assert sharding.data_axis(named) == "data" and sharding.process_rows(named, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        sharding.data_axis("data")


def test_shard_batch_and_replicate_on_one_device():
    mesh = sharding.data_mesh()
    x, y = np.ones((4, 3), np.float32), np.arange(4)
    bx, by = sharding.shard_batch((x, y), mesh)
    assert bx.sharding == sharding.batch_sharding(mesh) and np.array_equal(np.asarray(by), y)
    with pytest.raises(ValueError, match=r"leaves have different leading sizes \[3, 4\]"):
        sharding.shard_batch((x, y[:3]), mesh)
    with pytest.raises(ValueError, match="expected arrays with a leading batch axis, got a scalar"):
        sharding.shard_batch(np.float32(1.0), mesh)
    tree = sharding.replicate({"w": x, "n": 3}, mesh)
    assert tree["n"] == 3 and tree["w"].sharding.is_fully_replicated


def test_param_spec_splits_the_largest_divisible_dimension():
    spec = sharding.param_spec
    P = sharding.PartitionSpec
    assert spec((3, 3, 16, 32), 1) == P()  # no model axis: replicated
    assert spec((3, 3, 16, 32), 2) == P(None, None, None, "model")
    assert spec((784, 300), 4) == P("model")  # the larger of two divisible dimensions
    assert spec((300, 784), 4) == P(None, "model")
    assert spec((3, 3, 6, 6), 2) == P(None, None, None, "model")  # ties: the last one
    assert spec((3, 3, 5, 12), 8) == P() and spec((10,), 4) == P() and spec((), 2) == P()
    assert spec((3, 3, 5, 12), 3) == P(None, None, None, "model")
    assert spec((2, 3), 3) == P(None, "model") and spec((2,), 4) == P()  # smaller than the axis


def test_model_axis_on_one_device():
    mesh = sharding.data_mesh(model=1)
    assert mesh.axis_names == ("data",) and sharding.model_axis_size(mesh) == 1
    with pytest.raises(ValueError, match=r"model=0: expected an integer >= 1 \(size of the 'model' mesh axis\)"):
        sharding.data_mesh(model=0)
    with pytest.raises(ValueError, match=r"model=2: expected a divisor of the 1 devices of the mesh"):
        sharding.data_mesh(model=2)
    grid = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    tree = {"w": np.ones((4, 2), np.float32), "n": 3}
    placed = sharding.shard_params(tree, grid)
    assert placed["n"] == 3 and placed["w"].sharding.spec == sharding.PartitionSpec()
    assert sharding.point_sharding(grid).spec == sharding.PartitionSpec(("data", "model"))
    points, n = sharding.shard_points(np.arange(3.0), grid)
    assert n == 3 and np.asarray(points).tolist() == [0.0, 1.0, 2.0]
    assert sharding.gather(placed)["w"] is placed["w"]  # replicated already: untouched


def test_pad_to_multiple():
    x = np.arange(5.0)
    padded, n = sharding.pad_to_multiple(x, 4)
    assert n == 5 and padded.tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    zeros, _ = sharding.pad_to_multiple(x + 1, 3, mode="zeros")
    assert zeros.tolist() == [1, 2, 3, 4, 5, 0]
    same, n = sharding.pad_to_multiple(x, 5)
    assert same is x and n == 5
    with pytest.raises(ValueError, match=r"mode='wrap': expected one of \['edge', 'zeros'\]"):
        sharding.pad_to_multiple(x, 2, mode="wrap")
    with pytest.raises(ValueError, match="multiple=0: expected an integer >= 1"):
        sharding.pad_to_multiple(x, 0)
    with pytest.raises(ValueError, match="expected arrays with a leading batch axis, got a scalar"):
        sharding.pad_to_multiple(np.float32(2.0), 2)


def test_experiment_mesh_config():
    import ml_collections

    from experiments import pipeline

    def config(mesh_devices, batch=16):
        c = ml_collections.ConfigDict({"training": {"batch_size": batch}, "retraining": {"batch_size": batch}})
        if mesh_devices is not None:
            c.mesh_devices = mesh_devices
        return c

    assert pipeline.make_mesh(config(-1)) is None  # one device, one process: the plain path
    assert pipeline.make_mesh(config(None)) is None  # configs without the field
    assert pipeline.make_mesh(config(1)) is None
    with pytest.raises(ValueError, match=r"config.mesh_devices=2: expected -1 \(all devices\) or a count in \[1, 1\]"):
        pipeline.make_mesh(config(2))
    with pytest.raises(ValueError, match="config.mesh_devices=0"):
        pipeline.make_mesh(config(0))
    assert "mesh_devices" in pipeline.RUNTIME_FIELDS and "multihost" in pipeline.RUNTIME_FIELDS
    assert "mesh_model" in pipeline.RUNTIME_FIELDS
    with_model = config(-1)
    with_model.mesh_model = 1
    assert pipeline.make_mesh(with_model) is None
    for bad in (2, 0, True, "2"):
        with_model = config(-1)
        with_model.mesh_model = bad
        expected = (r"config.mesh_model=.*: expected a divisor of the 1 devices of the mesh "
                    r"\(config.mesh_devices\): one of \[1\]")
        with pytest.raises(ValueError, match=expected):
            pipeline.make_mesh(with_model)


# ----------------------------------------------------------------------------
# The experiment launcher on two JAX processes
# ----------------------------------------------------------------------------


def _launcher(workdir, *extra):
    return [
        sys.executable, "-m", "experiments.main", "--config=configs/default.py", f"--workdir={workdir}",
        "--config.dataset.name=digits", "--config.training.num_epochs=1", "--config.retraining.num_epochs=1",
        "--config.training.max_steps_per_epoch=3", "--config.retraining.max_steps_per_epoch=2",
        "--config.training.lr_milestones=()", "--config.retraining.lr_milestones=()",
        "--config.experiments.methods=('sipp', 'pfp')", "--config.coresets.size=30", *extra,
    ]


def test_launcher_on_two_processes_matches_one_process(tmp_path):
    """``experiments.main --config.multihost=True`` with explicit ``config.distributed`` settings on two
    processes (2 forced devices each, a 2 x 2 mesh with a 'model' axis), killed part-way and re-run:
    it resumes from its checkpoints, process 0 alone reports, and the results equal a one-process run's."""
    from experiments import results as results_lib

    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored_count")
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    single = tmp_path / "single"
    subprocess.run(_launcher(single, "--config.mesh_devices=1"), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)

    multi = tmp_path / "multi"

    def launch(kill_when=None):
        port = str(_free_port())
        procs = [subprocess.Popen(
            _launcher(multi, "--config.multihost=True", "--config.mesh_model=2",
                      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = []
        try:
            if kill_when is not None:  # SIGKILL both processes once the run is part-way
                deadline = time.time() + 600
                while not kill_when.exists() and procs[0].poll() is None and time.time() < deadline:
                    time.sleep(0.05)
                assert procs[0].poll() is None, "the run finished before it could be killed"
                time.sleep(1.0)
                for proc in procs:
                    proc.kill()
                return [proc.communicate() for proc in procs]
            for proc in procs:
                stdout, stderr = proc.communicate(timeout=600)
                assert proc.returncode == 0, stderr[-4000:]
                outs.append((stdout, stderr))
        finally:
            for proc in procs:
                proc.kill()
        return outs

    launch(kill_when=multi / "checkpoints" / "net0" / "rep0" / "pfp")
    partial = results_lib.Results.load_npz(multi / "results.npz")
    assert 0 < partial.done.sum() < partial.done.size  # really interrupted mid-way
    outs = launch()  # resumes from the last checkpoints
    assert "Results:" in outs[0][0] and "Results:" not in outs[1][0]  # only process 0 reports
    assert "JAX process 0 of 2" in outs[0][1] and "mesh {'data': 2, 'model': 2}" in outs[0][1]
    assert "net 0: trained checkpoint found" in outs[0][1]  # restored on both processes, not retrained
    for path in ("results.npz", "report.md", "plots", "tensorboard", "config.json", "checkpoints"):
        assert (multi / path).exists(), path
    a = results_lib.Results.load_npz(single / "results.npz")
    b = results_lib.Results.load_npz(multi / "results.npz")
    assert a.done.all() and b.done.all()
    # Training on 4 devices differs by float reassociation only; at the most extreme ratio that can move a
    # few weights between layers of near-equal sensitivity (seen: SiPP at 3 %), not the totals.
    np.testing.assert_allclose(a.sizes, b.sizes, rtol=1e-3)
    np.testing.assert_allclose(a.layer_kept.sum(-1), b.layer_kept.sum(-1), rtol=1e-3)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-3)
    np.testing.assert_allclose(a.error, b.error, atol=0.01)


def test_distributed_args_from_the_config():
    import ml_collections

    from experiments.main import distributed_args

    def config(**fields):
        base = dict(coordinator_address="", num_processes=0, process_id=-1)
        return ml_collections.ConfigDict({"distributed": {**base, **fields}})

    assert distributed_args(config()) == {}  # all from the cluster environment
    assert distributed_args(ml_collections.ConfigDict({})) == {}  # configs without the block
    assert distributed_args(config(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match=r"config.distributed.process_id=4: expected one of 0..3"):
        distributed_args(config(num_processes=4, process_id=4))
    with pytest.raises(ValueError, match=r"config.distributed.num_processes=-2: expected >= 1"):
        distributed_args(config(num_processes=-2))
    with pytest.raises(ValueError, match=r"config.distributed: unknown fields \['port'\]"):
        distributed_args(ml_collections.ConfigDict({"distributed": {"port": 1}}))
