"""Reference experiment: LeNet5 on MNIST. Needs MNIST IDX files (--config.dataset.data_dir).

Run:
  python -m experiments.main --config=configs/mnist/lenet5.py --workdir=runs/mnist_lenet5
"""

from configs import common


def get_config():
    train = common.training(**{**common.MNIST_LENET, "lr_milestones": (25, 35)})
    return common.experiment(
        network="lenet5", dataset="mnist", train=train, methods=common.ORIGINAL_METHODS,
        spacing=[common.geometric(0.5, 0.02, 15)], mode="cascade", retrain_iterations=-1, num_nets=3,
        delta_s=1e-9, plot_min=0.02, plot_max=0.5)
