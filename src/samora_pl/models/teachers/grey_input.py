"""The teachers' shared input step: grey slices in [0, 1] become 3 normalised channels.

`normalize="imagenet"` applies ImageNet mean / std (what torchvision / timm ResNets and MAE were trained
on); "none" keeps [0, 1] (what SimCLRv2 was trained on). The SimCLR teacher's config default, "auto", picks
one from its starting weights (`files.simclr_normalize`); the teacher itself always holds a resolved
value, which `teacher.pt` records in its architecture.
"""

import torch
import torch.nn as nn

from samora_pl.errors import SamoraError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE = ("imagenet", "none")
NORMALIZE_AUTO = "auto"  # cpt.simclr.normalize only: follow the starting weights


class GreyInput(nn.Module):
    """[B, 1 | 3, H, W] in [0, 1] -> 3 channels, normalised (ImageNet statistics or none)."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, normalize: str = "imagenet"):
        super().__init__()
        if normalize not in NORMALIZE:
            raise SamoraError(f"Teacher input normalisation {normalize!r}; allowed: {', '.join(NORMALIZE)}.")
        self.normalize = normalize
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W]; got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    def undo(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] grey (channel mean) for pictures."""
        return (images * self.std + self.mean).mean(dim=1, keepdim=True).clamp(0, 1)
