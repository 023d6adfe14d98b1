"""sensprune: provable, sensitivity-based pruning (SiPP, PFP) for JAX/Flax.

Typical use::

    import sensprune as sp
    result = sp.prune(model, variables, points, method="pfp", keep_ratio=0.3, key=key)
    tx = sp.masked(optax.sgd(0.01, momentum=0.9), result.masks)

Everything works on plain pytrees: params, masks (bool, True = kept) and
sensitivities keyed by layer name.
"""

from sensprune.budget import search_budget, validate_keep_ratio
from sensprune.context import PruneContext
from sensprune.counting import (
    count_nonzero,
    count_params,
    dense_flops,
    flops,
    layer_nonzero,
    sample_size,
)
from sensprune.layers import capture_inputs, find_layers
from sensprune.masking import (
    apply_masks,
    check_same_structure,
    get_masks,
    intersect_masks,
    masked,
    nonzero_masks,
    ones_like_masks,
    set_masks,
)
from sensprune.registry import Method, Selection, available_methods, get_method, method_options, register_method
from sensprune.sensitivity import compute_sensitivities, layer_sensitivity
from sensprune import sharding  # noqa: E402  (data-parallel meshes: sensprune.sharding)
from sensprune.sharding import data_mesh

# Importing the method modules registers them.
from sensprune import filter_norm, magnitude, norm_sampling, pfp, random_pruning, sipp, snip, svd, thinet  # noqa: F401  isort: skip
from sensprune.prune import prune, search_selection  # isort: skip
from sensprune import nnx  # noqa: F401,E402  isort: skip  (sensprune.nnx: Flax NNX models)
from sensprune.types import Layer, LayerSensitivity, PruneResult
from sensprune.dependencies import DependencyMap, analyze as analyze_dependencies  # noqa: E402  isort: skip
from sensprune.shrink import Shrunk, load_shrunk, predict_param_count, read_shrunk_meta, save_shrunk, shrink  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = [
    "DependencyMap",
    "Shrunk",
    "analyze_dependencies",
    "load_shrunk",
    "predict_param_count",
    "read_shrunk_meta",
    "save_shrunk",
    "shrink",
    "Layer",
    "LayerSensitivity",
    "Method",
    "PruneContext",
    "PruneResult",
    "Selection",
    "apply_masks",
    "available_methods",
    "method_options",
    "capture_inputs",
    "check_same_structure",
    "compute_sensitivities",
    "count_nonzero",
    "count_params",
    "data_mesh",
    "dense_flops",
    "find_layers",
    "flops",
    "get_masks",
    "get_method",
    "intersect_masks",
    "layer_nonzero",
    "layer_sensitivity",
    "masked",
    "nonzero_masks",
    "ones_like_masks",
    "prune",
    "register_method",
    "sample_size",
    "search_budget",
    "search_selection",
    "set_masks",
    "validate_keep_ratio",
]
