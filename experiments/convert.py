"""Convert a PyTorch state dict (torchvision / reference layout) into a zoo network's variables.

  python -m experiments.convert --from=resnet50.pth --model=resnet50 --out=runs/resnet50_pretrained \\
      [--sample=inputs.npy | --sample=random:4] [--num_classes=1000]

writes an orbax checkpoint in the :class:`experiments.checkpoint.Checkpointer`
layout (step 0: ``params``, ``batch_stats`` and a ``meta`` naming the network),
which ``config.training.init_from`` accepts. With ``--sample`` the converted
network is checked: the PyTorch replica of the architecture
(:mod:`experiments.torch_reference`) is loaded with the same state dict and
both networks' eval-mode logits on the sample must agree.

Supported networks (state-dict layouts of torchvision and of the reference's
bearpaw CIFAR models): the ImageNet ResNets (``resnet18/34/50/101``,
``wide_resnet50_2``), ``vgg11_bn_imagenet`` / ``vgg16_bn_imagenet``, the CIFAR
ResNets (``resnet20/32/44/56/110``) and the CIFAR VGGs (``vgg11..19[_bn]``).

What the conversion does: conv weights OIHW -> HWIO (NCHW -> NHWC), Linear
weights transposed, torchvision's first VGG Linear (``classifier.0``, on the
flattened C x 7 x 7 map) reshaped into the equivalent 7x7 conv ``fc6``,
BatchNorm ``weight/bias`` -> ``scale/bias`` and ``running_mean/running_var`` ->
``batch_stats`` ``mean/var`` (the zoo's BatchNorm uses PyTorch's eps 1e-5;
``num_batches_tracked`` and the momentum do not matter for inference). A
common prefix such as ``module.`` (DataParallel) is stripped.

Needs ``torch`` (``pip install torch``; the ``[convert]`` extra) only to read
``.pth`` files and run the check; :func:`from_state_dict` takes numpy arrays.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from experiments import models as models_lib

__all__ = [
    "ConversionError",
    "check_logits",
    "expected_state_dict",
    "from_state_dict",
    "load_torch_file",
    "main",
    "supported",
    "to_state_dict",
]

_MAX_LISTED = 10
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(ValueError):
    """A source file does not match the network it is converted into."""


# ----------------------------------------------------------------------------
# Name and layout mapping: one Flax leaf <-> one torch tensor
# ----------------------------------------------------------------------------


def _conv_to_torch(a: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
    return np.transpose(a, (3, 2, 0, 1))


def _conv_from_torch(a: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


class _Leaf:
    """How one Flax leaf (``collection/module.../name``) is stored in a torch state dict."""

    def __init__(self, flax_name: str, flax_shape: tuple[int, ...], torch_key: str, kind: str):
        self.flax_name, self.flax_shape, self.torch_key, self.kind = flax_name, flax_shape, torch_key, kind

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = self.flax_shape
        if self.kind == "conv":
            return (s[3], s[2], s[0], s[1])
        if self.kind == "dense":
            return (s[1], s[0])
        if self.kind == "linear_as_conv":  # 7x7 conv fc6 <- Linear on the flattened C x 7 x 7 map
            return (s[3], s[2] * s[0] * s[1])
        return s

    def from_torch(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return _conv_from_torch(a)
        if self.kind == "dense":
            return a.T
        if self.kind == "linear_as_conv":
            h, w, c, o = self.flax_shape
            return _conv_from_torch(a.reshape(o, c, h, w))
        return a

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return _conv_to_torch(a)
        if self.kind == "dense":
            return a.T
        if self.kind == "linear_as_conv":
            return _conv_to_torch(a).reshape(self.torch_shape)
        return a


_LEAF_NAMES = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _resnet_module(mods: tuple[str, ...]) -> str:
    out = []
    for m in mods:
        block = re.fullmatch(r"layer(\d+)_(\d+)", m)
        if block:
            out.append(f"layer{block.group(1)}.{block.group(2)}")
        elif m == "downsample_conv":
            out.append("downsample.0")
        elif m == "downsample_bn":
            out.append("downsample.1")
        else:
            out.append(m)
    return ".".join(out)


def _vgg_module_fn(cfg, batch_norm: bool) -> Callable[[tuple[str, ...]], str]:
    """``conv{i}``/``bn{i}`` -> ``features.{j}``; classifier names as torchvision / bearpaw."""
    conv_at, j = [], 0
    for v in cfg:
        if v == "M":
            j += 1
            continue
        conv_at.append(j)
        j += 3 if batch_norm else 2  # conv [, bn], relu
    heads = {"classifier": "classifier", "fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}

    def name(mods: tuple[str, ...]) -> str:
        (m,) = mods
        found = re.fullmatch(r"(conv|bn)(\d+)", m)
        if found:
            return f"features.{conv_at[int(found.group(2))] + (found.group(1) == 'bn')}"
        return heads[m]

    return name


def supported() -> list[str]:
    """Zoo networks with a PyTorch state-dict layout."""
    out = []
    for name in sorted(models_lib.MODELS):
        m = models_lib.get_model(name, 10)
        if isinstance(m, (models_lib.ImageNetResNet, models_lib.CifarResNet, models_lib.CifarVGG,
                          models_lib.ImageNetVGG)):
            out.append(name)
    return out


def _module_namer(model: Any, name: str) -> Callable[[tuple[str, ...]], str]:
    if isinstance(model, (models_lib.ImageNetResNet, models_lib.CifarResNet)):
        return _resnet_module
    if isinstance(model, (models_lib.CifarVGG, models_lib.ImageNetVGG)):
        return _vgg_module_fn(model.cfg, model.batch_norm)
    raise ConversionError(
        f"network {name!r} has no PyTorch state-dict layout here; supported: {', '.join(supported())}"
    )


def _head_key(model: Any) -> str:
    """Torch key of the classifier weight (its first axis is num_classes)."""
    if isinstance(model, models_lib.ImageNetVGG):
        return "classifier.6.weight"
    if isinstance(model, models_lib.CifarVGG):
        return "classifier.weight"
    return "fc.weight"


def abstract_variables(model: Any, name: str, input_shape: Optional[tuple[int, ...]] = None) -> dict:
    """Shapes/dtypes of ``model``'s variables on inputs of ``input_shape`` (default: the zoo's; no compute)."""
    x0 = np.zeros((1, *(input_shape or models_lib.input_shape(name))), np.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0, train=False))


def _flax_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def _leaves(model: Any, name: str) -> list[_Leaf]:
    namer = _module_namer(model, name)
    out = []
    for path, leaf in _flax_leaves(abstract_variables(model, name)):
        coll, mods, last = path[0], path[1:-1], path[-1]
        module = namer(mods)
        shape = tuple(leaf.shape)
        if (coll, last) == ("params", "kernel"):
            kind = "linear_as_conv" if isinstance(model, models_lib.ImageNetVGG) and mods == ("fc6",) else (
                "conv" if len(shape) == 4 else "dense")
            key = f"{module}.weight"
        elif (coll, last) in _LEAF_NAMES:
            kind, key = "vector", f"{module}.{_LEAF_NAMES[coll, last]}"
        else:
            raise ConversionError(f"{name}: no PyTorch name for variable {'/'.join(path)}")
        out.append(_Leaf("/".join(path), shape, key, kind))
    return out


def expected_state_dict(name: str, num_classes: int, **model_kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Torch key -> shape of the state dict that converts into ``name`` (without ``num_batches_tracked``)."""
    model = models_lib.get_model(name, num_classes, **model_kwargs)
    return {leaf.torch_key: leaf.torch_shape for leaf in _leaves(model, name)}


@functools.lru_cache(maxsize=None)
def _expected_cached(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    return expected_state_dict(name, num_classes)


# ----------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------


def _strip_prefix(state: Mapping[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """Drops a prefix (``module.``, ``model.``, ...) that all keys share before the layout's names."""
    if head in state:
        return dict(state)
    for key in state:
        if key.endswith("." + head):
            prefix = key[: -len(head)]
            if all(k.startswith(prefix) for k in state):
                return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _listing(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return "; ".join(items[:_MAX_LISTED]) + (f"; ... and {more} more" if more > 0 else "")


def mismatch_message(
    what: str, target: str, expected: Mapping[str, tuple], found: Mapping[str, tuple]
) -> Optional[str]:
    """A message naming missing, unexpected and mis-shaped entries, or ``None`` when they match."""
    missing = [f"{k} (expected shape {tuple(expected[k])})" for k in expected if k not in found]
    extra = [f"{k} (shape {tuple(found[k])})" for k in found if k not in expected]
    shaped = [
        f"{k} has shape {tuple(found[k])}, expected {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or extra or shaped):
        return None
    parts = [f"{what} does not match {target}:"]
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {_listing(missing)}.")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s): {_listing(extra)}.")
    if shaped:
        parts.append(f"{len(shaped)} mis-shaped tensor(s): {_listing(shaped)}.")
    return " ".join(parts)


def _set(tree: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def from_state_dict(
    state: Mapping[str, Any],
    name: str,
    num_classes: Optional[int] = None,
    *,
    source: str = "state dict",
    **model_kwargs: Any,
) -> tuple[Any, dict]:
    """Converts a PyTorch state dict (name -> array-like) into ``(model, variables)``.

    Args:
      state: the state dict (torch tensors or numpy arrays).
      name: zoo network name.
      num_classes: classifier outputs; ``None`` takes them from the classifier weight.
      source: how error messages name the input.
      **model_kwargs: module fields for ``models.get_model`` (e.g. ``hidden=``).

    Raises:
      ConversionError: unsupported network, or missing / unexpected / mis-shaped tensors (named,
        with the expected shape).
    """
    model = models_lib.get_model(name, num_classes or 1, **model_kwargs)
    head = _head_key(model)
    arrays = {k: _to_numpy(v) for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    arrays = _strip_prefix(arrays, head)
    if num_classes is None:
        if head not in arrays or arrays[head].ndim != 2:
            raise ConversionError(
                f"{source}: cannot tell the number of classes of {name!r}: no 2-D classifier weight "
                f"{head!r} (pass num_classes)"
            )
        num_classes = int(arrays[head].shape[0])
    model = models_lib.get_model(name, num_classes, **model_kwargs)
    leaves = _leaves(model, name)
    expected = {leaf.torch_key: leaf.torch_shape for leaf in leaves}
    found = {k: tuple(v.shape) for k, v in arrays.items()}
    msg = mismatch_message(source, f"{name} ({num_classes} classes)", expected, found)
    if msg:
        if not model_kwargs:
            matches = [n for n in supported() if n != name and _expected_cached(n, num_classes) == found]
            if matches:
                msg += f" The file matches {' / '.join(repr(n) for n in matches)}: use that network."
        raise ConversionError(msg)
    variables: dict = {}
    for leaf in leaves:
        value = np.ascontiguousarray(leaf.from_torch(arrays[leaf.torch_key]).astype(np.float32))
        _set(variables, leaf.flax_name.split("/"), value)
    return model, variables


def to_state_dict(name: str, variables: Mapping[str, Any], num_classes: int, **model_kwargs: Any) -> dict:
    """The inverse: a zoo network's variables as a PyTorch-layout state dict of numpy arrays."""
    model = models_lib.get_model(name, num_classes, **model_kwargs)
    flat = {"/".join(p): np.asarray(v) for p, v in _flax_leaves(variables)}
    return {leaf.torch_key: np.ascontiguousarray(leaf.to_torch(flat[leaf.flax_name])) for leaf in _leaves(model, name)}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "reading PyTorch files needs torch: pip install torch (CPU is enough), or the project's "
            "[convert] extra"
        ) from err
    return torch


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict (also one nested under ``state_dict``/``model``/``net``) as numpy."""
    torch = _import_torch()
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many types
        raise ConversionError(f"{path}: not a readable PyTorch state dict: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict (tensor name -> tensor), got {type(obj).__name__}")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------
# Check
# ----------------------------------------------------------------------------


def _nhwc(x: np.ndarray, channels: int) -> np.ndarray:
    """Accepts NHWC (our layout) or NCHW (PyTorch's) sample batches."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"sample inputs must be a batch of images [N, H, W, C] or [N, C, H, W], got shape {x.shape}")
    if x.shape[-1] == channels:
        return x
    if x.shape[1] == channels:
        return np.transpose(x, (0, 2, 3, 1))
    raise ValueError(f"sample inputs of shape {x.shape} have no axis of {channels} channels")


def check_logits(
    name: str, model: Any, variables: Mapping[str, Any], state: Mapping[str, Any], x: np.ndarray,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Eval-mode logits of the converted network and of the PyTorch replica on ``x`` (NHWC).

    Returns ``{'checked': bool, 'max_abs_diff', 'max_abs_logit', 'reason'}``; ``checked`` is False
    (with the reason) when torch is missing or has no replica of ``name``.
    """
    try:
        torch = _import_torch()
        from experiments import torch_reference
    except ImportError as err:
        return {"checked": False, "reason": str(err)}
    num_classes = int(model.num_classes)
    try:
        net = torch_reference.build(name, num_classes, **model_kwargs)
    except ValueError as err:
        return {"checked": False, "reason": str(err)}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(_to_numpy(v))) for k, v in state.items()}
    tensors = _strip_prefix(tensors, _head_key(model))
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(_IGNORED_SUFFIXES)]
    unexpected = [k for k in unexpected if not k.endswith(_IGNORED_SUFFIXES)]
    if missing or unexpected:
        return {"checked": False, "reason": f"the PyTorch replica does not hold this state dict "
                                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"}
    x = np.asarray(x, np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))).numpy()
    ours = np.asarray(jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, x))
    return {
        "checked": True,
        "max_abs_diff": float(np.max(np.abs(ours - ref))),
        "max_abs_logit": float(np.max(np.abs(ref))),
        "same_top1": bool(np.all(ours.argmax(-1) == ref.argmax(-1))),
        "reason": "",
    }


def _sample(spec: str, name: str) -> np.ndarray:
    if spec.startswith("random"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 2
        return np.random.default_rng(0).standard_normal((n, *models_lib.input_shape(name))).astype(np.float32)
    return _nhwc(np.load(spec, allow_pickle=False).astype(np.float32), models_lib.input_shape(name)[-1])


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def convert_file(
    src: str, name: str, out: str, *, sample: str = "", num_classes: Optional[int] = None,
    tolerance: float = 1e-3, **model_kwargs: Any,
) -> dict[str, Any]:
    """Converts ``src`` (a ``.pth`` state dict) into an orbax checkpoint at ``out``; returns the check.

    Raises:
      ConversionError: the file does not match the network, or the logits disagree by more than
        ``tolerance`` (relative to the largest logit, or absolute when that is below 1).
    """
    from experiments import checkpoint as ckpt_lib

    state = load_torch_file(src)
    model, variables = from_state_dict(state, name, num_classes, source=src, **model_kwargs)
    check: dict[str, Any] = {"checked": False, "reason": "no --sample given"}
    if sample:
        check = check_logits(name, model, variables, state, _sample(sample, name), **model_kwargs)
        if check["checked"]:
            bound = tolerance * max(1.0, check["max_abs_logit"])
            check["tolerance"] = bound
            if check["max_abs_diff"] > bound:
                raise ConversionError(
                    f"{src} -> {name}: logits differ by {check['max_abs_diff']:.3g} (> {bound:.3g}) from the "
                    "PyTorch replica's; the file's architecture may differ from the zoo's"
                )
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory")
    meta = {"network": name, "num_classes": int(model.num_classes), "source": os.path.abspath(src),
            "converted_from": "pytorch", "model_kwargs": dict(model_kwargs), "check": check}
    with ckpt_lib.Checkpointer(out, max_to_keep=None) as ck:
        ck.save(0, params=variables["params"], batch_stats=variables.get("batch_stats", {}), meta=meta)
    return check


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="PyTorch state dict (.pth)")
    parser.add_argument("--model", required=True, help="zoo network name, e.g. resnet50")
    parser.add_argument("--out", required=True, help="output directory (orbax checkpoint)")
    parser.add_argument("--sample", default="",
                        help="inputs to compare logits on: a .npy batch (NHWC or NCHW) or random[:N]")
    parser.add_argument("--num_classes", type=int, default=None, help="default: from the classifier weight")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="allowed max |logit difference|, relative to max(1, max |logit|)")
    args = parser.parse_args(argv)
    if args.model not in models_lib.MODELS:
        parser.error(f"unknown --model={args.model!r}; supported: {', '.join(supported())}")
    try:
        check = convert_file(args.src, args.model, args.out, sample=args.sample, num_classes=args.num_classes,
                             tolerance=args.tolerance)
    except (ConversionError, FileExistsError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.out)} ({args.model})")
    if check["checked"]:
        print(f"logit check: max |diff| = {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}, "
              f"max |logit| {check['max_abs_logit']:.3g}), same top-1: {check['same_top1']}")
    else:
        print(f"no logit check: {check['reason']}")
    print(f"use it with --config.training.init_from={os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
