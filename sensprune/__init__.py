"""sensprune: provable, sensitivity-based pruning (SiPP, PFP) for JAX/Flax.

Typical use::

    import sensprune as sp
    result = sp.prune(model, variables, points, method="pfp", keep_ratio=0.3, key=key)
    tx = sp.masked(optax.sgd(0.01, momentum=0.9), result.masks)

Everything works on plain pytrees: params, masks (bool, True = kept) and
sensitivities keyed by layer name. The algorithms live in
:mod:`sensprune.methods` (one module per method family); models are run only
through :mod:`sensprune.adapter` (Linen) and :mod:`sensprune.nnx_adapter` (nnx).
"""

from sensprune import (  # noqa: F401
    boxing,  # partitioned params (nn.with_partitioning)
    points,  # the points of S as a pytree (a tuple = positional arguments)
    reach,  # reachable keep ratios
    sharding,  # data-parallel meshes
)
from sensprune.adapter import LinenAdapter, ModelAdapter, as_adapter
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
from sensprune.sharding import data_mesh
from sensprune.types import Layer, LayerSensitivity, PruneResult

# Importing the method package registers the methods; the family modules stay reachable as
# sensprune.<family> (e.g. ``from sensprune import thinet``) as well as sensprune.methods.<family>.
from sensprune import methods  # noqa: E402  isort: skip
from sensprune.methods import (  # noqa: E402,F401  isort: skip
    filter_norm,
    magnitude,
    norm_sampling,
    pfp,
    random_pruning,
    sipp,
    snip,
    svd,
    thinet,
)
from sensprune.prune import prune, search_selection  # noqa: E402  isort: skip
from sensprune import nnx  # noqa: E402,F401  isort: skip  (sensprune.nnx: Flax NNX models)
from sensprune.dependencies import DependencyMap, analyze as analyze_dependencies  # noqa: E402  isort: skip
from sensprune.shrink import (  # noqa: E402  isort: skip
    Shrunk,
    load_shrunk,
    predict_param_count,
    read_shrunk_meta,
    save_shrunk,
    shrink,
)

__version__ = "0.1.0"

__all__ = [
    "DependencyMap",
    "Layer",
    "LayerSensitivity",
    "LinenAdapter",
    "Method",
    "ModelAdapter",
    "PruneContext",
    "PruneResult",
    "Selection",
    "Shrunk",
    "analyze_dependencies",
    "apply_masks",
    "as_adapter",
    "available_methods",
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
    "load_shrunk",
    "masked",
    "method_options",
    "methods",
    "nonzero_masks",
    "ones_like_masks",
    "predict_param_count",
    "prune",
    "read_shrunk_meta",
    "register_method",
    "sample_size",
    "save_shrunk",
    "search_budget",
    "search_selection",
    "set_masks",
    "shrink",
    "validate_keep_ratio",
]
