"""Start an experiment from a trained network: ``config.training.init_from=PATH``.

The network's variables (params and BatchNorm statistics) are loaded instead of
training it; the train stage is skipped, or, with
``config.training.init_finetune=True``, runs its ``num_epochs`` from the loaded
weights (resumable like a normal training run). Pruning, retraining, cascades
and reports run as usual.

Accepted sources (:func:`load_variables`):

* an orbax checkpoint in the :class:`experiments.checkpoint.Checkpointer`
  layout: a pipeline run's ``checkpoints/net<n>/train`` (or any other of its
  checkpoint directories; the newest step) or one of its numbered step
  directories, or the output of ``python -m experiments.convert``;
* a plain orbax directory of a variables tree (``ocp.StandardCheckpointer``),
  or a :func:`sensprune.save_shrunk` directory (its ``variables/``);
* a ``.npz`` of arrays named by ``/``-joined paths (``params/conv1/kernel``,
  ``batch_stats/bn1/mean``; names without a collection are params), optionally
  with a string entry ``__network__`` (:func:`save_npz` writes one);
* a PyTorch state dict (``.pth``/``.pt``/``.bin``/``.tar``) in torchvision /
  reference layout for the networks :mod:`experiments.convert` supports (needs
  ``torch``).

Every source is checked against the config's network: missing, unexpected and
mis-shaped arrays are named (with the expected shapes), and a source that
records its network (converted checkpoints, pipeline workdirs, ``.npz`` with
``__network__``) must name ``config.network``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from experiments import convert as convert_lib
from experiments import models as models_lib

__all__ = [
    "CONFIG_FIELDS",
    "PretrainedError",
    "init_from",
    "load_net",
    "load_variables",
    "save_npz",
]

CONFIG_FIELDS = ("init_from", "init_finetune")
"""Fields of ``config.training`` read here (not part of the training schedule)."""

COLLECTIONS = ("params", "batch_stats")
_NETWORK_KEY = "__network__"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


class PretrainedError(convert_lib.ConversionError):
    """A pretrained source does not match the configured network (or cannot be read)."""


def init_from(config: Any) -> str:
    """``config.training.init_from`` ('' when not set)."""
    return str(config.training.get("init_from", "") or "")


# ----------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    if prefix:
        out[prefix[:-1]] = tree
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def _step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / "index").is_dir()


def _checkpointer_root(path: Path) -> bool:
    return path.is_dir() and any(_step_dir(p) for p in path.iterdir())


def _workdir_network(path: Path) -> tuple[Optional[str], str]:
    """The network of the pipeline workdir holding checkpoint dir ``path`` (from its config.json)."""
    for parent in list(path.resolve().parents)[:6]:
        if parent.name == "checkpoints" and (parent.parent / "config.json").is_file():
            cfg_path = parent.parent / "config.json"
            try:
                return json.loads(cfg_path.read_text()).get("network"), str(cfg_path)
            except (OSError, ValueError):
                return None, ""
    return None, ""


def _read_checkpointer(path: Path) -> tuple[dict, Optional[str], str]:
    from experiments import checkpoint as ckpt_lib

    root, step = (path.parent, int(path.name)) if _step_dir(path) else (path, None)
    ck = ckpt_lib.Checkpointer(root, max_to_keep=None)
    step = ck.latest_step() if step is None else step
    saved = ck.index(step)["items"]
    if "params" not in saved:
        raise PretrainedError(f"{path}: checkpoint step {step} holds no params (items: {sorted(saved)})")
    items = ck.restore(step, like={k: None for k in COLLECTIONS if k in saved})
    meta = items.pop("meta") or {}
    network, where = meta.get("network"), f"{root} (meta of step {step})"
    if not network:
        network, where = _workdir_network(root)
    return {k: v for k, v in items.items() if k in COLLECTIONS}, network, where


def _read_orbax_tree(path: Path) -> dict:
    import orbax.checkpoint as ocp

    try:
        tree = ocp.StandardCheckpointer().restore(os.fspath(path.resolve()))
    except Exception as err:  # orbax raises many error types for damaged checkpoints
        raise PretrainedError(f"{path}: cannot read the orbax checkpoint: {type(err).__name__}: {err}") from err
    return dict(tree)


def _read_npz(path: Path) -> tuple[dict, Optional[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            flat = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{path}: not a readable .npz: {err}") from err
    network = flat.pop(_NETWORK_KEY, None)
    return _unflatten(flat), None if network is None else str(network)


def _as_variables(tree: Mapping[str, Any]) -> dict:
    """A bare params tree becomes ``{'params': tree}``."""
    if any(k in tree for k in COLLECTIONS):
        return dict(tree)
    return {"params": dict(tree)}


def read_source(path: str | os.PathLike, network: str, num_classes: int) -> tuple[dict, Optional[str], str]:
    """Reads ``path`` as nested dicts of numpy arrays; also the network it records (or None) and where.

    PyTorch files are converted for ``network`` with ``num_classes``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"init_from={os.fspath(path)!r} does not exist")
    if p.is_dir():
        if _step_dir(p) or _checkpointer_root(p):
            return _read_checkpointer(p)
        if (p / "shrunk.json").is_file() and (p / "variables").is_dir():
            return _as_variables(_read_orbax_tree(p / "variables")), None, ""
        if any((p / f).exists() for f in ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint")):
            return _as_variables(_read_orbax_tree(p)), None, ""
        raise PretrainedError(
            f"{p}: not a checkpoint directory (expected numbered step directories of a Checkpointer, "
            "an orbax checkpoint or a save_shrunk directory)"
        )
    if p.suffix == ".npz":
        tree, net = _read_npz(p)
        return _as_variables(tree), net, f"{p} ({_NETWORK_KEY})"
    if p.name.endswith(_TORCH_SUFFIXES):
        state = convert_lib.load_torch_file(p)
        _, variables = convert_lib.from_state_dict(state, network, num_classes, source=str(p))
        return variables, None, ""
    raise PretrainedError(
        f"{p}: unknown source type; expected a checkpoint directory, a .npz or a PyTorch state dict "
        f"({', '.join(_TORCH_SUFFIXES)})"
    )


def load_variables(
    path: str | os.PathLike,
    network: str,
    num_classes: int,
    model: Any = None,
    input_shape: Optional[tuple[int, ...]] = None,
) -> dict:
    """The variables of ``network`` (``{'params', ['batch_stats']}``, float32 numpy) read from ``path``.

    ``model`` (default: the zoo's ``network``) and the per-example ``input_shape`` (default: the
    zoo's) decide the expected shapes.

    Raises:
      FileNotFoundError: no such path.
      PretrainedError: the source names another network, or its arrays do not match
        ``network`` with ``num_classes`` outputs (missing / unexpected / mis-shaped ones named,
        with the expected shapes).
    """
    model = model if model is not None else models_lib.get_model(network, num_classes)
    loaded, recorded, where = read_source(path, network, num_classes)
    if recorded and recorded != network:
        raise PretrainedError(
            f"config.network={network!r} but init_from={os.fspath(path)!r} holds a {recorded!r} "
            f"(recorded in {where}); set config.network={recorded!r} or use a {network!r} checkpoint"
        )
    expected = _flatten(dict(convert_lib.abstract_variables(model, network, input_shape)))
    found = _flatten(loaded)
    # Empty collections (no BatchNorm) are absent on both sides once flattened.
    msg = convert_lib.mismatch_message(
        f"init_from={os.fspath(path)!r}", f"{network} ({num_classes} classes)",
        {k: v.shape for k, v in expected.items()}, {k: np.shape(v) for k, v in found.items()},
    )
    if msg:
        raise PretrainedError(msg)
    flat = {k: np.asarray(found[k], dtype=expected[k].dtype) for k in expected}
    return _unflatten(flat)


def save_npz(path: str | os.PathLike, variables: Mapping[str, Any], network: Optional[str] = None) -> None:
    """Writes ``variables`` as a ``.npz`` of ``/``-joined names (and the network name, if given)."""
    flat = {k: np.asarray(v) for k, v in _flatten(dict(jax.device_get(variables))).items()}
    if network:
        flat[_NETWORK_KEY] = np.asarray(network)
    np.savez(path, **flat)


# ----------------------------------------------------------------------------
# Pipeline stage
# ----------------------------------------------------------------------------


def load_net(exp: Any, net: int, tb: Any) -> Any:
    """The pipeline's trained net ``net`` taken from ``config.training.init_from``.

    Without ``init_finetune`` the loaded variables are the trained net (no training); with it,
    the train stage runs ``config.training.num_epochs`` starting from them (its checkpoints
    resume as usual). Returns a ``train_state.TrainState``.
    """
    import sensprune as sp
    from experiments import pipeline
    from experiments import train_state as state_lib

    config = exp.config
    path = init_from(config)
    variables = load_variables(path, config.network, exp.dataset.num_classes, exp.model, exp.input_shape)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    cfg = exp.train_cfg
    masks = sp.ones_like_masks(params)
    finetune = bool(config.training.get("init_finetune", False))
    mode = config.experiments.mode
    if not finetune:
        state = state_lib.state_from_params(exp.model, variables, exp.optimizer(cfg), masks=masks)
        if mode == "cascade-rewind":
            # Rewinding goes back to the loaded weights and replays the schedule's tail.
            rewind = exp.ckpt(f"net{net}", "rewind")
            epoch = max(cfg.num_epochs - exp.retrain_cfg.num_epochs, 0)
            if rewind.latest_step() is None:
                rewind.save(epoch, params=params, batch_stats=batch_stats, meta={"epoch": epoch})
        return state
    # Fine-tuning: the train stage resumes "at epoch 0" from the loaded weights.
    ckpt = exp.ckpt(f"net{net}", "train")
    if ckpt.latest_step() is None:
        state = state_lib.state_from_params(exp.model, variables, exp.optimizer(cfg), masks=masks)
        ckpt.save(0, params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state,
                  masks=masks, meta={"epoch": 0, "init_from": os.path.abspath(path)})
        if mode == "cascade-rewind" and cfg.num_epochs <= exp.retrain_cfg.num_epochs:
            rewind = exp.ckpt(f"net{net}", "rewind")
            if rewind.latest_step() is None:
                rewind.save(0, params=params, batch_stats=batch_stats, meta={"epoch": 0})
    return pipeline.train_net(exp, net, tb)
