"""A small Vision Transformer (ViT) for 28x28 digit-sized images (NHWC).

Patch embedding (a ``patch x patch`` conv with stride ``patch``), a learned
class token or mean pooling over the tokens, learned position embeddings, then
``depth`` pre-norm encoder blocks::

    x = x + Attention(LayerNorm(x))      # nn.MultiHeadDotProductAttention
    x = x + MLP(LayerNorm(x))            # Dense(mlp_dim) -> gelu -> Dense(hidden)

and a final LayerNorm and a Dense classifier ``head``. No dropout, so
``train`` changes nothing (kept for the zoo's uniform call signature).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLS = ("cls", "mean")
_POS_INIT = nn.initializers.normal(stddev=0.02)


class MlpBlock(nn.Module):
    """``Dense(mlp_dim) -> gelu -> Dense(width of the input)``.

    The output width is read from the input, so a model whose residual stream
    was shrunk keeps working; the hidden units are what filter methods prune.
    """

    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x))
        return nn.Dense(width, name="fc2")(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention and MLP branches added to the stream."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(name="ln2")(x)
        return x + MlpBlock(self.mlp_dim, name="mlp")(y)


class ViT(nn.Module):
    """Vision Transformer: patchify, ``depth`` pre-norm blocks, pool, classify.

    Attributes:
      num_classes: outputs of the ``head``.
      patch_size: side of the square patches (must divide the input size).
      hidden_size: token width (divisible by ``num_heads``).
      depth: number of encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: hidden units of each block's MLP.
      pool: ``'cls'`` (a learned class token, read out at the end) or
        ``'mean'`` (average over the patch tokens).
    """

    num_classes: int
    patch_size: int = 7
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    pool: str = "cls"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout / BatchNorm
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool={self.pool!r}; allowed: {', '.join(POOLS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViT hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT patch_size={p} must divide the input size {x.shape[1:3]}")
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape((x.shape[0], -1, x.shape[-1]))
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_size))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        pos = self.param("pos_embed", _POS_INIT, (1, x.shape[1], self.hidden_size))
        x = x + pos
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
