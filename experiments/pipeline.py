"""The experiment loop: train -> (prune -> retrain -> evaluate) per method and keep ratio.

Everything is resumable. Under ``workdir``:

  checkpoints/net<n>/train/             per-epoch training checkpoints (orbax)
  checkpoints/net<n>/rewind/            the rewind point (cascade-rewind only)
  checkpoints/net<n>/rep<r>/<method>/chain/        the retrained net after each keep ratio
  checkpoints/net<n>/rep<r>/<method>/retrain<i>/   per-epoch retraining checkpoints
  results.npz, tensorboard/, plots/, report.md, config.json
  records/                              one JSON record per finished run (results.npz is rebuilt from them)
  .lock                                 held (fcntl) by the run in progress: a second run is refused

Each finished keep ratio is written to its chain checkpoint (with its metrics)
before ``results.npz``, so a run killed at any point and started again with the
same command skips finished work, resumes an interrupted training or retraining
at its last finished epoch and produces the same numbers as an uninterrupted run
(all randomness is derived from the seed and the position in the loop).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

import sensprune as sp
from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import evaluate as eval_lib
from experiments import models as models_lib
from experiments import plot as plot_lib
from experiments import pretrained as pretrained_lib
from experiments import results as results_lib
from experiments import spacing as spacing_lib
from experiments import train as train_lib
from experiments import train_config as train_config_lib
from experiments import train_state as state_lib
from experiments import workdir as workdir_lib
from experiments.optim import Optimizer
from experiments.rng import check_prng_impl, make_key

MODES = ("train", "retrain", "cascade", "cascade-rewind", "cascade-random", "prune-only")


# ----------------------------------------------------------------------------
# Config validation (fails before any training)
# ----------------------------------------------------------------------------
def train_config(cfg: Any) -> train_config_lib.TrainConfig:
    """The validated TrainConfig of a config's training/retraining block (without the
    fields ``experiments.pretrained`` reads, which are not part of the schedule)."""
    fields = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields = {k: v for k, v in fields.items() if k not in pretrained_lib.CONFIG_FIELDS}
    return train_config_lib.as_train_config(fields)


def validate_config(config: Any) -> list[spacing_lib.Step]:
    """Checks every field a run needs; returns the keep-ratio steps.

    Raises:
      ValueError naming the field and the allowed values.
    """
    workdir_lib.normalize_lists(config)  # --config.experiments.methods=sipp,pfp etc.
    if config.network not in models_lib.MODELS:
        raise ValueError(
            f"config.network={config.network!r} is unknown; allowed: {', '.join(sorted(models_lib.MODELS))}"
        )
    exp = config.experiments
    if exp.mode not in MODES:
        raise ValueError(f"config.experiments.mode={exp.mode!r}; allowed: {', '.join(MODES)}")
    methods = list(exp.methods)
    known = sp.available_methods()
    for i, m in enumerate(methods):
        if m not in known:
            raise ValueError(f"config.experiments.methods[{i}]={m!r} is unknown; allowed: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"config.experiments.methods has duplicates: {methods}")
    options = exp.get("method_options") or {}
    for m in options:
        if m not in methods:
            raise ValueError(
                f"config.experiments.method_options has {m!r}, not in config.experiments.methods {methods}")
        try:
            sp.registry.check_options(sp.get_method(m), dict(options[m]))
        except ValueError as err:
            raise ValueError(f"config.experiments.{err}") from None
    if exp.mode != "train" and not methods:
        raise ValueError("config.experiments.methods is empty; name at least one method")
    for field in ("num_nets", "num_repetitions"):
        if int(exp[field]) < 1:
            raise ValueError(f"config.experiments.{field} must be >= 1, got {exp[field]!r}")
    for block in ("training", "retraining"):
        try:
            train_config(config[block])
        except ValueError as err:
            raise ValueError(f"config.{block}: {err}") from None
    check_prng_impl(config.get("prng_impl", ""))
    delta = float(config.coresets.delta_s)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"config.coresets.delta_s must be in (0, 1), got {delta}")
    if float(config.coresets.c_constant) <= 0:
        raise ValueError(f"config.coresets.c_constant must be > 0, got {config.coresets.c_constant}")
    if int(config.coresets.chunk_size) < 1:
        raise ValueError(f"config.coresets.chunk_size must be >= 1, got {config.coresets.chunk_size}")
    ratios = spacing_lib.keep_ratios(list(exp.spacing))
    cascade = exp.mode not in ("retrain", "prune-only")
    return spacing_lib.split_keep_ratios(ratios, int(exp.retrain_iterations), cascade=cascade)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _seed(*parts: Any) -> int:
    """A stable 31-bit seed from the position in the loop."""
    return zlib.crc32(json.dumps([str(p) for p in parts]).encode()) & 0x7FFFFFFF


@dataclasses.dataclass
class Experiment:
    """Everything derived once from the config."""

    config: Any
    workdir: Path
    dataset: data_lib.Data
    model: Any
    layers: list[sp.Layer]
    steps: list[spacing_lib.Step]
    train_cfg: train_config_lib.TrainConfig
    retrain_cfg: train_config_lib.TrainConfig
    dense_size: int
    dense_flops: int
    s_size: int
    mesh: Any = None  # data-parallel mesh (None: one device)

    @property
    def methods(self) -> list[str]:
        return list(self.config.experiments.methods)

    def ckpt(self, *parts: str) -> ckpt_lib.Checkpointer:
        return ckpt_lib.Checkpointer(self.workdir.joinpath("checkpoints", *parts), max_to_keep=2)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.input_shape)

    def key(self, seed: int) -> jax.Array:
        """A PRNG key of ``seed`` with the config's implementation (``config.prng_impl``)."""
        return make_key(seed, self.prng_impl)

    @property
    def prng_impl(self) -> Optional[str]:
        return check_prng_impl(self.config.get("prng_impl", ""))

    def optimizer(self, cfg: train_config_lib.TrainConfig) -> Optimizer:
        """The optimizer of ``cfg`` over this experiment's training split."""
        return Optimizer.create(cfg, train_config_lib.steps_per_epoch(self.dataset.num_train, cfg))


def build(config: Any, workdir: str | Path) -> Experiment:
    """Validates the config, loads data and builds the model (no training)."""
    steps = validate_config(config)
    ds_cfg = config.dataset
    dataset = data_lib.load_data(data_lib.DataSpec.from_config(ds_cfg), seed=int(config.seed))
    model = models_lib.get_model(config.network, dataset.num_classes)
    x0 = np.zeros((1, *dataset.input_shape), np.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0, train=False))
    layers = sp.find_layers(model, variables, x0, train=False)
    size_s = int(config.coresets.size)
    if size_s <= 0:
        size_s = sp.sample_size(
            layers, float(config.coresets.delta_s), float(config.coresets.c_constant),
            batch_size=int(config.training.batch_size),
        )
    dense_size = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    return Experiment(
        config=config,
        workdir=Path(workdir),
        dataset=dataset,
        model=model,
        layers=layers,
        steps=steps,
        train_cfg=train_config(config.training),
        retrain_cfg=train_config(config.retraining),
        dense_size=dense_size,
        dense_flops=sp.dense_flops(layers),
        s_size=min(size_s, dataset.num_valid),
        mesh=make_mesh(config),
    )


def make_mesh(config: Any) -> Any:
    """The mesh of ``config.mesh_devices`` (-1: every device of every process)
    with a ``'model'`` axis of ``config.mesh_model`` devices when that is > 1,
    or None for a single device in a single process.

    Raises:
      ValueError naming the field: a bad device count or model-axis size, or a
      (re)training batch size that the data axis does not divide.
    """
    count = int(config.get("mesh_devices", -1))
    model = config.get("mesh_model", 1)
    available = jax.device_count()
    if count != -1 and not 1 <= count <= available:
        raise ValueError(f"config.mesh_devices={count}: expected -1 (all devices) or a count in [1, {available}]")
    if jax.process_count() > 1 and count not in (-1, available):
        raise ValueError(f"config.mesh_devices={count}: multi-host runs use every device (-1 or {available})")
    size = available if count == -1 else count
    if isinstance(model, bool) or not isinstance(model, int) or model < 1 or size % model:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(
            f"config.mesh_model={model!r}: expected a divisor of the {size} devices of the mesh "
            f"(config.mesh_devices): one of {divisors}"
        )
    if size == 1 and jax.process_count() == 1:
        return None
    data = size // model
    for block in ("training", "retraining"):
        batch = int(config[block].batch_size)
        if batch % data:
            raise ValueError(
                f"config.{block}.batch_size={batch}: expected a multiple of the {data} devices "
                "of the mesh's data axis (config.mesh_devices / config.mesh_model)"
            )
    mesh = sp.sharding.data_mesh(size, model=model)
    logging.info("mesh %s: batches split over 'data'%s", dict(mesh.shape),
                 ", params / masks / optimizer state over 'model'" if model > 1 else ", state replicated")
    return mesh


def _train_with_checkpoints(
    exp: Experiment,
    ckpt: ckpt_lib.Checkpointer,
    state: state_lib.TrainState,
    *,
    seed: int,
    masks: Any = None,
    meta: Optional[Mapping[str, Any]] = None,
    desc: str,
    tb: Optional[results_lib.TensorBoardLogger] = None,
    tb_tag: str = "",
    on_epoch: Any = None,
) -> state_lib.TrainState:
    """Trains to the end of the state's schedule, checkpointing after every epoch."""
    meta = dict(meta or {})

    def on_epoch_end(epoch: int, st: state_lib.TrainState, metrics: Mapping[str, float]) -> None:
        ckpt.save(
            epoch + 1, params=st.params, batch_stats=st.batch_stats, opt_state=st.opt_state,
            masks=masks, meta={**meta, "epoch": epoch + 1, "metrics": dict(metrics)},
        )
        if tb is not None:
            tb.log_train(tb_tag, dict(metrics), epoch, phase=desc.split()[0], unit="epoch")
        if on_epoch is not None:
            on_epoch(epoch + 1, st)

    examples, augment_fn = exp.dataset.training(state.tx.config.augment)
    state = train_lib.train(
        state, examples, None, seed=seed, prng_impl=exp.prng_impl, augment_fn=augment_fn,
        on_epoch_end=on_epoch_end, desc=desc, progress=jax.process_index() == 0, mesh=exp.mesh,
    )
    # Pruning and checkpointing downstream work on host-local arrays (as without a mesh).
    return state if exp.mesh is None else state_lib.local_state(state)


_variables = state_lib.variables_of  # {'params', 'batch_stats'} of a state (experiments.guarantees uses it)


def _restore_state(
    ckpt: ckpt_lib.Checkpointer, like: state_lib.TrainState, masks_like: Any = None
) -> tuple[Optional[state_lib.TrainState], dict]:
    """The latest per-epoch state of a training run, or (None, {}).

    ``meta['epoch']`` is the (global) number of finished epochs, so the global
    step is ``epoch * steps_per_epoch``.
    """
    target = state_lib.state_to_items(like)
    if masks_like is not None:
        target["masks"] = masks_like
    step, items = ckpt.restore_latest(like=target)  # a corrupt newest step: the one before
    if step is None:
        return None, {}
    meta = items.pop("meta")
    items.pop("masks", None)
    return state_lib.state_from_items(like, items, int(meta["epoch"]) * like.tx.steps_per_epoch), meta


def _retrain_cfg(exp: Experiment, start_epoch: int) -> train_config_lib.TrainConfig:
    """Retraining schedule; cascade-rewind replays the tail of the training schedule."""
    base = exp.train_cfg if exp.config.experiments.mode == "cascade-rewind" else exp.retrain_cfg
    return dataclasses.replace(base, start_epoch=int(start_epoch))


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------
def train_net(exp: Experiment, net: int, tb: results_lib.TensorBoardLogger) -> state_lib.TrainState:
    """Trains net ``net`` (or resumes / loads it)."""
    cfg = exp.train_cfg
    seed = _seed(exp.config.seed, "net", net)
    init = state_lib.create_state(exp.model, exp.key(seed), exp.input_shape, exp.optimizer(cfg))
    # Dense training runs the same (masked, all-ones) step as retraining, so the two share
    # one compiled train step when their schedules agree.
    fresh = state_lib.state_from_params(exp.model, state_lib.variables_of(init), exp.optimizer(cfg),
                                        masks=sp.ones_like_masks(init.params))
    ckpt = exp.ckpt(f"net{net}", "train")
    state, meta = _restore_state(ckpt, fresh, sp.ones_like_masks(init.params))
    if state is not None and meta.get("epoch", 0) >= cfg.num_epochs:
        logging.info("net %d: trained checkpoint found (%d epochs)", net, meta["epoch"])
        return state
    if state is not None:
        logging.info("net %d: resuming training at epoch %d", net, meta["epoch"])
    rewind_epoch = max(cfg.num_epochs - exp.retrain_cfg.num_epochs, 0)
    rewind = exp.ckpt(f"net{net}", "rewind")

    def keep_rewind(epoch: int, st: state_lib.TrainState) -> None:
        if exp.config.experiments.mode == "cascade-rewind" and epoch == rewind_epoch:
            rewind.save(epoch, params=st.params, batch_stats=st.batch_stats, meta={"epoch": epoch})

    if exp.config.experiments.mode == "cascade-rewind" and rewind_epoch == 0 and rewind.latest_step() is None:
        rewind.save(0, params=fresh.params, batch_stats=fresh.batch_stats, meta={"epoch": 0})
    state = state if state is not None else fresh
    return _train_with_checkpoints(
        exp, ckpt, state, seed=seed, masks=sp.ones_like_masks(init.params), desc=f"train net{net}", tb=tb,
        tb_tag="dense", on_epoch=keep_rewind,
    )


def _sensitivity_set(exp: Experiment, net: int) -> tuple[np.ndarray, np.ndarray]:
    """S: a seeded random subset of the validation split (with labels, for SNIP)."""
    return data_lib.sample_set(exp.dataset.valid, exp.s_size, _seed(exp.config.seed, "S", net))


@dataclasses.dataclass(frozen=True)
class Chain:
    """One (net, repetition, method) of the results grid: the chain of its keep ratios."""

    net: int
    rep: int
    method: str

    def seed(self, config_seed: Any, i: int) -> int:  # of its i-th keep ratio
        return _seed(config_seed, self.net, self.rep, self.method, i)


@dataclasses.dataclass(frozen=True, eq=False)
class ChainContext:
    """What each step of a chain reads: its chain checkpoint, where results go, the set S."""

    exp: Experiment
    chain: Chain
    checkpoint: ckpt_lib.Checkpointer
    results: results_lib.Results
    tb: results_lib.TensorBoardLogger
    s_x: np.ndarray
    s_y: np.ndarray


def _prune(ctx: ChainContext, variables: dict, *, ratio: float, key: jax.Array) -> sp.PruneResult:
    exp, method = ctx.exp, ctx.chain.method
    co = exp.config.coresets
    return sp.prune(
        exp.model, variables, ctx.s_x, method=method, keep_ratio=ratio, key=key, labels=ctx.s_y,
        delta=float(co.delta_s), c_constant=float(co.c_constant), chunk_size=int(co.chunk_size),
        reference_size=exp.dense_size, layers=exp.layers, apply_kwargs={"train": False}, mesh=exp.mesh,
        method_options=dict((exp.config.experiments.get("method_options") or {}).get(method) or {}),
        fused_pass=bool(exp.config.get("fused_pass", False)),
        allow_dead_layers=True,  # a study records what a method does, a layer emptied at extreme ratios included
        zero_dead=bool(co.get("zero_dead", True)),
    )


def _prune_meta(exp: Experiment, result: sp.PruneResult) -> dict:
    """What the results record of a prune step: kept fraction, FLOP fraction, per-layer counts (layers
    the method left dense, e.g. attention projections under filter pruning, counted here)."""
    left = [layer for layer in exp.layers if layer.name not in result.layer_kept]
    kept = {**result.layer_kept, **sp.layer_nonzero(result.params, left)}
    return {"keep_ratio": result.keep_ratio,
            "flops": (result.flops + sp.flops(result.params, left)) / max(exp.dense_flops, 1),
            "layer_kept": {layer.name: kept[layer.name] for layer in exp.layers}}


def _retrain_start(exp: Experiment, net: int, result: sp.PruneResult, variables: dict, seed: int):
    """Params/batch stats retraining starts from, and its config, by mode."""
    mode = exp.config.experiments.mode
    cfg = _retrain_cfg(exp, 0)
    params, batch_stats = result.params, variables.get("batch_stats", {})
    if mode == "cascade-random":
        fresh = exp.model.init(exp.key(seed), np.zeros((1, *exp.input_shape), np.float32), train=False)
        params, batch_stats = sp.apply_masks(fresh["params"], result.masks), fresh.get("batch_stats", {})
    elif mode == "cascade-rewind":
        rewind = exp.ckpt(f"net{net}", "rewind")
        like = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        items = rewind.restore_latest(like=like)[1]
        params, batch_stats = sp.apply_masks(items["params"], result.masks), items["batch_stats"]
        cfg = _retrain_cfg(exp, int(items["meta"]["epoch"]))
    return params, batch_stats, cfg


def run_chain(
    exp: Experiment,
    chain_id: Chain,
    trained: dict,
    *,
    results: results_lib.Results,
    tb: results_lib.TensorBoardLogger,
    save_results: Any,
    bar: tqdm,
) -> None:
    """All keep ratios of one (net, repetition, method), resuming where it stopped."""
    mode = exp.config.experiments.mode
    net, rep, method = chain_id.net, chain_id.rep, chain_id.method
    base = ("net%d" % net, "rep%d" % rep, method)
    chain = exp.ckpt(*base, "chain")
    s_x, s_y = _sensitivity_set(exp, net)
    ctx = ChainContext(exp=exp, chain=chain_id, checkpoint=chain, results=results, tb=tb, s_x=s_x, s_y=s_y)
    masks_like = sp.ones_like_masks(trained["params"])
    like = {"params": trained["params"], "batch_stats": trained.get("batch_stats", {}), "masks": masks_like}
    current = dict(trained)
    start = 0
    done_step, items = ckpt_lib.restore_chain(chain, like, len(exp.steps))
    if done_step is not None:
        current = {"params": items.get("params")}  # None when finished (only meta is read)
        if items.get("batch_stats"):
            current["batch_stats"] = items["batch_stats"]
        start = done_step
        _record(ctx, done_step - 1, items["meta"])
        save_results()
    bar.update(start)
    # Prune-only: every ratio from the trained net, evaluated as pruned (no retraining).
    prune_only = mode == "prune-only" or not sp.get_method(method).retrainable
    for i in range(start, len(exp.steps)):
        step = exp.steps[i]
        if mode == "retrain" or prune_only:
            current = dict(trained)
        seed = chain_id.seed(exp.config.seed, i)
        if prune_only:
            _prune_only_step(ctx, i, current)
            save_results()
            bar.update(1)
            continue
        retrain_ckpt = exp.ckpt(*base, f"retrain{i}")
        state, meta = _resume_retrain(exp, retrain_ckpt, current, masks_like)
        if state is None:
            variables = dict(current)
            for j, ratio in enumerate(step.compress_only):
                res = _prune(ctx, variables, ratio=ratio, key=exp.key(_seed(seed, "c", j)))
                variables = {**variables, "params": res.params}
            result = _prune(ctx, variables, ratio=step.keep_ratio, key=exp.key(seed))
            params, batch_stats, cfg = _retrain_start(exp, net, result, variables, seed)
            meta = {**_prune_meta(exp, result), "start_epoch": cfg.start_epoch}
            state = state_lib.state_from_params(exp.model, {"params": params, "batch_stats": batch_stats},
                                                exp.optimizer(cfg), masks=result.masks)
            retrain_ckpt.save(0, params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state,
                              masks=result.masks, meta={**meta, "epoch": cfg.start_epoch})
        masks = state.masks
        state = _train_with_checkpoints(
            exp, retrain_ckpt, state, seed=seed, masks=masks, meta=meta,
            desc=f"retrain {method} r={step.keep_ratio:.3f}", tb=tb, tb_tag=method,
        )
        metrics = eval_lib.evaluate(state, exp.model, exp.dataset.test, None,
                                    int(exp.config.eval_batch_size), mesh=exp.mesh)
        meta = {**{k: meta[k] for k in ("keep_ratio", "flops", "layer_kept")}, **metrics}
        current = state_lib.variables_of(state)
        chain.save(i + 1, params=state.params, batch_stats=state.batch_stats, masks=masks, meta=meta)
        _record(ctx, i, meta)
        save_results()
        shutil.rmtree(retrain_ckpt.directory, ignore_errors=True)
        bar.update(1)


def _prune_only_step(ctx: ChainContext, i: int, current: dict) -> None:
    """Keep ratio ``i`` pruned straight from ``current`` and evaluated without retraining."""
    exp, step = ctx.exp, ctx.exp.steps[i]
    result = _prune(ctx, current, ratio=step.keep_ratio, key=exp.key(ctx.chain.seed(exp.config.seed, i)))
    variables = {**current, "params": result.params}
    metrics = eval_lib.evaluate(variables, exp.model, exp.dataset.test, None,
                                int(exp.config.eval_batch_size), mesh=exp.mesh)
    meta = {**_prune_meta(exp, result), **metrics}
    ctx.checkpoint.save(i + 1, params=result.params, batch_stats=current.get("batch_stats", {}),
                        masks=result.masks, meta=meta)
    _record(ctx, i, meta)


def _resume_retrain(exp, ckpt, current, masks_like):
    """A retraining interrupted mid-way: its latest per-epoch state and prune metadata."""
    step, first = ckpt.restore_meta_latest()
    if step is None:
        return None, {}
    cfg = _retrain_cfg(exp, int(first.get("start_epoch", 0)))
    like = state_lib.state_from_params(exp.model, current, exp.optimizer(cfg), masks=masks_like)
    state, meta = _restore_state(ckpt, like, masks_like)
    if state is None:  # every step was corrupt (moved aside): prune again
        return None, {}
    logging.info("resuming retraining %s at epoch %d", ckpt.directory, meta["epoch"])
    return state, meta


def _record(ctx: ChainContext, i: int, meta: Mapping[str, Any]) -> None:
    """Keep ratio ``i`` of the chain, finished with ``meta``: into the results, TensorBoard and the log."""
    exp, results, tb = ctx.exp, ctx.results, ctx.tb
    net, rep, method = ctx.chain.net, ctx.chain.rep, ctx.chain.method
    results.record(
        net, i, rep, method, error=meta["error"], error5=meta["error5"], loss=meta["loss"],
        sizes=meta["keep_ratio"], flops=meta["flops"], layer_kept=meta["layer_kept"],
    )
    tb.log_test(method, size=meta["keep_ratio"], flops=meta["flops"], error=meta["error"],
                error5=meta["error5"], loss=meta["loss"])
    total = {layer.name: layer.kernel_size for layer in exp.layers}
    tb.log_layer_budget(method, meta["layer_kept"], total, size=meta["keep_ratio"])
    logging.info(
        "net %d rep %d %s: keep %.4f flops %.4f -> test error %.4f",
        net, rep, method, meta["keep_ratio"], meta["flops"], meta["error"],
    )


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def run(config: Any, workdir: str | Path) -> results_lib.Results:
    """Runs (or resumes) the experiment described by ``config`` in ``workdir``
    (writable, and locked against a second run there: :mod:`experiments.workdir`)."""
    with workdir_lib.open_workdir(workdir, primary=jax.process_index() == 0):
        return _run(config, workdir)


def _run(config: Any, workdir: str | Path) -> results_lib.Results:
    exp = build(config, workdir)
    exp.workdir.mkdir(parents=True, exist_ok=True)
    _check_config_unchanged(exp)
    steps = exp.steps if exp.config.experiments.mode != "train" else []
    exp_cfg = exp.config.experiments
    layout = dict(
        methods=exp.methods,
        keep_ratios=[s.keep_ratio for s in steps],
        num_nets=int(exp_cfg.num_nets),
        num_repetitions=int(exp_cfg.num_repetitions),
        layer_names=[layer.name for layer in exp.layers],
        layer_total={layer.name: layer.kernel_size for layer in exp.layers},
        sizes_total=exp.dense_size,
        flops_total=exp.dense_flops,
    )
    results_path = exp.workdir / "results.npz"
    results = results_lib.load_or_empty(results_path, records=exp.workdir / "records",
                                        write_records=jax.process_index() == 0, **layout)
    is_main = jax.process_index() == 0
    save = (lambda: results.save_npz(results_path)) if is_main else (lambda: None)
    logging.info(
        "experiment: %s on %s (%d train / %d valid / %d test), %d prunable layers, |S| = %d, %d keep ratios",
        exp.config.network, exp.dataset.name, exp.dataset.num_train, exp.dataset.num_valid,
        exp.dataset.num_test, len(exp.layers), exp.s_size, len(steps),
    )
    with results_lib.TensorBoardLogger(exp.workdir / "tensorboard", enabled=is_main) as tb:
        tb.log_config(exp.config)
        total = int(exp_cfg.num_nets) * int(exp_cfg.num_repetitions) * len(exp.methods) * len(steps)
        with tqdm(total=total, desc="prune/retrain", unit="ratio", disable=total == 0 or not is_main) as bar:
            for net in range(int(exp_cfg.num_nets)):
                state = pretrained_lib.load_net(exp, net, tb) if pretrained_lib.init_from(exp.config) else \
                    train_net(exp, net, tb)
                dense = eval_lib.evaluate(state, exp.model, exp.dataset.test, None,
                                          int(exp.config.eval_batch_size), mesh=exp.mesh)
                results.record_dense(net, **dense)
                save()
                logging.info("net %d dense: test error %.4f", net, dense["error"])
                for rep in range(int(exp_cfg.num_repetitions)):
                    for method in exp.methods if steps else []:
                        run_chain(exp, Chain(net, rep, method), state_lib.variables_of(state),
                                  results=results, tb=tb, save_results=save, bar=bar)
        if is_main and steps:
            report = plot_lib.write_outputs(results, exp.workdir, exp.workdir.name or "results")
            tb.log_text("report", report)
    return results


# Where and on how many devices a run executes; not part of what it computes, so a run
# may resume on another machine.
RUNTIME_FIELDS = ("mesh_devices", "mesh_model", "multihost", "distributed", "fused_pass", "compilation_cache_dir")


def _check_config_unchanged(exp: Experiment) -> None:
    """Refuses to resume a workdir that was started with a different config
    (fields in ``RUNTIME_FIELDS`` may differ). Only process 0 writes."""
    path = exp.workdir / "config.json"
    current = json.loads(exp.config.to_json_best_effort(sort_keys=True))
    if path.exists():
        stored = ckpt_lib.read_json(path)
        stored.setdefault("prng_impl", "rbg")  # runs from before the field: main.py set rbg globally
        runtime = lambda d: {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}  # noqa: E731
        if runtime(stored) != runtime(current):
            diff = workdir_lib.config_diff(stored, current, ignore=RUNTIME_FIELDS)
            raise ValueError(
                f"--workdir {exp.workdir} holds a run with another config (differs in: {'; '.join(diff)}); "
                "use a new --workdir or the same config"
            )
    elif jax.process_index() == 0:
        ckpt_lib.write_json(path, current)
