"""Experiments that start from a trained network (config.training.init_from); no torch needed."""

import json

import jax
import numpy as np
import pytest

from configs import default as default_config
from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import evaluate as eval_lib
from experiments import models as models_lib
from experiments import pipeline, pretrained, train_config, train_state
from experiments import train as train_lib
from experiments.optim import Optimizer

NETWORK = "lenet300_100"


def tiny_config(init_from="", finetune=False, mode="cascade"):
    config = default_config.get_config()
    config.dataset.name = "digits"
    for block in (config.training, config.retraining):
        block.num_epochs = 1
        block.max_steps_per_epoch = 2
        block.lr_milestones = ()
        block.batch_size = 16
    config.training.init_from = str(init_from)
    config.training.init_finetune = finetune
    config.experiments.methods = ("wt",)
    config.experiments.mode = mode
    config.experiments.num_nets = 1
    config.experiments.spacing = (dict(type="manual", values=[0.5]),)
    config.experiments.retrain_iterations = -1
    config.coresets.size = 4
    config.coresets.chunk_size = 4
    config.eval_batch_size = 64
    return config


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits", valid_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A LeNet trained for a few steps on digits (not what the pipeline would make)."""
    model = models_lib.get_model(NETWORK, digits.num_classes)
    cfg = train_config.as_train_config(dict(num_epochs=2, batch_size=32, learning_rate=0.1, momentum=0.9))
    opt = Optimizer.create(cfg, train_config.steps_per_epoch(digits.num_train, cfg))
    state = train_state.create_state(model, jax.random.PRNGKey(123), digits.input_shape, opt)
    state = train_lib.train(state, digits.train_x, digits.train_y, seed=1, progress=False)
    variables = jax.device_get({"params": state.params})
    acc = eval_lib.evaluate(variables, model, digits.test_x, digits.test_y, 64)
    return model, variables, acc


def load(path):
    """load_variables for LeNet300-100 on the 8x8x1 digits."""
    return pretrained.load_variables(path, NETWORK, 10, input_shape=(8, 8, 1))


def _same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_from_npz_skips_training_and_prunes_the_loaded_net(tmp_path, trained):
    model, variables, acc = trained
    src = tmp_path / "net.npz"
    pretrained.save_npz(src, variables, network=NETWORK)
    workdir = tmp_path / "run"
    results = pipeline.run(tiny_config(src), workdir)
    # Its dense accuracy is the loaded net's, evaluated directly.
    assert results.dense["error"][0] == pytest.approx(acc["error"], abs=1e-6)
    assert results.dense["loss"][0] == pytest.approx(acc["loss"], rel=1e-5)
    assert acc["error"] < 0.5  # it was trained (a fresh net is at ~0.9)
    assert not (workdir / "checkpoints" / "net0" / "train").exists()  # no training ran
    assert np.isfinite(results.error).any()  # pruned + retrained + evaluated
    assert (workdir / "report.md").is_file()
    # Resuming the finished run loads again and changes nothing.
    again = pipeline.run(tiny_config(src), workdir)
    np.testing.assert_array_equal(again.error, results.error)


def test_run_from_a_pipeline_checkpoint_with_finetuning(tmp_path, trained, digits):
    model, variables, acc = trained
    ckdir = tmp_path / "other" / "checkpoints" / "net0" / "train"
    with ckpt_lib.Checkpointer(ckdir) as ck:
        ck.save(3, params=variables["params"], batch_stats={}, meta={"epoch": 3})
    (tmp_path / "other" / "config.json").write_text(json.dumps({"network": NETWORK}))
    got = load(ckdir)
    _same_tree(got, variables)
    _same_tree(load(ckdir / "3"), variables)

    workdir = tmp_path / "run"
    results = pipeline.run(tiny_config(ckdir, finetune=True), workdir)
    train_ck = ckpt_lib.Checkpointer(workdir / "checkpoints" / "net0" / "train")
    assert train_ck.all_steps() == [0, 1]  # seeded with the loaded net, then one epoch
    assert train_ck.restore_meta(0)["init_from"] == str(ckdir.resolve())
    assert results.dense["loss"][0] != pytest.approx(acc["loss"], rel=1e-6)  # fine-tuned: not the loaded net


def test_orbax_tree_and_bare_params_npz(tmp_path, trained, digits):
    import orbax.checkpoint as ocp

    _, variables, _ = trained
    saver = ocp.StandardCheckpointer()
    saver.save(str(tmp_path / "vars"), variables)
    saver.wait_until_finished()
    _same_tree(load(tmp_path / "vars"), variables)
    np.savez(tmp_path / "bare.npz", **{f"{k}/kernel": v["kernel"] for k, v in variables["params"].items()},
             **{f"{k}/bias": v["bias"] for k, v in variables["params"].items()})
    _same_tree(load(tmp_path / "bare.npz"), variables)


def test_mismatched_file_names_every_problem(tmp_path, trained, digits):
    _, variables, _ = trained
    flat = {k: np.asarray(v) for k, v in pretrained._flatten(variables).items()}
    names = sorted(flat)
    dropped = names[0]
    misshaped = names[-1]
    del flat[dropped]
    flat[misshaped] = flat[misshaped][:3]
    flat["params/extra/kernel"] = np.zeros((2, 2), np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(pretrained.PretrainedError) as err:
        load(tmp_path / "bad.npz")
    msg = str(err.value)
    expected_dropped = np.shape(pretrained._flatten(variables)[dropped])
    assert f"{dropped} (expected shape {expected_dropped})" in msg
    assert "params/extra/kernel (shape (2, 2))" in msg
    assert f"{misshaped} has shape (3," in msg and "expected (" in msg
    assert "lenet300_100 (10 classes)" in msg


def test_config_network_must_match_the_source(tmp_path, trained, digits):
    _, variables, _ = trained
    pretrained.save_npz(tmp_path / "net.npz", variables, network="lenet5")
    with pytest.raises(pretrained.PretrainedError, match="config.network='lenet300_100' but .* holds a 'lenet5'"):
        load(tmp_path / "net.npz")
    # A pipeline workdir records its network in config.json.
    ckdir = tmp_path / "w" / "checkpoints" / "net0" / "train"
    with ckpt_lib.Checkpointer(ckdir) as ck:
        ck.save(1, params=variables["params"], batch_stats={}, meta={"epoch": 1})
    (tmp_path / "w" / "config.json").write_text(json.dumps({"network": "lenet500_300_100"}))
    with pytest.raises(pretrained.PretrainedError, match="holds a 'lenet500_300_100'.*config.json"):
        load(ckdir)
    # ... and the run fails before training or pruning.
    with pytest.raises(pretrained.PretrainedError, match="lenet5"):
        pipeline.run(tiny_config(tmp_path / "net.npz"), tmp_path / "run")


def test_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pretrained.PretrainedError, match="not a checkpoint directory"):
        load(tmp_path / "empty")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(pretrained.PretrainedError, match="unknown source type"):
        load(tmp_path / "w.h5")


def test_config_fields_are_not_schedule_fields():
    config = tiny_config("x.npz", finetune=True)
    pipeline.validate_config(config)  # init_from / init_finetune do not reach TrainConfig
    assert "init_from" not in config.retraining


def test_cascade_rewind_rewinds_to_the_loaded_net(tmp_path, trained):
    _, variables, acc = trained
    src = tmp_path / "net.npz"
    pretrained.save_npz(src, variables)
    workdir = tmp_path / "run"
    results = pipeline.run(tiny_config(src, mode="cascade-rewind"), workdir)
    assert results.dense["error"][0] == pytest.approx(acc["error"], abs=1e-6)
    rewind = ckpt_lib.Checkpointer(workdir / "checkpoints" / "net0" / "rewind")
    items = rewind.restore(like={"params": None})
    _same_tree(items["params"], variables["params"])
    assert np.isfinite(results.error).any()
