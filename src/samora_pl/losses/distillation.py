"""Losses of stage-1 distillation.

* :func:`normalized_mse`: the paper's ``(1/n) sum_i ||F(x_i) - G(x_i)||^2`` between L2-normalised student and
  teacher feature vectors (rows), i.e. ``2 - 2 cos`` per row, averaged over the rows (images or tokens);
  image and patch levels.
* :func:`denoise_loss`: ``overlap_weight x (1 - 2 sum(p t) / (sum p^2 + sum t^2)) + mse_weight x MSE`` per
  image, with prediction and target both in [0, 1] (pixel level).
"""

import torch
import torch.nn.functional as F


def normalized_mse(
    student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., D] -> (mean over rows of ||s/|s| - t/|t|||^2, mean cosine similarity)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ")
    s = F.normalize(student.float(), dim=-1, eps=eps)
    t = F.normalize(teacher.float(), dim=-1, eps=eps)
    loss = (s - t).pow(2).sum(-1).mean()
    cosine = (s * t).sum(-1).mean()
    return loss, cosine.detach()


def overlap_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice-style overlap per image, averaged over the batch:
    1 - (2 sum(p t) + eps) / (sum p^2 + sum t^2 + eps)."""
    p = pred.float().flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.pow(2).sum(1) + t.pow(2).sum(1) + eps)
    return (1 - dice).mean()


def denoise_loss(
    pred: torch.Tensor, target: torch.Tensor, overlap_weight: float = 0.9, mse_weight: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, overlap, mse) for a reconstruction and the clean slice, both in [0, 1]."""
    if pred.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    overlap = overlap_loss(pred, target)
    mse = F.mse_loss(pred.float(), target.float())
    return overlap_weight * overlap + mse_weight * mse, overlap.detach(), mse.detach()
