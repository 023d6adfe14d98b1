"""MobileNet-small (depthwise-separable convs, BatchNorm) on the embedded MNIST digits: SiPP, PFP, WT, FT.

Stem conv and five depthwise-separable blocks (16 -> 128 channels); SGD with momentum, cascade over four
keep ratios (60 % down to 6 %) with two retraining epochs each. Filter methods prune the pointwise
convs' channels; depthwise convs stay dense unless the library maps their channels.

Run:
  python -m experiments.main --config=configs/digits/mobilenet.py --workdir=runs/digits_mobilenet
"""

from configs import common


def get_config():
    train = common.training(num_epochs=12, batch_size=64, learning_rate=0.05, lr_milestones=(8, 11),
                            momentum=0.9, weight_decay=1e-4)
    return common.experiment(
        network="mobilenet_small", dataset="mnist_embedded", train=train,
        retrain_overrides=dict(num_epochs=2, learning_rate=0.01, lr_milestones=(1,)),
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.6, 0.06, 4)], mode="cascade",
        retrain_iterations=-1, num_nets=1, delta_s=1e-12, plot_min=0.03, plot_max=0.7, eval_batch_size=500)
