"""The conv-net study's configs and study names (experiments.reproduce), without data or training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from experiments import models as models_lib
from experiments import pipeline, reproduce

CONV_STUDIES = ("fashion_resnet20", "fashion_vgg_small")


def test_study_names_resolve_groups_single_studies_and_all():
    assert reproduce.study_names("fashion_convnets") == list(CONV_STUDIES)
    assert reproduce.study_names("fashion_resnet20") == ["fashion_resnet20"]
    assert set(CONV_STUDIES) <= set(reproduce.study_names("all"))
    with pytest.raises(ValueError, match="--study='nope' is unknown; allowed: .*fashion_convnets, all"):
        reproduce.study_names("nope")


@pytest.mark.parametrize("name", CONV_STUDIES)
def test_conv_study_configs_validate_with_five_ratios_from_70_to_15_percent(name):
    assert reproduce.STUDIES[name].modes == ("cascade",)
    config = reproduce.study_config(name, "cascade")
    steps = pipeline.validate_config(config)  # names every bad field; no data needed
    ratios = [s.keep_ratio for s in steps]
    assert len(ratios) == 5 and ratios[0] == pytest.approx(0.7) and ratios[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert set(config.experiments.methods) == {"pfp", "ft", "softnet", "thinet", "uniform_filters", "sipp", "wt"}
    assert config.dataset.name == "fashion_mnist" and config.experiments.num_nets == 1
    assert config.retraining.max_steps_per_epoch > 0 and config.retraining.num_epochs == 1


@pytest.mark.parametrize("network, convs", [("resnet20", 21), ("vgg_small_bn", 8)])
def test_conv_study_networks_take_one_channel_28x28_images(network, convs):
    model = models_lib.get_model(network, 10)
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, 10)
    layers = sp.find_layers(model, variables, np.zeros((1, 28, 28, 1), np.float32), train=False)
    kinds = [layer.kind for layer in layers]
    assert kinds.count("conv") == convs and kinds[-1] == "dense"
    first = layers[0].kernel_shape
    assert first[-2] == 1  # one input channel
