"""Worker of ``tests/test_sharding.py``: runs under
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and prints one JSON line.

Computes everything once without a mesh (default device) and once on a
4-device data mesh, and reports the largest differences and the shardings seen.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import sensprune as sp
from experiments import evaluate as E
from experiments import train as T
from experiments import train_state as S
from experiments.optim import Optimizer
from experiments.train_config import TrainConfig
from sensprune import sharding
from tests.fixtures import CNN, MLP, digits, np_init


def _max_diff(a, b) -> float:
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(diffs, default=0.0)


def _max_rel(a, b) -> float:
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y) / (np.abs(x) + 1e-6), initial=0.0)))
    return out


def _replicated(tree, mesh) -> bool:
    return all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
        for leaf in jax.tree.leaves(tree)
    )




def main(keep: dict | None = None) -> dict:
    """The checks; ``keep`` (if given) receives the state trained on the mesh."""
    out: dict = {"devices": jax.device_count()}
    mesh = sharding.data_mesh()
    out["mesh_shape"] = dict(mesh.shape)
    x, y = digits()
    s_points = x[:26]  # not a multiple of the chunk or of 4: padded chunks

    # Sensitivities (SiPP mean, PFP max) of an MLP and a CNN -------------------------
    nets = {"mlp": MLP(widths=(16,)), "cnn": CNN()}
    variables = {name: np_init(m, x[:1], seed=1) for name, m in nets.items()}
    out["sens"] = {}
    for name, model in nets.items():
        for reduction in ("mean", "max"):
            one = sp.compute_sensitivities(model, variables[name], s_points, reduction=reduction, chunk_size=10)
            many = sp.compute_sensitivities(
                model, variables[name], s_points, reduction=reduction, chunk_size=10, mesh=mesh
            )
            fused = sp.compute_sensitivities(
                model, variables[name], s_points, reduction=reduction, chunk_size=10, mesh=mesh, fused=True
            )
            out["sens"][f"{name}/{reduction}"] = {
                "max_rel": _max_rel(one, many),
                "fused_max_rel": _max_rel(one, fused),
                "fused_replicated": _replicated(fused, mesh),
                "layers": sorted(one) == sorted(many),
                "replicated": _replicated(many, mesh),
                "positive": bool(all(float(jnp.max(v.weight)) > 0 for v in one.values())),
            }

    # Masks of prune() -----------------------------------------------------------------
    cnn, cnn_vars = nets["cnn"], variables["cnn"]
    out["prune"] = {}
    results = {}
    for method in ("sipp", "pfp"):
        kw = dict(method=method, keep_ratio=0.5, key=jax.random.PRNGKey(3), chunk_size=10,
                  apply_kwargs={"train": False})
        one = sp.prune(cnn, cnn_vars, s_points, **kw)
        many = sp.prune(cnn, cnn_vars, s_points, mesh=mesh, **kw)
        results[method] = one
        same = all(bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(one.masks), jax.tree.leaves(many.masks)))
        out["prune"][method] = {"same_masks": same, "keep": [one.keep_ratio, many.keep_ratio]}

    # Sharded batch ----------------------------------------------------------------------
    bx, by = sharding.shard_batch((x[:8], y[:8]), mesh)
    out["batch"] = {
        "spec": str(bx.sharding.spec),
        "shard_shapes": sorted({tuple(s.data.shape) for s in bx.addressable_shards}),
        "label_shard_shapes": sorted({tuple(s.data.shape) for s in by.addressable_shards}),
        "num_shards": len(bx.addressable_shards),
        "devices": len(bx.sharding.device_set),
    }

    out["errors"] = {}
    for name, fn in {
        "shard_batch": lambda: sharding.shard_batch(x[:6], mesh),
        "process_rows": lambda: sharding.process_rows(mesh, 10),
        "train_batch": lambda: T.train(
            S.state_from_params(cnn, cnn_vars, Optimizer.create(TrainConfig(1, 6, 0.1), 1)),
            x[:6], y[:6], seed=0, progress=False, mesh=mesh,
        ),
    }.items():
        try:
            fn()
            out["errors"][name] = None
        except ValueError as err:
            out["errors"][name] = str(err)
    out["process_rows"] = sharding.process_rows(mesh, 8).tolist()
    padded, n = sharding.pad_to_multiple(x[:6], 4)
    out["padded"] = [int(padded.shape[0]), n, bool(np.array_equal(padded[6:], x[:1].repeat(2, 0)))]

    # 5 masked training steps of the (BatchNorm) CNN, then a pruned evaluation -------
    cfg = TrainConfig(num_epochs=1, batch_size=16, learning_rate=0.05, momentum=0.9, weight_decay=1e-4)
    train_x, train_y = x[:80], (y[:80] % 5).astype(np.int32)  # 5 steps of 16
    masks = results["sipp"].masks
    start = S.state_from_params(cnn, {**cnn_vars, "params": results["sipp"].params}, Optimizer.create(cfg, 5),
                                masks=masks)
    one = T.train(start, train_x, train_y, seed=0, progress=False)
    many = T.train(start, train_x, train_y, seed=0, progress=False, mesh=mesh)
    if keep is not None:
        keep["trained_on_mesh"] = many
    kernels_kept_zero = all(
        bool(np.all(np.asarray(p)[~np.asarray(m)] == 0))
        for p, m in zip(jax.tree.leaves(many.params), jax.tree.leaves(masks))
    )
    out["train"] = {
        "steps": [int(one.step), int(many.step)],
        "params_max_diff": _max_diff(one.params, many.params),
        "params_moved": _max_diff(start.params, one.params),
        "batch_stats_max_diff": _max_diff(one.batch_stats, many.batch_stats),
        "opt_state_max_diff": _max_diff(one.opt_state, many.opt_state),
        "state_replicated": _replicated((many.params, many.batch_stats, many.opt_state), mesh),
        "pruned_stay_zero": kernels_kept_zero,
    }
    test_x, test_y = x[100:137], (y[100:137] % 5).astype(np.int32)  # 37 examples, batch 10 -> 12 on 4 devices
    e1 = E.evaluate(one, cnn, test_x, test_y, 10)
    e4 = E.evaluate(one, cnn, test_x, test_y, 10, mesh=mesh)
    out["eval"] = {"one": e1, "many": e4}
    out["model_axis"] = _model_axis_checks(
        cnn, cnn_vars, s_points, results, start, one, (train_x, train_y, cfg), (test_x, test_y, e1)
    )
    return out


def _specs(tree) -> list[str]:
    return [str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)]


def _model_axis_checks(cnn, cnn_vars, s_points, results, start, trained_one, train_data, test_data) -> dict:
    """The same pass, prune, training and evaluation on a 2 x 2 mesh whose
    'model' axis splits params, masks and optimizer state."""
    mesh = sharding.data_mesh(model=2)
    out: dict = {"mesh_shape": dict(mesh.shape)}
    out["sens_max_rel"] = max(
        _max_rel(
            sp.compute_sensitivities(cnn, cnn_vars, s_points, reduction=red, chunk_size=10),
            sp.compute_sensitivities(cnn, cnn_vars, s_points, reduction=red, chunk_size=10, mesh=mesh, fused=fused),
        )
        for red in ("mean", "max") for fused in (False, True)
    )
    out["same_masks"] = {}
    for method in ("sipp", "pfp"):
        many = sp.prune(cnn, cnn_vars, s_points, method=method, keep_ratio=0.5, key=jax.random.PRNGKey(3),
                        chunk_size=10, apply_kwargs={"train": False}, mesh=mesh)
        out["same_masks"][method] = all(
            bool(np.array_equal(a, b))
            for a, b in zip(jax.tree.leaves(results[method].masks), jax.tree.leaves(many.masks))
        )
    train_x, train_y, cfg = train_data
    many = T.train(start, train_x, train_y, seed=0, progress=False, mesh=mesh)
    masks = many.opt_state.masks
    out["train"] = {
        "steps": int(many.step),
        "params_max_diff": _max_diff(trained_one.params, many.params),
        "batch_stats_max_diff": _max_diff(trained_one.batch_stats, many.batch_stats),
        "opt_state_max_diff": _max_diff(trained_one.opt_state, many.opt_state),
        "kernel_specs": {name: str(layer["kernel"].sharding.spec)
                         for name, layer in many.params.items() if "kernel" in layer},
        "kernel_shard_shapes": {name: sorted({tuple(s.data.shape) for s in layer["kernel"].addressable_shards})
                                for name, layer in many.params.items() if "kernel" in layer},
        "specs_match": _specs(many.params) == _specs(masks) == _specs(many.opt_state.inner_state[1][0].trace),
        "pruned_stay_zero": all(
            bool(np.all(np.asarray(p)[~np.asarray(m)] == 0))
            for p, m in zip(jax.tree.leaves(many.params), jax.tree.leaves(masks))
        ),
    }
    local = S.local_state(many)
    out["local_max_diff"] = _max_diff(trained_one.params, local.params)
    out["local_whole"] = all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(local.params), jax.tree.leaves(trained_one.params))
    )
    test_x, test_y, e1 = test_data
    out["eval"] = {"one": e1, "many": E.evaluate(trained_one, cnn, test_x, test_y, 10, mesh=mesh)}
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
    print()
