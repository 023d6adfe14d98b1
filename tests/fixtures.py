"""Small models and data shared by the pruning tests (a plain module, not a conftest).

- ``MLP`` / ``CNN``: tiny Flax nets over sklearn's 8x8 digits.
- ``digits()``: the digits set as NHWC float32 images in about [-0.3, 0.7] and int32 labels.
- ``np_init``: variables filled from NumPy (no XLA RNG compiles).
- ``mlp()``: an untrained ``MLP`` with ``np_init`` variables.
- ``trained_mlp()``: an ``MLP`` trained on the digits.
- ``Compiles``: records the XLA programs compiled while active (names, and the compiling threads).

The loaders are cached, so every test in a process shares one copy.
"""

import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits


class MLP(nn.Module):
    widths: tuple = (48, 32)
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.classes)(x)


class CNN(nn.Module):
    """conv-BN-relu, strided VALID conv, bias-free conv (``dilation``), global mean, dense."""

    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.relu(nn.Conv(12, (3, 3), strides=2, padding="VALID")(x))
        x = nn.Conv(16, (3, 3), kernel_dilation=self.dilation, use_bias=False)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(5)(x)


def np_init(model, x, seed=0):
    """Variables of ``model`` filled with numpy (fan-in scaled normal kernels): no XLA RNG compiles."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
        if name == "bias":
            return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def digits():
    x, y = load_digits(return_X_y=True)
    return ((x / 16.0) - 0.3).astype(np.float32).reshape(-1, 8, 8, 1), y.astype(np.int32)


@functools.lru_cache(maxsize=None)
def mlp():
    x, _ = digits()
    model = MLP()
    return model, np_init(model, x[:1], seed=0)


@functools.lru_cache(maxsize=None)
def trained_mlp():
    """An MLP trained for a few hundred Adam steps on sklearn digits (~97% train acc)."""
    x, y = digits()
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        loss, g = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()
        )(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, 1400, 64)
        params, opt, _ = step(params, opt, x[idx], y[idx])
    return model, {"params": params}


class Compiles:
    """Names of the XLA programs compiled while active (``jax.monitoring`` compile events, from any
    thread), and the name of the thread that compiled each."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.names = []
        self.threads = []

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))
            self.threads.append(threading.current_thread().name)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
