"""The points of S as a pytree: models called with several inputs.

The rule (used by :func:`sensprune.prune`, the sensitivity pass, layer
discovery and capture):

* an **array** ``[N, ...]`` is one argument: ``model.apply(variables, x)``;
* a **tuple** is the *positional arguments* of ``__call__``: points
  ``(inputs, targets)`` run as ``model.apply(variables, inputs, targets)``.
  Each element may itself be any pytree (array, dict, namedtuple);
* any other pytree (a **dict**, a namedtuple, a dataclass) is one argument,
  e.g. a batch dict ``model.apply(variables, {'image': ..., 'label': ...})``;
* a **list** is a list of batches of the above (concatenated along the
  leading axis); :func:`batches` spells it explicitly.

Every array leaf of one batch shares the leading (batch) axis; slicing a
point takes that index of every leaf. Keyword arguments of ``__call__`` that
are not per-point (``train=False``) go in ``apply_kwargs``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_args", "as_points", "batches", "chunks", "concat", "num_points", "take"]


class _Batches(list):
    """A list of batches, spelled explicitly (see :func:`batches`)."""


def batches(items: Iterable[Any]) -> list:
    """Marks ``items`` as a list of batches of points (each an array, a tuple of arguments or a pytree)."""
    return _Batches(items)


def as_args(x: Any) -> tuple:
    """The positional arguments of the model call for points ``x``: a tuple is spread, anything else is one."""
    return x if type(x) is tuple else (x,)


def _leaves(x: Any) -> list:
    return jax.tree_util.tree_leaves(x)


def num_points(x: Any, what: str = "data") -> int:
    """The shared leading size of every leaf of one batch of points; ``ValueError`` when they differ."""
    leaves = _leaves(x)
    if not leaves:
        raise ValueError(f"{what} holds no arrays")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if -1 in sizes:
        raise ValueError(f"{what}: every array must have a leading batch axis (got a scalar)")
    if len(sizes) > 1:
        shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        raise ValueError(
            f"{what}: the arrays of the points must share the leading (batch) axis, got shapes {shapes}. "
            "A tuple of points is the positional arguments of the model's __call__ (one array per "
            "argument, all with N points); pass a list for a list of batches"
        )
    return sizes.pop()


def take(x: Any, start: int, stop: int) -> Any:
    """Points ``start:stop`` of every leaf."""
    return jax.tree_util.tree_map(lambda a: a[start:stop], x)


def concat(parts: Sequence[Any]) -> Any:
    """Batches of points joined along the leading axis (numpy when all are numpy)."""
    if len(parts) == 1:
        return parts[0]

    def join(*leaves):
        if all(isinstance(a, np.ndarray) for a in leaves):
            return np.concatenate(leaves)
        return jnp.concatenate(leaves)

    return jax.tree_util.tree_map(join, *parts)


def _is_single(data: Any) -> bool:
    return not isinstance(data, list) and not (
        isinstance(data, Iterable) and not isinstance(data, (tuple, dict, np.ndarray, jax.Array))
        and not hasattr(data, "__dataclass_fields__") and not _is_mapping(data)
    )


def _is_mapping(data: Any) -> bool:
    from collections.abc import Mapping

    return isinstance(data, Mapping)


def as_points(data: Any, what: str = "data") -> Any:
    """The points of S as one host batch (numpy leaves), after checking the leaves share the batch axis."""
    if isinstance(data, list):
        if not data:
            raise ValueError(f"{what} is an empty list of batches")
        for i, part in enumerate(data):
            num_points(part, f"{what}[{i}]")
        structures = {jax.tree_util.tree_structure(part) for part in data}
        if len(structures) > 1:
            listed = sorted(map(str, structures))
            raise ValueError(f"{what}: the batches of the list have different structures {listed}")
        data = concat([jax.tree_util.tree_map(np.asarray, part) for part in data])
    else:
        data = jax.tree_util.tree_map(np.asarray, data)
    n = num_points(data, what)
    if n == 0:
        raise ValueError(f"{what} must hold at least one point (got N = 0)")
    return data


def chunks(data: Any, size: int) -> Iterator[Any]:
    """Fixed-size chunks of points; the last one is padded by repeating its first point.

    ``data``: one batch (array, tuple of arguments, pytree) or a list / iterable
    of batches.
    """
    if _is_single(data):
        n = num_points(data)
        if n == 0:
            raise ValueError("data must hold at least one point (got an empty array)")
        size = min(size, n)
        parts: Iterable[Any] = [data]
    else:
        parts = data
    pending: list[Any] = []
    held = 0
    for part in parts:
        if not _leaves(part) or any(np.ndim(a) == 0 for a in _leaves(part)):
            raise ValueError(
                "data must be an array [N, ...] (or a tuple / pytree of them) or an iterable of such batches, "
                f"got {type(part).__name__}"
            )
        pending.append(part)
        held += num_points(part)
        if held < size:
            continue
        joined = concat(pending)
        full = held - held % size
        for start in range(0, full, size):
            yield take(joined, start, start + size)
        pending = [take(joined, full, held)] if held > full else []
        held -= full
    if held:
        rest = concat(pending)
        yield concat([rest] + [take(rest, 0, 1)] * (size - held))


def check_arity(model: Any, method: Any, x: Any) -> None:
    """Raises ``ValueError`` when tuple points have more arguments than the called method takes."""
    import inspect

    if type(x) is not tuple:
        return
    fn = getattr(model, method) if isinstance(method, str) else (method or getattr(model, "__call__", None))
    if fn is None:
        return
    try:
        signature = inspect.signature(fn)
        if method is not None and not isinstance(method, str):  # an unbound function: (module, *args)
            signature.bind(model, *x)
        else:
            signature.bind(*x)
    except (TypeError, ValueError) as err:
        if "missing" in str(err):  # fewer arguments than parameters: let the model say what it needs
            return
        raise ValueError(
            f"data: a tuple of points is the positional arguments of {type(model).__name__}'s call, but it "
            f"does not take {len(x)} ({err}). Data must be an array [N, ...], a tuple of one array per "
            "argument, a pytree (one argument), or an iterable of arrays (a list of batches)"
        ) from None
