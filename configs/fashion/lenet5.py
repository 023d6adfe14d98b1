"""Fidelity study: LeNet5 on full Fashion-MNIST, all methods, cascade, 3 nets, keep ratios 40 % -> 2 %.

About 1.5 hours on 2 CPU cores (one retraining epoch per ratio); a subset with
--config.experiments.methods="('sipp', 'pfp', 'wt', 'ft')".

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`; see lenet300_100.py). Prune-only
curves: --config.experiments.mode=prune-only.

Run:
  python -m experiments.main --config=configs/fashion/lenet5.py --workdir=runs/fashion_lenet5
"""

from configs import common


def get_config():
    train = common.training(num_epochs=8, batch_size=128, learning_rate=0.05, lr_milestones=(5, 7),
                            momentum=0.9, weight_decay=1e-4)
    return common.experiment(
        network="lenet5", dataset="fashion_mnist", train=train,
        retrain_overrides=dict(num_epochs=1, learning_rate=0.01),
        methods=common.ALL_METHODS,
        spacing=[common.geometric(0.4, 0.025, 5), common.manual(0.02)], mode="cascade",
        retrain_iterations=-1, num_nets=3, delta_s=1e-12, plot_min=0.02, plot_max=0.5, eval_batch_size=1000)
