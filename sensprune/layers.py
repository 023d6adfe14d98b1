"""Discovery of the prunable layers of a model and capture of their inputs.

Both functions run the model through its adapter (:mod:`sensprune.adapter`):

* :func:`find_layers` traces the model under :func:`jax.eval_shape` (no
  compute) and turns each ``nn.Dense`` / ``nn.Conv`` call into a static
  :class:`~sensprune.types.Layer` (:mod:`sensprune.geometry`).
* :func:`capture_inputs` returns each layer's input; it is pure and works
  inside :func:`jax.jit`.

The user's model and variables are never modified. Layers are keyed by
``Layer.path`` (the module's scope path, which is its path in
``variables['params']``) and by name ``'/'.join(path)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax

from sensprune.adapter import as_adapter
from sensprune.boxing import unbox_variables
from sensprune.types import Layer


def find_layers(
    model: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> list[Layer]:
    """Every scored linear layer the model calls on ``x``, in first-call order.

    ``model``: a Linen module (called as ``model.apply(variables, x,
    method=method, **apply_kwargs)`` under ``jax.eval_shape``, no FLOPs spent)
    or a model adapter. Dense, Conv (grouped too), DenseGeneral, linear Einsums,
    shared layers (``Layer.calls``) and ``Embed.attend`` are found
    (:mod:`sensprune.layer_kinds`); linear layers that cannot be scored are
    skipped (``adapter.find_layers_report`` names them with the reason).
    Raises ``ValueError`` when no prunable layer is found.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise KeyError("variables has no 'params' collection")
    variables = unbox_variables(variables)  # partitioned params (nn.with_partitioning): their arrays
    return as_adapter(model, method, apply_kwargs).find_layers(variables, x)


def capture_inputs(
    model: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    method: Callable[..., Any] | str | None = None,
    layers: Sequence[Layer] | None = None,
    **apply_kwargs: Any,
) -> dict[str, jax.Array]:
    """Layer name -> the input the layer received, shape ``[B, *input_shape]``.

    Pure and jittable. ``layers`` restricts the capture (default: every scored
    layer call). The inputs of a layer called ``k`` times are stacked on the
    batch axis (``[k * B, ...]``).
    """
    return as_adapter(model, method, apply_kwargs).capture_inputs(unbox_variables(variables), x, layers)
