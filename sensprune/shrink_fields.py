"""The field values that describe a shrunk Linen model, and a module rebuilt from them.

:func:`sensprune.shrink.shrink` runs the *original* module on narrower kernels under an
interceptor, so its fields (``features``, ``num_heads``, ...) still hold the dense sizes.
:func:`new_fields` reads, per module path, the values those fields would need for the
narrower kernels (``Shrunk.meta['fields']``, saved by ``save_shrunk``):

* ``nn.Dense`` / ``nn.Conv`` / ``nn.ConvTranspose``: ``features`` (a conv also
  ``feature_group_count`` when whole groups went);
* ``nn.DenseGeneral``: ``features``; ``nn.Einsum``: ``shape``;
* ``nn.MultiHeadDotProductAttention`` (and its subclasses): ``num_heads``,
  ``qkv_features`` and, when set, ``out_features``.

Only changed values are listed (not those of an attention's projections, which follow from
it). :func:`rebuild` turns them into a module whose plain
``apply`` (no interceptor) runs the shrunk variables: the model itself (path ``''``) is
``model.clone(**fields)``. Linen gives no way to set the fields of submodules that a compact
``__call__`` creates from its own fields, so a nested model rebuilds itself: it defines
``with_shrunk_fields(self, fields) -> nn.Module`` (the zoo ViT does); other nested models raise.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from sensprune import boxing

__all__ = ["new_fields", "rebuild"]

Fields = dict[str, dict[str, Any]]


def _kernel(module: nn.Module, *keys: str) -> tuple[int, ...]:
    tree: Any = module.variables["params"]
    for key in keys:
        tree = tree[key]
    return tuple(int(d) for d in np.shape(boxing.unbox(tree)))


def _attention(module: nn.MultiHeadDotProductAttention, inputs_q: Any) -> dict[str, Any]:
    query, out = _kernel(module, "query", "kernel"), _kernel(module, "out", "kernel")
    heads, head_dim = query[-2], query[-1]
    want: dict[str, Any] = {"num_heads": heads, "qkv_features": heads * head_dim}
    if module.out_features is not None:
        want["out_features"] = out[-1] if len(out) == 3 else out[2:]
    have = {"num_heads": module.num_heads, "qkv_features": module.qkv_features or int(np.shape(inputs_q)[-1]),
            "out_features": module.out_features}
    return {k: v for k, v in want.items() if v != have[k]}


def _fields(module: nn.Module, args: tuple) -> dict[str, Any]:
    """Changed width fields of one Linen module called with ``args`` (its stored params read)."""
    if isinstance(module, nn.MultiHeadDotProductAttention):
        return _attention(module, args[0]) if "query" in module.variables.get("params", {}) else {}
    if not module.has_variable("params", "kernel"):
        return {}
    kernel = _kernel(module, "kernel")
    want: dict[str, Any] = {}
    if isinstance(module, (nn.Dense, nn.Conv, nn.ConvTranspose)):
        want["features"] = kernel[-1]
        if isinstance(module, nn.Conv) and args:
            want["feature_group_count"] = int(np.shape(args[0])[-1]) // kernel[-2]
    elif isinstance(module, nn.DenseGeneral) and not module.batch_dims:
        n_in = 1 if isinstance(module.axis, int) else len(module.axis)
        out = kernel[n_in:]
        want["features"] = out[0] if isinstance(module.features, int) else out
    elif isinstance(module, nn.Einsum):
        want["shape"] = kernel
    have = {k: getattr(module, k) for k in want}
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in have.items()}
    return {k: v for k, v in want.items() if v != have[k]}


def new_fields(apply: Callable[..., Any], variables: Mapping[str, Any], x: Any) -> Fields:
    """Module path (``'/'``-joined, ``''`` for the model) -> changed field values, read while
    ``apply(variables, x)`` (the shrunk model) is traced abstractly (no computation)."""
    found: Fields = {}
    attention: list[str] = []

    def record(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Module) and module.scope is not None:
            call_args = args or tuple(kwargs.values())
            if isinstance(module, nn.MultiHeadDotProductAttention):
                attention.append("/".join(module.path))
            changed = _fields(module, call_args)
            if changed:
                found["/".join(module.path)] = {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(apply, variables, x)
    owners = [p + "/" if p else "" for p in attention]  # q/k/v/out widths follow from the attention's fields
    return {p: v for p, v in found.items() if not any(p.startswith(o) and p != o[:-1] for o in owners)}


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def rebuild(module: nn.Module, fields: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """A module with ``fields`` (:func:`new_fields`) set, for a plain ``apply`` on the shrunk variables.

    Raises ``ValueError`` for a nested model without ``with_shrunk_fields`` (module docstring).
    """
    if not fields:
        return module
    nested = sorted(path for path in fields if path)
    if not nested:
        return module.clone(**{k: _tuples(v) for k, v in fields[""].items()})
    hook = getattr(module, "with_shrunk_fields", None)
    if hook is None:
        raise ValueError(
            f"{type(module).__name__} creates the shrunk submodules {nested[:3]}{' ...' if len(nested) > 3 else ''} "
            "in its own code, so Linen cannot set their fields from outside; define "
            "with_shrunk_fields(self, fields) -> nn.Module on the model class (see sensprune.shrink_fields), "
            "or run Shrunk.apply (computes from the narrower kernels)"
        )
    return hook({path: {k: _tuples(v) for k, v in values.items()} for path, values in fields.items()})
