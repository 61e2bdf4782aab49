"""Linear CKA: 1 for the same features, invariant to orthogonal maps and isotropic scaling, about 0 for
independent features, and equal to the Gram-matrix (HSIC) form it replaces."""

import torch

from samora_pl.diagnostics.cka import linear_cka


def _gram_cka(x, y):
    """Kornblith et al.'s HSIC form with centred linear Gram matrices (the n x n reference)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = h @ (x.double() @ x.double().t()) @ h, h @ (y.double() @ y.double().t()) @ h
    return float((gram_x * gram_y).sum() / ((gram_x * gram_x).sum().sqrt() * (gram_y * gram_y).sum().sqrt()))


def test_same_features_give_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert abs(linear_cka(x, x) - 1.0) < 1e-10


def test_orthogonal_transform_and_isotropic_scaling_change_nothing():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    y = torch.randn(300, 20, generator=g, dtype=torch.float64)
    y = y + x @ torch.randn(12, 20, generator=g, dtype=torch.float64)  # related features, CKA well inside (0, 1)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    assert abs(linear_cka(x, y @ q) - base) < 1e-10
    assert abs(linear_cka(7.5 * x, 0.01 * y) - base) < 1e-10
    assert abs(linear_cka(x + 3.0, y - 2.0) - base) < 1e-10  # centred: offsets do not count


def test_independent_features_are_near_zero_and_a_linear_map_is_not():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20000, 8, generator=g), torch.randn(20000, 8, generator=g)
    assert linear_cka(x, y) < 0.01
    assert linear_cka(x, x @ torch.randn(8, 8, generator=g)) > 0.3


def test_equals_the_gram_matrix_form():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g)
    y = torch.tanh(x @ torch.randn(6, 9, generator=g)) + 0.5 * torch.randn(50, 9, generator=g)
    assert abs(linear_cka(x, y) - _gram_cka(x, y)) < 1e-10
