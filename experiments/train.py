"""The training loop: epochs of shuffled batches through the jitted train step.

Randomness: epoch ``e`` visits the data in the order
``numpy.random.default_rng([seed, e]).permutation(N)``; step ``t`` (global) uses
``fold_in(make_key(seed, prng_impl), t)`` for augmentation and dropout.
Training epochs ``0..n`` in one go therefore equals training ``0..k``,
checkpointing, restoring and training ``k..n``.

The pieces live in their own modules: :mod:`experiments.train_config`
(hyperparameters), :mod:`experiments.optim` (schedule, optimizer),
:mod:`experiments.train_state` (state, checkpoint items, placement),
:mod:`experiments.steps` (jitted step) and :mod:`experiments.evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments.evaluate import evaluate  # noqa: F401  (studies call train.evaluate)
from experiments.rng import make_key
from experiments.steps import AugmentFn, StepOptions, check_mesh_batch, local_rows, make_train_step, place_batch
from experiments.train_config import check_int, steps_per_epoch
from experiments.train_state import TrainState, committed, shard_state

__all__ = ["Epochs", "epoch_order", "plan_epochs", "train"]

EpochCallback = Callable[[int, TrainState, dict], Any]
StepCallback = Callable[[int, dict], Any]


def epoch_order(seed: int, epoch: int, num_examples: int, num_steps: int, batch_size: int) -> np.ndarray:
    """Example indices of one epoch, ``[num_steps, batch_size]``: a permutation
    seeded by ``(seed, epoch)``, wrapped around to fill the last batch."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return np.resize(perm, num_steps * batch_size).reshape(num_steps, batch_size)


@dataclasses.dataclass(frozen=True)
class Epochs:
    """The epochs a call to :func:`train` runs: ``[first, end)`` of ``steps_per_epoch`` steps."""

    first: int
    end: int
    steps_per_epoch: int

    @property
    def num_steps(self) -> int:
        return (self.end - self.first) * self.steps_per_epoch


def plan_epochs(state: TrainState, num_examples: int, end_epoch: Optional[int] = None) -> Epochs:
    """The epochs from the one ``state.step`` is in to ``end_epoch`` (default:
    the config's ``num_epochs``); ``ValueError`` for a state off an epoch
    boundary, before the config's ``start_epoch`` or of another epoch length."""
    cfg = state.tx.config
    spe = steps_per_epoch(num_examples, cfg)
    if spe != state.tx.steps_per_epoch:
        raise ValueError(
            f"{num_examples} examples make {spe} steps per epoch, but the state's optimizer was built "
            f"for {state.tx.steps_per_epoch}; build the state with steps_per_epoch({num_examples}, cfg)"
        )
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
    end = cfg.num_epochs if end_epoch is None else check_int("argument end_epoch", end_epoch, 0)
    if end > cfg.num_epochs:
        raise ValueError(f"end_epoch={end}: expected at most num_epochs={cfg.num_epochs}")
    return Epochs(first, max(end, first), spe)


def _epoch_metrics(history: list[dict]) -> dict[str, float]:
    hist = jax.device_get(history)
    return {
        "loss": float(np.mean([h["loss"] for h in hist])),
        "accuracy": float(np.mean([h["accuracy"] for h in hist])),
        "lr": float(hist[-1]["lr"]),
    }


def train(
    state: TrainState,
    data_x: Any,
    data_y: Any,
    *,
    seed: int,
    prng_impl: Optional[str] = None,
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
    ``num_epochs`` of the state's config, ``state.tx.config``) and returns the
    final state. Pass a state restored from an end-of-epoch checkpoint to resume
    exactly.

    Args:
      state: start state (:func:`~experiments.train_state.create_state` /
        ``state_from_params`` for this many examples); not modified: the loop
        runs on a copy, whose buffers every step donates to the next.
      data_x, data_y: training examples ``[N, ...]`` and integer labels ``[N]``
        (host arrays; batches are gathered on the host), or ``data_x`` an
        ``experiments.data.Examples`` (in memory or streamed: each batch is
        decoded when the plan reaches it) and ``data_y`` None.
      seed: seeds shuffling (per epoch) and the step keys (per global step).
      prng_impl: PRNG implementation of the step keys (``experiments.rng``;
        None: JAX's default).
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
        rows its devices hold), the state is placed by ``shard_state``
        (replicated, or split over the mesh's ``'model'`` axis) and returned
        placed alike. Same numbers as one device, up to float reassociation.
    """
    cfg = state.tx.config
    examples = data_lib.as_examples(data_x, data_y)
    n = len(examples)
    epochs = plan_epochs(state, n, end_epoch)
    check_mesh_batch(cfg, mesh)
    state = committed(state) if mesh is None else shard_state(state, mesh)
    # Steps donate their input state; this copy keeps the caller's arrays alive.
    state = jax.tree.map(jnp.copy, state)
    step_fn = make_train_step(StepOptions.create(cfg, augment_fn=augment_fn, mesh=mesh), donate=True)
    base_key = shard_state(make_key(seed, prng_impl), mesh)
    rows = local_rows(mesh, cfg.batch_size)  # each process reads only the rows its devices hold
    with tqdm(total=epochs.num_steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for epoch in range(epochs.first, epochs.end):
            order = epoch_order(seed, epoch, n, epochs.steps_per_epoch, cfg.batch_size)
            history = []
            batches = examples.batches((idx[rows] for idx in order), seed=seed, epoch=epoch)
            for i, local in enumerate(batches):
                batch = place_batch(mesh, cfg.batch_size, *local)
                state, metrics = step_fn(state, *batch, base_key)
                history.append(metrics)
                global_step = epoch * epochs.steps_per_epoch + i
                if on_log is not None and (global_step + 1) % max(1, log_every) == 0:
                    on_log(global_step, {k: float(v) for k, v in jax.device_get(metrics).items()})
                bar.update(1)
            epoch_metrics = _epoch_metrics(history)
            bar.set_postfix(epoch=epoch, loss=f"{epoch_metrics['loss']:.4f}", acc=f"{epoch_metrics['accuracy']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, state, epoch_metrics)
    return state
