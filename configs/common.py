"""Building blocks shared by the experiment configs (configs are data)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ml_collections

from experiments import train_config


def training(**fields: Any) -> ml_collections.ConfigDict:
    """A training schedule: every field of ``experiments.train_config.TrainConfig``,
    ``fields`` over its defaults (the one set of training defaults). ``num_epochs``,
    ``batch_size`` and ``learning_rate`` are required; ``max_steps_per_epoch=-1``
    means no cap (smoke tests set a small number)."""
    return train_config.config_dict(**fields)


def geometric(max_val: float, min_val: float, num: int) -> dict[str, Any]:
    return dict(type="geometric", num_intervals=num, max_val=max_val, min_val=min_val)


def manual(*values: float) -> dict[str, Any]:
    return dict(type="manual", values=list(values))


def linear(max_val: float, min_val: float, num: int) -> dict[str, Any]:
    return dict(type="linear", num_intervals=num, max_val=max_val, min_val=min_val)


def experiment(
    *,
    network: str,
    dataset: str,
    train: ml_collections.ConfigDict,
    retrain_overrides: Optional[dict[str, Any]] = None,
    methods: Sequence[str],
    spacing: Sequence[dict[str, Any]],
    mode: str = "cascade",
    retrain_iterations: int = -1,
    num_nets: int = 1,
    num_repetitions: int = 1,
    delta_s: float = 1e-16,
    c_constant: float = 3.0,
    plot_min: float = 0.02,
    plot_max: float = 0.85,
    data_dir: Optional[str] = None,
    image_size: int = -1,
    eval_batch_size: int = 500,
    method_options: Optional[dict[str, dict[str, Any]]] = None,
) -> ml_collections.ConfigDict:
    """The full experiment config; every field can be overridden with --config.x=y.

    List fields take comma-separated values on the command line:
    ``--config.experiments.methods=sipp,pfp,wt`` (unknown names are refused,
    listing the allowed ones), ``--config.experiments.spacing=0.5,0.2,0.1``
    (these keep ratios, a manual spacing) and
    ``--config.training.lr_milestones=30,60`` (Python tuples such as
    ``"('sipp', 'pfp')"`` work too).
    """
    retrain = ml_collections.ConfigDict(train.to_dict())
    retrain.update(retrain_overrides or {})
    config = ml_collections.ConfigDict()
    config.network = network
    config.seed = 0
    # PRNG implementation of every key of the run (experiments.rng.make_key): "rbg" compiles much
    # faster than "threefry2x32" on CPU when initialising large models; deterministic either way.
    config.prng_impl = "rbg"
    config.dataset = ml_collections.ConfigDict(
        # image_size: square input size; -1 = native (in memory) or 224 (streamed, e.g. ImageNet:
        # resized and cropped while decoding).
        dict(name=dataset, data_dir=data_dir or "", valid_fraction=0.1, max_train=-1, max_test=-1,
             image_size=image_size)
    )
    config.training = train
    # Start from a trained network instead of training it (experiments/pretrained.py, docs/pretrained.md): a
    # checkpoint dir, .npz or PyTorch .pth; init_finetune=True trains num_epochs from it instead of skipping.
    config.training.init_from = ""
    config.training.init_finetune = False
    config.retraining = retrain
    config.experiments = ml_collections.ConfigDict(
        dict(
            methods=tuple(methods),
            mode=mode,
            num_nets=num_nets,
            num_repetitions=num_repetitions,
            spacing=tuple(dict(s) for s in spacing),
            retrain_iterations=retrain_iterations,
            plotting=dict(min_val=plot_min, max_val=plot_max),
            # Method name -> its select options (sensprune.method_options), e.g.
            # {"ft": {"joint": "mean", "round_to": 8}} for hardware-aligned filter counts.
            method_options={m: dict(o) for m, o in (method_options or {}).items()},
        )
    )
    config.coresets = ml_collections.ConfigDict(
        # zero_dead: the reference's data-dependent zeroing inside the keep-ratio search (sensprune.zeroing)
        dict(delta_s=delta_s, c_constant=c_constant, size=-1, chunk_size=32, zero_dead=True)
    )
    config.eval_batch_size = eval_batch_size
    # Data-parallel devices: -1 = every device (of every process), n = the first n. Batch sizes
    # must be multiples of it. Runtime only: a run may resume with another value.
    config.mesh_devices = -1
    # Size of a 'model' mesh axis that params, masks and optimizer state are split over (FSDP-style,
    # each device stores 1/mesh_model of them); 1 = replicated. Must divide the device count.
    config.mesh_model = 1
    # The sensitivity pass as one compiled program (one dispatch per pass; faster for small nets on
    # accelerators, longer compiles). Same results; runtime only.
    config.fused_pass = False
    # JAX's persistent compilation cache (set once at start-up by experiments.main): a later run
    # loads the compiled sensitivity kernels / train steps instead of compiling them. "" = off.
    # Runtime only.
    config.compilation_cache_dir = "~/.cache/sensprune/jax"
    # Multi-host (TPU pods, GPU clusters): call jax.distributed.initialize() on every host.
    config.multihost = False
    # Its arguments where the cluster environment does not provide them (a manually launched GPU
    # cluster): "" / 0 / -1 = detect from the environment (TPU, SLURM, Open MPI, ...).
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return config


# Method lists of the reference's experiment files (display names in parentheses):
# PFPNet (pfp), FilterThresNet (ft), SiPPNet (sipp), ThresNet (wt), SnipNet (snip).
ORIGINAL_METHODS = ("pfp", "ft", "sipp", "wt", "snip")
SIPP_METHODS = ("sipp", "sipp_rand", "sipp_hybrid", "wt", "snip")
ALL_METHODS = ("sipp", "sipp_rand", "sipp_hybrid", "pfp", "pfp_rand", "pfp_top", "wt", "snip", "uniform", "norm_l1",
               "norm_l2", "norm_l1l2", "random", "ft", "softnet", "thinet", "uniform_filters", "svd")
PFP_METHODS = ("pfp", "ft", "softnet", "thinet")

# Reference training schedules (torchprune_reference.md, section 2).
CIFAR_RESNET = dict(num_epochs=182, batch_size=128, learning_rate=0.1, lr_milestones=(91, 136), lr_gamma=0.1,
                    warmup=5, momentum=0.9, weight_decay=1e-4, augment="cifar")
CIFAR_VGG = dict(num_epochs=300, batch_size=256, learning_rate=0.05, lr_milestones=tuple(range(30, 300, 30)),
                 lr_gamma=0.5, warmup=10, momentum=0.9, weight_decay=5e-4, augment="cifar")
CIFAR_WRN = dict(num_epochs=200, batch_size=128, learning_rate=0.1, lr_milestones=(60, 120, 160), lr_gamma=0.2,
                 warmup=5, momentum=0.9, nesterov=True, weight_decay=5e-4, augment="cifar")
CIFAR_DENSENET = dict(num_epochs=300, batch_size=64, learning_rate=0.1, lr_milestones=(150, 225), lr_gamma=0.1,
                      warmup=10, momentum=0.9, nesterov=True, weight_decay=1e-4, augment="cifar")
IMAGENET_RESNET = dict(num_epochs=90, batch_size=256, learning_rate=0.1, lr_milestones=(30, 60, 80), lr_gamma=0.1,
                       warmup=5, momentum=0.9, weight_decay=1e-4, augment="imagenet")
IMAGENET_VGG = dict(num_epochs=90, batch_size=16, learning_rate=0.01, lr_milestones=(30, 60, 80), lr_gamma=0.1,
                    warmup=5, momentum=0.9, weight_decay=5e-4, augment="imagenet")
IMAGENET_WRN = dict(num_epochs=90, batch_size=128, learning_rate=0.1, lr_milestones=(30, 60, 80), lr_gamma=0.1,
                    warmup=5, momentum=0.9, nesterov=True, weight_decay=5e-4, augment="imagenet")
MNIST_LENET = dict(num_epochs=40, batch_size=64, learning_rate=0.01, lr_milestones=(30, 45), lr_gamma=0.1,
                   warmup=0, momentum=0.9, weight_decay=1e-4)
