"""Everything a pruning method may look at, computed lazily and cached.

A :class:`PruneContext` is built once per :func:`sensprune.prune` call. Methods
read kernels, alive masks and (cached) sensitivities from it, so the keep-ratio
search can call a method's ``select`` many times while the expensive pass over
S runs once. What is shared by several methods is a typed, lazily computed
property; a method's own derived data (scores, factorisations, ...) is
memoised per context by the function that computes it (:meth:`PruneContext.memo`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Optional, TypeVar

import jax
import numpy as np

from sensprune import paths, points
from sensprune.adapter import ModelAdapter, as_adapter
from sensprune.types import Layer, LayerSensitivity

if TYPE_CHECKING:
    from sensprune.dependencies import DependencyMap

T = TypeVar("T")
Sensitivities = dict[str, LayerSensitivity]


@dataclasses.dataclass(eq=False)
class PruneContext:
    """Inputs shared by all methods of one prune call.

    Attributes:
      model: the flax.linen module, or a model adapter (:mod:`sensprune.adapter`);
        None for methods that only read kernels.
      variables: its variables (``{'params': ..., ...}``).
      layers: the prunable layers, in call order.
      data: the points of S, ``[N, *input_shape]`` or a pytree of such arrays
        (a tuple = the positional arguments; :mod:`sensprune.points`).
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
      contraction: strategy of the kernels' (max, x) contraction
        (``compute_sensitivities(..., contraction=...)``).
    """

    model: Any
    variables: Mapping[str, Any]
    layers: list[Layer]
    data: Any
    labels: Optional[np.ndarray] = None
    loss_fn: Optional[Callable[[Any, Any], jax.Array]] = None
    delta: float = 1e-16
    c_constant: float = 3.0
    chunk_size: int = 32
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    apply_method: Any = None
    protect_input_channels: bool = True
    mesh: Any = None
    fused_pass: bool = False
    contraction: str = "auto"
    _sensitivities: dict[str, Sensitivities] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _memo: dict[tuple[Callable[..., Any], tuple], Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

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

    @functools.cached_property
    def adapter(self) -> ModelAdapter:
        """The model adapter: the only way methods run the model."""
        if self.model is None:
            raise ValueError("this method runs the model: the PruneContext needs model=")
        return as_adapter(self.model, self.apply_method, self.apply_kwargs)

    @functools.cached_property
    def _kernels(self) -> dict[str, np.ndarray]:
        return {layer.name: np.asarray(paths.get_kernel(self.params, layer)) for layer in self.layers}

    def kernels(self) -> dict[str, np.ndarray]:
        """Layer name -> kernel as a host numpy array (cached)."""
        return self._kernels

    @functools.cached_property
    def _alive(self) -> dict[str, np.ndarray]:
        return {name: k != 0 for name, k in self.kernels().items()}

    def alive(self) -> dict[str, np.ndarray]:
        """Layer name -> bool mask of nonzero kernel entries (already pruned = False; cached)."""
        return self._alive

    def sensitivities(self, reduction: str) -> Sensitivities:
        """Empirical sensitivities over S with the given patch reduction (cached)."""
        if reduction not in self._sensitivities:
            from sensprune.sensitivity import compute_sensitivities

            self._sensitivities[reduction] = compute_sensitivities(
                self.adapter,
                self.variables,
                self.data,
                reduction=reduction,
                chunk_size=self.chunk_size,
                layers=self.layers,
                mesh=self.mesh,
                fused=self.fused_pass,
                contraction=self.contraction,
            )
        return self._sensitivities[reduction]

    def computed_sensitivities(self) -> dict[str, Sensitivities]:
        """Reduction -> the sensitivities computed (or preset) so far."""
        return dict(self._sensitivities)

    def preset_sensitivities(self, reduction: str, sensitivities: Sensitivities) -> None:
        """Uses already computed sensitivities for ``reduction`` (e.g. timed separately by a benchmark)."""
        from sensprune.sensitivity import REDUCTIONS

        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self._sensitivities[reduction] = dict(sensitivities)

    @functools.cached_property
    def _dependencies(self) -> DependencyMap:
        from sensprune.dependencies import analyze

        return analyze(self.adapter, self.variables, points.take(self.data, 0, 1), layers=self.layers)

    def dependencies(self) -> DependencyMap:
        """Channel groups of the model (:func:`sensprune.dependencies.analyze`, cached)."""
        return self._dependencies

    @functools.cached_property
    def _input_layers(self) -> frozenset[str]:
        from sensprune.sensitivity import pass_capture

        # The first chunk of the sensitivity pass through its compiled capture (a cache hit
        # when the pass ran or runs; an eager forward would compile every op on its own).
        x = points.take(self.data, 0, min(self.chunk_size, points.num_points(self.data)))
        capture = pass_capture(self.adapter, self.layers, single_device=self.mesh is None)
        reads_input = jax.device_get(capture(self.variables, x)[2])
        return frozenset(name for name, flag in reads_input.items() if flag)

    def input_layers(self) -> frozenset[str]:
        """Names of layers whose input is the model input itself (cached)."""
        return self._input_layers

    def memo(self, fn: Callable[..., T], *args: Hashable) -> T:
        """``fn(self, *args)``, computed once per context and argument tuple.

        Methods keep their derived data (scores, factorisations, compiled
        functions) here, keyed by the function that computes it.
        """
        key = (fn, args)
        if key not in self._memo:
            self._memo[key] = fn(self, *args)
        return self._memo[key]
