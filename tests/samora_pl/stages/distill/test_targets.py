"""Distillation tensor operations (distillation.py): degradation, blur, patch positions and grids."""

import pytest
import torch

from samora_pl.stages.distill.targets import (
    degrade,
    gather_positions,
    gaussian_blur,
    to_teacher_grid,
    visible_student_tokens,
)


def test_degrade_range_and_probability():
    torch.manual_seed(0)
    clean = torch.rand(64, 1, 16, 16)
    noisy = degrade(clean, noise_sigma=0.08, blur_prob=0.0)
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1
    assert 0.05 < float((noisy - clean).std()) < 0.09
    same = degrade(clean, noise_sigma=0.0, blur_prob=0.0)
    assert torch.equal(same, clean)
    blurred = degrade(clean, noise_sigma=0.0, blur_prob=0.5)
    changed = (blurred - clean).flatten(1).abs().amax(1) > 0
    assert 16 <= int(changed.sum()) <= 48  # about half the images blurred
    every = degrade(clean, noise_sigma=0.0, blur_prob=1.0)
    assert bool(((every - clean).flatten(1).abs().amax(1) > 0).all())


def test_gaussian_blur_keeps_constants_and_sums():
    img = torch.full((2, 1, 12, 12), 0.3)
    torch.testing.assert_close(gaussian_blur(img, torch.tensor([0.7, 1.5])), img)
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    y = gaussian_blur(x, torch.tensor([1.0]))
    torch.testing.assert_close(y.sum(), torch.tensor(1.0))
    assert float(y[0, 0, 7, 7]) < 1.0


# ------------------------------------------------------------------------------------- patch positions


def test_gather_positions_is_row_major():
    B, h, w, C = 2, 3, 4, 5
    tokens = torch.randn(B, h, w, C)
    ids = torch.tensor([[0, 5, 11], [3, 4, 7]])
    out = gather_positions(tokens, ids)
    for b in range(B):
        for j, i in enumerate(ids[b].tolist()):
            assert torch.equal(out[b, j], tokens[b, i // w, i % w])
    with pytest.raises(ValueError):
        gather_positions(tokens, torch.tensor([[12, 0, 1], [0, 1, 2]]))


def test_to_teacher_grid_identity_area_mean_and_upsampling():
    tokens = torch.randn(2, 8, 8, 6)
    assert to_teacher_grid(tokens, (8, 8)) is tokens
    coarse = to_teacher_grid(tokens, (4, 4))  # student finer: area mean of the 2x2 tokens of each patch
    torch.testing.assert_close(coarse[:, 1, 2], tokens[:, 2:4, 4:6].mean(dim=(1, 2)))
    small = torch.randn(1, 2, 2, 3)
    fine = to_teacher_grid(small, (4, 4))  # student coarser: bilinear at the teacher patch centres
    assert fine.shape == (1, 4, 4, 3)
    torch.testing.assert_close(fine[0, 0, 0], small[0, 0, 0])  # corner patch centre clamps to the corner token
    ids = torch.tensor([[1, 6]])
    torch.testing.assert_close(visible_student_tokens(small, ids, (4, 4)), gather_positions(fine, ids))
