"""Pruning a scanned, partitioned transformer LM: perplexity vs. kept parameters.

  nice -n 10 python -m experiments.lm_study --workdir=runs/studies/lm
  python -m experiments.docs_lm --workdir=runs/studies/lm --out=docs/

A character-level LM (:class:`experiments.models.scanned_lm.ScannedLM`: blocks under
``nn.scan`` + ``nn.remat``, params with logical axis names) is trained on an offline text
(default: the GPL-3 text Debian ships in ``/usr/share/common-licenses``; nothing is
downloaded), then pruned by sipp, wt and pfp at several keep ratios, once without retraining
and once followed by a short masked retraining. Perplexity is measured on the last 10 % of
the text (held out). pfp prunes the scanned model itself: the channel analysis steps through
the scan body, so each slice's hidden MLP units and attention heads are groups of their own
(:mod:`sensprune.scan_flow`; the masks equal those of the unrolled copy).

Resumable: the trained params and every finished ``(method, keep ratio)`` row are kept in
``WORKDIR`` (``dense.npz``, ``results.json``); a rerun only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import traverse_util

import sensprune as sp
from experiments.models.scanned_lm import ScannedLM
from sensprune import boxing

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
METHODS = ("sipp", "wt", "pfp")
KEEP_RATIOS = (0.8, 0.6, 0.45, 0.3)


@dataclasses.dataclass(frozen=True)
class Options:
    """The study's settings (all written to ``results.json``)."""

    text: str = DEFAULT_TEXT
    seq_len: int = 32
    dim: int = 48
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 96
    batch: int = 32
    train_steps: int = 400
    retrain_steps: int = 60
    learning_rate: float = 3e-3
    num_points: int = 64
    seed: int = 0


def load_text(path: str) -> tuple[np.ndarray, list[str]]:
    """``(character ids, alphabet)`` of an offline text file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"text must be a readable file on this machine (nothing is downloaded), got {path!r}")
    text = file.read_text(encoding="utf-8", errors="replace")
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return np.asarray([index[c] for c in text], np.int32), alphabet


def windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows ``[N, seq_len + 1]`` (inputs and next-token targets)."""
    n = (len(ids) - 1) // seq_len
    return np.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def _model(opts: Options, vocab: int, scan: bool = True) -> ScannedLM:
    return ScannedLM(vocab=vocab, dim=opts.dim, depth=opts.depth, heads=opts.heads, mlp_dim=opts.mlp_dim,
                     max_len=opts.seq_len, scan=scan, remat=scan)


def _loss(model: ScannedLM, params: Any, batch: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def train(model: ScannedLM, params: Any, data: np.ndarray, steps: int, opts: Options, masks: Any = None) -> Any:
    """Adam on random windows of ``data`` (masked: pruned entries stay zero)."""
    tx = optax.adam(opts.learning_rate)
    if masks is not None:
        tx = sp.masked(tx, masks)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: _loss(model, p, batch))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(opts.seed + steps)
    for i in range(steps):
        params, state, loss = step(params, state, data[rng.integers(0, len(data), opts.batch)])
        if i % 100 == 0:
            logging.info("step %d loss %.3f", i, float(loss))
    return params


def perplexity(model: ScannedLM, params: Any, data: np.ndarray) -> float:
    """exp(mean next-character cross-entropy) over ``data``."""
    loss = jax.jit(lambda p, b: _loss(model, p, b))
    return float(np.exp(np.mean([float(loss(params, data[i : i + 64])) for i in range(0, len(data), 64)])))


def _save(path: Path, params: Any) -> None:
    flat = traverse_util.flatten_dict(boxing.unbox(params), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def _restore(path: Path, like: Any) -> Any:
    with np.load(path) as stored:
        plain = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(stored[k]) for k in stored.files})
    return boxing.rebox_like(like, plain)


def stack_masks(unrolled: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Masks of the unrolled model as masks of the scanned one (block masks stacked per step;
    e.g. to compare with a prune of the unrolled copy)."""
    out = {k: v for k, v in unrolled.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree_util.tree_map(lambda *m: jnp.stack(m), *[unrolled[f"blocks_{i}"] for i in range(depth)])
    return out


def prune_row(model, params, points, method: str, keep: float, opts: Options, vocab: int) -> dict[str, Any]:
    """One pruned model of the scanned LM: its masks and what was achieved."""
    del vocab  # the scanned model is pruned directly, every method alike
    kwargs = dict(method=method, keep_ratio=keep, key=jax.random.PRNGKey(opts.seed), chunk_size=32)
    res = sp.prune(model, {"params": params}, points, **kwargs)
    return {"masks": res.masks, "keep_ratio": res.keep_ratio, "note": ""}


def run(workdir: Path, opts: Options) -> dict[str, Any]:
    """Trains (or restores) the LM and fills in every missing row of ``results.json``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ids, alphabet = load_text(opts.text)
    data = windows(ids, opts.seq_len)
    split = int(0.9 * len(data))
    train_data, test_data = data[:split], data[split:]
    model = _model(opts, len(alphabet))
    params = model.init(jax.random.PRNGKey(opts.seed), train_data[:1, :-1])["params"]
    out_file = workdir / "results.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    if results.get("options") not in (None, dataclasses.asdict(opts)):
        raise ValueError(f"{out_file} holds a study with other options; use another --workdir")
    dense_file = workdir / "dense.npz"
    if dense_file.exists():
        params = _restore(dense_file, params)
    else:
        start = time.time()
        params = train(model, params, train_data, opts.train_steps, opts)
        _save(dense_file, params)
        results["train_seconds"] = round(time.time() - start, 1)
    results.update(options=dataclasses.asdict(opts), vocab=len(alphabet), windows=[len(train_data), len(test_data)],
                   dense_params=sp.counting.count_params(boxing.unbox(params)))
    results["dense_ppl"] = perplexity(model, params, test_data)
    if "dense_ppl_continued" not in results:  # the baseline of the retrained rows: as many more dense steps
        continued = train(model, params, train_data, opts.retrain_steps, opts)
        results["dense_ppl_continued"] = perplexity(model, continued, test_data)
    rows = results.setdefault("rows", {})
    points = train_data[: opts.num_points, :-1]
    for method in METHODS:
        for keep in KEEP_RATIOS:
            key = f"{method}@{keep}"
            if key in rows:
                continue
            start = time.time()
            try:
                got = prune_row(model, params, points, method, keep, opts, len(alphabet))
            except ValueError as err:  # an unreachable ratio: recorded with the reason
                rows[key] = {"method": method, "target": keep, "refused": str(err).split(". ")[0]}
            else:
                pruned = sp.apply_masks(params, got["masks"])
                retrained = train(model, pruned, train_data, opts.retrain_steps, opts, masks=got["masks"])
                rows[key] = {
                    "method": method, "target": keep, "keep_ratio": round(float(got["keep_ratio"]), 4),
                    "kept_params": sp.counting.count_nonzero(boxing.unbox(retrained)),
                    "ppl_pruned": perplexity(model, pruned, test_data),
                    "ppl_retrained": perplexity(model, retrained, test_data),
                    "note": got["note"], "seconds": round(time.time() - start, 1),
                }
            logging.info("%s: %s", key, rows[key])
            out_file.write_text(json.dumps(results, indent=1, sort_keys=True))
    out_file.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", "runs/studies/lm", "where the study keeps its outputs")
    flags.DEFINE_string("text", DEFAULT_TEXT, "an offline text file (character-level LM)")
    flags.DEFINE_integer("train_steps", Options.train_steps, "training steps of the dense LM")


def main(argv: list[str]) -> None:
    del argv
    run(Path(FLAGS.workdir), Options(text=FLAGS.text, train_steps=FLAGS.train_steps))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
