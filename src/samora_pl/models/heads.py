"""Small heads that sit on the student (SAM encoder + one LoRA expert) during distillation only.

They are trained with the expert and thrown away afterwards; stage 2 never sees them.

* :class:`ImageProjection` (image level): the neck output [B, neck, h, w] mean-pooled to [B, neck], then
  an MLP (Linear, ReLU, Linear) to the SimCLR teacher's projection width (128 in the paper).
* :class:`TokenProjection` (patch level): the last block's tokens [..., C] to the MAE teacher's token
  width D: LayerNorm then Linear (SAM's blocks end without a norm), or a two-layer MLP with ``hidden``.
* :class:`PixelDecoder` (pixel level): the neck output [B, neck, S/16, S/16] back to a [B, 1, S, S] image
  in [0, 1] through four x2 stages (transposed conv, GroupNorm, GELU, 3x3 conv, GroupNorm, GELU), widths
  halving from ``width``, then a 1x1 conv and a sigmoid. There is deliberately no skip connection from
  the input image: everything the decoder knows about the slice must come through the encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ImageProjection", "TokenProjection", "PixelDecoder", "mean_pool"]


def mean_pool(neck: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, D] (global average over the token grid)."""
    return neck.mean(dim=(-2, -1))


class ImageProjection(nn.Module):
    """Pooled neck features [B, in_dim] (or the neck map [B, in_dim, h, w]) -> [B, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = int(hidden or max(in_dim, out_dim))
        self.in_dim, self.out_dim, self.hidden = int(in_dim), int(out_dim), hidden
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = mean_pool(features)
        return self.net(features)


class TokenProjection(nn.Module):
    """Student tokens [..., in_dim] -> [..., out_dim] (LayerNorm + Linear, or + a hidden layer)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.hidden = int(hidden) if hidden else None
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        if self.hidden:
            layers += [nn.Linear(in_dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim)]
        else:
            layers += [nn.Linear(in_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class _UpStage(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2),
            nn.GroupNorm(_groups(out_ch), out_ch),
            nn.GELU(),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(out_ch), out_ch),
            nn.GELU(),
        )


class PixelDecoder(nn.Module):
    """Neck map [B, in_dim, h, w] -> image [B, out_channels, h*factor, w*factor] in [0, 1].

    ``factor`` (the encoder's patch size, 16 for SAM) must be a power of two; one x2 stage per octave.
    Stage widths: ``width``, ``width/2``, ... never below ``min_width``.
    """

    def __init__(
        self, in_dim: int, width: int = 128, factor: int = 16, min_width: int = 8, out_channels: int = 1
    ) -> None:
        super().__init__()
        stages = int(round(math.log2(factor)))
        if 2**stages != factor or stages < 1:
            raise ValueError(f"PixelDecoder factor must be a power of two >= 2, got {factor}")
        self.in_dim, self.factor = int(in_dim), int(factor)
        widths = [max(int(width) // (2**i), int(min_width)) for i in range(stages)]
        blocks, ch = [], int(in_dim)
        for w in widths:
            blocks.append(_UpStage(ch, w))
            ch = w
        self.stages = nn.Sequential(*blocks)
        self.out = nn.Conv2d(ch, out_channels, kernel_size=1)
        self.widths = tuple(widths)

    def logits(self, neck: torch.Tensor) -> torch.Tensor:
        x = self.stages(neck)
        # the 1x1 output conv as a channel contraction: same result, several times faster than a
        # few-channel convolution on CPU (oneDNN is slow for 1 output channel at full resolution)
        weight, bias = self.out.weight[:, :, 0, 0], self.out.bias
        assert bias is not None  # self.out is built with its bias (nn.Conv2d's default)
        return torch.einsum("bchw,oc->bohw", x, weight) + bias.view(1, -1, 1, 1)

    def forward(self, neck: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(neck))
