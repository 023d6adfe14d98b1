"""Reference experiment: vgg16_bn_imagenet on ImageNet. Needs ImageNet prepared for tensorflow-datasets (imagenet2012) in --config.dataset.data_dir.

Run:
  python -m experiments.main --config=configs/imagenet/vgg16_bn.py --workdir=runs/imagenet_vgg16_bn
"""

from configs import common


def get_config():
    train = common.training(**common.IMAGENET_VGG)
    return common.experiment(
        network="vgg16_bn_imagenet", dataset="tfds:imagenet2012", train=train,
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.80, 0.10, 10)],
        mode="cascade", retrain_iterations=-1, num_nets=1, delta_s=1e-16, plot_min=0.1, plot_max=0.9)
