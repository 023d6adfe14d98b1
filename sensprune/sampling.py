"""Importance sampling with reweighting, and the sample-size relations it needs.

Sampling methods draw ``m`` items with replacement from a distribution ``p`` over
the entries of a row (weights of an output neuron, or input channels of a layer),
keep the items drawn at least once and rescale each kept item by
``count / (m * p)``, which makes the reweighted row an unbiased estimate of the
original one.

Budgets count *distinct* kept items, so two relations between the number of
draws ``m`` and the expected number of distinct items are needed:

    E[#unique](m) = sum_j 1 - (1 - p_j)^m.

``draws_for_unique`` inverts it (SiPP: budget -> draws) by vectorised bisection;
``expected_unique`` evaluates it (PFP: draws -> budget).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def expected_unique(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Expected distinct items after ``m`` draws from each row of ``p``.

    Args:
      p: probabilities, shape ``[rows, n]`` (rows sum to 1 or are all zero).
      m: number of draws per row, shape ``[rows]`` (float allowed).

    Returns:
      Shape ``[rows]``.
    """
    p = np.asarray(p, np.float64)
    m = np.asarray(m, np.float64)
    # (1 - p)^m computed as exp(m * log1p(-p)) for accuracy at small p.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_miss = np.log1p(-np.minimum(p, 1.0))
        hit = np.where(p > 0, 1.0 - np.exp(np.minimum(m, 1e300)[:, None] * log_miss), 0.0)
    return np.sum(hit, axis=-1)


def draws_for_unique(p: np.ndarray, target: np.ndarray, iters: int = 50) -> np.ndarray:
    """Number of draws whose expected distinct count equals ``target``.

    Solves ``expected_unique(p, m) = target`` for every row with Newton's
    method started at ``m = target``: the function is concave and increasing in
    ``m``, so the iterates approach the root monotonically from below. The
    target is capped at ``support - 1`` (the expectation reaches the full
    support only as m -> inf); rows whose target is below 1 or whose support
    is empty get 0 draws.

    Args:
      p: probabilities ``[rows, n]``.
      target: desired distinct counts ``[rows]``.
      iters: Newton steps at most.

    Returns:
      Integer draws ``[rows]`` (ceil of the real solution).
    """
    p = np.asarray(p, np.float64)
    support = np.sum(p > 0, axis=-1)
    target = np.minimum(np.asarray(target, np.float64), np.maximum(support - 1, 0))
    active = target >= 1
    target = np.where(active, target, 1.0)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.minimum(p, 1.0))  # <= 0; -inf where p == 1
    log_miss = np.where(np.isfinite(log_miss), log_miss, -1e300)
    m = target.copy()
    for _ in range(iters):
        miss = np.exp(m[:, None] * log_miss)
        gap = target - np.sum(1.0 - miss, axis=-1)
        todo = active & (gap > 1e-9 * target)
        if not np.any(todo):
            break
        slope = -np.sum(log_miss * miss, axis=-1)
        m = np.where(todo, m + gap / np.maximum(slope, 1e-300), m)
    draws = np.ceil(m - 1e-6)
    return np.where(active, draws, 0).astype(np.int64)


def key_words(key: jax.Array) -> tuple[int, ...]:
    """The bits of a ``jax.random`` key (raw or typed) as Python ints, to seed NumPy streams."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return tuple(int(v) for v in np.asarray(key, np.uint32).ravel())


def rng_from_key(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by a ``jax.random`` key (same key, same stream)."""
    return np.random.default_rng(list(key_words(key)))


def split_key(key: jax.Array | None, count: int) -> list[np.ndarray]:
    """``count`` independent seeds for :func:`sample_counts` derived from ``key`` on the host
    (``None``: ``PRNGKey(0)``'s data): the key's words plus the index, no ``jax.random.split``
    program to compile. Same key, same seeds."""
    base = np.zeros(2, np.uint32) if key is None else np.asarray(key_words(key), np.uint32)
    return [np.concatenate([base, np.array([0x9E3779B9, i], np.uint32)]) for i in range(count)]


def sample_counts(key: jax.Array, p: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Multinomial counts for each row: ``counts[r] ~ Multinomial(draws[r], p[r])``.

    Runs on the host (allocation is host-side, and row sizes vary), seeded by
    ``key`` so that the same key always gives the same counts.
    """
    p = np.asarray(p, np.float64)
    draws = np.asarray(draws, np.int64)
    total = p.sum(-1, keepdims=True)
    safe = np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / p.shape[-1])
    counts = rng_from_key(key).multinomial(np.maximum(draws, 0), safe)
    return np.where(draws[..., None] > 0, counts, 0).astype(np.float64)


def reweight_factors(counts: np.ndarray, p: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Importance weights ``count / (m * p)``; 0 where nothing was drawn."""
    counts = np.asarray(counts, np.float64)
    denom = np.asarray(draws, np.float64)[..., None] * np.asarray(p, np.float64)
    return np.where((counts > 0) & (denom > 0), counts / np.where(denom > 0, denom, 1.0), 0.0)
