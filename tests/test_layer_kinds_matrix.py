"""The acceptance matrix of issue #15, completed: every registered method on the nnx equivalents
of the tied-embedding model and of the ConvTranspose decoder (the Linen models, the nnx attention
block and the nnx depthwise block run in tests/test_layer_kinds.py). Weight methods reach the keep
ratio within 0.5 %, filter methods where the granularity allows (else ``reachable=False``), pruned
entries are exactly zero, and the masks cover the new kinds."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import sensprune.nnx as spx
from sensprune import registry
from tests.test_layer_kinds import nnx_prune_every_method

_RNG = np.random.default_rng(11)


class NNXTiedLM(nnx.Module):
    """Input and output embeddings tied: ``Embed.attend`` is the output projection."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(40, 16, rngs=rngs)
        self.mid = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, tok):
        return self.emb.attend(nnx.relu(self.mid(self.emb(tok)))).mean(1)


class NNXDecoder(nnx.Module):
    """Dense -> ConvTranspose (stride 2, transposed kernel) -> Conv."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(7, 64, rngs=rngs)
        self.up = nnx.ConvTranspose(4, 6, (3, 3), strides=(2, 2), transpose_kernel=True, rngs=rngs)
        self.out = nnx.Conv(6, 3, (3, 3), rngs=rngs)

    def __call__(self, z):
        x = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, 4)
        x = self.out(nnx.relu(self.up(x)))
        return x.reshape(x.shape[0], -1)[:, :5]


CASES = {
    "tied": (NNXTiedLM, _RNG.integers(0, 40, (16, 5)), {"emb": ("embedding", (40, 16))}),
    "convtranspose": (NNXDecoder, _RNG.normal(size=(16, 7)).astype(np.float32), {"up": ("kernel", (3, 3, 6, 4))}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_every_method_runs(case):
    cls, data, new_kind = CASES[case]
    model = cls(nnx.Rngs(0))
    names = {layer.name for layer in spx.find_layers(model, data)}
    assert set(new_kind) <= names
    for method, result in nnx_prune_every_method(model, data).items():
        for name, (leaf, shape) in new_kind.items():
            mask = np.asarray(result.masks[name][leaf].get_value())
            assert mask.shape == shape
            if not registry.get_method(method).structured and method != "svd":
                assert name not in result.info["dense_layers"] and not mask.all(), method  # scored and pruned
