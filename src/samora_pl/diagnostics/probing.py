"""Both probes on one set of features: train on the training part, score on the held-out part."""

import torch

from samora_pl.diagnostics.knn_probe import knn_scores
from samora_pl.diagnostics.linear_probe import LogisticProbe
from samora_pl.diagnostics.scores import mean_scores, scorable


def probe_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    knn_k: int = 5,
    l2: float = 1e-2,
    prefix: str = "",
    knn: bool = True,
) -> dict:
    """{prefix}linear_bacc / linear_auroc (and knn_bacc / knn_auroc with `knn`): means over the classes
    scorable on both parts ({prefix}classes of them); NaN scores when no class is."""
    keep = scorable(train_y, test_y)
    out = {f"{prefix}classes": int(keep.sum())}
    if not bool(keep.any()):
        names = ("linear_bacc", "linear_auroc") + (("knn_bacc", "knn_auroc") if knn else ())
        return {**out, **{f"{prefix}{name}": float("nan") for name in names}}
    train_y, test_y = train_y[:, keep], test_y[:, keep]
    linear = mean_scores(LogisticProbe(l2).fit(train_x, train_y).predict(test_x), test_y)
    out.update({f"{prefix}linear_{k}": v for k, v in linear.items()})
    if knn:
        scores = mean_scores(knn_scores(train_x, train_y, test_x, knn_k), test_y)
        out.update({f"{prefix}knn_{k}": v for k, v in scores.items()})
    return out
