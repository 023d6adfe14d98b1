"""Fidelity study: LeNet300-100 on full Fashion-MNIST, every method, cascade, 3 nets, keep ratios 40 % -> 2 %
(halving, so that 10 % = 90 % pruned is on the grid).

Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`, read from
/usr/share/datasets/fashion-mnist/; or --config.dataset.data_dir=DIR with the IDX files).
About 40 minutes on 2 CPU cores. Prune-only curves (no retraining): add
--config.experiments.mode=prune-only. `python -m experiments.reproduce` runs both and writes the
tables and plots under its --workdir (runs/studies by default; docs/results.md is built from it).

Run:
  python -m experiments.main --config=configs/fashion/lenet300_100.py --workdir=runs/fashion_lenet300_100
"""

from configs import common


def get_config():
    train = common.training(num_epochs=12, batch_size=128, learning_rate=0.05, lr_milestones=(8, 11),
                            momentum=0.9, weight_decay=1e-4)
    return common.experiment(
        network="lenet300_100", dataset="fashion_mnist", train=train,
        retrain_overrides=dict(num_epochs=2, learning_rate=0.01, lr_milestones=(1,)),
        methods=common.ALL_METHODS, spacing=[common.geometric(0.4, 0.025, 5), common.manual(0.02)], mode="cascade",
        retrain_iterations=-1, num_nets=3, delta_s=1e-12, plot_min=0.02, plot_max=0.5, eval_batch_size=1000)
