"""PyTorch -> Flax conversion: torchvision-layout nets built with torch agree with the converted ones.

The torch tests are skipped when torch is not installed (it is an optional extra); the numpy-only
tests below them always run.
"""

import sys

import numpy as np
import pytest

from experiments import convert, pretrained
from experiments import models as models_lib


def _torch_net(name, num_classes=10, seed=0, **kwargs):
    """A torch replica with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch = pytest.importorskip("torch")
    from experiments import torch_reference

    torch.manual_seed(seed)
    net = torch_reference.build(name, num_classes, **kwargs)
    with torch.no_grad():
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(10.0)  # logits of order 1, not ~0.1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def _torch_logits(net, x_nhwc):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _ours(model, variables, x):
    return np.asarray(model.apply(variables, x, train=False))


@pytest.mark.parametrize(
    "name, kwargs, hw",
    [
        ("resnet18", {}, 64),
        # torchvision's VGG pools to 7x7 before the classifier: the zoo's (exact) pool needs sides of
        # 224 multiples; the hidden width is cut from 4096 to keep the 25088 x hidden fc6 small.
        ("vgg11_bn_imagenet", {"hidden": 64}, 224),
    ],
)
def test_torchvision_layout_logits_agree(tmp_path, name, kwargs, hw):
    torch = pytest.importorskip("torch")
    net = _torch_net(name, **kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    x = np.random.default_rng(1).standard_normal((2, hw, hw, 3)).astype(np.float32)

    model, variables = convert.from_state_dict(convert.load_torch_file(path), name, source=str(path), **kwargs)
    assert model.num_classes == 10  # from the classifier weight
    ref = _torch_logits(net, x)
    assert 0.5 < np.abs(ref).max() < 100
    np.testing.assert_allclose(_ours(model, variables, x), ref, atol=1e-4, rtol=0)
    # The state dict round-trips exactly.
    back = convert.to_state_dict(name, variables, 10, **kwargs)
    sd = {k: v.numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_cli_converts_checks_and_feeds_init_from(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    net = _torch_net("resnet18", num_classes=7)
    src = tmp_path / "r18.pth"
    # A DataParallel-style prefix and a {'state_dict': ...} wrapper, as checkpoints often have.
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, src)
    x_nchw = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x_nchw)  # PyTorch layout: transposed by the check
    out = tmp_path / "out"
    rc = convert.main([f"--from={src}", "--model=resnet18", f"--out={out}", f"--sample={tmp_path / 'x.npy'}"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "logit check: max |diff|" in text and "same top-1: True" in text
    # The written checkpoint is an init_from source, and names its network.
    variables = pretrained.load_variables(out, "resnet18", 7)
    model = models_lib.get_model("resnet18", 7)
    x = x_nchw.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_ours(model, variables, x), _torch_logits(net, x), atol=1e-4, rtol=0)
    with pytest.raises(pretrained.PretrainedError, match="config.network='resnet34' but .* holds a 'resnet18'"):
        pretrained.load_variables(out, "resnet34", 7)
    # ... and a .pth works as init_from directly.
    direct = pretrained.load_variables(src, "resnet18", 7)
    np.testing.assert_array_equal(direct["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    # An existing --out is refused.
    assert convert.main([f"--from={src}", "--model=resnet18", f"--out={out}"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_mismatched_state_dict_names_missing_extra_and_misshaped(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    sd = dict(_torch_net("resnet18").state_dict())
    del sd["layer4.1.bn2.running_var"]
    sd["layer5.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 5, 5)
    src = tmp_path / "bad.pth"
    torch.save(sd, src)
    with pytest.raises(convert.ConversionError) as err:
        convert.from_state_dict(convert.load_torch_file(src), "resnet18", source=str(src))
    msg = str(err.value)
    assert "does not match resnet18 (10 classes)" in msg
    assert "1 missing tensor(s): layer4.1.bn2.running_var (expected shape (512,))" in msg
    assert "1 unexpected tensor(s): layer5.0.conv1.weight (shape (3, 3, 3, 3))" in msg
    assert "1 mis-shaped tensor(s): layer1.0.conv2.weight has shape (64, 64, 5, 5), expected (64, 64, 3, 3)" in msg
    # The CLI reports it and writes nothing; a network the file is not shows its errors too.
    assert convert.main([f"--from={src}", "--model=resnet18", f"--out={tmp_path / 'o'}"]) == 1
    assert "layer4.1.bn2.running_var" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    good = tmp_path / "r18.pth"
    torch.save(_torch_net("resnet18").state_dict(), good)
    with pytest.raises(convert.ConversionError, match=r"missing tensor.*layer1.0.bn3.running_mean.*The file "
                                                      r"matches 'resnet18': use that network"):
        convert.from_state_dict(convert.load_torch_file(good), "resnet50")


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn"])
def test_cifar_layouts(name):
    """The reference's bearpaw CIFAR nets (same key names as its checkpoints)."""
    net = _torch_net(name)
    x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model, variables = convert.from_state_dict(net.state_dict(), name)
    np.testing.assert_allclose(_ours(model, variables, x), _torch_logits(net, x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- no torch needed


def _random_variables(name, num_classes=10, **kwargs):
    """Random variables of the right shapes (no init compile)."""
    import jax

    model = models_lib.get_model(name, num_classes, **kwargs)
    rng = np.random.default_rng(0)
    shapes = convert.abstract_variables(model, name)
    return model, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_numpy_round_trip_and_expected_keys():
    model, variables = _random_variables("resnet20")
    sd = convert.to_state_dict("resnet20", variables, 10)
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["fc.weight"].shape == (10, 64)
    assert "layer2.0.downsample.0.weight" in sd and "layer2.0.downsample.1.running_var" in sd
    expected = convert.expected_state_dict("resnet20", 10)
    assert {k: v.shape for k, v in sd.items()} == expected
    _, back = convert.from_state_dict(sd, "resnet20")
    flat, flat_back = pretrained._flatten(dict(variables)), pretrained._flatten(back)
    assert sorted(flat) == sorted(flat_back)
    for k in flat:
        np.testing.assert_array_equal(flat_back[k], flat[k])
    keys = convert.expected_state_dict("vgg11_bn_imagenet", 1000)
    assert keys["features.0.weight"] == (64, 3, 3, 3) and keys["features.1.running_mean"] == (64,)
    assert keys["features.4.weight"] == (128, 64, 3, 3)  # conv, bn, relu, pool -> index 4
    assert keys["classifier.0.weight"] == (4096, 25088) and keys["classifier.6.weight"] == (1000, 4096)


def test_unsupported_network_and_missing_torch(monkeypatch, tmp_path):
    with pytest.raises(convert.ConversionError, match="no PyTorch state-dict layout.*supported: .*resnet50"):
        convert.from_state_dict({"fc.weight": np.zeros((10, 4))}, "lenet5")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    with pytest.raises(ImportError, match="pip install torch"):
        convert.load_torch_file(tmp_path / "x.pth")
    assert "resnet50" in convert.supported() and "wide_resnet50_2" in convert.supported()
