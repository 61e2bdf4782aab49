"""Distillation heads (models/heads.py): shapes, widths, full-resolution output, training end to end."""

import pytest
import torch

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
