"""Per-class scores of a multi-label probe: balanced accuracy and AUROC, averaged over the scorable classes.

A class is scorable on a split when it has positives and negatives there; a class is only probed when it
is scorable on both the training and the held-out part (`scorable`), otherwise its score would be
undefined or trivially perfect.
"""

import numpy as np
import torch
from scipy.stats import rankdata


def scorable(*targets: torch.Tensor) -> torch.Tensor:
    """Boolean [C]: classes with positives and negatives in every given target matrix [n, C]."""
    keep = None
    for y in targets:
        y = y.bool()
        ok = y.any(0) & (~y).any(0)
        keep = ok if keep is None else keep & ok
    return keep


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """(true-positive rate + true-negative rate) / 2 of binary predictions [n]; 0.5 is chance."""
    pred, target = pred.bool(), target.bool()
    tpr = (pred & target).sum().item() / max(int(target.sum()), 1)
    tnr = (~pred & ~target).sum().item() / max(int((~target).sum()), 1)
    return 0.5 * (tpr + tnr)


def auroc(score: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half); 0.5 is chance."""
    target = target.bool().cpu().numpy()
    ranks = rankdata(score.double().cpu().numpy())
    pos, neg = int(target.sum()), int((~target).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[target].sum() - pos * (pos + 1) / 2) / (pos * neg))


def mean_scores(score: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> dict:
    """Mean balanced accuracy (score > threshold) and mean AUROC over the columns of score/target [n, C]."""
    bacc = [balanced_accuracy(score[:, c] > threshold, target[:, c]) for c in range(target.shape[1])]
    area = [auroc(score[:, c], target[:, c]) for c in range(target.shape[1])]
    return {"bacc": float(np.mean(bacc)), "auroc": float(np.mean(area))}
