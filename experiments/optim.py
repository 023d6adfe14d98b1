"""Learning-rate schedule and optimizer of a :class:`TrainConfig` (torchprune semantics).

* learning rate (per step ``t``, ``S`` steps per epoch):
  ``lr * min(1, t / (warmup * S)) * lr_gamma ** #{m in lr_milestones : t >= m * S}``
  (torchprune's ``WarmupLR`` + ``MultiStepLR``, both stepped per batch with
  epoch arguments multiplied by ``S``; the first warm-up step uses lr 0);
* SGD as ``torch.optim.SGD``: coupled weight decay (``g + wd * w``) on every
  param, then momentum / Nesterov, then the learning rate; Adam as
  ``torch.optim.Adam`` (also coupled weight decay);
* with masks the optimizer is wrapped in :func:`sensprune.masking.masked`, so
  pruned weights stay exactly zero.

:class:`Optimizer` is the form a train state carries: an optax-style
transformation (``init`` / ``update``) that is a frozen dataclass of its
hyperparameters, so it is hashable *by value*. It sits in the static part of
the state (``TrainState.tx``), and states built from equal configs share one
compiled train step without any cache of optimizer objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.train_config import TrainConfig, as_train_config, check_int
from sensprune import masking
from sensprune.types import PyTree

__all__ = ["Optimizer", "make_optimizer", "make_schedule"]


def make_schedule(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the *global* step (epoch ``e`` starts at
    step ``e * steps_per_epoch``): linear warm-up from 0 over ``warmup`` epochs,
    times ``lr_gamma`` at the start of every milestone epoch."""
    cfg = as_train_config(cfg)
    spe = check_int("argument steps_per_epoch", steps_per_epoch, 1)
    bounds = np.asarray([m * spe for m in cfg.lr_milestones], dtype=np.int64)
    # lr for 0, 1, 2, ... milestones passed, each rounded once to float32.
    values = np.asarray(
        [cfg.learning_rate * cfg.lr_gamma**k for k in range(len(bounds) + 1)], dtype=np.float32
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


def make_optimizer(
    cfg: Any, steps_per_epoch: int, masks: Optional[PyTree] = None
) -> optax.GradientTransformation:
    """torch-like SGD (coupled weight decay, momentum / Nesterov) or Adam with the
    schedule of :func:`make_schedule`; its step 0 is global step
    ``start_epoch * steps_per_epoch``. Wrapped in ``masking.masked`` when
    ``masks`` is given (pruned entries get zero gradient and zero update)."""
    cfg = as_train_config(cfg)
    schedule = make_schedule(cfg, steps_per_epoch)
    offset = cfg.start_epoch * steps_per_epoch
    lr = schedule if offset == 0 else (lambda count: schedule(count + offset))
    parts = []
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.optimizer == "sgd":
        momentum = cfg.momentum if cfg.momentum > 0 else None
        parts.append(optax.sgd(lr, momentum=momentum, nesterov=cfg.nesterov))
    else:
        parts.append(optax.adam(lr, nesterov=cfg.nesterov))
    tx = optax.chain(*parts)
    return tx if masks is None else masking.masked(tx, masks)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer of ``config`` at ``steps_per_epoch``, as a value.

    Behaves as an optax ``GradientTransformation`` (``init`` / ``update``);
    ``masked`` says whether its state is a ``masking.PruneMaskState`` (then
    ``update`` keeps pruned entries at zero).

    Attributes:
      config: the training config (validated).
      steps_per_epoch: steps of one epoch (places milestones and warm-up).
      masked: wrap the update rule in :func:`sensprune.masking.masked`.
    """

    config: TrainConfig
    steps_per_epoch: int
    masked: bool = False

    @classmethod
    def create(cls, cfg: Any, steps_per_epoch: int, *, masked: bool = False) -> "Optimizer":
        """Validates ``cfg`` (any form :func:`as_train_config` takes)."""
        spe = check_int("argument steps_per_epoch", steps_per_epoch, 1)
        return cls(as_train_config(cfg), spe, bool(masked))

    def transformation(self, masks: Optional[PyTree] = None) -> optax.GradientTransformation:
        """The optax transformation; ``masks`` only matter to ``init`` (``None``:
        keep the nonzero params), ``update`` reads them from the state."""
        tx = make_optimizer(self.config, self.steps_per_epoch)
        return masking.masked(tx, masks) if self.masked else tx

    def init(self, params: PyTree, masks: Optional[PyTree] = None) -> optax.OptState:
        """Fresh optimizer state for ``params`` (``masks``: see :meth:`transformation`)."""
        return self.transformation(masks).init(params)

    def update(
        self, grads: PyTree, state: optax.OptState, params: Optional[PyTree] = None
    ) -> tuple[PyTree, optax.OptState]:
        """``(updates, new_state)`` as optax's ``update``."""
        return self.transformation().update(grads, state, params)

    def learning_rate(self, step: jax.typing.ArrayLike) -> jax.Array:
        """The learning rate of global step ``step``."""
        return make_schedule(self.config, self.steps_per_epoch)(step)
