"""Registry of pruning methods: name -> :class:`Method`.

A method is a selection function ``select(ctx, budget, key) -> Selection`` that
keeps about ``budget`` kernel entries of the prunable layers. Everything else
(budget accounting, the keep-ratio search, building masks and pruned params,
statistics) is shared by :func:`sensprune.prune`. Add your own with
:func:`register_method`. Keyword-only parameters of ``select`` with defaults
are the method's options (:func:`method_options`), passed through
``prune(..., method_options={...})``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

if TYPE_CHECKING:
    import jax

    from sensprune.context import PruneContext


@dataclasses.dataclass
class Selection:
    """What a method's ``select`` returns.

    Attributes:
      masks: layer name -> bool array of the kernel's shape (True = kept).
      scales: layer name -> float array broadcastable to the kernel (importance
        reweighting of sampling methods); layers not listed are not rescaled.
      scores: layer name -> the scores the choice was based on (for reporting).
      info: method-specific extras (epsilon, draws, ...).
      kernels: layer name -> replacement kernel (methods that rewrite weights
        instead of masking them, e.g. low-rank ``svd``); applied before masks.
      sizes: layer name -> parameters the layer costs after the method
        (overrides the kept-entry count of its mask, e.g. ``k (n + d + 1)`` for
        a rank-``k`` factorisation).
      flops: layer name -> multiply-accumulates per sample (overrides
        ``nnz * num_patches``).
    """

    masks: dict[str, np.ndarray]
    scales: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    scores: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    kernels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: dict[str, int] = dataclasses.field(default_factory=dict)

    def layer_size(self, name: str) -> int:
        """Parameters layer ``name`` costs under this selection."""
        if name in self.sizes:
            return int(self.sizes[name])
        return int(np.sum(self.masks[name]))


SelectFn = Callable[["PruneContext", int, Optional["jax.Array"]], Selection]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes:
      name: registry key.
      select: ``select(ctx, budget, key, **options) -> Selection``.
      structured: True for filter/channel methods (masks whole input channels).
      stochastic: True if ``select`` needs a ``jax.random`` key.
      needs_labels: True if the method needs labels and a loss (e.g. SNIP).
      description: one line for listings.
      retrainable: False if the result is not a sparsity pattern that masked
        retraining preserves (e.g. low-rank ``svd``); the experiment package
        then evaluates it without retraining, always from the trained net.
    """

    name: str
    select: SelectFn
    structured: bool = False
    stochastic: bool = False
    needs_labels: bool = False
    description: str = ""
    retrainable: bool = True


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    select: SelectFn,
    *,
    structured: bool = False,
    stochastic: bool = False,
    needs_labels: bool = False,
    description: str = "",
    retrainable: bool = True,
    overwrite: bool = False,
) -> Method:
    """Registers ``select`` under ``name`` and returns the :class:`Method`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if name in _METHODS and not overwrite:
        raise ValueError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
    method = Method(name, select, structured, stochastic, needs_labels, description, retrainable)
    _METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    """Looks a method up by name; unknown names list the available ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _METHODS[name]


def method_options(name: str) -> dict[str, Any]:
    """Keyword options of a method's select function and their defaults (``{}`` for none)."""
    return _options(get_method(name).select)


def _options(select: SelectFn) -> dict[str, Any]:
    params = inspect.signature(select).parameters
    return {
        p.name: p.default for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def check_options(method: Method, options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``options`` as a dict, after checking every name is a keyword option of ``method``."""
    options = dict(options or {})
    allowed = _options(method.select)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"method_options: {unknown} not options of method {method.name!r}; allowed: {listed}")
    return options


def available_methods() -> list[str]:
    """Sorted names of all registered methods."""
    return sorted(_METHODS)
