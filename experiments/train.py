"""Training and retraining: config, schedule, optimizer, jitted steps, loop.

The training config is data (an ``ml_collections.ConfigDict``, a mapping or a
:class:`TrainConfig`); :func:`as_train_config` validates it. Semantics follow
torchprune's trainer:

* learning rate (per step ``t``, ``S`` steps per epoch, epochs ``E``):
  ``lr * min(1, t / (warmup * S)) * lr_gamma ** #{m in lr_milestones : t >= m * S}``
  (torchprune's ``WarmupLR`` + ``MultiStepLR``, both stepped per batch with
  epoch arguments multiplied by ``S``; the first warm-up step uses lr 0);
* SGD as ``torch.optim.SGD``: coupled weight decay (``g + wd * w``) on every
  param, then momentum / Nesterov, then the learning rate; Adam as
  ``torch.optim.Adam`` (also coupled weight decay);
* retraining gets a fresh optimizer and the full schedule
  (:func:`state_from_params`); with masks the optimizer is wrapped in
  :func:`sensprune.masking.masked`, so pruned weights stay exactly zero.

Randomness: epoch ``e`` visits the data in the order
``numpy.random.default_rng([seed, e]).permutation(N)``; step ``t`` (global) uses
``jax.random.fold_in(jax.random.key(seed), t)`` for augmentation and dropout.
Training epochs ``0..n`` in one go therefore equals training ``0..k``,
checkpointing, restoring and training ``k..n``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments import data as data_lib
from sensprune import masking
from sensprune import sharding as sharding_lib
from sensprune.types import PyTree

__all__ = [
    "AUGMENT_NAMES",
    "DTYPES",
    "OPTIMIZERS",
    "TrainConfig",
    "TrainState",
    "abstract_state",
    "as_train_config",
    "create_state",
    "default_config",
    "epoch_order",
    "eval_step",
    "local_state",
    "evaluate",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "shard_state",
    "state_from_items",
    "state_from_params",
    "state_to_items",
    "steps_per_epoch",
    "train",
    "train_step",
]

OPTIMIZERS = ("sgd", "adam")
AUGMENT_NAMES = ("none", "cifar", "imagenet")
DTYPES = ("float32", "bfloat16")

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
EpochCallback = Callable[[int, "TrainState", dict], Any]
StepCallback = Callable[[int, dict], Any]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Validated training hyperparameters (hashable; epochs are integers).

    Attributes:
      num_epochs: epochs of the full schedule.
      batch_size: examples per step.
      learning_rate: peak learning rate.
      lr_milestones: epochs at which the lr is multiplied by ``lr_gamma``.
      lr_gamma: step-decay factor.
      warmup: epochs of linear warm-up from 0 (0 = none).
      optimizer: ``'sgd'`` or ``'adam'``.
      momentum: SGD momentum (0 = plain SGD); ignored by Adam.
      nesterov: Nesterov momentum (SGD with momentum > 0 only).
      weight_decay: coupled L2 weight decay on every param.
      augment: name of an augmentation in ``experiments.augment.AUGMENTATIONS``.
      dtype: compute dtype of the forward/backward pass (params stay float32).
      max_steps_per_epoch: optional cap on steps per epoch (smoke tests).
      start_epoch: epoch the schedule starts at (learning-rate rewinding); the
        optimizer's step 0 is global step ``start_epoch * steps_per_epoch``.
    """

    num_epochs: int
    batch_size: int
    learning_rate: float
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    warmup: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    augment: str = "none"
    dtype: str = "float32"
    max_steps_per_epoch: Optional[int] = None
    start_epoch: int = 0


_REQUIRED = ("num_epochs", "batch_size", "learning_rate")
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def default_config() -> "ml_collections.ConfigDict":  # noqa: F821
    """A ConfigDict with every field (CIFAR ResNet schedule of the reference)."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            num_epochs=182,
            batch_size=128,
            learning_rate=0.1,
            lr_milestones=[91, 136],
            lr_gamma=0.1,
            warmup=5,
            optimizer="sgd",
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4,
            augment="cifar",
            dtype="float32",
            max_steps_per_epoch=None,
            start_epoch=0,
        )
    )


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    where = field if " " in field else f"training config field {field!r}"
    return ValueError(f"{where}={value!r}: expected {allowed}")


def _int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise _bad(field, value, f"an integer >= {minimum}")
    if value < minimum:
        raise _bad(field, value, f"an integer >= {minimum}")
    return int(value)


def _float(field: str, value: Any, minimum: float, *, strict: bool = False) -> float:
    allowed = f"a number {'>' if strict else '>='} {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(field, value, allowed)
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise _bad(field, value, allowed)
    return value


def _choice(field: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _bad(field, value, f"one of {list(allowed)}")
    return str(value)


def _augment_names() -> tuple[str, ...]:
    """Built-in names plus whatever ``experiments.augment`` registers."""
    try:
        from experiments import augment  # pylint: disable=import-outside-toplevel
    except ImportError:
        return AUGMENT_NAMES
    extra = tuple(k for k in getattr(augment, "AUGMENTATIONS", {}) if k not in AUGMENT_NAMES)
    return AUGMENT_NAMES + extra


def _to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(
        f"training config must be a TrainConfig, ConfigDict or mapping, got {type(cfg).__name__}"
    )


def as_train_config(cfg: Any) -> TrainConfig:
    """Validates ``cfg`` and returns it as a :class:`TrainConfig`.

    Raises ``ValueError`` naming the field and the allowed values for missing,
    unknown or out-of-range fields.
    """
    if isinstance(cfg, TrainConfig):
        return cfg
    raw = _to_dict(cfg)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"training config has unknown field(s) {unknown}; allowed fields: {list(_FIELDS)}"
        )
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ValueError(f"training config is missing required field(s) {missing}")
    d = {k: v for k, v in raw.items() if v is not None or k == "max_steps_per_epoch"}

    out: dict[str, Any] = {}
    out["num_epochs"] = _int("num_epochs", d["num_epochs"], 0)
    out["batch_size"] = _int("batch_size", d["batch_size"], 1)
    out["learning_rate"] = _float("learning_rate", d["learning_rate"], 0.0)
    milestones = d.get("lr_milestones", ())
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise _bad("lr_milestones", milestones, "a list of epochs (integers >= 0)")
    out["lr_milestones"] = tuple(
        sorted(_int("lr_milestones", m, 0) for m in milestones)
    )
    out["lr_gamma"] = _float("lr_gamma", d.get("lr_gamma", 0.1), 0.0, strict=True)
    out["warmup"] = _int("warmup", d.get("warmup", 0), 0)
    out["optimizer"] = _choice("optimizer", d.get("optimizer", "sgd"), OPTIMIZERS)
    out["momentum"] = _float("momentum", d.get("momentum", 0.0), 0.0)
    if out["momentum"] >= 1.0:
        raise _bad("momentum", out["momentum"], "a number in [0, 1)")
    nesterov = d.get("nesterov", False)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise _bad("nesterov", nesterov, "True or False")
    out["nesterov"] = bool(nesterov)
    if out["nesterov"] and out["optimizer"] == "sgd" and out["momentum"] == 0.0:
        raise _bad("nesterov", True, "False when momentum is 0 (Nesterov needs momentum > 0)")
    out["weight_decay"] = _float("weight_decay", d.get("weight_decay", 0.0), 0.0)
    aug = d.get("augment", "none")
    if aug not in AUGMENT_NAMES:
        _choice("augment", aug, _augment_names())
    out["augment"] = str(aug)
    out["dtype"] = _choice("dtype", d.get("dtype", "float32"), DTYPES)
    cap = d.get("max_steps_per_epoch")
    out["max_steps_per_epoch"] = None if cap is None else _int("max_steps_per_epoch", cap, 1)
    out["start_epoch"] = _int("start_epoch", d.get("start_epoch", 0), 0)
    if out["start_epoch"] > out["num_epochs"]:
        raise _bad("start_epoch", out["start_epoch"], f"at most num_epochs={out['num_epochs']}")
    return TrainConfig(**out)


def steps_per_epoch(num_examples: int, cfg: Any) -> int:
    """``ceil(N / batch_size)`` (the last batch wraps around), capped by
    ``max_steps_per_epoch``."""
    cfg = as_train_config(cfg)
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples}: expected a positive count")
    n = -(-num_examples // cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        n = min(n, cfg.max_steps_per_epoch)
    return n


# ----------------------------------------------------------------------------
# Schedule and optimizer
# ----------------------------------------------------------------------------


def make_schedule(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the *global* step (epoch ``e`` starts at
    step ``e * steps_per_epoch``): linear warm-up from 0 over ``warmup`` epochs,
    times ``lr_gamma`` at the start of every milestone epoch."""
    cfg = as_train_config(cfg)
    spe = _int("argument steps_per_epoch", steps_per_epoch, 1)
    bounds = np.asarray([m * spe for m in cfg.lr_milestones], dtype=np.int64)
    # lr for 0, 1, 2, ... milestones passed, each rounded once to float32.
    values = np.asarray(
        [cfg.learning_rate * cfg.lr_gamma**k for k in range(len(bounds) + 1)],
        dtype=np.float32,
    )
    warm = cfg.warmup * spe

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step)
        passed = jnp.sum(step[..., None] >= bounds, axis=-1) if len(bounds) else 0
        lr = jnp.asarray(values)[passed]
        if warm > 0:
            frac = jnp.minimum(step.astype(jnp.float32) / np.float32(warm), 1.0)
            lr = jnp.where(step < warm, lr * frac, lr)
        return lr

    return schedule


def _base_optimizer(cfg: TrainConfig, spe: int) -> optax.GradientTransformation:
    """Unmasked optimizer; its step 0 is global step ``start_epoch * spe``."""
    schedule = make_schedule(cfg, spe)
    offset = cfg.start_epoch * spe
    lr = schedule if offset == 0 else (lambda count: schedule(count + offset))
    parts = []
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.optimizer == "sgd":
        momentum = cfg.momentum if cfg.momentum > 0 else None
        parts.append(optax.sgd(lr, momentum=momentum, nesterov=cfg.nesterov))
    else:
        parts.append(optax.adam(lr, nesterov=cfg.nesterov))
    return optax.chain(*parts)


def make_optimizer(
    cfg: Any, steps_per_epoch: int, masks: Optional[PyTree] = None
) -> optax.GradientTransformation:
    """torch-like SGD (coupled weight decay, momentum / Nesterov) or Adam with the
    schedule of :func:`make_schedule`; wrapped in ``masking.masked`` when
    ``masks`` is given (pruned entries get zero gradient and zero update)."""
    cfg = as_train_config(cfg)
    tx = _base_optimizer(cfg, steps_per_epoch)
    if masks is not None:
        tx = masking.masked(tx, masks)
    return tx


def _opt_key(cfg: TrainConfig) -> TrainConfig:
    """The part of the config the update rule depends on (cache key)."""
    return dataclasses.replace(
        cfg, num_epochs=0, batch_size=1, augment="none", max_steps_per_epoch=None, dtype="float32"
    )


@functools.lru_cache(maxsize=64)
def _step_tx(opt_cfg: TrainConfig, spe: int, is_masked: bool) -> optax.GradientTransformation:
    """Cached update rule for the jitted step (same object -> no recompilation).

    ``masked``'s update reads the masks from its state, so the masks given at
    construction (used only by ``init``) do not matter here.
    """
    tx = _base_optimizer(opt_cfg, spe)
    return masking.masked(tx, None) if is_masked else tx


@functools.lru_cache(maxsize=64)
def _step_schedule(opt_cfg: TrainConfig, spe: int) -> optax.Schedule:
    return make_schedule(opt_cfg, spe)


# ----------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree).

    Attributes:
      step: global step (int32 scalar); epoch ``e`` covers steps
        ``[e * S, (e + 1) * S)``.
      params: float32 master params.
      batch_stats: BatchNorm running statistics (``{}`` without BatchNorm).
      opt_state: optimizer state (a ``masking.PruneMaskState`` inside when masked).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState


def _committed(tree: PyTree) -> PyTree:
    """Commits uncommitted arrays to the default device, so fresh and restored
    (committed) states hit the same compiled step."""
    device = jax.local_devices()[0]

    def commit(a: Any) -> Any:
        if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array) or a.committed:
            return a
        return jax.device_put(a, device)

    return jax.tree.map(commit, tree)


def _has_mask_state(opt_state: optax.OptState) -> bool:
    is_ms = lambda n: isinstance(n, masking.PruneMaskState)  # noqa: E731
    return any(is_ms(n) for n in jax.tree.leaves(opt_state, is_leaf=is_ms))


def state_from_params(
    params: PyTree,
    batch_stats: Optional[PyTree],
    cfg: Any,
    steps_per_epoch: int,
    masks: Optional[PyTree] = None,
) -> TrainState:
    """Fresh optimizer around given (e.g. pruned) params: what retraining starts
    from. With ``masks`` the params are masked and the optimizer keeps them so."""
    cfg = as_train_config(cfg)
    params = jax.tree.map(jnp.asarray, params)
    if masks is not None:
        params = masking.apply_masks(params, masks)
    tx = make_optimizer(cfg, steps_per_epoch, masks)
    batch_stats = {} if batch_stats is None else jax.tree.map(jnp.asarray, batch_stats)
    state = TrainState(
        step=jnp.asarray(cfg.start_epoch * steps_per_epoch, dtype=jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    return _committed(state)


@functools.partial(jax.jit, static_argnames=("model", "input_shape"))
def _init_variables(key: jax.Array, *, model: Any, input_shape: tuple[int, ...]) -> PyTree:
    k_params, k_dropout = jax.random.split(key)
    x = jnp.zeros((1, *input_shape), dtype=jnp.float32)
    return model.init({"params": k_params, "dropout": k_dropout}, x, train=False)


def create_state(
    model: Any,
    key: jax.Array,
    input_shape: Sequence[int],
    cfg: Any,
    steps_per_epoch: int,
    masks: Optional[PyTree] = None,
) -> TrainState:
    """Initializes ``model`` on zeros of ``[1, *input_shape]`` (per-example shape,
    no batch axis) and wraps the variables with a fresh optimizer."""
    variables = _init_variables(key, model=model, input_shape=tuple(input_shape))
    return state_from_params(
        variables["params"], variables.get("batch_stats"), cfg, steps_per_epoch, masks
    )


def abstract_state(
    model: Any,
    input_shape: Sequence[int],
    cfg: Any,
    steps_per_epoch: int,
    masks: Optional[PyTree] = None,
) -> TrainState:
    """``jax.ShapeDtypeStruct`` tree of :func:`create_state` (restore target)."""
    return jax.eval_shape(
        lambda k: create_state(model, k, input_shape, cfg, steps_per_epoch, masks),
        jax.random.key(0),
    )


def state_to_items(state: TrainState) -> dict[str, PyTree]:
    """``params``, ``batch_stats``, ``opt_state`` of ``state`` (checkpoint items)."""
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def state_from_items(items: Mapping[str, PyTree], step: int) -> TrainState:
    """Inverse of :func:`state_to_items` at global step ``step``."""
    state = TrainState(
        step=jnp.asarray(step, dtype=jnp.int32),
        params=items["params"],
        batch_stats=items.get("batch_stats") or {},
        opt_state=items["opt_state"],
    )
    return _committed(state)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _forward(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    *,
    train: bool,
    compute_dtype: str,
    dropout_key: Optional[jax.Array] = None,
) -> tuple[jax.Array, PyTree]:
    """Logits (float32) and updated batch stats (same dtypes as given)."""
    if compute_dtype == "bfloat16":
        params = _cast_floats(params, jnp.bfloat16)
        x = x.astype(jnp.bfloat16)
    else:
        x = x.astype(jnp.float32)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    if train and batch_stats:
        logits, updates = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs=rngs
        )
        new_stats = jax.tree.map(
            lambda new, old: new.astype(old.dtype), updates["batch_stats"], batch_stats
        )
    else:
        logits = model.apply(variables, x, train=train, rngs=rngs)
        new_stats = batch_stats
    return logits.astype(jnp.float32), new_stats


_STEP_STATIC = ("model", "tx", "schedule", "augment_fn", "compute_dtype")


def _train_step_fn(
    state: TrainState,
    batch_x: jax.Array,
    batch_y: jax.Array,
    key: jax.Array,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    augment_fn: Optional[AugmentFn],
    compute_dtype: str,
) -> tuple[TrainState, dict[str, jax.Array]]:
    step_key = jax.random.fold_in(key, state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x = batch_x if augment_fn is None else augment_fn(aug_key, batch_x)
    labels = batch_y.astype(jnp.int32)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, new_stats = _forward(
            model, params, state.batch_stats, x, train=True,
            compute_dtype=compute_dtype, dropout_key=dropout_key,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
        "lr": schedule(state.step),
    }
    new_state = TrainState(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    return new_state, metrics


_train_step = jax.jit(_train_step_fn, static_argnames=_STEP_STATIC)
# The same step, reusing the input state's buffers for the output state (the loop in :func:`train`).
_train_step_donated = jax.jit(_train_step_fn, static_argnames=_STEP_STATIC, donate_argnums=(0,))


@functools.lru_cache(maxsize=64)
def _sharded_train_step(mesh: Any, donate: bool = False, **static: Any) -> Callable[..., Any]:
    """:func:`_train_step_fn` with its static arguments bound, jitted for
    ``mesh``: batch split over its data axis, key and metrics replicated, the
    state placed by :func:`sensprune.sharding.param_sharding` (replicated, or
    split over a ``'model'`` axis) on the way in and out. XLA all-reduces the
    gradients and batch statistics.

    Returned as a ``functools.partial`` (no keywords) like the unsharded step,
    so ``step.func.lower(*args, **step.keywords)`` works on both."""
    rep, batch = sharding_lib.replicated_sharding(mesh), sharding_lib.batch_sharding(mesh)

    def step(state: TrainState, batch_x: jax.Array, batch_y: jax.Array, key: jax.Array):
        new_state, metrics = _train_step_fn(sharding_lib.constrain_params(state, mesh), batch_x, batch_y, key, **static)
        return sharding_lib.constrain_params(new_state, mesh), metrics

    # The state's shardings come from its (committed) arrays: shard_state placed them by the same rule.
    jitted = jax.jit(
        step, in_shardings=(None, batch, batch, rep), out_shardings=(None, rep),
        donate_argnums=(0,) if donate else (),
    )
    return functools.partial(jitted)


def _resolve_augment(name: str, augment_fn: Optional[AugmentFn]) -> Optional[AugmentFn]:
    """``augment_fn`` if given, else ``AUGMENTATIONS[name]`` (None for 'none')."""
    if augment_fn is not None:
        return augment_fn
    if name == "none":
        return None
    try:
        from experiments.augment import AUGMENTATIONS  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ValueError(
            f"training config field 'augment'={name!r} needs experiments.augment.AUGMENTATIONS "
            f"({e}); pass augment_fn or use augment='none'"
        ) from e
    if name not in AUGMENTATIONS:
        raise ValueError(
            f"training config field 'augment'={name!r}: expected one of "
            f"{['none', *AUGMENTATIONS]}"
        )
    return AUGMENTATIONS[name]


def make_train_step(
    model: Any,
    cfg: Any,
    steps_per_epoch: int,
    *,
    masked: bool = False,
    augment_fn: Optional[AugmentFn] = None,
    mesh: Any = None,
    donate: bool = False,
) -> Callable[[TrainState, Any, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``step(state, batch_x, batch_y, key) -> (state, metrics)``.

    ``key`` is the *base* key: the step uses ``fold_in(key, state.step)``
    (split into augmentation and dropout keys), so a step's randomness depends
    only on (key, global step). Loss: mean softmax cross-entropy. Metrics:
    ``loss``, ``accuracy`` (batch top-1) and ``lr`` (of this step). ``masked``
    must say whether ``state.opt_state`` comes from a masked optimizer.
    Compiled once per (model, update rule, augmentation, dtype, shapes).

    With ``mesh`` (``sensprune.sharding.data_mesh()``) the step runs
    data-parallel: pass batches split over the data axis and a state placed by
    :func:`shard_state` (replicated, or split over the mesh's ``'model'``
    axis); it returns the state placed alike and replicated metrics.

    With ``donate=True`` the input state's buffers are donated to the output
    state (no new params / optimizer state / masks are allocated per step);
    the state passed in must not be used again.
    """
    cfg = as_train_config(cfg)
    opt_cfg = _opt_key(cfg)
    static = dict(
        model=model,
        tx=_step_tx(opt_cfg, steps_per_epoch, bool(masked)),
        schedule=_step_schedule(opt_cfg, steps_per_epoch),
        augment_fn=_resolve_augment(cfg.augment, augment_fn),
        compute_dtype=cfg.dtype,
    )
    if mesh is not None:
        return _sharded_train_step(mesh, bool(donate), **static)
    return functools.partial(_train_step_donated if donate else _train_step, **static)


def train_step(
    state: TrainState,
    batch_x: Any,
    batch_y: Any,
    key: jax.Array,
    *,
    model: Any,
    cfg: Any,
    steps_per_epoch: int,
    augment_fn: Optional[AugmentFn] = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (see :func:`make_train_step`; masking is detected
    from ``state.opt_state``)."""
    step = make_train_step(
        model, cfg, steps_per_epoch,
        masked=_has_mask_state(state.opt_state), augment_fn=augment_fn,
    )
    return step(state, batch_x, batch_y, key)


def _eval_step_fn(
    params: PyTree,
    batch_stats: PyTree,
    batch_x: jax.Array,
    batch_y: jax.Array,
    weight: jax.Array,
    *,
    model: Any,
    compute_dtype: str = "float32",
) -> dict[str, jax.Array]:
    """Per-batch sums over examples with ``weight`` (1 real, 0 padding):
    ``loss`` (cross-entropy), ``correct1``, ``correct5``, ``count``."""
    logits, _ = _forward(
        model, params, batch_stats, batch_x, train=False, compute_dtype=compute_dtype
    )
    labels = batch_y.astype(jnp.int32)
    w = weight.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hit5 = jnp.any(top == labels[:, None], axis=-1)
    hit1 = top[:, 0] == labels
    return {
        "loss": jnp.sum(w * loss),
        "correct1": jnp.sum(w * hit1),
        "correct5": jnp.sum(w * hit5),
        "count": jnp.sum(w),
    }


eval_step = jax.jit(_eval_step_fn, static_argnames=("model", "compute_dtype"))


@functools.lru_cache(maxsize=64)
def _sharded_eval_step(mesh: Any, model: Any, compute_dtype: str) -> Callable[..., Any]:
    """:func:`eval_step` for ``mesh``: batch, labels and weights split over the
    data axis, params and batch statistics as :func:`shard_state` placed them,
    sums replicated."""
    rep, batch = sharding_lib.replicated_sharding(mesh), sharding_lib.batch_sharding(mesh)
    return jax.jit(
        functools.partial(_eval_step_fn, model=model, compute_dtype=compute_dtype),
        in_shardings=(None, None, batch, batch, batch), out_shardings=rep,
    )


def shard_state(tree: PyTree, mesh: Any) -> PyTree:
    """``tree`` (a :class:`TrainState`, params, ...) placed on ``mesh`` by
    :func:`sensprune.sharding.shard_params`: replicated, or split over the
    mesh's ``'model'`` axis; unchanged when ``mesh`` is None."""
    return tree if mesh is None else sharding_lib.shard_params(tree, mesh)


def local_state(tree: PyTree) -> PyTree:
    """``tree`` (e.g. a state placed by :func:`shard_state`) copied whole to
    this process's first device: the inverse of :func:`shard_state`. Arrays
    split over a ``'model'`` axis are all-gathered first (multi-host: every
    process must call this)."""
    return _committed(jax.device_get(sharding_lib.gather(tree)))


def _place_batch(mesh: Any, size: int, *local: np.ndarray):
    """Host arrays of one batch (``size`` rows in all) ready for a step: as they
    are without a mesh; else global arrays split over the data axis, built from
    the rows this process holds (``sharding.process_rows``)."""
    if mesh is None:
        return local
    if jax.process_count() == 1:
        return sharding_lib.shard_batch(local, mesh)
    return sharding_lib.global_batch_from_local(local, mesh, size)


def _local_rows(mesh: Any, batch_size: int) -> Any:
    """Positions in every batch that this process reads (all without a mesh)."""
    return slice(None) if mesh is None else sharding_lib.process_rows(mesh, batch_size)


def _split_variables(state_or_params: Any) -> tuple[PyTree, PyTree]:
    if isinstance(state_or_params, TrainState):
        return state_or_params.params, state_or_params.batch_stats
    if isinstance(state_or_params, Mapping) and "params" in state_or_params:
        return state_or_params["params"], state_or_params.get("batch_stats") or {}
    return state_or_params, {}


def evaluate(
    state_or_params: Any,
    model: Any,
    x: Any,
    y: Any,
    batch_size: int,
    *,
    dtype: str = "float32",
    mesh: Any = None,
) -> dict[str, float]:
    """Mean ``loss``, top-1 ``error`` and top-5 ``error5`` (fractions in [0, 1])
    over all of ``x``; batches have a fixed size (the last one is padded and
    weighted out), so this compiles once per shape.

    ``x, y``: host arrays, or ``x`` an ``experiments.data.Examples`` (in memory
    or streamed) and ``y`` None.

    ``state_or_params``: a :class:`TrainState`, a variables dict
    (``{'params': ..., 'batch_stats': ...}``) or a bare params tree.
    ``mesh``: evaluate data-parallel, batches split over its data axis (the
    batch size is rounded up to a multiple of the axis size; the padding is
    weighted out), params replicated.
    """
    batch_size = _int("argument batch_size", batch_size, 1)
    _choice("argument dtype", dtype, DTYPES)
    params, batch_stats = _split_variables(state_or_params)
    examples = data_lib.as_examples(x, y)
    n = len(examples)
    if n == 0:
        raise ValueError("evaluate: no examples; expected > 0")
    step = functools.partial(eval_step, model=model, compute_dtype=dtype)
    if mesh is not None:
        batch_size = -(-batch_size // sharding_lib.mesh_size(mesh)) * sharding_lib.mesh_size(mesh)
        params, batch_stats = shard_state((params, batch_stats), mesh)
        step = _sharded_eval_step(mesh, model, dtype)
    rows = _local_rows(mesh, batch_size)
    plan = list(data_lib.padded_index_batches(n, batch_size))  # (indices, weights); padding: example 0
    batches = examples.batches(idx[rows] for idx, _ in plan)
    totals = None
    for (_, w), (bx, by) in zip(plan, batches):
        bx, by, bw = _place_batch(mesh, batch_size, bx, by, w[rows])
        sums = step(params, batch_stats, bx, by, bw)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = {k: float(v) for k, v in jax.device_get(totals).items()}
    return {
        "loss": t["loss"] / t["count"],
        "error": 1.0 - t["correct1"] / t["count"],
        "error5": 1.0 - t["correct5"] / t["count"],
    }


# ----------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, num_examples: int, num_steps: int, batch_size: int) -> np.ndarray:
    """Example indices of one epoch, ``[num_steps, batch_size]``: a permutation
    seeded by ``(seed, epoch)``, wrapped around to fill the last batch."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return np.resize(perm, num_steps * batch_size).reshape(num_steps, batch_size)


class _Run(NamedTuple):
    first_epoch: int
    end_epoch: int
    spe: int


def _plan(state: TrainState, cfg: TrainConfig, n: int, end_epoch: Optional[int]) -> _Run:
    spe = steps_per_epoch(n, cfg)
    step = int(jax.device_get(state.step))
    if step % spe:
        raise ValueError(
            f"state.step={step} is not at an epoch boundary (steps_per_epoch={spe}); "
            "training resumes only from states saved at the end of an epoch"
        )
    first = step // spe
    if first < cfg.start_epoch:
        raise ValueError(
            f"state.step={step} (epoch {first}) is before the config's start_epoch="
            f"{cfg.start_epoch}; build the state with the same config"
        )
    end = cfg.num_epochs if end_epoch is None else _int("argument end_epoch", end_epoch, 0)
    if end > cfg.num_epochs:
        raise ValueError(f"end_epoch={end}: expected at most num_epochs={cfg.num_epochs}")
    return _Run(first, max(end, first), spe)


def train(
    model: Any,
    state: TrainState,
    data_x: Any,
    data_y: Any,
    cfg: Any,
    *,
    seed: int,
    end_epoch: Optional[int] = None,
    on_epoch_end: Optional[EpochCallback] = None,
    on_log: Optional[StepCallback] = None,
    log_every: int = 50,
    augment_fn: Optional[AugmentFn] = None,
    desc: str = "train",
    progress: bool = True,
    mesh: Any = None,
) -> TrainState:
    """Trains from the epoch ``state.step`` is in up to ``end_epoch`` (default
    ``num_epochs``) and returns the final state.

    The start epoch is ``state.step // steps_per_epoch``: pass a state restored
    from an end-of-epoch checkpoint to resume exactly. ``state`` must come from
    :func:`create_state` / :func:`state_from_params` with the same ``cfg`` and
    number of examples (same steps per epoch).

    Args:
      model: flax.linen module with ``__call__(x, train: bool)``.
      state: start state (not modified: the loop runs on a copy, whose
        buffers every step donates to the next).
      data_x, data_y: training examples ``[N, ...]`` and integer labels ``[N]``
        (host arrays; batches are gathered on the host), or ``data_x`` an
        ``experiments.data.Examples`` (in memory or streamed: each batch is
        decoded when the plan reaches it) and ``data_y`` None.
      cfg: training config (see :func:`as_train_config`).
      seed: seeds shuffling (per epoch) and the step keys (per global step).
      end_epoch: stop after this epoch (exclusive), e.g. to train in pieces.
      on_epoch_end: ``fn(epoch, state, metrics)`` after every epoch, with the
        epoch just finished (0-based; the next run starts at ``epoch + 1``) and
        its mean ``loss``, ``accuracy`` and last ``lr``. Checkpoint here,
        synchronously: the next step donates this state's buffers, so copy
        (``jax.tree.map(jnp.copy, state)``) what you keep beyond the call.
      on_log: ``fn(global_step, metrics)`` every ``log_every`` steps with the
        metrics of that step (host floats).
      augment_fn: overrides the config's augmentation (``fn(key, x) -> x``).
      desc: progress bar label.
      progress: show a tqdm bar over steps.
      mesh: train data-parallel (``sensprune.sharding.data_mesh()``): every
        batch is split over the mesh's data axis (``batch_size`` must be
        divisible by its size; with several processes each gathers only the
        rows its devices hold), the state is placed by :func:`shard_state`
        (replicated, or split over the mesh's ``'model'`` axis) and returned
        placed alike. Same numbers as one device, up to float reassociation.
    """
    cfg = as_train_config(cfg)
    examples = data_lib.as_examples(data_x, data_y)
    n = len(examples)
    run = _plan(state, cfg, n, end_epoch)
    if mesh is not None and cfg.batch_size % sharding_lib.mesh_size(mesh):
        raise ValueError(
            f"training config field 'batch_size'={cfg.batch_size}: expected a multiple of the "
            f"{sharding_lib.mesh_size(mesh)} devices of the mesh"
        )
    state = _committed(state) if mesh is None else shard_state(state, mesh)
    # Steps donate their input state; this copy keeps the caller's arrays alive.
    state = jax.tree.map(jnp.copy, state)
    step_fn = make_train_step(
        model, cfg, run.spe, masked=_has_mask_state(state.opt_state), augment_fn=augment_fn,
        mesh=mesh, donate=True,
    )
    base_key = shard_state(jax.random.key(seed), mesh)
    total = (run.end_epoch - run.first_epoch) * run.spe
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        rows = _local_rows(mesh, cfg.batch_size)
        for epoch in range(run.first_epoch, run.end_epoch):
            order = epoch_order(seed, epoch, n, run.spe, cfg.batch_size)
            history = []
            batches = examples.batches((idx[rows] for idx in order), seed=seed, epoch=epoch)
            for i, local in enumerate(batches):
                batch_x, batch_y = _place_batch(mesh, cfg.batch_size, *local)
                state, metrics = step_fn(state, batch_x, batch_y, base_key)
                history.append(metrics)
                global_step = epoch * run.spe + i
                if on_log is not None and (global_step + 1) % max(1, log_every) == 0:
                    on_log(global_step, {k: float(v) for k, v in jax.device_get(metrics).items()})
                bar.update(1)
            hist = jax.device_get(history)
            epoch_metrics = {
                "loss": float(np.mean([h["loss"] for h in hist])),
                "accuracy": float(np.mean([h["accuracy"] for h in hist])),
                "lr": float(hist[-1]["lr"]),
            }
            bar.set_postfix(epoch=epoch, loss=f"{epoch_metrics['loss']:.4f}",
                            acc=f"{epoch_metrics['accuracy']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, state, epoch_metrics)
    return state
