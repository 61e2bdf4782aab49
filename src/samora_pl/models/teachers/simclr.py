"""The image-level teacher: SimCLRv2 as a plain nn.Module.

A timm ResNet (depth 18/34/50/101/152) whose channels are all multiplied by `width` (1 and 2 are
SimCLRv2's 1x and 2x; at 2x, ResNet-50 has 94M parameters as in SimCLRv2), optionally with selective
kernels (timm's SK bottleneck with two 3x3 paths, attention width max(C/16, 32), deep stem and average-pool
shortcut; 140M parameters at 2x, as SimCLRv2's R50-2x+SK), then the 3-layer projection head: Linear
without bias + BatchNorm1d, ReLU after the first two, `proj_dim` (128) out, the last BatchNorm without a
trained shift (as SimCLRv2's). `embed()` returns the head's
final output (before L2 normalisation): the distillation target. Inputs are grey slices in [0, 1]
([B, 1, H, W] or 3-channel); `GreyInput` repeats and normalises them.
"""

from typing import Any, cast

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.grey_input import GreyInput

RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def build_resnet(depth: int = 50, width: float = 1.0, selective_kernel: bool = False) -> ResNet:
    """A timm ResNet without classifier; `width` multiplies every channel count (stem included)."""
    if depth not in RESNET_DEPTHS:
        raise SamoraError(f"cpt.simclr.depth is {depth}; allowed: {', '.join(map(str, RESNET_DEPTHS))}.")
    if width <= 0:
        raise SamoraError(f"cpt.simclr.width is {width}; it must be positive (1 or 2 for SimCLRv2's 1x / 2x).")
    kind, layers = RESNET_DEPTHS[depth]
    channels = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
    kwargs: dict[str, Any] = dict(layers=list(layers), channels=channels, num_classes=0, global_pool="avg")
    block: type[nn.Module]
    if selective_kernel:
        # attention width max(C / 16, 32) as SimCLRv2 (exact at widths 1 and 2), so its public weights load
        sk = dict(kernel_size=[3, 3], rd_ratio=1.0 / 16, rd_divisor=32, split_input=False)
        block = SelectiveKernelBottleneck if kind == "bottleneck" else SelectiveKernelBasic
        kwargs.update(
            stem_type="deep",
            stem_width=max(8, int(round(32 * width))),
            avg_down=True,
            block_args=dict(sk_kwargs=sk),
            zero_init_last=False,
        )
        # the deep stem already scales: (32w, 32w, 64w)
        return ResNet(block=block, **kwargs)  # type: ignore[arg-type]  # timm annotates block as an instance
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    model = ResNet(block=block, **kwargs)  # type: ignore[arg-type]  # timm annotates block as an instance
    if channels[0] != 64:
        _scale_stem(model, channels[0])
    return model


def _scale_stem(model: ResNet, width: int) -> None:
    """timm's 7x7 stem is always 64 wide; SimCLRv2 scales it with the rest (2x: 128). Rebuild the stem and
    the layer1 inputs at `width` (same parameter names, so torchvision-layout 2x checkpoints load)."""
    # timm's conv1 is a Conv2d, or a Sequential with the deep stem; its inferred type is the latter only
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)  # type: ignore[assignment]
    model.bn1 = nn.BatchNorm2d(width)
    layer1 = cast(nn.Sequential, model.layer1)  # timm adds its stages with add_module: Sequentials of blocks
    first = cast(BasicBlock | Bottleneck, layer1[0])  # the plain (non-SK) ResNet's blocks
    old = first.conv1
    # torch types _ConvNd's kernel_size / stride / padding as tuple[int, ...]; a Conv2d's are pairs (or a str padding)
    first.conv1 = nn.Conv2d(
        width,
        old.out_channels,
        kernel_size=cast(tuple[int, int], old.kernel_size),
        stride=cast(tuple[int, int], old.stride),
        padding=cast(str | tuple[int, int], old.padding),
        bias=False,
    )
    out = (first.conv3 if isinstance(first, Bottleneck) else first.conv2).out_channels
    if out == width:  # basic blocks: input already matches, no projection (as torchvision)
        first.downsample = None
    else:  # a projection from the new stem width (timm made none where its 64-wide stem matched)
        first.downsample = nn.Sequential(nn.Conv2d(width, out, kernel_size=1, bias=False), nn.BatchNorm2d(out))
    for module in (model.conv1, first.conv1, *(first.downsample or [])):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLRv2's 3-layer head: (Linear no bias, BN, ReLU) x 2, then Linear no bias, BN without a shift.

    SimCLRv2's last BatchNorm has a scale but no shift (TensorFlow `center=False`). Its bias stays in the
    state dict, so the converted files (which carry it at 0) and older teacher.pt files load, but it starts
    at 0 and never trains (requires_grad False)."""
    last = nn.BatchNorm1d(out_dim)
    last.bias.requires_grad_(False)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        last,
    )


class SimclrTeacher(nn.Module):
    """SimCLRv2 image-level teacher: ResNet backbone + 3-layer projection head."""

    kind = "simclr"
    teacher_meta: dict  # the metadata of the teacher.pt it was loaded from (files.load_teacher sets it)

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        selective_kernel: bool = False,
        proj_dim: int = 128,
        proj_hidden_dim: int | None = None,
        normalize: str = "imagenet",
        img_size: int = 224,
    ):
        super().__init__()
        self.input = GreyInput(normalize)
        self.backbone = build_resnet(depth, width, selective_kernel)
        self.feature_dim = self.backbone.num_features
        hidden = proj_hidden_dim or self.feature_dim
        self.head = projection_head(self.feature_dim, hidden, proj_dim)
        self.proj_dim = proj_dim
        self.img_size = img_size
        self.arch = dict(
            depth=int(depth),
            width=float(width),
            selective_kernel=bool(selective_kernel),
            proj_dim=int(proj_dim),
            proj_hidden_dim=int(hidden),
            normalize=normalize,
            img_size=int(img_size),
        )
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "SimclrTeacher":
        """NHWC memory layout for the backbone and its inputs (faster convolutions on most GPUs)."""
        self.channels_last = bool(enabled)
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Globally pooled backbone features [B, feature_dim]."""
        x = self.input(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Distillation target: the projection head's output [B, proj_dim] (not L2-normalised)."""
        return self.forward(images)
