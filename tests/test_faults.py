"""Issue #17: nothing silently wrong, every fault of a workdir recoverable.

One tiny cascade run (2 methods x 2 keep ratios, 1 epoch of 2 steps) is the
reference; each test damages a copy of its workdir (or interferes with a run)
and checks that a rerun produces exactly the reference numbers.
"""

import glob
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import pipeline
from experiments import results as results_lib
from experiments import workdir as workdir_lib
from tests.test_pipeline import ROOT, load_config, tiny

FIELDS = ("error", "error5", "loss", "sizes", "flops", "layer_kept")


def _config():
    config = tiny(load_config(ROOT / "configs" / "default.py"), dataset="synthetic:8x8x1:10",
                  methods=["wt", "sipp"], ratios=(0.5, 0.2))
    config.dataset.max_train, config.dataset.max_test = 256, 64
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    results = pipeline.run(_config(), workdir)
    assert results.done.all()
    return workdir


def _copy(reference, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(reference, dest)
    return dest


def assert_same_results(a, b):
    assert a.done.all() and b.done.all()
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-7, err_msg=field)
    for key in a.dense:
        np.testing.assert_allclose(a.dense[key], b.dense[key], rtol=1e-6, err_msg=key)


def _load(workdir):
    return results_lib.Results.load_npz(Path(workdir) / "results.npz")


# --------------------------------------------------------------------------
# Item 2: results.npz deleted or corrupt -> rebuilt from the per-run records.
# --------------------------------------------------------------------------
def test_deleted_or_corrupt_results_are_rebuilt_without_holes(reference, tmp_path):
    ref = _load(reference)
    run = _copy(reference, tmp_path)
    (run / "results.npz").unlink()
    out = pipeline.run(_config(), run)
    assert_same_results(ref, out)
    assert_same_results(ref, _load(run))
    assert "—" not in (run / "report.md").read_text().split("Commensurate")[0]

    (run / "results.npz").write_bytes(b"PK\x03\x04 garbage, not an npz")
    with pytest.raises(results_lib.CorruptResultsError, match="corrupt or truncated.*records"):
        results_lib.Results.load_npz(run / "results.npz")
    out = pipeline.run(_config(), run)
    assert_same_results(ref, out)
    assert (run / "results.npz.corrupt").exists()


# --------------------------------------------------------------------------
# Item 3: a corrupt newest checkpoint -> the step before (or nothing) is used.
# --------------------------------------------------------------------------
def _chain(workdir, method="sipp"):
    return Path(workdir) / "checkpoints" / "net0" / "rep0" / method / "chain"


def test_corrupt_chain_checkpoint_falls_back_to_the_previous_step(reference, tmp_path):
    ref = _load(reference)
    # Damaged arrays of the last chain step of a finished run: not needed, not read.
    run = _copy(reference, tmp_path, "finished")
    for f in glob.glob(str(_chain(run) / "2" / "params" / "**" / "d" / "*"), recursive=True):
        if os.path.isfile(f):
            Path(f).write_bytes(b"\x00" * 16)
    assert_same_results(ref, pipeline.run(_config(), run))
    assert not (_chain(run) / "corrupt").exists()

    # Garbage metadata of the newest chain step: resume from step 1, recompute step 2.
    run = _copy(reference, tmp_path, "meta")
    (_chain(run) / "2" / "meta" / "metadata").write_bytes(b"\x00{garbage")
    (run / "results.npz").unlink()
    shutil.rmtree(run / "records" / "net0" / "rep0" / "sipp")
    out = pipeline.run(_config(), run)
    assert_same_results(ref, out)
    assert (_chain(run) / "corrupt" / "step2.0").is_dir()
    assert (_chain(run) / "2").is_dir()  # written again

    # A corrupt trained-net checkpoint (no older step): the net is trained again, same numbers.
    run = _copy(reference, tmp_path, "train")
    train = run / "checkpoints" / "net0" / "train"
    newest = max(int(p.name) for p in train.iterdir() if p.name.isdigit())
    (train / str(newest) / "index" / "metadata").write_text("{}")
    shutil.rmtree(run / "checkpoints" / "net0" / "rep0")
    assert_same_results(ref, pipeline.run(_config(), run))


# --------------------------------------------------------------------------
# Items 4, 5, 6: lock, writability, config diff.
# --------------------------------------------------------------------------
def test_locked_workdir_is_refused_at_once(reference, tmp_path):
    run = _copy(reference, tmp_path)
    with workdir_lib.lock(run):
        start = time.time()
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"in use by another run \\(process id {os.getpid()}"):
            pipeline.run(_config(), run)
        assert time.time() - start < 5
    assert_same_results(_load(reference), pipeline.run(_config(), run))  # released


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders")
def test_read_only_workdir_fails_up_front(reference, tmp_path):
    run = _copy(reference, tmp_path)
    run.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            pipeline.run(_config(), run)
    finally:
        run.chmod(stat.S_IRWXU)


def test_writability_check_names_the_path(tmp_path, monkeypatch):
    (tmp_path / "results.npz").write_bytes(b"")
    real = os.access
    monkeypatch.setattr(workdir_lib.os, "access",
                        lambda p, mode: False if str(p).endswith("results.npz") else real(p, mode))
    with pytest.raises(PermissionError, match="results.npz is not writable"):
        workdir_lib.check_writable(tmp_path)
    monkeypatch.setattr(workdir_lib.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError, match="is not writable \\(Permission denied\\)"):
        workdir_lib.check_writable(tmp_path)


def test_config_mismatch_names_every_field_with_both_values(reference, tmp_path):
    run = _copy(reference, tmp_path)
    config = _config()
    config.training.learning_rate = 0.5
    config.retraining.momentum = 0.5
    with pytest.raises(ValueError, match="another config") as err:
        pipeline.run(config, run)
    assert "retraining.momentum: workdir 0.9, config 0.5" in str(err.value)
    assert "training.learning_rate: workdir 0.05, config 0.5" in str(err.value)
    diff = workdir_lib.config_diff({"a": {"b": 1, "c": [1, 2]}, "mesh_devices": 1},
                                   {"a": {"b": 2, "c": [1, 2], "d": "x"}, "mesh_devices": 4}, ignore=("mesh_devices",))
    assert diff == ["a.b: workdir 1, config 2", "a.d: workdir <absent>, config 'x'"]


# --------------------------------------------------------------------------
# Item 8: comma-separated lists on the command line.
# --------------------------------------------------------------------------
def test_comma_separated_lists_and_unknown_methods():
    config = _config()
    config.experiments.methods = ("sipp, pfp",)
    config.experiments.spacing = (0.5, "0.2,0.1")
    config.training.lr_milestones = ("2,3",)
    steps = pipeline.validate_config(config)
    assert config.experiments.methods == ("sipp", "pfp")
    assert [s.keep_ratio for s in steps] == [0.5, 0.2, 0.1]
    assert tuple(config.training.lr_milestones) == (2, 3)
    config.experiments.methods = ("sipp,nope",)
    with pytest.raises(ValueError, match=r"methods\[1\]='nope' is unknown; allowed: .*sipp"):
        pipeline.validate_config(config)


def test_comma_separated_methods_on_the_command_line(tmp_path):
    """The flag as a user types it, parsed by ml_collections, then validated."""
    script = (
        "import sys; from absl import app, flags; from ml_collections import config_flags\n"
        "from experiments import pipeline\n"
        "C = config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
        "def main(_):\n"
        "    c = C.value\n"
        "    try:\n"
        "        pipeline.validate_config(c)\n"
        "    except ValueError as e:\n"
        "        print('ERR', e)\n"
        "    print('METHODS', list(c.experiments.methods))\n"
        "app.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, "--config=configs/default.py",
                          "--config.experiments.methods=sipp,pfp,nope", "--config.experiments.spacing=0.5,0.2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "methods[2]='nope' is unknown; allowed:" in out.stdout, out.stderr[-2000:]
    assert "METHODS ['sipp', 'pfp', 'nope']" in out.stdout


# --------------------------------------------------------------------------
# Item 10: file modes honour the umask.
# --------------------------------------------------------------------------
def test_written_files_honour_the_umask(reference):
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    for name in ("results.npz", "config.json", "report.md", "records/net0/dense.json"):
        assert stat.S_IMODE(os.stat(reference / name).st_mode) == want, name


# --------------------------------------------------------------------------
# Fault injection: SIGKILL at random moments, a second run, one corrupted file.
# --------------------------------------------------------------------------
_CHILD = """
import sys
import tests.conftest  # noqa: F401  (the test process's JAX settings)
from experiments import pipeline
from tests.test_faults import _config
pipeline.run(_config(), sys.argv[1])
print("FINISHED", flush=True)
"""


def _marks(workdir):
    """Checkpoint steps and records present now (retraining steps come and go)."""
    steps = glob.glob(str(workdir / "checkpoints" / "**" / "[0-9]*"), recursive=True)
    return {s for s in steps if os.path.basename(s).isdigit()} | set(
        glob.glob(str(workdir / "records" / "**" / "*.json"), recursive=True))


@pytest.mark.slow
def test_fault_injection_kills_and_a_corrupt_file_give_the_uninterrupted_results(reference, tmp_path):
    rng = random.Random(17)
    run = tmp_path / "faults"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}

    def start():
        return subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    seen = set()  # every mark ever observed: a measure of progress that only grows
    kills = 0
    for round_ in range(3):
        proc = start()
        if round_ == 0:
            # A second run in the same workdir is refused at once, naming the holder; the first
            # one is paused meanwhile (so it cannot finish first) and carries on unaffected.
            lock = run / workdir_lib.LOCK_NAME
            deadline = time.time() + 120
            while not (lock.exists() and lock.read_text()):
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGSTOP)
            t0 = time.time()
            second = subprocess.run([sys.executable, "-c", _CHILD, str(run)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
            proc.send_signal(signal.SIGCONT)
            assert second.returncode != 0 and time.time() - t0 < 30
            assert f"in use by another run (process id {proc.pid}" in second.stderr, second.stderr[-2000:]
        target = len(seen) + rng.randint(1, 4)
        deadline = time.time() + 180
        while proc.poll() is None and len(seen) < target and time.time() < deadline:
            seen |= _marks(run)
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # a random moment after that progress
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if round_ == 1:  # one corrupted file: the newest checkpoint step's arrays, truncated
            steps = [s for s in glob.glob(str(run / "checkpoints" / "**" / "[0-9]*"), recursive=True)
                     if os.path.basename(s).isdigit()]
            newest = max(steps, key=os.path.getmtime)
            for f in glob.glob(os.path.join(newest, "*", "**", "d", "*"), recursive=True):
                if os.path.isfile(f):
                    with open(f, "r+b") as fh:
                        fh.truncate(max(os.path.getsize(f) // 2, 1))
    assert kills >= 2
    final = subprocess.run([sys.executable, "-c", _CHILD, str(run)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert "FINISHED" in final.stdout, final.stderr[-3000:]
    assert_same_results(_load(reference), _load(run))
