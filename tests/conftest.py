"""Test-wide JAX settings."""

import os

# Tests compile many small programs once each: cheaper LLVM optimisation makes XLA's CPU
# compiles much faster, at a small cost in run time (set before JAX creates its backend).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (
        _flags + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()

import jax  # noqa: E402

# The counter-based 'rbg' generator compiles far faster on CPU than threefry for model
# initialisation (experiment configs name it explicitly: config.prng_impl, experiments.rng).
jax.config.update("jax_default_prng_impl", "rbg")

