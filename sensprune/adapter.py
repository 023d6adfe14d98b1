"""The one place that runs a user's model: a small adapter per framework.

Every sensprune module that needs the model (layer discovery, input capture,
channel-dependency tracing, losses and outputs) goes through a
:class:`ModelAdapter`. An adapter knows *how* to call the model (its method and
keyword arguments); variables are always passed in, so its functions are pure
and work under :func:`jax.jit` (adapters are hashable static arguments unless a
keyword value is not hashable). Two implementations:

* :class:`LinenAdapter` (here): a ``flax.linen.Module``, called through
  ``model.apply``; layer calls are intercepted with ``nn.intercept_methods``.
* :class:`sensprune.nnx_adapter.NNXAdapter`: a ``flax.nnx.Module`` split into a
  graph definition and state, merged into a private copy per call.

Variables are ``{'params': params, ...}`` for both, with params a plain nested
dict, so ``Layer.path`` addresses kernels the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sensprune import geometry, layer_kinds, lifted, paths, validation
from sensprune.points import as_args, check_arity
from sensprune.types import Layer, Path

__all__ = ["Interceptor", "LayerCall", "LinenAdapter", "ModelAdapter", "as_adapter", "trace_with_markers"]


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What an interceptor is told about one prunable layer call.

    Attributes:
      path: the layer's ``Layer.path`` (string keys).
      module: the layer module being called (Linen ``nn.Dense``/``nn.Conv`` or
        an nnx ``Linear``/``Conv`` of a private model copy).
    """

    path: Path
    module: Any


Interceptor = Callable[[Callable[..., Any], tuple, dict, LayerCall], Any]
"""``interceptor(next_fun, args, kwargs, call) -> outputs`` around every prunable layer call."""


@runtime_checkable
class ModelAdapter(Protocol):
    """How sensprune runs a model. All functions are pure in ``variables`` and ``x``."""

    def apply(self, variables: Mapping[str, Any], x: Any) -> Any:
        """The model's outputs on ``x`` (state updates of the forward pass discarded)."""

    def intercept(self, variables: Mapping[str, Any], x: Any, interceptor: Interceptor) -> Any:
        """:meth:`apply` with ``interceptor`` around every prunable layer call.

        Return ``next_fun(*args, **kwargs)`` to run the layer, or any array to
        replace its output.
        """

    def find_layers(self, variables: Mapping[str, Any], x: Any) -> list[Layer]:
        """Every prunable layer the model calls on ``x``, in call order (no FLOPs spent)."""

    def capture_inputs(
        self, variables: Mapping[str, Any], x: Any, layers: Optional[Sequence[Layer]] = None
    ) -> dict[str, jax.Array]:
        """Layer name -> the input the layer received, ``[B, *input_shape]`` (jittable)."""


def with_params(variables: Mapping[str, Any], params: Any) -> dict:
    """``variables`` with its ``'params'`` collection replaced."""
    return {**variables, "params": params}


def _returns_state(mutable: Any) -> bool:
    return mutable not in (False, None)


def _freeze(value: Any) -> Any:
    """Lists (e.g. ``mutable=['batch_stats']``) as tuples, so adapters stay hashable."""
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class LinenAdapter:
    """A Linen module called as ``model.apply(variables, x, method=method, **kwargs)``.

    Attributes:
      model: the ``flax.linen.Module``.
      method: optional ``method=`` of ``apply``.
      kwargs: the other keyword arguments of ``apply`` as sorted ``(name, value)``
        pairs (e.g. ``(('train', False),)``); see :meth:`create`.
    """

    model: nn.Module
    method: Any = None
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(cls, model: nn.Module, method: Any = None, apply_kwargs: Optional[Mapping[str, Any]] = None):
        """The adapter of ``model.apply(..., method=method, **apply_kwargs)``."""
        items = tuple(sorted((k, _freeze(v)) for k, v in dict(apply_kwargs or {}).items()))
        return cls(model, method, items)

    @property
    def apply_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def _call(self, variables: Mapping[str, Any], x: Any, **override: Any) -> Any:
        check_arity(self.model, self.method, x)  # a tuple of points = the positional arguments
        return self.raw_apply(variables, *as_args(x), **override)

    def raw_apply(
        self, variables: Mapping[str, Any], *args: Any, interceptor: Optional[Interceptor] = None, **override: Any
    ) -> Any:
        """``model.apply(variables, *args, ...)`` with the adapter's keywords updated by ``override``.

        Returns what ``apply`` returns (``(outputs, state)`` with ``mutable``).
        ``interceptor`` runs around every prunable layer call.
        """
        kwargs = {**self.apply_kwargs, **override}
        if self.method is not None and "method" not in kwargs:
            kwargs["method"] = self.method
        if interceptor is None:
            return self.model.apply(variables, *args, **kwargs)

        def linen_interceptor(next_fun, args, kw, context):
            module = context.module
            if not layer_kinds.is_linen_call(module, context.method_name):
                return next_fun(*args, **kw)
            return interceptor(next_fun, args, kw, LayerCall(tuple(module.path), module))

        with nn.intercept_methods(linen_interceptor):
            return self.model.apply(variables, *args, **kwargs)

    def apply(self, variables: Mapping[str, Any], x: Any) -> Any:
        out = self._call(variables, x)
        return out[0] if _returns_state(self.apply_kwargs.get("mutable", False)) else out

    def intercept(self, variables: Mapping[str, Any], x: Any, interceptor: Interceptor) -> Any:
        check_arity(self.model, self.method, x)
        out = self.raw_apply(variables, *as_args(x), interceptor=interceptor)
        return out[0] if _returns_state(self.apply_kwargs.get("mutable", False)) else out

    def find_layers(self, variables: Mapping[str, Any], x: Any) -> list[Layer]:
        layers, dense = self.find_layers_report(variables, x)
        if not layers:
            raise ValueError(
                f"no prunable layer (nn.Dense / nn.Conv) found in {type(self.model).__name__}"
                + (f" ({layer_kinds.layer_report(dense)})" if dense else "")
            )
        return layers

    def find_layers_report(self, variables: Mapping[str, Any], x: Any) -> tuple[list[Layer], dict[str, str]]:
        """``(scored layers in call order, {name: reason} of linear layers left dense)``; never raises
        for a layer kind (see :mod:`sensprune.layer_kinds`)."""
        _check_variables(variables)
        found: dict[Path, Layer] = {}
        dense: dict[str, str] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            path = tuple(module.path)
            validation.warn_fixed_layer(module, path)  # e.g. an LSTM cell: stays dense, and how to prune it
            reason = layer_kinds.linen_unscorable(module, context.method_name)
            if reason is not None:
                dense[geometry.layer_name(path)] = reason
            if not layer_kinds.is_linen_call(module, context.method_name):
                return next_fun(*args, **kwargs)
            inputs = geometry.layer_input(args, kwargs)
            name = geometry.layer_name(path)
            args, kwargs = geometry.with_layer_input(args, kwargs, lifted.tag(inputs, name))
            outputs = next_fun(*args, **kwargs)
            if name in dense:
                return outputs
            try:
                if path in found:
                    found[path] = layer_kinds.merge_call(found[path], inputs)
                else:
                    found[path] = layer_kinds.linen_layer(
                        module, context.method_name, path, inputs, outputs, len(found)
                    )
            except ValueError as err:
                found.pop(path, None)
                dense[name] = str(err)
            return outputs

        lost: dict[str, str] = {}

        def tagged(variables, x):
            _, found, where = lifted.tagged_values(self._call, variables, x)
            lost.update(where)
            return found

        with nn.intercept_methods(interceptor):
            occurrences = jax.eval_shape(tagged, variables, x)
        for name, primitive in lost.items():
            dense[name] = lifted.lost_reason(primitive)
        found = {path: layer for path, layer in found.items() if geometry.layer_name(path) not in lost}
        batch = int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])
        layers: list[Layer] = []
        for path, layer in found.items():
            name = geometry.layer_name(path)
            leaf = paths.get_path(variables["params"], paths.kernel_path(layer))
            try:
                layers.extend(lifted.expand_layer(layer, np.shape(leaf), occurrences.get(name, []), batch))
            except ValueError as err:
                dense[name] = str(err)
        layers = lifted.in_call_order(layers)
        geometry.check_kernels(layers, variables)
        return layers, dense

    def capture_inputs(
        self, variables: Mapping[str, Any], x: Any, layers: Optional[Sequence[Layer]] = None
    ) -> dict[str, jax.Array]:
        if layers is None:
            layers = self.find_layers(variables, x)
        wanted = {tuple(layer.path) for layer in layers}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if layer_kinds.is_linen_call(module, context.method_name) and tuple(module.path) in wanted:
                inputs = lifted.tag(geometry.layer_input(args, kwargs), geometry.layer_name(tuple(module.path)))
                args, kwargs = geometry.with_layer_input(args, kwargs, inputs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            _, found, _ = lifted.tagged_values(self._call, variables, x)
        # a shared layer: the inputs of all its calls (scan steps too), stacked on the batch axis;
        # a slice of a scanned stack: the inputs of its own step
        captured = {
            layer.name: lifted.layer_input(layer, found[geometry.layer_name(layer.path)])
            for layer in layers
            if geometry.layer_name(layer.path) in found
        }
        return check_captured(captured, layers)


def check_captured(captured: dict[str, jax.Array], layers: Optional[Sequence[Layer]]) -> dict[str, jax.Array]:
    """``captured``, after checking every requested layer was called."""
    if layers is not None:
        missing = [layer.name for layer in layers if layer.name not in captured]
        if missing:
            raise ValueError(f"layers {missing} were not called by the model")
    return captured


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise KeyError("variables has no 'params' collection")


def as_adapter(model: Any, method: Any = None, apply_kwargs: Optional[Mapping[str, Any]] = None) -> ModelAdapter:
    """The adapter of ``model``: a Linen module is wrapped; an adapter is returned as is.

    ``method`` and ``apply_kwargs`` describe how to call a Linen module; an
    adapter already carries them (nnx: :func:`sensprune.nnx.adapter`).
    """
    if isinstance(model, nn.Module):
        return LinenAdapter.create(model, method, apply_kwargs)
    if isinstance(model, ModelAdapter):
        if method is not None or apply_kwargs:
            raise ValueError(
                f"{type(model).__name__} already says how to call the model; pass no method/apply_kwargs with it"
            )
        return model
    raise ValueError(
        f"model must be a flax.linen.Module or a sensprune model adapter (sensprune.nnx for nnx models), "
        f"got {type(model).__name__}"
    )


# --------------------------------------------------------------------------- jaxpr tracing


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def trace_with_markers(adapter: ModelAdapter, variables: Mapping[str, Any], x: Any, layers: Sequence[Layer]):
    """Closed jaxpr of ``(variables, x, markers) -> (outputs, {layer name: input})`` (no FLOPs).

    Every call of a layer in ``layers`` is replaced by a fresh *marker* input of
    the layer's output shape (``markers``: layer name -> ``ShapeDtypeStruct``),
    and the layer's input becomes an extra output.

    Returns:
      ``(closed jaxpr, output shapes, markers)``.
    """
    by_path = {tuple(layer.path): layer for layer in layers}

    def fn(variables, x, markers):
        captured = {}

        def interceptor(next_fun, args, kwargs, call: LayerCall):
            layer = by_path.get(tuple(call.path))
            if layer is None:
                return next_fun(*args, **kwargs)
            captured[layer.name] = geometry.layer_input(args, kwargs)
            return markers[layer.name]

        return adapter.intercept(variables, x, interceptor), captured

    batch = int(jax.tree_util.tree_leaves(x)[0].shape[0])
    markers = {layer.name: jax.ShapeDtypeStruct((batch, *layer.output_shape), jnp.float32) for layer in layers}
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(_abstract(variables), _abstract(x), markers)
    return closed, shapes, markers
