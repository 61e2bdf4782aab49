"""A multi-label logistic-regression probe in torch (L-BFGS, L2), so no extra dependency is needed.

One independent logistic regression per class on standardised features (mean and std of the training
rows), with balanced class weights (positives and negatives weigh the same in total), so the 0.5
threshold suits balanced accuracy even for rare organs. Per class it minimises mean weighted log-loss +
l2 ||w||^2 (intercept free), which is scikit-learn's LogisticRegression(C=1/(2 n l2), class_weight="balanced")
on the same standardised features (tested against it where it is installed). Float64 and L-BFGS: the fit is
deterministic.
"""

import torch
import torch.nn.functional as F


class Standardise:
    """Feature-wise z-scoring fitted on training rows (constant features are left at zero)."""

    def __init__(self, x: torch.Tensor):
        x = x.double()
        self.mean = x.mean(0, keepdim=True)
        self.std = x.std(0, keepdim=True).clamp_min(1e-8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


class LogisticProbe:
    """fit(x [n, d], y [n, C] in {0, 1}) then predict(x) -> probabilities [m, C]."""

    def __init__(self, l2: float = 1e-2, max_iter: int = 200):
        self.l2 = float(l2)
        self.max_iter = int(max_iter)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> "LogisticProbe":
        self.scale = Standardise(x)
        x, y = self.scale(x), y.double()
        n, d = x.shape
        pos = y.sum(0).clamp_min(1.0)
        neg = (n - y.sum(0)).clamp_min(1.0)
        weight = y * (n / (2 * pos)) + (1 - y) * (n / (2 * neg))
        self.w = torch.zeros(d, y.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS(
            [self.w, self.b], max_iter=self.max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
        )

        def closure():
            optimiser.zero_grad()
            logits = x @ self.w + self.b
            fit = F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="sum") / n
            loss = fit + self.l2 * self.w.pow(2).sum()  # per class: mean loss + l2 ||w_c||^2, whatever C is
            loss.backward()
            return loss

        optimiser.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale(x) @ self.w + self.b)
