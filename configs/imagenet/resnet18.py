"""Reference experiment: resnet18 on ImageNet. Needs ImageNet prepared for tensorflow-datasets (imagenet2012) in --config.dataset.data_dir.

Run:
  python -m experiments.main --config=configs/imagenet/resnet18.py --workdir=runs/imagenet_resnet18
"""

from configs import common


def get_config():
    train = common.training(**common.IMAGENET_RESNET)
    return common.experiment(
        network="resnet18", dataset="tfds:imagenet2012", train=train,
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.90, 0.35, 12), common.linear(0.31, 0.10, 6)],
        mode="cascade", retrain_iterations=-1, num_nets=1, delta_s=1e-16, plot_min=0.1, plot_max=0.9)
