"""Everything a pruning method may look at, computed lazily and cached.

A :class:`PruneContext` is built once per :func:`sensprune.prune` call. Methods
read kernels, alive masks and (cached) sensitivities from it, so the keep-ratio
search can call a method's ``select`` many times while the expensive pass over
S runs once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from sensprune import paths
from sensprune.types import Layer, LayerSensitivity


@dataclasses.dataclass
class PruneContext:
    """Inputs shared by all methods of one prune call.

    Attributes:
      model: the flax.linen module.
      variables: its variables (``{'params': ..., ...}``).
      layers: the prunable layers, in call order.
      data: the points of S, ``[N, *input_shape]``.
      labels: labels of S (only methods with ``needs_labels``), or None.
      loss_fn: ``loss_fn(outputs, labels) -> scalar`` for gradient-based methods.
      delta: failure probability of the sampling guarantees.
      c_constant: the constant C of the sample-complexity bounds.
      chunk_size: points per chunk of the sensitivity pass.
      apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. train=False).
      apply_method: optional method passed to ``model.apply``.
      protect_input_channels: never prune input channels of layers that read
        the model input directly (e.g. the RGB channels of the first conv).
      mesh: optional ``jax.sharding.Mesh``: the sensitivity pass runs
        data-parallel over its devices (:mod:`sensprune.sharding`).
      fused_pass: run the sensitivity pass as one compiled program
        (``compute_sensitivities(..., fused=True)``).
      contraction: strategy of the pass's (max, x) contraction
        (``compute_sensitivities(..., contraction=...)``).
    """

    model: Any
    variables: Mapping[str, Any]
    layers: list[Layer]
    data: np.ndarray
    labels: Optional[np.ndarray] = None
    loss_fn: Optional[Callable[[Any, Any], jax.Array]] = None
    delta: float = 1e-16
    c_constant: float = 3.0
    chunk_size: int = 32
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    apply_method: Any = None
    protect_input_channels: bool = True
    cache: dict = dataclasses.field(default_factory=dict)
    mesh: Any = None
    fused_pass: bool = False
    contraction: str = "auto"

    @property
    def params(self) -> Mapping[str, Any]:
        return self.variables["params"]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no prunable layer named {name!r}")

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def kernels(self) -> dict[str, np.ndarray]:
        """Layer name -> kernel as a host numpy array (cached)."""
        if "kernels" not in self.cache:
            self.cache["kernels"] = {
                layer.name: np.asarray(paths.get_kernel(self.params, layer)) for layer in self.layers
            }
        return self.cache["kernels"]

    def alive(self) -> dict[str, np.ndarray]:
        """Layer name -> bool mask of nonzero kernel entries (already pruned = False)."""
        return {name: k != 0 for name, k in self.kernels().items()}

    def sensitivities(self, reduction: str) -> dict[str, LayerSensitivity]:
        """Empirical sensitivities over S with the given patch reduction (cached)."""
        key = ("sensitivity", reduction)
        if key not in self.cache:
            from sensprune.sensitivity import compute_sensitivities

            kwargs = dict(self.apply_kwargs)
            self.cache[key] = compute_sensitivities(
                self.model,
                self.variables,
                self.data,
                reduction=reduction,
                chunk_size=self.chunk_size,
                layers=self.layers,
                method=self.apply_method,
                mesh=self.mesh,
                fused=self.fused_pass,
                contraction=self.contraction,
                **kwargs,
            )
        return self.cache[key]

    def dependencies(self):
        """Channel groups of the model (:func:`sensprune.dependencies.analyze`, cached)."""
        if "dependencies" not in self.cache:
            from sensprune.dependencies import analyze

            self.cache["dependencies"] = analyze(
                self.model, self.variables, np.asarray(self.data[:1]), layers=self.layers,
                method=self.apply_method, **dict(self.apply_kwargs),
            )
        return self.cache["dependencies"]

    def input_layers(self) -> set[str]:
        """Names of layers whose input is the model input itself (cached)."""
        if "input_layers" not in self.cache:
            from sensprune.layers import capture_inputs

            x = np.asarray(self.data[:2])
            inputs = capture_inputs(
                self.model, self.variables, x, method=self.apply_method, layers=self.layers,
                **dict(self.apply_kwargs),
            )
            flat_x = x.reshape(x.shape[0], -1)
            found = set()
            for name, a in inputs.items():
                a = np.asarray(a).reshape(a.shape[0], -1)
                if a.shape == flat_x.shape and np.array_equal(a, flat_x):
                    found.add(name)
            self.cache["input_layers"] = found
        return self.cache["input_layers"]
