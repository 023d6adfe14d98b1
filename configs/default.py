"""The main job: LeNet300-100 on the embedded MNIST digits (offline, a few minutes on 2 CPU cores).

Compares every registered method (SiPP and PFP variants and all comparison methods) over five keep
ratios in cascade mode: prune, retrain briefly, evaluate, prune further.

Run:
  python -m experiments.main --config=configs/default.py --workdir=runs/default
"""

from configs import common


def get_config():
    train = common.training(num_epochs=15, batch_size=64, learning_rate=0.05, lr_milestones=(10,), momentum=0.9,
                            weight_decay=1e-4)
    config = common.experiment(
        network="lenet300_100", dataset="mnist_embedded", train=train,
        retrain_overrides=dict(num_epochs=3, learning_rate=0.01, lr_milestones=(2,)),
        methods=("sipp", "sipp_rand", "sipp_hybrid", "pfp", "pfp_rand", "pfp_top", "wt", "snip", "uniform",
                 "norm_l1", "norm_l2", "norm_l1l2", "random", "ft", "softnet", "thinet", "uniform_filters", "svd"),
        spacing=[common.geometric(0.4, 0.03, 5)], mode="cascade", retrain_iterations=-1, num_nets=1,
        delta_s=1e-12, plot_min=0.03, plot_max=0.5, eval_batch_size=500)
    return config
