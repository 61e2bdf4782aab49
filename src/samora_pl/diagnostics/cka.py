"""Linear CKA (Kornblith et al. 2019): how alike two representations of the same inputs are.

CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X [n, dx] and Y [n, dy]; the
feature-space form of HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = XX^T, L = YY^T, so
it never builds an n x n Gram matrix (patch-level CKA has one row per token). It is 1 for the same
features, unchanged by an orthogonal transform or an isotropic scaling of either side, and near 0 for
independent features when n >> d.
"""

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features x [n, dx] and y [n, dy] (rows: the same inputs), in float64."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.t() @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.t() @ x) * torch.linalg.matrix_norm(y.t() @ y)
    return float(cross / norm) if norm > 0 else float("nan")
