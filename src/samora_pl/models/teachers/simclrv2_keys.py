"""SimCLRv2 weights in the layout of their common PyTorch conversion -> `SimclrTeacher` key names.

Google releases SimCLRv2 (R50-2x+SK among them) only as TensorFlow checkpoints. The PyTorch files people use
come from `convert.py` of the SimCLRv2-Pytorch repository (Separius): `torch.save({"resnet": ..., "head": ...})`
with the state dicts of its own module tree, where each BatchNorm sits in a (BatchNorm, ReLU) Sequential:

    resnet  net.0.*                        the stem: a 7x7 conv `net.0.0` + BN `net.0.1.0`; with selective
                                           kernels three 3x3 convs `net.0.{0,2,4}` + BNs `net.0.{1,3,5}.0`
            net.{1..4}.blocks.{j}.*        bottleneck j of stage 1..4 (only bottleneck ResNets: 50/101/152):
              net.0 + net.1.0                1x1 conv + BN
              net.2 + net.3.0                3x3 conv + BN (stride here); with selective kernels instead
              net.2.main_conv.0 + .1.0       both 3x3 paths as one conv of 2C outputs + their BN, and
              net.2.mixing_conv.{0,1.0,2}    the path attention (1x1 conv to max(C/16, 32), BN, 1x1 conv to 2C)
              net.4 + net.5.0                1x1 conv + BN (net.3 + net.4.0 with selective kernels)
              projection.shortcut(.2) + projection.bn.0   the first block's shortcut (SK: after an avg-pool)
            fc.*                           the supervised linear head (ignored here)
    head    layers.{0,3,6}.weight          the 3-layer projection head: Linear (no bias) ...
            layers.{1,4,7}.*               ... and BatchNorm1d, the indices of `SimclrTeacher.head`

`SimclrTeacher` is a timm ResNet / SK-ResNet (deep stem, avg-pool shortcut, selective-kernel attention
reduced to at least 32 channels as in SimCLRv2), so every tensor maps one to one, except the joint 3x3 conv
and BN of a selective kernel, split in two paths (first C outputs: path 0, as the conversion's `chunk`).
Widths 1 and 2 map exactly (3x differs in one attention width and is reported by the shape check).

One difference we keep on purpose: the shortcut of the first selective-kernel block (stride 1). The
conversion's PyTorch model zero-pads and averages 2x2 windows there; TensorFlow SimCLRv2, whose weights
these are, averages with pool size = stride (1: no pooling), and so does the teacher.
"""

import re

import torch

PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
STEM = re.compile(rf"net\.0\.(.+)\.{PARAM}$")
BLOCK = re.compile(rf"net\.([1-4])\.blocks\.(\d+)\.(.+)\.{PARAM}$")
HEAD = re.compile(rf"layers\.(\d+)\.{PARAM}$")
STEM_PLAIN = {"0": "conv1", "1.0": "bn1"}
STEM_SK = {"0": "conv1.0", "1.0": "conv1.1", "2": "conv1.3", "3.0": "conv1.4", "4": "conv1.6", "5.0": "bn1"}
BLOCK_PLAIN = {
    "projection.shortcut": "downsample.0",
    "projection.bn.0": "downsample.1",
    "net.0": "conv1",
    "net.1.0": "bn1",
    "net.2": "conv2",
    "net.3.0": "bn2",
    "net.4": "conv3",
    "net.5.0": "bn3",
}
BLOCK_SK = {
    "projection.shortcut.2": "downsample.1",
    "projection.bn.0": "downsample.2",
    "net.0": "conv1.conv",
    "net.1.0": "conv1.bn",
    "net.2.mixing_conv.0": "conv2.attn.fc_reduce",
    "net.2.mixing_conv.1.0": "conv2.attn.bn",
    "net.2.mixing_conv.2": "conv2.attn.fc_select",
    "net.3": "conv3.conv",
    "net.4.0": "conv3.bn",
}
SK_PATHS = {"net.2.main_conv.0": "conv", "net.2.main_conv.1.0": "bn"}  # split into conv2.paths.{0,1}.<this>
UNMAPPED = "unmapped:"  # prefix of keys with no counterpart, so the shape / key check reports them


def is_simclrv2_pytorch(data: dict) -> bool:
    """True for a file written by SimCLRv2-Pytorch's convert.py: {"resnet": {"net.0.0.weight", ...}, ...}."""
    resnet = data.get("resnet") if isinstance(data, dict) else None
    return isinstance(resnet, dict) and any(str(key).startswith("net.0.0.") for key in resnet)


def convert(resnet: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(backbone, head) state dicts in `SimclrTeacher.backbone` / `.head` key names; `fc.*` is dropped."""
    selective = any(".main_conv." in key for key in resnet)
    backbone: dict[str, torch.Tensor] = {}
    for key, value in resnet.items():
        if key.startswith("fc."):
            continue
        stem, block = STEM.match(key), BLOCK.match(key)
        if stem:
            target = (STEM_SK if selective else STEM_PLAIN).get(stem.group(1))
            backbone[f"{target}.{stem.group(2)}" if target else UNMAPPED + key] = value
        elif block and selective and block.group(3) in SK_PATHS:
            stage, index, module, param = block.groups()
            halves = (value, value) if param == "num_batches_tracked" else value.chunk(2, dim=0)
            for path, half in enumerate(halves):
                backbone[f"layer{stage}.{index}.conv2.paths.{path}.{SK_PATHS[module]}.{param}"] = half.clone()
        elif block:
            stage, index, module, param = block.groups()
            target = (BLOCK_SK if selective else BLOCK_PLAIN).get(module)
            backbone[f"layer{stage}.{index}.{target}.{param}" if target else UNMAPPED + key] = value
        else:
            backbone[UNMAPPED + key] = value
    heads = {}
    for key, value in head.items():
        match = HEAD.match(key)
        heads[f"{match.group(1)}.{match.group(2)}" if match else UNMAPPED + key] = value
    return backbone, heads
