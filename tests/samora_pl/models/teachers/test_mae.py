"""The MAE teacher (models/teachers/mae.py): masking, patch order, loss targets, the official parameter layout."""

import torch

from samora_pl.models.teachers.mae import norm_pix_targets, patchify, random_masking, unpatchify


def test_masking_keeps_the_configured_ratio():
    ids_keep, mask = random_masking(5, 64, 0.75)
    assert ids_keep.shape == (5, 16) and mask.shape == (5, 64)
    assert torch.all(mask.sum(1) == 48)
    assert torch.all(ids_keep[:, 1:] > ids_keep[:, :-1])  # sorted, distinct
    assert torch.all(mask.gather(1, ids_keep) == 0)
    assert not torch.equal(ids_keep[0], ids_keep[1])  # per-sample shuffle


def test_patchify_order_and_round_trip():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 = row 0, column 1 of the grid; pixels in (row, col, channel) order
    expected = images[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)
    assert torch.equal(unpatchify(patches, 4, (2, 2)), images)


def test_norm_pix_targets_follow_the_formula(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae()
    x = torch.randn(2, 3, 64, 64)
    targets = model.targets(x)
    patch = x[1, :, 16:32, 32:48].permute(1, 2, 0).reshape(-1)  # grid row 1, column 2 -> index 6
    mean, var = patch.mean(), patch.var(unbiased=True)
    assert torch.allclose(targets[1, 6], (patch - mean) / torch.sqrt(var + 1e-6), atol=1e-5)
    assert torch.allclose(norm_pix_targets(patchify(x, 16)), targets)
    raw = tiny_mae(norm_pix_loss=False)
    assert torch.equal(raw.targets(x), patchify(x, 16))


def test_mae_loss_ignores_visible_patches(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae()
    target = torch.randn(2, 16, 16 * 16 * 3)
    pred = torch.randn_like(target)
    _, mask = random_masking(2, 16, 0.75)
    loss = model.loss(pred, target, mask)
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, manual)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible patches
    assert torch.allclose(model.loss(changed, target, mask), loss)
    changed[mask == 1] += 1.0
    assert not torch.allclose(model.loss(changed, target, mask), loss)


def test_forward_masks_ratio_and_visible_tokens_ignore_masked_pixels(tiny_mae):
    torch.manual_seed(0)
    model = tiny_mae().eval()
    images = torch.rand(2, 1, 64, 64)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(images, noise=noise)
    assert pred.shape == (2, 16, 16 * 16 * 3) and torch.all(mask.sum(1) == 12) and loss.ndim == 0
    tokens, ids_keep, grid = model.encode_visible(images, 0.75, noise=noise)
    assert tokens.shape == (2, 4, 32) and ids_keep.shape == (2, 4) and grid == (4, 4)
    # changing the pixels of masked patches leaves the visible tokens unchanged
    altered = images.clone()
    for b in range(2):
        for index in range(16):
            if index not in ids_keep[b]:
                r, c = divmod(index, 4)
                altered[b, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = torch.rand(1, 16, 16)
    tokens2, _, _ = model.encode_visible(altered, 0.75, noise=noise)
    assert torch.allclose(tokens, tokens2, atol=1e-6)
    # another image size works (positions resampled)
    tokens3, ids3, grid3 = model.encode_visible(torch.rand(1, 1, 96, 64), 0.5)
    assert grid3 == (6, 4) and tokens3.shape == (1, 12, 32)


def test_mae_parameter_names_are_the_official_layout(tiny_mae):
    model = tiny_mae(depth=1)
    blocks = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    official = (
        ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
        + [f"blocks.0.{k}" for k in blocks]
        + ["norm.weight", "norm.bias"]
        + ["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
        + [f"decoder_blocks.0.{k}" for k in blocks]
        + ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    )
    assert set(model.state_dict()) == set(official)
