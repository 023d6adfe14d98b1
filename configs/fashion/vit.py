"""ViT-tiny on full Fashion-MNIST: SiPP, PFP, WT, FT in cascade, keep ratios 60 % -> 6 %.

The architecture and Adam schedule of configs/digits/vit.py on 60,000 training images (fewer epochs).
Needs Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`; see lenet300_100.py). About an
hour on 2 CPU cores.

Run:
  python -m experiments.main --config=configs/fashion/vit.py --workdir=runs/fashion_vit
"""

from configs import common
from configs.digits.vit import VIT_TRAIN


def get_config():
    train = common.training(num_epochs=10, lr_milestones=(7, 9), **{**VIT_TRAIN, "batch_size": 128})
    return common.experiment(
        network="vit_tiny", dataset="fashion_mnist", train=train,
        retrain_overrides=dict(num_epochs=1, learning_rate=1e-3, warmup=0),
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.6, 0.06, 4)], mode="cascade",
        retrain_iterations=-1, num_nets=1, delta_s=1e-12, plot_min=0.03, plot_max=0.7, eval_batch_size=1000)
