"""Reference experiment: resnet56 on CIFAR-10. Needs CIFAR-10 (cifar-10-batches-py/ in --config.dataset.data_dir, or tfds).

Run:
  python -m experiments.main --config=configs/cifar/resnet56.py --workdir=runs/cifar_resnet56
"""

from configs import common


def get_config():
    train = common.training(**common.CIFAR_RESNET)
    return common.experiment(
        network="resnet56", dataset="cifar10", train=train, retrain_overrides=dict(num_epochs=182),
        methods=common.ORIGINAL_METHODS, spacing=[common.geometric(0.99, 0.855, 2), common.geometric(0.85, 0.02, 58)],
        mode="cascade", retrain_iterations=20, num_nets=3, delta_s=1e-16, plot_min=0.02, plot_max=0.85)
