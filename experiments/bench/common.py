"""What every benchmark shares: the model set-up, the environment record and JSON output."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import sensprune as sp

# (delta, batch size of |S|, train batch size) of the reference's experiments, per dataset family.
REFERENCE = {
    "mnist": (1e-12, 64, 64),
    "cifar": (1e-16, 128, 128),
    "imagenet": (1e-16, 256, 256),
}
C_CONSTANT = 3.0
INPUTS_NOTE = "random normal N(0,1) points (negative entries: layers reading the input take the sign-split path)"


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """A zoo model with random variables (seed 0), its prunable layers and S."""

    name: str
    family: str
    model: Any
    variables: Any
    layers: tuple
    shape: tuple[int, ...]
    data: np.ndarray
    delta: float
    sample_batch_size: int
    train_batch_size: int
    sample_size_formula: int

    @property
    def num_params(self) -> int:
        return sp.count_params(self.variables["params"])

    def describe(self) -> dict[str, Any]:
        """The JSON record of this set-up."""
        return {
            "family": self.family, "num_layers": len(self.layers), "num_params": self.num_params,
            "sample_size": len(self.data), "sample_size_formula": self.sample_size_formula, "delta": self.delta,
            "c_constant": C_CONSTANT, "sample_batch_size": self.sample_batch_size, "data": INPUTS_NOTE,
        }


def setup_model(name: str, num_points: int = 0, seed: int = 0) -> ModelSetup:
    """Builds ``name`` (``experiments.models``) with random variables and ``num_points``
    N(0, 1) points (0: the reference's ``sample_size`` formula)."""
    from experiments.models import MODEL_DATASET_FAMILY, get_model, input_shape

    if name not in MODEL_DATASET_FAMILY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_DATASET_FAMILY))}")
    family = MODEL_DATASET_FAMILY[name]
    delta, s_batch, train_batch = REFERENCE[family]
    shape = tuple(input_shape(name))
    model = get_model(name, 10 if family != "imagenet" else 1000)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))
    variables = jax.device_get(init(jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    probe = rng.normal(size=(1, *shape)).astype(np.float32)
    layers = tuple(sp.find_layers(model, variables, probe, train=False))
    formula = int(sp.sample_size(list(layers), delta, C_CONSTANT, s_batch))
    data = rng.normal(size=(int(num_points or formula), *shape)).astype(np.float32)
    return ModelSetup(
        name=name, family=family, model=model, variables=variables, layers=layers, shape=shape, data=data,
        delta=delta, sample_batch_size=s_batch, train_batch_size=train_batch, sample_size_formula=formula,
    )


def forward_fn(setup: ModelSetup) -> Any:
    """A jitted plain forward ``(variables, x) -> logits`` (``train=False``)."""
    model = setup.model
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def environment() -> dict[str, Any]:
    """Device, versions, CPUs and load of this process."""
    import flax

    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    return {
        "device": f"{dev.platform}:{dev.id} {dev.device_kind}", "device_kind": dev.device_kind,
        "backend": jax.default_backend(), "num_devices": jax.device_count(), "jax": jax.__version__,
        "flax": flax.__version__, "sensprune": sp.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg": list(os.getloadavg()),
    }


def memory_sizes(compiled: Any) -> dict[str, Optional[int]]:
    """Sizes of ``compiled.memory_analysis()`` (None where the backend gives none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend dependent
        stats = None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes")
    values = {k: getattr(stats, k, None) if stats is not None else None for k in keys}
    return {k: None if v is None else int(v) for k, v in values.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    return path
