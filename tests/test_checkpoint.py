"""Tests for experiments/checkpoint.py."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.checkpoint import Checkpointer, CheckpointError, read_json, write_json
from sensprune import masking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_items(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)},
    }
    masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.5), params)
    batch_stats = {"BatchNorm_0": {"mean": jnp.arange(3.0), "var": jnp.ones(3)}}
    tx = masking.masked(optax.chain(optax.add_decayed_weights(1e-4),
                                    optax.sgd(0.1, momentum=0.9)), masks)
    opt_state = tx.init(params)
    # Make the momentum nonzero so the round trip is meaningful.
    _, opt_state = tx.update(params, opt_state, params)
    return dict(params=params, batch_stats=batch_stats, opt_state=opt_state, masks=masks), tx


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_all_items(tmp_path):
    items, tx = make_items()
    meta = {"epoch": 3, "phase": "retrain", "seed": np.int64(7), "loss": np.float32(0.25),
            "results": {"error": [0.1, 0.2]}, "sizes": np.arange(3)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(10, **items, meta=meta)
    assert ckpt.latest_step() == 10

    fresh = Checkpointer(tmp_path)
    abstract = dict(items, opt_state=jax.eval_shape(tx.init, items["params"]))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    out = fresh.restore(like=abstract)
    for name in items:
        assert_trees_equal(out[name], items[name])
    assert isinstance(out["opt_state"], masking.PruneMaskState)
    assert out["masks"]["Dense_0"]["kernel"].dtype == jnp.bool_
    assert out["meta"] == {"epoch": 3, "phase": "retrain", "seed": 7, "loss": 0.25,
                           "results": {"error": [0.1, 0.2]}, "sizes": [0, 1, 2]}
    assert fresh.restore_meta() == out["meta"]

    # Concrete targets, subsets and raw (target-free) restores work too.
    sub = fresh.restore(10, like={"params": items["params"], "masks": None})
    assert set(sub) == {"params", "masks", "meta"}
    assert_trees_equal(sub["masks"], items["masks"])


def test_empty_and_missing_items(tmp_path):
    items, _ = make_items()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, params=items["params"], batch_stats={}, meta={"k": 1})
    out = ckpt.restore(like={"params": items["params"], "batch_stats": {}})
    assert out["batch_stats"] == {}
    with pytest.raises(CheckpointError, match="'masks' was not saved"):
        ckpt.restore(like={"masks": items["masks"]})
    with pytest.raises(ValueError, match="steps must increase"):
        ckpt.save(1, params=items["params"])
    with pytest.raises(FileNotFoundError):
        ckpt.restore(5, like={"params": None})


def test_max_to_keep(tmp_path):
    items, _ = make_items()
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, params=items["params"], meta={"step": step})
    assert ckpt.all_steps() == [2, 3]
    assert Checkpointer(tmp_path).restore_meta(2) == {"step": 2}


def test_mismatched_target_raises(tmp_path):
    items, _ = make_items()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, **items)
    bad_shape = jax.tree.map(lambda a: a, items["params"])
    bad_shape["Dense_0"]["kernel"] = jnp.zeros((5, 3))
    with pytest.raises(CheckpointError) as e:
        ckpt.restore(like={"params": bad_shape})
    msg = str(e.value)
    assert str(tmp_path) in msg and "'params'" in msg and "Dense_0/kernel" in msg
    assert "(4, 3)" in msg and "(5, 3)" in msg

    missing = {"Dense_0": items["params"]["Dense_0"]}
    with pytest.raises(CheckpointError, match="Conv_0/kernel' is in the checkpoint but not"):
        ckpt.restore(like={"params": missing})
    extra = dict(items["params"], Dense_1={"kernel": jnp.zeros((3, 2))})
    with pytest.raises(CheckpointError, match="Dense_1/kernel' is in the target but not"):
        ckpt.restore(like={"params": extra})
    with pytest.raises(CheckpointError, match="bool.*float32"):
        ckpt.restore(like={"masks": items["params"]})  # float target for bool masks
    # A different optimizer's state (Adam instead of masked SGD) does not fit.
    adam_state = optax.adam(0.1).init(items["params"])
    with pytest.raises(CheckpointError, match="'opt_state' does not match"):
        ckpt.restore(like={"opt_state": adam_state})


def _save_one(directory):
    items, _ = make_items()
    Checkpointer(directory).save(1, **items, meta={"a": 1})
    return items


# orbax may report the failed read a second time from a leftover coroutine.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_data_file_raises(tmp_path):
    items = _save_one(tmp_path)
    data = [f for f in glob.glob(str(tmp_path / "1" / "params" / "**" / "d" / "*"), recursive=True)
            if os.path.isfile(f)]
    assert data
    for f in data:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match=r"step 1.*cannot read"):
        Checkpointer(tmp_path).restore(like={"params": items["params"]})
    # Items that were not touched still restore.
    out = Checkpointer(tmp_path).restore(like={"masks": items["masks"]})
    assert_trees_equal(out["masks"], items["masks"])


def test_deleted_file_raises(tmp_path):
    items = _save_one(tmp_path)
    os.remove(tmp_path / "1" / "masks" / "manifest.ocdbt")
    with pytest.raises(CheckpointError, match="cannot read"):
        Checkpointer(tmp_path).restore(like={"masks": items["masks"]})
    os.remove(tmp_path / "1" / "index" / "metadata")
    with pytest.raises(CheckpointError, match="cannot read item 'index'"):
        Checkpointer(tmp_path).restore(like={"params": items["params"]})


def test_checksum_mismatch_raises(tmp_path):
    items = _save_one(tmp_path)
    index_file = tmp_path / "1" / "index" / "metadata"
    index = json.loads(index_file.read_text())
    index["items"]["params"]["crc32"] ^= 1  # as if the data had changed on disk
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'params' fails its checksum"):
        Checkpointer(tmp_path).restore(like={"params": items["params"]})


def test_killed_save_leaves_no_complete_checkpoint(tmp_path):
    # A child saves step 1, then is SIGKILLed during step 2 right before orbax
    # renames the (fully written) temporary directory to its final name.
    script = textwrap.dedent(
        """
        import os, signal, sys
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import async_path
        from experiments.checkpoint import Checkpointer

        ckpt = Checkpointer(sys.argv[1])
        ckpt.save(1, params={"w": jnp.ones(3)}, meta={"step": 1})

        async def killed_rename(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        async_path.rename = killed_rename
        ckpt.save(2, params={"w": jnp.full(3, 2.0)}, meta={"step": 2})
        print("save returned", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "save returned" not in proc.stdout
    tmp_dirs = glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*"))
    assert tmp_dirs, os.listdir(tmp_path)

    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1]
    assert not glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*"))  # cleaned up
    out = ckpt.restore(like={"params": {"w": jnp.zeros(3)}})
    np.testing.assert_array_equal(out["params"]["w"], np.ones(3))
    assert out["meta"] == {"step": 1}
    ckpt.save(2, params={"w": jnp.full(3, 2.0)})
    assert ckpt.latest_step() == 2


def test_json_helpers(tmp_path):
    path = tmp_path / "sub" / "results.json"
    assert read_json(path, default={}) == {}
    write_json(path, {"error": np.float64(0.5), "ratios": np.asarray([0.1, 0.2])})
    assert read_json(path) == {"error": 0.5, "ratios": [0.1, 0.2]}
    assert os.listdir(path.parent) == ["results.json"]  # no temp files left
    path.write_text('{"error": 0.')
    with pytest.raises(CheckpointError, match="results.json"):
        read_json(path)
    with pytest.raises(ValueError, match="not JSON-serializable"):
        write_json(path, {"f": object()})


# --------------------------------------------------------------------------
# Issue #17 item 3: a corrupt newest step falls back to the newest intact one.
# --------------------------------------------------------------------------


def _corrupt(step_dir, how):
    step_dir = str(step_dir)
    if how == "truncated":
        files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
                 if os.path.isfile(f)]
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "flipped":
        files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
                 if os.path.isfile(f)]
        for f in files:
            data = bytearray(open(f, "rb").read())
            for i in range(0, len(data), 7):
                data[i] ^= 0xFF
            open(f, "wb").write(bytes(data))
    elif how == "garbage_meta":
        with open(os.path.join(step_dir, "meta", "metadata"), "wb") as fh:
            fh.write(b"\x00{not json")
    elif how == "garbage_index":
        with open(os.path.join(step_dir, "index", "metadata"), "w") as fh:
            fh.write('{"format": "something else"}')
    else:
        raise ValueError(how)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage_meta", "garbage_index"])
def test_restore_latest_falls_back_to_the_newest_intact_step(tmp_path, how):
    items, _ = make_items()
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, params=jax.tree.map(lambda a: a * step, items["params"]), meta={"step": step})
    _corrupt(tmp_path / "3", how)
    fresh = Checkpointer(tmp_path, max_to_keep=3)
    step, out = fresh.restore_latest(like={"params": items["params"]})
    assert step == 2 and out["meta"] == {"step": 2}
    assert_trees_equal(out["params"], jax.tree.map(lambda a: a * 2, items["params"]))
    # The bad step was moved aside, never listed again; the run can save step 3 anew.
    assert fresh.all_steps() == [1, 2]
    assert os.path.isdir(tmp_path / "corrupt" / "step3.0")
    fresh.save(3, params=items["params"], meta={"step": 3})
    assert Checkpointer(tmp_path).restore_latest(like={"params": items["params"]})[0] == 3


def test_restore_latest_all_corrupt_or_empty_and_mismatch_still_raises(tmp_path):
    items, _ = make_items()
    ckpt = Checkpointer(tmp_path / "a")
    assert ckpt.restore_latest(like={"params": items["params"]}) == (None, {})
    ckpt.save(1, params=items["params"], meta={"step": 1})
    _corrupt(tmp_path / "a" / "1", "garbage_meta")
    assert ckpt.restore_latest(like={"params": items["params"]}) == (None, {})
    # A target that does not fit is a config/code change, not damage: no fallback, nothing moved.
    ckpt = Checkpointer(tmp_path / "b")
    ckpt.save(1, params=items["params"])
    with pytest.raises(CheckpointError, match="does not match the target"):
        ckpt.restore_latest(like={"params": {"w": jnp.zeros(2)}})
    assert ckpt.all_steps() == [1]
    # Meta-only: damaged arrays do not matter when only the metadata is needed.
    _corrupt(tmp_path / "b" / "1", "flipped")
    assert ckpt.restore_meta_latest() == (1, {})
