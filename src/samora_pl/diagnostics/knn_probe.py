"""A k-nearest-neighbour probe: Euclidean neighbours on standardised features, class-balanced votes.

Each neighbour's vote for a class is divided by that label's share in the training rows, so a rare organ
is not outvoted by the background: score = (f / p) / (f / p + (1 - f) / (1 - p)) with f the neighbours'
positive fraction and p the class prevalence. It is monotone in f, so AUROC equals that of plain voting;
score > 0.5 is the balanced decision.
"""

import torch

from samora_pl.diagnostics.linear_probe import Standardise


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Balanced neighbour scores [m, C] in [0, 1] for the test rows."""
    scale = Standardise(train_x)
    reference, queries = scale(train_x), scale(test_x)
    k = min(int(k), train_x.shape[0])
    nearest = torch.cat(  # [m, k], in chunks of queries so the distance matrix stays small
        [torch.cdist(part, reference).topk(k, dim=1, largest=False).indices for part in queries.split(1024)]
    )
    y = train_y.double()
    fraction = y[nearest].mean(1)  # [m, C]
    prevalence = y.mean(0).clamp(1e-6, 1 - 1e-6)
    pos, neg = fraction / prevalence, (1 - fraction) / (1 - prevalence)
    return pos / (pos + neg)
