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

import re
from typing import Any, Mapping, Optional

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
    qkv_features: Optional[int] = None  # None: the input width

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.qkv_features, name="attn"
        )(y, y)
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
      block_heads, block_mlp_dims: per-block head counts and MLP widths of a
        filter-pruned ViT (``None``: ``num_heads`` / ``mlp_dim`` in every block;
        each head keeps ``hidden_size // num_heads`` dims); see
        :meth:`with_shrunk_fields`.
    """

    num_classes: int
    patch_size: int = 7
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    pool: str = "cls"
    block_heads: Optional[tuple[int, ...]] = None
    block_mlp_dims: Optional[tuple[int, ...]] = None

    def with_shrunk_fields(self, fields: Mapping[str, Mapping[str, Any]]) -> "ViT":
        """This ViT with the per-block widths of a shrunk one (``Shrunk.meta['fields']``:
        ``'block{i}/attn'``: ``num_heads``, ``'block{i}/mlp/fc1'``: ``features``); its plain
        ``apply`` runs the shrunk variables. Any other changed field is a ``ValueError``."""
        heads = list(self.block_heads or (self.num_heads,) * self.depth)
        mlp = list(self.block_mlp_dims or (self.mlp_dim,) * self.depth)
        for path, values in fields.items():
            m = re.fullmatch(r"block(\d+)/(attn|mlp/fc1)", path)
            if m is None or set(values) - {"num_heads", "qkv_features", "features"}:
                raise ValueError(f"ViT.with_shrunk_fields: {path!r} {dict(values)} cannot be expressed by ViT fields")
            i = int(m.group(1))
            if m.group(2) == "attn":
                heads[i] = int(values.get("num_heads", heads[i]))
            elif m.group(2) == "mlp/fc1":
                mlp[i] = int(values["features"])
        return self.clone(block_heads=tuple(heads), block_mlp_dims=tuple(mlp))

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
        head_dim = self.hidden_size // self.num_heads
        heads = self.block_heads or (self.num_heads,) * self.depth
        mlp = self.block_mlp_dims or (self.mlp_dim,) * self.depth
        if len(heads) != self.depth or len(mlp) != self.depth:
            raise ValueError(f"ViT block_heads={self.block_heads} / block_mlp_dims={self.block_mlp_dims} must have "
                             f"depth={self.depth} entries")
        for i in range(self.depth):
            qkv = None if heads[i] == self.num_heads else heads[i] * head_dim
            x = EncoderBlock(heads[i], mlp[i], qkv_features=qkv, name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
