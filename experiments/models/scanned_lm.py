"""A small decoder-only transformer LM built like large Flax codebases.

Params carry logical axis names (``nn.with_logical_partitioning``); the blocks
run under ``nn.scan`` (params stacked on a leading ``'layers'`` axis) with
``nn.remat``, or unrolled (``scan=False``: modules ``blocks_0``, ``blocks_1``,
...; :func:`unroll_params` maps the stacked params onto them). Attention
projections are ``nn.DenseGeneral`` over ``(heads, head_dim)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

__all__ = ["ScannedLM", "unroll_params"]


def _logical(init: Any, *names: str) -> Any:
    return nn.with_logical_partitioning(init, names)


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP; ``(x, None) -> (x, None)`` for ``nn.scan``."""

    dim: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        head_dim = self.dim // self.heads

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(scale_init=_logical(nn.initializers.ones, "embed"),
                                bias_init=_logical(nn.initializers.zeros, "embed"), name=name)

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral((self.heads, head_dim), name=name,
                                   kernel_init=_logical(nn.initializers.lecun_normal(), "embed", "heads", "kv"),
                                   bias_init=_logical(nn.initializers.zeros, "heads", "kv"))

        h = norm("ln_att")(x)
        q, k, v = proj("query")(h), proj("key")(h), proj("value")(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        att = nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), name="out",
                                kernel_init=_logical(nn.initializers.lecun_normal(), "heads", "kv", "embed"),
                                bias_init=_logical(nn.initializers.zeros, "embed"))(mixed)
        h = nn.Dense(self.mlp_dim, name="mlp_in", kernel_init=_logical(nn.initializers.lecun_normal(), "embed", "mlp"),
                     bias_init=_logical(nn.initializers.zeros, "mlp"))(norm("ln_mlp")(x))
        x = x + nn.Dense(self.dim, name="mlp_out", kernel_init=_logical(nn.initializers.lecun_normal(), "mlp", "embed"),
                         bias_init=_logical(nn.initializers.zeros, "embed"))(nn.gelu(h))
        return x, None


class ScannedLM(nn.Module):
    """Token LM: ``tokens [B, T] -> logits [B, T, vocab]``."""

    vocab: int = 32
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 64
    max_len: int = 64
    scan: bool = True
    remat: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim, name="embed",
                     embedding_init=_logical(nn.initializers.normal(1.0), "vocab", "embed"))(tokens)
        pos = self.param("pos", _logical(nn.initializers.normal(0.02), "length", "embed"), (self.max_len, self.dim))
        x = x + pos[None, : tokens.shape[1]]
        block: Any = nn.remat(Block) if self.remat else Block
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                            length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(self.dim, self.heads, self.mlp_dim, name="blocks")(x, None)
        else:
            for i in range(self.depth):
                x, _ = block(self.dim, self.heads, self.mlp_dim, name=f"blocks_{i}")(x, None)
        x = nn.LayerNorm(name="ln_final", scale_init=_logical(nn.initializers.ones, "embed"),
                         bias_init=_logical(nn.initializers.zeros, "embed"))(x)
        head_init = _logical(nn.initializers.lecun_normal(), "embed", "vocab")
        return nn.Dense(self.vocab, name="logits", kernel_init=head_init,
                        bias_init=_logical(nn.initializers.zeros, "vocab"))(x)


def unroll_params(params: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Params of ``ScannedLM(scan=True)`` as those of the same model with ``scan=False`` (unboxed)."""
    plain = meta.unbox(params)
    out = {k: v for k, v in plain.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], plain["blocks"])
    return out
