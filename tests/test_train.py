"""Tests for the training modules: train_config, optim, train_state, steps, evaluate, train (tiny models, CPU)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from experiments import data as data_lib
from experiments import evaluate as E
from experiments import optim, rng, steps
from experiments import train as T
from experiments import train_config as C
from experiments import train_state as S
from experiments.checkpoint import Checkpointer
from sensprune import masking


class MLP(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dropout -> Dense."""

    hidden: int = 16
    classes: int = 3
    use_bn: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden)(x)
        if self.use_bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class TinyCNN(nn.Module):
    classes: int = 7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.classes)(x)


def blobs(n: int = 480, dim: int = 8, classes: int = 3, seed: int = 0):
    """Well separated Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 4.0
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, y


def noise_augment(key: jax.Array, x: jax.Array) -> jax.Array:
    return x + 0.1 * jax.random.normal(key, x.shape, x.dtype)


# One model, batch size and augmentation for the training tests, so that they
# share compiled steps (dropout and augmentation exercise the step keys).
MODEL = MLP(dropout=0.1)
KW = dict(augment_fn=noise_augment, progress=False)


def create_state(model, key, input_shape, cfg, spe, masks=None):
    return S.create_state(model, key, input_shape, optim.Optimizer.create(cfg, spe), masks)


def state_from(model, state, cfg, spe, masks=None):
    """A fresh optimizer (of ``cfg``) around the variables of ``state``."""
    return S.state_from_params(model, S.variables_of(state), optim.Optimizer.create(cfg, spe), masks)


BASE = dict(
    num_epochs=4,
    batch_size=32,
    learning_rate=0.05,
    lr_milestones=[3],
    lr_gamma=0.1,
    warmup=1,
    optimizer="sgd",
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    augment="none",
    dtype="float32",
)


# ----------------------------------------------------------------------------
# Config, schedule, optimizer
# ----------------------------------------------------------------------------


def test_config_validation_names_field_and_allowed_values():
    cfg = C.as_train_config(common.training(**common.CIFAR_RESNET))
    assert cfg.lr_milestones == (91, 136) and cfg.optimizer == "sgd"
    cases = [
        ({"optimizer": "rmsprop"}, "'optimizer'", "['sgd', 'adam']"),
        ({"dtype": "float16"}, "'dtype'", "bfloat16"),
        ({"augment": "mixup"}, "'augment'", "cifar"),
        ({"batch_size": 0}, "'batch_size'", ">= 1"),
        ({"lr_milestones": [3, "x"]}, "'lr_milestones'", "integer"),
        ({"momentum": 1.0}, "'momentum'", "[0, 1)"),
        ({"momentum": 0.0, "nesterov": True}, "'nesterov'", "momentum"),
        ({"max_steps_per_epoch": 0}, "'max_steps_per_epoch'", ">= 1"),
        ({"lr_milestone": [3]}, "unknown field", "lr_milestones"),
    ]
    for change, field, allowed in cases:
        with pytest.raises(ValueError) as e:
            C.as_train_config({**BASE, **change})
        assert field in str(e.value) and allowed in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="missing required field.*learning_rate"):
        C.as_train_config({"num_epochs": 1, "batch_size": 2})


def test_schedule_warmup_and_milestones():
    cfg = {**BASE, "learning_rate": 0.1, "warmup": 2, "lr_milestones": [5, 3], "lr_gamma": 0.1}
    sched = optim.make_schedule(cfg, steps_per_epoch=10)  # warm-up: steps 0..19
    expected = {
        0: 0.0,  # torchprune's WarmupLR starts at 0
        5: 0.1 * 5 / 20,
        19: 0.1 * 19 / 20,
        20: 0.1,
        29: 0.1,
        30: 0.01,  # first step of milestone epoch 3
        49: 0.01,
        50: 0.001,  # epoch 5
        1000: 0.001,
    }
    for step, lr in expected.items():
        np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6, err_msg=f"step {step}")
    # Milestone inside the warm-up: both factors apply.
    sched = optim.make_schedule({**cfg, "lr_milestones": [1]}, steps_per_epoch=10)
    np.testing.assert_allclose(float(sched(15)), 0.1 * 0.1 * 15 / 20, rtol=1e-6)
    # No warm-up: full lr at step 0.
    sched = optim.make_schedule({**cfg, "warmup": 0, "lr_milestones": []}, steps_per_epoch=10)
    np.testing.assert_allclose(float(sched(0)), 0.1, rtol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_semantics_on_quadratic(nesterov):
    # f(w) = 0.5 * a * w^2, g = a * w; torch.optim.SGD(lr, momentum=mu,
    # weight_decay=wd, nesterov): d = g + wd * w; buf = mu * buf + d (buf = d at
    # step 1); step = d + mu * buf (nesterov) or buf; w -= lr * step.
    a, w0, lr, mu, wd = 2.0, 1.0, 0.1, 0.9, 0.01
    cfg = {**BASE, "learning_rate": lr, "momentum": mu, "weight_decay": wd,
           "warmup": 0, "lr_milestones": [], "nesterov": nesterov}
    tx = optim.make_optimizer(cfg, steps_per_epoch=1)
    # step 1: d1 = 2*1 + 0.01*1 = 2.01; buf1 = 2.01
    #   plain: w1 = 1 - 0.1 * 2.01 = 0.799
    #   nesterov: step = 2.01 + 0.9 * 2.01 = 3.819; w1 = 1 - 0.3819 = 0.6181
    # step 2 (plain): d2 = 2.01 * 0.799 = 1.60599; buf2 = 0.9*2.01 + 1.60599 = 3.41499
    #   w2 = 0.799 - 0.341499 = 0.457501
    # step 2 (nesterov): d2 = 2.01 * 0.6181 = 1.242381; buf2 = 1.809 + 1.242381 = 3.051381
    #   step = 1.242381 + 0.9 * 3.051381 = 3.9886239; w2 = 0.6181 - 0.39886239 = 0.21923761
    expected = [0.6181, 0.21923761] if nesterov else [0.799, 0.457501]
    w = jnp.asarray(w0, jnp.float32)
    state = tx.init(w)
    for want in expected:
        updates, state = tx.update(a * w, state, w)
        w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(float(w), want, rtol=1e-6)


def test_adam_uses_coupled_weight_decay():
    # torch.optim.Adam, first step: g' = g + wd*w; update = -lr * g'/(|g'| + eps) ~ -lr.
    cfg = {**BASE, "optimizer": "adam", "learning_rate": 0.01, "weight_decay": 0.5,
           "warmup": 0, "lr_milestones": []}
    tx = optim.make_optimizer(cfg, steps_per_epoch=1)
    w = jnp.asarray([1.0, -2.0])
    g = jnp.asarray([0.0, 0.0])  # the decay alone drives the first step
    updates, _ = tx.update(g, tx.init(w), w)
    np.testing.assert_allclose(np.asarray(updates), [-0.01, 0.01], rtol=1e-5)


def test_rewind_start_epoch_offsets_optimizer_schedule():
    cfg = {**BASE, "learning_rate": 0.1, "warmup": 0, "lr_milestones": [2],
           "momentum": 0.0, "weight_decay": 0.0, "start_epoch": 2}
    tx = optim.make_optimizer(cfg, steps_per_epoch=5)
    w = jnp.asarray(0.0)
    updates, _ = tx.update(jnp.asarray(1.0), tx.init(w), w)  # optimizer step 0 = epoch 2
    np.testing.assert_allclose(float(updates), -0.01, rtol=1e-6)
    state = S.state_from_params(MODEL, {"params": {"w": w}}, optim.Optimizer.create(cfg, steps_per_epoch=5))
    assert int(state.step) == 10


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def test_train_learns_separable_problem():
    x, y = blobs()
    model = MODEL
    cfg = C.as_train_config(BASE)
    spe = C.steps_per_epoch(len(x), cfg)
    assert spe == 15
    state = create_state(model, jax.random.key(0), x.shape[1:], cfg, spe)
    before = E.evaluate(state, model, x, y, 128)
    seen = []
    state = T.train(state, x, y, seed=0, **KW,
                    on_epoch_end=lambda e, s, m: seen.append((e, int(s.step), m)))
    after = E.evaluate(state, model, x, y, 128)
    assert [e for e, _, _ in seen] == [0, 1, 2, 3]
    assert [s for _, s, _ in seen] == [15, 30, 45, 60]
    assert seen[-1][2]["loss"] < seen[0][2]["loss"]
    np.testing.assert_allclose(seen[-1][2]["lr"], 0.005, rtol=1e-6)
    assert after["loss"] < before["loss"]
    assert after["error"] < 0.1, after
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32


def test_max_steps_per_epoch_and_bfloat16():
    x, y = blobs(n=200)
    model = MODEL
    cfg = C.as_train_config({**BASE, "max_steps_per_epoch": 3, "dtype": "bfloat16",
                             "num_epochs": 2})
    spe = C.steps_per_epoch(len(x), cfg)
    assert spe == 3
    state = create_state(model, jax.random.key(1), x.shape[1:], cfg, spe)
    out = T.train(state, x, y, seed=0, **KW)
    assert int(out.step) == 6
    for leaf in jax.tree.leaves((out.params, out.batch_stats, out.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert np.isfinite(E.evaluate(out, model, x, y, 64, dtype="bfloat16")["loss"])


@pytest.mark.parametrize("with_masks", [False, True])
def test_resume_from_checkpoint_equals_straight_run(tmp_path, with_masks):
    x, y = blobs(n=200)
    model = MODEL
    cfg = C.as_train_config(BASE)  # 200 % 32 != 0: the last batch wraps around
    spe = C.steps_per_epoch(len(x), cfg)
    masks = None
    init = create_state(model, jax.random.key(3), x.shape[1:], cfg, spe)
    if with_masks:
        rng = np.random.default_rng(1)
        masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.5), init.params)
        init = state_from(model, init, cfg, spe, masks)
    kw = dict(seed=7, **KW)

    straight = T.train(init, x, y, **kw)

    def save(epoch, state, metrics):
        Checkpointer(tmp_path).save(
            int(state.step), **S.state_to_items(state), masks=masks,
            meta={"epoch": epoch + 1, "loss": metrics["loss"]},
        )

    T.train(init, x, y, end_epoch=2, on_epoch_end=save, **kw)
    ckpt = Checkpointer(tmp_path)  # fresh objects, as after a restart
    assert ckpt.latest_step() == 2 * spe
    like = S.abstract_state(model, x.shape[1:], optim.Optimizer.create(cfg, spe), masks)
    restored = ckpt.restore(like=S.state_to_items(like))
    assert restored["meta"]["epoch"] == 2
    resumed = S.state_from_items(like, restored, ckpt.latest_step())
    resumed = T.train(resumed, x, y, **kw)

    assert int(resumed.step) == int(straight.step) == 4 * spe
    for a, b in zip(jax.tree.leaves((straight.params, straight.batch_stats, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_masked_training_keeps_pruned_weights_zero():
    x, y = blobs()
    model = MODEL
    cfg = C.as_train_config({**BASE, "num_epochs": 2})
    spe = C.steps_per_epoch(len(x), cfg)
    dense = create_state(model, jax.random.key(0), x.shape[1:], cfg, spe)
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.3), dense.params)
    state = state_from(model, dense, cfg, spe, masks)
    out = T.train(state, x, y, seed=0, **KW)
    for p, m, p0 in zip(jax.tree.leaves(out.params), jax.tree.leaves(masks),
                        jax.tree.leaves(dense.params)):
        p, m = np.asarray(p), np.asarray(m)
        assert np.all(p[~m] == 0.0)
        assert np.any(p[m] != np.asarray(p0)[m])  # kept weights did train
    assert masking.get_masks(out.opt_state) is not None


def test_train_donates_only_its_own_copy():
    """The loop's steps donate their state (buffers really reused), never the caller's state."""
    x, y = blobs()
    cfg = C.as_train_config({**BASE, "num_epochs": 1})
    spe = C.steps_per_epoch(len(x), cfg)
    state = create_state(MODEL, jax.random.key(0), x.shape[1:], cfg, spe)
    before = jax.device_get(state)
    first = T.train(state, x, y, seed=0, **KW)
    again = T.train(state, x, y, seed=0, **KW)  # the input is still alive and unchanged
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    step = steps.make_train_step(steps.StepOptions.create(cfg), donate=True)
    copy = jax.tree.map(jnp.copy, state)
    out, _ = step(copy, jnp.asarray(x[:8]), jnp.asarray(y[:8]), jax.random.key(1))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(copy.params))
    plain_step = steps.make_train_step(steps.StepOptions.create(cfg))
    plain, _ = plain_step(state, jnp.asarray(x[:8]), jnp.asarray(y[:8]), jax.random.key(1))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_pads_last_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 7, 23).astype(np.int32)
    model = TinyCNN()
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    got = E.evaluate(variables, model, x, y, batch_size=10)  # 10 + 10 + 3 (padded)
    logits = jax.jit(model.apply)(variables, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    np.testing.assert_allclose(got["loss"], float(jnp.mean(loss)), rtol=1e-5)
    np.testing.assert_allclose(got["error"], float(np.mean(np.argmax(logits, -1) != y)))
    np.testing.assert_allclose(got["error5"], float(np.mean(~np.any(top5 == y[:, None], -1))))
    # Bare params give the same numbers (no BatchNorm).
    assert E.evaluate(variables["params"], model, x, y, batch_size=10) == pytest.approx(got)


class RecordingExamples(data_lib.ArrayExamples):
    """In-memory examples that record every index batch (and seed / epoch) they are asked for."""

    def __init__(self, x, y):
        super().__init__(x, y)
        object.__setattr__(self, "asked", [])

    def take(self, indices, *, seed=0, epoch=0):
        self.asked.append((np.asarray(indices).tolist(), seed, epoch))
        return super().take(indices, seed=seed, epoch=epoch)


def test_train_and_evaluate_take_examples_objects():
    """An ``experiments.data.Examples`` (y=None) is read batch by batch in the loop's plan and
    gives the same state and metrics as the arrays."""
    x, y = blobs(n=100)
    cfg = C.as_train_config({**BASE, "num_epochs": 2})
    spe = C.steps_per_epoch(len(x), cfg)
    state = create_state(MODEL, jax.random.key(0), x.shape[1:], cfg, spe)
    examples = RecordingExamples(x, y)
    from_arrays = T.train(state, x, y, seed=5, **KW)
    from_examples = T.train(state, examples, None, seed=5, **KW)
    for a, b in zip(jax.tree.leaves(from_arrays), jax.tree.leaves(from_examples)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plan = [(idx.tolist(), 5, e) for e in range(2) for idx in T.epoch_order(5, e, len(x), spe, cfg.batch_size)]
    assert examples.asked == plan
    examples.asked.clear()
    assert E.evaluate(from_examples, MODEL, examples, None, 32) == E.evaluate(from_examples, MODEL, x, y, 32)
    assert [len(idx) for idx, _, _ in examples.asked] == [32] * 4  # 100 = 3 * 32 + 4, padded
    with pytest.raises(ValueError, match="labels"):
        T.train(state, examples, y, seed=5, **KW)
    with pytest.raises(ValueError, match="labels are missing"):
        E.evaluate(from_examples, MODEL, x, None, 32)


def test_train_rejects_state_off_epoch_boundary():
    x, y = blobs(n=64)
    model = MODEL
    cfg = C.as_train_config({**BASE, "num_epochs": 1})
    spe = C.steps_per_epoch(len(x), cfg)
    state = create_state(model, jax.random.key(0), x.shape[1:], cfg, spe)
    state, metrics = steps.train_step(state, x[:32], y[:32], jax.random.key(0),
                                      options=steps.StepOptions(augment_fn=noise_augment))
    assert int(state.step) == 1 and float(metrics["lr"]) == 0.0  # warm-up starts at 0
    with pytest.raises(ValueError, match="epoch boundary"):
        T.train(state, x, y, seed=0, **KW)


# ----------------------------------------------------------------------------
# One set of defaults, the state's static part, explicit PRNG
# ----------------------------------------------------------------------------


def test_training_defaults_have_one_source():
    """configs.common.training fills exactly TrainConfig's fields and defaults."""
    block = common.training(num_epochs=3, batch_size=8, learning_rate=0.1)
    cfg = C.as_train_config(block)
    assert cfg == C.TrainConfig(num_epochs=3, batch_size=8, learning_rate=0.1)
    assert set(block.keys()) == {f for f in C.TrainConfig.__dataclass_fields__}
    assert block.max_steps_per_epoch == -1 and cfg.max_steps_per_epoch is None  # -1: no cap
    assert C.as_train_config(C.config_dict(**dict(BASE, max_steps_per_epoch=3))).max_steps_per_epoch == 3
    with pytest.raises(ValueError, match="'momentum'"):
        common.training(num_epochs=3, batch_size=8, learning_rate=0.1, momentum=2.0)


def test_optimizer_is_static_state_and_shares_compiled_steps():
    """Two states of equal configs have equal static parts: one compiled step, no cached optimizers."""
    x, y = blobs(n=64)
    cfg = C.as_train_config({**BASE, "num_epochs": 1})
    spe = C.steps_per_epoch(len(x), cfg)
    a = create_state(MODEL, jax.random.key(0), x.shape[1:], cfg, spe)
    b = create_state(MODEL, jax.random.key(1), x.shape[1:], dict(BASE, num_epochs=1), spe)
    assert a.tx == b.tx and hash(a.tx) == hash(b.tx)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert not any(isinstance(leaf, optim.Optimizer) for leaf in jax.tree.leaves(a))
    options = steps.StepOptions(augment_fn=noise_augment)
    steps.train_step(a, x[:32], y[:32], jax.random.key(0), options=options)
    size = steps.train_step._cache_size()
    steps.train_step(b, x[:32], y[:32], jax.random.key(0), options=options)
    assert steps.train_step._cache_size() == size
    masked = state_from(MODEL, a, cfg, spe, masks=jax.tree.map(lambda p: p != 0, a.params))
    assert masked.tx.masked and masked.masks is not None and a.masks is None


def test_train_refuses_other_epoch_length():
    x, y = blobs(n=64)
    cfg = C.as_train_config({**BASE, "num_epochs": 1})
    state = create_state(MODEL, jax.random.key(0), x.shape[1:], cfg, 5)  # 64 / 32 = 2 steps per epoch
    with pytest.raises(ValueError, match="steps per epoch"):
        T.train(state, x, y, seed=0, **KW)


def test_make_key_is_explicit_and_matches_raw_keys():
    key = rng.make_key(3, "rbg")
    assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl="rbg"))
    with jax.default_prng_impl("rbg"):  # the bits the global flag used to give
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.PRNGKey(3))
    default = str(jax.config.jax_default_prng_impl)
    assert jax.random.key_impl(rng.make_key(3, "threefry2x32")) != jax.random.key_impl(key)
    assert str(jax.config.jax_default_prng_impl) == default  # nothing global changed
    np.testing.assert_array_equal(jax.random.key_data(rng.make_key(3)), jax.random.PRNGKey(3))
    with pytest.raises(ValueError, match="threefry2x32"):
        rng.make_key(0, "philox")
