"""Distillation losses (losses/distillation.py): normalised MSE, overlap and denoising losses."""

import pytest
import torch
import torch.nn.functional as F

from samora_pl.losses.distillation import denoise_loss, normalized_mse, overlap_loss


def test_normalized_mse_is_the_spec_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 16), torch.randn(6, 16)
    loss, cosine = normalized_mse(s, t)
    sn, tn = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    expected = sum(((sn[i] - tn[i]) ** 2).sum() for i in range(6)) / 6
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, 2 - 2 * cosine)
    zero, one = normalized_mse(3 * t, t)
    assert float(zero) < 1e-6 and abs(float(one) - 1) < 1e-6
    with pytest.raises(ValueError):
        normalized_mse(s, t[:, :8])


def test_overlap_and_denoise_loss():
    torch.manual_seed(0)
    t = torch.rand(2, 1, 8, 8)
    assert float(overlap_loss(t, t)) < 1e-6
    p = torch.rand(2, 1, 8, 8)
    manual = 1 - (2 * (p * t).flatten(1).sum(1) + 1e-5) / ((p**2).flatten(1).sum(1) + (t**2).flatten(1).sum(1) + 1e-5)
    torch.testing.assert_close(overlap_loss(p, t), manual.mean())
    total, overlap, mse = denoise_loss(p, t, 0.9, 0.1)
    torch.testing.assert_close(total, 0.9 * overlap + 0.1 * F.mse_loss(p, t))
    torch.testing.assert_close(mse, F.mse_loss(p, t))
