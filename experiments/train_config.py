"""Training hyperparameters: the one place that defines their fields and defaults.

:class:`TrainConfig` is the single source of truth. Experiment configs build
their ``training`` / ``retraining`` blocks from it (``configs.common.training``
calls :func:`config_dict`), and :func:`as_train_config` turns such a block (an
``ml_collections.ConfigDict``, a mapping or a :class:`TrainConfig`) back into a
validated :class:`TrainConfig`, naming the field and the allowed values on error.

In a ``ConfigDict`` every field keeps one type, so "no cap" of
``max_steps_per_epoch`` is written ``-1`` there and ``None`` here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "AUGMENT_NAMES",
    "DTYPES",
    "OPTIMIZERS",
    "TrainConfig",
    "as_train_config",
    "config_dict",
    "steps_per_epoch",
]

OPTIMIZERS = ("sgd", "adam")
AUGMENT_NAMES = ("none", "cifar", "imagenet")
DTYPES = ("float32", "bfloat16")
NO_CAP = -1  # max_steps_per_epoch in a ConfigDict: no cap


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Validated training hyperparameters (hashable; epochs are integers).

    The defaults are those of ``torch.optim.SGD`` and the reference trainer;
    the experiment configs set every schedule explicitly.

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
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in _REQUIRED}


def config_dict(**fields: Any) -> "ml_collections.ConfigDict":  # noqa: F821
    """A ``ConfigDict`` with every field of :class:`TrainConfig`: the given
    ``fields`` (validated) over the dataclass defaults. ``num_epochs``,
    ``batch_size`` and ``learning_rate`` are required."""
    import ml_collections  # pylint: disable=import-outside-toplevel

    cfg = as_train_config(fields)
    out = dataclasses.asdict(cfg)
    out["lr_milestones"] = tuple(cfg.lr_milestones)
    out["max_steps_per_epoch"] = NO_CAP if cfg.max_steps_per_epoch is None else cfg.max_steps_per_epoch
    return ml_collections.ConfigDict(out)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    where = field if " " in field else f"training config field {field!r}"
    return ValueError(f"{where}={value!r}: expected {allowed}")


def check_int(field: str, value: Any, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming ``field`` otherwise."""
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


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; ``ValueError`` naming ``field`` otherwise."""
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


def _milestones(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad("lr_milestones", value, "a list of epochs (integers >= 0)")
    return tuple(sorted(check_int("lr_milestones", m, 0) for m in value))


def _cap(value: Any) -> Optional[int]:
    if value is None or (not isinstance(value, bool) and value == NO_CAP):
        return None
    try:
        return check_int("max_steps_per_epoch", value, 1)
    except ValueError:
        raise _bad("max_steps_per_epoch", value, f"an integer >= 1 (or {NO_CAP}: no cap)") from None


def as_train_config(cfg: Any) -> TrainConfig:
    """Validates ``cfg`` and returns it as a :class:`TrainConfig`.

    Missing optional fields take the :class:`TrainConfig` defaults. Raises
    ``ValueError`` naming the field and the allowed values for missing,
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
    d = {**_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}

    out: dict[str, Any] = {
        "num_epochs": check_int("num_epochs", d["num_epochs"], 0),
        "batch_size": check_int("batch_size", d["batch_size"], 1),
        "learning_rate": _float("learning_rate", d["learning_rate"], 0.0),
        "lr_milestones": _milestones(d["lr_milestones"]),
        "lr_gamma": _float("lr_gamma", d["lr_gamma"], 0.0, strict=True),
        "warmup": check_int("warmup", d["warmup"], 0),
        "optimizer": check_choice("optimizer", d["optimizer"], OPTIMIZERS),
        "momentum": _float("momentum", d["momentum"], 0.0),
        "weight_decay": _float("weight_decay", d["weight_decay"], 0.0),
        "dtype": check_choice("dtype", d["dtype"], DTYPES),
        "max_steps_per_epoch": _cap(d["max_steps_per_epoch"]),
        "start_epoch": check_int("start_epoch", d["start_epoch"], 0),
    }
    if out["momentum"] >= 1.0:
        raise _bad("momentum", out["momentum"], "a number in [0, 1)")
    if not isinstance(d["nesterov"], (bool, np.bool_)):
        raise _bad("nesterov", d["nesterov"], "True or False")
    out["nesterov"] = bool(d["nesterov"])
    if out["nesterov"] and out["optimizer"] == "sgd" and out["momentum"] == 0.0:
        raise _bad("nesterov", True, "False when momentum is 0 (Nesterov needs momentum > 0)")
    if d["augment"] not in AUGMENT_NAMES:
        check_choice("augment", d["augment"], _augment_names())
    out["augment"] = str(d["augment"])
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
