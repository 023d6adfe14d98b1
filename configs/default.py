"""The main job: LeNet300-100 on the embedded MNIST digits (offline, a few minutes on 2 CPU cores).

Compares the provable methods (SiPP, PFP) with their baselines over six keep ratios in cascade mode.

Run:
  python -m experiments.main --config=configs/default.py --workdir=runs/default
"""

from configs import common


def get_config():
    train = common.training(num_epochs=15, batch_size=64, learning_rate=0.05, lr_milestones=(10,), momentum=0.9,
                            weight_decay=1e-4)
    config = common.experiment(
        network="lenet300_100", dataset="mnist_embedded", train=train,
        retrain_overrides=dict(num_epochs=4, learning_rate=0.01, lr_milestones=(3,)),
        methods=("sipp", "sipp_rand", "pfp", "wt", "ft", "snip", "random"),
        spacing=[common.geometric(0.5, 0.03, 6)], mode="cascade", retrain_iterations=-1, num_nets=1,
        delta_s=1e-12, plot_min=0.03, plot_max=0.5, eval_batch_size=500)
    return config
