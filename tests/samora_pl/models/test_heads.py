"""Distillation heads (models/heads.py) and the distillation losses and tensor operations (distillation.py)."""

import pytest
import torch
import torch.nn.functional as F

from samora_pl.distillation import degrade, gather_positions, gaussian_blur, to_teacher_grid, visible_student_tokens
from samora_pl.losses.distillation import denoise_loss, normalized_mse, overlap_loss
from samora_pl.models.heads import ImageProjection, PixelDecoder, TokenProjection

# ------------------------------------------------------------------------------------------------ heads


def test_image_projection_pools_the_neck_map():
    torch.manual_seed(0)
    head = ImageProjection(64, 128, hidden=96)
    neck = torch.randn(3, 64, 8, 8)
    out = head(neck)
    assert out.shape == (3, 128)
    torch.testing.assert_close(out, head(neck.mean(dim=(2, 3))))


def test_token_projection_widths():
    head = TokenProjection(64, 48)
    assert head(torch.randn(2, 5, 64)).shape == (2, 5, 48)
    mlp = TokenProjection(64, 48, hidden=32)
    assert mlp(torch.randn(2, 5, 64)).shape == (2, 5, 48)
    assert sum(p.numel() for p in mlp.parameters()) > 0


@pytest.mark.parametrize("factor, size", [(16, 4), (16, 8), (8, 3)])
def test_pixel_decoder_full_resolution_in_unit_range(factor, size):
    torch.manual_seed(0)
    dec = PixelDecoder(64, width=32, factor=factor)
    with torch.no_grad():
        out = dec(torch.randn(2, 64, size, size) * 10)
    assert out.shape == (2, 1, size * factor, size * factor)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_pixel_decoder_widths_halve_with_a_floor():
    assert PixelDecoder(256, width=128).widths == (128, 64, 32, 16)
    assert PixelDecoder(64, width=32, min_width=8).widths == (32, 16, 8, 8)
    with pytest.raises(ValueError):
        PixelDecoder(64, factor=12)


def test_pixel_decoder_output_layer_is_its_1x1_conv():
    torch.manual_seed(0)
    dec = PixelDecoder(16, width=16, factor=4)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits(x), dec.out(dec.stages(x)))


def test_pixel_decoder_trains_end_to_end():
    torch.manual_seed(0)
    dec = PixelDecoder(16, width=16, factor=4)
    x = torch.randn(2, 16, 4, 4)
    dec(x).sum().backward()
    assert all(p.grad is not None for p in dec.parameters())


# ------------------------------------------------------------------------------------------------ losses


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
