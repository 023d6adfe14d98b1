"""The pruning methods, one module per algorithm family; importing this package registers them.

| module | registered methods |
|---|---|
| ``sipp`` | ``sipp``, ``sipp_rand``, ``sipp_hybrid``: SiPP allocation and selection |
| ``pfp`` | ``pfp``, ``pfp_rand``, ``pfp_top``: provable filter pruning |
| ``magnitude`` | ``wt``: global magnitude pruning |
| ``snip`` | ``snip``: connection sensitivity |
| ``norm_sampling`` | ``uniform``, ``norm_l1``, ``norm_l2``, ``norm_l1l2``: norm-based weight sampling |
| ``random_pruning`` | ``random`` (weights), ``uniform_filters`` (filters) |
| ``filter_norm`` | ``ft``, ``softnet``: filter pruning by L1 / L2 norm |
| ``thinet`` | ``thinet``: greedy output reconstruction |
| ``svd`` | ``svd``: low-rank factorisation |

Each module reads what it needs from a :class:`~sensprune.context.PruneContext`
and registers its select functions with :func:`sensprune.registry.register_method`.
"""

from sensprune.methods import (  # noqa: F401  (importing registers the methods)
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

__all__ = ["filter_norm", "magnitude", "norm_sampling", "pfp", "random_pruning", "sipp", "snip", "svd", "thinet"]
