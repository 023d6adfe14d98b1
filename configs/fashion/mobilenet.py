"""MobileNet-small on full Fashion-MNIST: SiPP, PFP, WT, FT in cascade, keep ratios 60 % -> 6 %.

The architecture of configs/digits/mobilenet.py; SGD with momentum, one retraining epoch per ratio.
Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`; see lenet300_100.py).

Run:
  python -m experiments.main --config=configs/fashion/mobilenet.py --workdir=runs/fashion_mobilenet
"""

from configs import common


def get_config():
    train = common.training(num_epochs=8, batch_size=128, learning_rate=0.05, lr_milestones=(5, 7),
                            momentum=0.9, weight_decay=1e-4)
    return common.experiment(
        network="mobilenet_small", dataset="fashion_mnist", train=train,
        retrain_overrides=dict(num_epochs=1, learning_rate=0.01),
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.6, 0.06, 4)], mode="cascade",
        retrain_iterations=-1, num_nets=1, delta_s=1e-12, plot_min=0.03, plot_max=0.7, eval_batch_size=1000)
