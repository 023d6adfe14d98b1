"""ViT-tiny on the embedded MNIST digits (offline; the main job's data): SiPP, PFP, WT, FT in cascade.

A 4-block pre-norm ViT (7x7 patches, width 64, 4 heads, MLP 128) trained with Adam, then pruned at
four keep ratios (60 % down to 6 %, geometric) with one short Adam retraining per ratio. Filter methods
prune the MLP hidden units (attention projections stay dense unless the library removes whole heads),
so below about half the parameters they report the closest size they reach. A few minutes on one core;
`python -m experiments.reproduce --study=digits_vit` writes its table (docs/vit.md).

Run:
  python -m experiments.main --config=configs/digits/vit.py --workdir=runs/digits_vit
"""

from configs import common

VIT_TRAIN = dict(optimizer="adam", batch_size=64, learning_rate=1e-3, warmup=1, weight_decay=0.0)


def get_config():
    train = common.training(num_epochs=20, lr_milestones=(14, 18), **VIT_TRAIN)
    return common.experiment(
        network="vit_tiny", dataset="mnist_embedded", train=train,
        retrain_overrides=dict(num_epochs=3, learning_rate=1e-3, warmup=0, lr_milestones=(2,)),
        methods=("sipp", "pfp", "wt", "ft"), spacing=[common.geometric(0.6, 0.06, 4)], mode="cascade",
        retrain_iterations=-1, num_nets=1, delta_s=1e-12, plot_min=0.03, plot_max=0.7, eval_batch_size=500)
