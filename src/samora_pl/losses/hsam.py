"""H-SAM's two-stage loss (CVPR 2024, arXiv 2403.18271; weights as in the authors' public training code).

Each stage has the fine-tuning loss (``ce_weight`` x CE + ``dice_weight`` x soft Dice, H-SAM: 0.1 / 0.9):
stage 1 against the label nearest-resized to its 4h grid (the batch's ``low_res_label``), stage 2 against
the full-size label. The total is (1 - w) L1 + w L2 with w = 0.6 ** (0.99 ** epoch), epoch counted from 0,
so the weight moves from 0.6 towards stage 2 (0.63 at epoch 10, 0.83 at 100, 0.975 at 299).
"""

from typing import NamedTuple

import torch

from samora_pl.losses.segmentation import SegmentationLoss

STAGE2_BASE = 0.6
STAGE2_DECAY = 0.99


def stage2_weight(epoch: int) -> float:
    """w = 0.6 ** (0.99 ** epoch), epoch 0-based."""
    return STAGE2_BASE ** (STAGE2_DECAY ** int(epoch))


class HSAMLossParts(NamedTuple):
    total: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    weight: float


class HSAMLoss(torch.nn.Module):
    def __init__(self, ce_weight: float = 0.1, dice_weight: float = 0.9):
        super().__init__()
        self.stage_loss = SegmentationLoss(ce_weight, dice_weight)

    def forward(
        self, stage1: torch.Tensor, stage2: torch.Tensor, low_res_label: torch.Tensor, label: torch.Tensor, epoch: int
    ) -> HSAMLossParts:
        """stage1 [B, K, 4h, 4w] vs low_res_label [B, 4h, 4w]; stage2 [B, K, S, S] vs label [B, S, S]."""
        l1 = self.stage_loss(stage1, low_res_label)
        l2 = self.stage_loss(stage2, label)
        w = stage2_weight(epoch)
        return HSAMLossParts((1 - w) * l1 + w * l2, l1, l2, w)
