"""PRNG keys with an explicit implementation (no global ``jax_default_prng_impl``).

Experiment configs name the implementation in ``config.prng_impl`` ("rbg" in
``configs.common``: much faster than threefry to compile on CPU when
initialising large models; deterministic). Every key of a run is made here, so
nothing changes JAX's global configuration at run time.
"""

from __future__ import annotations

from typing import Optional

import jax

__all__ = ["PRNG_IMPLS", "check_prng_impl", "make_key"]

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def check_prng_impl(impl: Optional[str], field: str = "config.prng_impl") -> Optional[str]:
    """``impl`` if it is ``None`` / ``""`` (JAX's default) or one of :data:`PRNG_IMPLS`."""
    if impl in (None, ""):
        return None
    if impl not in PRNG_IMPLS:
        raise ValueError(f"{field}={impl!r}: expected one of {list(PRNG_IMPLS)} (or '' for JAX's default)")
    return str(impl)


def make_key(seed: int, impl: Optional[str] = None) -> jax.Array:
    """A typed PRNG key of ``seed`` with implementation ``impl`` (``None`` / ``""``:
    JAX's default). ``make_key(s, "rbg")`` holds the same bits as
    ``jax.random.PRNGKey(s)`` under ``jax_default_prng_impl="rbg"``."""
    return jax.random.key(int(seed), impl=check_prng_impl(impl, "argument impl"))
