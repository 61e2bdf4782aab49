"""Stage-2 loss: 0.2 x cross-entropy + 0.8 x soft Dice over the K+1 classes (docs/method.md, section Stage 2).

MONAI's DiceCELoss with `batch=True, squared_pred=True, include_background=True` and smoothing 1e-5
computes exactly the reference Dice: per class 1 - (2 sum(p t) + 1e-5) / (sum p^2 + sum t^2 + 1e-5) over
the whole batch, averaged over classes. It always runs in float32, also under mixed precision.
"""

import torch
from monai.losses import DiceCELoss


class SegmentationLoss(torch.nn.Module):
    def __init__(self, ce_weight: float = 0.2, dice_weight: float = 0.8):
        super().__init__()
        self.loss = DiceCELoss(
            include_background=True,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
            lambda_ce=ce_weight,
            lambda_dice=dice_weight,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, K+1, h, w]; target [B, h, w] integer labels on the logit grid."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.loss(logits.float(), target.unsqueeze(1).long())
