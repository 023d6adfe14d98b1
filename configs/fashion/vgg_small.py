"""Conv-net study (issue #16, item 3): a VGG-style net (8 convs of 32-256 channels, BN, 1-channel 28x28 input) on Fashion-MNIST.

PFP against the filter baselines (ft, softnet, thinet, uniform_filters) and SiPP against WT; cascade with
short retraining, 1 net, 5 keep ratios from 70 % to 15 % of the parameters kept.

Sized for about 30 minutes on 2 idle CPU cores (measured 0.5-0.6 CPU-s per training step of 128 images,
11 CPU-s per evaluation of the 10k test set): 5 epochs on a seeded subset of 30k training images (27k
train / 3k valid), 60 retraining steps (lr 0.01) per keep ratio, |S| = 128, the full test set.
Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`; see lenet300_100.py).

Run (tables and plots under the workdir; `--study=fashion_convnets` runs this and resnet20):
  python -m experiments.reproduce --study=fashion_vgg_small --workdir=runs/studies
or the bare pipeline:
  python -m experiments.main --config=configs/fashion/vgg_small.py --workdir=runs/fashion_vgg_small
"""

from configs import common
from configs.fashion.resnet20 import study_config


def get_config():
    train = common.training(num_epochs=5, batch_size=128, learning_rate=0.05, lr_milestones=(3, 4), warmup=0,
                            momentum=0.9, weight_decay=5e-4)
    return study_config("vgg_small_bn", train)
