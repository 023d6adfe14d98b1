"""Reference experiment: LeNet300-100 on MNIST (SiPP/PFP papers). Needs MNIST IDX files (--config.dataset.data_dir).

Run:
  python -m experiments.main --config=configs/mnist/lenet300_100.py --workdir=runs/mnist_lenet300_100
"""

from configs import common


def get_config():
    train = common.training(**common.MNIST_LENET)
    return common.experiment(
        network="lenet300_100", dataset="mnist", train=train,
        retrain_overrides=dict(num_epochs=40, lr_milestones=(25, 35), learning_rate=0.01, warmup=0),
        methods=common.ORIGINAL_METHODS,
        spacing=[dict(type="harmonic", num_intervals=0.8, min_val=0.05)],
        mode="cascade", retrain_iterations=-1, num_nets=3, delta_s=1e-12, plot_min=0.05, plot_max=0.3)
