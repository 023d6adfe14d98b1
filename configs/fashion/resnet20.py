"""Conv-net study (issue #16, item 3): ResNet20 with a 1-channel 28x28 input on Fashion-MNIST.

PFP against the filter baselines (ft, softnet, thinet, uniform_filters) and SiPP against WT; cascade with
short retraining, 1 net, 5 keep ratios from 70 % to 15 % of the parameters kept.

Sized for about 30 minutes on 2 idle CPU cores (measured 0.5-0.6 CPU-s per training step of 128 images,
11 CPU-s per evaluation of the 10k test set): 5 epochs on a seeded subset of 30k training images (27k
train / 3k valid), 60 retraining steps (lr 0.01) per keep ratio, |S| = 128, the full test set.
Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`; see lenet300_100.py).

Run (tables and plots under the workdir; `--study=fashion_convnets` runs this and vgg_small):
  python -m experiments.reproduce --study=fashion_resnet20 --workdir=runs/studies
or the bare pipeline:
  python -m experiments.main --config=configs/fashion/resnet20.py --workdir=runs/fashion_resnet20
"""

from configs import common

# The methods of the conv-net comparison: PFP against the filter baselines, SiPP against WT.
CONV_METHODS = ("pfp", "ft", "softnet", "thinet", "uniform_filters", "sipp", "wt")
# Five keep ratios spanning 70 % -> 15 % of the parameters kept.
CONV_SPACING = [common.geometric(0.7, 0.15, 5)]
# The study's size (see the docstring): training subset and retraining steps per keep ratio.
TRAIN_SUBSET = 30000
RETRAIN_STEPS = 60


def study_config(network: str, train):
    """The conv-net study's experiment for ``network`` trained by ``train`` (shared with vgg_small.py)."""
    config = common.experiment(
        network=network, dataset="fashion_mnist", train=train,
        retrain_overrides=dict(num_epochs=1, learning_rate=0.01, lr_milestones=(), max_steps_per_epoch=RETRAIN_STEPS),
        methods=CONV_METHODS, spacing=CONV_SPACING, mode="cascade",
        retrain_iterations=-1, num_nets=1, delta_s=1e-12, plot_min=0.1, plot_max=0.85, eval_batch_size=500)
    config.dataset.max_train = TRAIN_SUBSET
    config.coresets.size = 128
    return config


def get_config():
    train = common.training(num_epochs=5, batch_size=128, learning_rate=0.1, lr_milestones=(3, 4), warmup=0,
                            momentum=0.9, weight_decay=1e-4)
    return study_config("resnet20", train)
