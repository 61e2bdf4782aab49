"""The two CPT teachers: architecture facts, MAE masking and loss, public checkpoint layouts, teacher.pt."""

import argparse

import pytest
import timm
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.mae import MaeTeacher, norm_pix_targets, patchify, random_masking, unpatchify
from samora_pl.models.simclr import SimclrTeacher, build_resnet
from samora_pl.models.teacher_io import load_mae_checkpoint, load_simclr_checkpoint, load_teacher, save_teacher

TINY_VIT = dict(
    variant="vit_base_patch16_224",
    img_size=64,
    patch_size=16,
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=4,
)


def tiny_mae(**kw) -> MaeTeacher:
    return MaeTeacher(**{**TINY_VIT, **kw})


def tiny_simclr(**kw) -> SimclrTeacher:
    return SimclrTeacher(**{**dict(depth=18, width=0.25, proj_dim=16), **kw})


# ---------------------------------------------------------------------------------------------- SimCLR


def test_simclr_head_and_embedding():
    model = tiny_simclr().eval()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.head if isinstance(m, torch.nn.BatchNorm1d)]
    relus = [m for m in model.head if isinstance(m, torch.nn.ReLU)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert len(norms) == 3 and len(relus) == 2
    assert isinstance(model.head[-1], torch.nn.BatchNorm1d)  # no ReLU on the output
    grey = torch.rand(3, 1, 48, 48)
    out = model.embed(grey)
    assert out.shape == (3, 16)
    assert torch.allclose(out, model.embed(grey.repeat(1, 3, 1, 1)))  # grey is repeated to 3 channels


def test_resnet_width_multiplies_every_channel():
    one, two = build_resnet(18, 1.0), build_resnet(18, 2.0)
    assert one.num_features == 512 and two.num_features == 1024
    assert two.conv1.out_channels == 2 * one.conv1.out_channels
    sk = build_resnet(18, 0.25, selective_kernel=True)
    assert any("paths" in name for name, _ in sk.named_parameters())


def test_resnet50_uses_torchvision_key_names():
    keys = set(build_resnet(50, 1.0).state_dict())
    reference = {k for k in timm.create_model("resnet50", pretrained=False).state_dict() if not k.startswith("fc.")}
    assert keys == reference
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.2.bn3.running_var", "layer1.0.downsample.0.weight"} <= keys


# ------------------------------------------------------------------------------------------------- MAE


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


def test_norm_pix_targets_follow_the_formula():
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


def test_mae_loss_ignores_visible_patches():
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


def test_forward_masks_ratio_and_visible_tokens_ignore_masked_pixels():
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


def test_mae_parameter_names_are_the_official_layout():
    model = MaeTeacher(**{**TINY_VIT, "depth": 1})
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


# ------------------------------------------------------------------------------------ public checkpoints


def test_simclr_checkpoint_torchvision_layout(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet50", pretrained=False)
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = SimclrTeacher(depth=50, width=1.0)
    report = load_simclr_checkpoint(model, path)
    assert report["head"] == "initialised" and "fc.weight" in report["ignored"]
    assert torch.equal(model.backbone.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, source.bn1.running_var)


def test_simclr_checkpoint_with_head(tmp_path):
    donor = tiny_simclr()
    for p in donor.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "simclr.pth"
    torch.save({"resnet": donor.backbone.state_dict(), "head": donor.head.state_dict()}, path)
    model = tiny_simclr()
    assert load_simclr_checkpoint(model, path)["head"] == "loaded"
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(model.eval().embed(x), donor.eval().embed(x))


def test_simclr_checkpoint_of_other_width_or_architecture(tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save(build_resnet(18, 1.0).state_dict(), wide)
    with pytest.raises(SamoraError, match=r"shape mismatches: .*conv1.weight"):
        load_simclr_checkpoint(tiny_simclr(), wide)
    mae = tmp_path / "mae.pth"
    torch.save({"model": tiny_mae().state_dict()}, mae)
    with pytest.raises(SamoraError, match=r"none of the layouts .*blocks.0.attn.*Expected SimCLRv2-Pytorch"):
        load_simclr_checkpoint(tiny_simclr(), mae)


def _official_encoder(img_size=64, **kw) -> dict:
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=0,
        **kw,
    )
    return dict(vit.state_dict())


def test_mae_pretrain_checkpoint_encoder_only(tmp_path):
    torch.manual_seed(0)
    encoder = _official_encoder()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    model = tiny_mae()
    report = load_mae_checkpoint(model, path)
    assert report["decoder"] == "initialised"
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mae_full_checkpoint_with_args_and_other_grid(tmp_path):
    torch.manual_seed(0)
    donor = MaeTeacher(**{**TINY_VIT, "img_size": 96})  # a 6x6 grid checkpoint for a 4x4 model
    state = donor.state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": state, "args": argparse.Namespace(mask_ratio=0.75), "epoch": 799}, path)
    model = tiny_mae()
    report = load_mae_checkpoint(model, path)
    assert report["decoder"] == "loaded" and any("resampled" in n for n in report["notes"])
    assert torch.equal(model.decoder_pred.weight, state["decoder_pred.weight"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 17, 32)


def test_mae_checkpoint_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "mae_full.pth"
    torch.save({"model": MaeTeacher(**{**TINY_VIT, "decoder_dim": 64}).state_dict()}, path)
    with pytest.raises(SamoraError, match=r"decoder_embed.weight: file \(64, 32\) vs model \(32, 32\)"):
        load_mae_checkpoint(tiny_mae(), path)
    simclr = tmp_path / "simclr.pth"
    torch.save(tiny_simclr().state_dict(), simclr)
    with pytest.raises(SamoraError, match="missing keys: cls_token"):
        load_mae_checkpoint(tiny_mae(), simclr)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": tiny_mae().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SamoraError, match="truncated"):
        load_mae_checkpoint(tiny_mae(), path)
    with pytest.raises(SamoraError, match="does not exist"):
        load_mae_checkpoint(tiny_mae(), tmp_path / "missing.pth")


# -------------------------------------------------------------------------------------------- teacher.pt


def test_teacher_file_round_trip(tmp_path):
    torch.manual_seed(0)
    simclr, mae = tiny_simclr(), tiny_mae()
    simclr.train()(torch.rand(4, 1, 32, 32))  # move the BatchNorm statistics away from their init
    save_teacher(simclr, tmp_path / "simclr.pt", {"epochs": 1})
    save_teacher(mae, tmp_path / "mae.pt")
    assert not list(tmp_path.glob(".*.tmp"))

    loaded = load_teacher(tmp_path / "simclr.pt", kind="simclr")
    x = torch.rand(3, 1, 40, 40)
    assert torch.equal(loaded.embed(x), simclr.eval().embed(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert loaded.teacher_meta == {"epochs": 1}

    loaded_mae = load_teacher(tmp_path / "mae.pt")
    noise = torch.rand(3, 16)
    images = torch.rand(3, 1, 64, 64)
    a = loaded_mae.encode_visible(images, 0.75, noise=noise)
    b = mae.eval().encode_visible(images, 0.75, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert (loaded_mae.patch_size, loaded_mae.img_size) == (16, 64)


def test_teacher_file_errors(tmp_path):
    save_teacher(tiny_mae(), tmp_path / "mae.pt")
    with pytest.raises(SamoraError, match="holds a mae teacher"):
        load_teacher(tmp_path / "mae.pt", kind="simclr")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((tmp_path / "mae.pt").read_bytes()[:5000])
    with pytest.raises(SamoraError, match="truncated"):
        load_teacher(truncated)
    public = tmp_path / "public.pth"
    torch.save({"model": tiny_mae().state_dict()}, public)
    with pytest.raises(SamoraError, match="not a samora_pl teacher file"):
        load_teacher(public)
