"""Teacher files (models/teachers/files.py): public SimCLR and MAE checkpoint layouts and the teacher.pt round trip."""

import argparse

import pytest
import timm
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.files import (
    load_mae_checkpoint,
    load_simclr_checkpoint,
    load_teacher,
    save_teacher,
    simclr_normalize,
)
from samora_pl.models.teachers.simclr import SimclrTeacher, build_resnet

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


def test_simclr_normalisation_follows_the_starting_weights(tmp_path, tiny_simclr):
    """auto: ImageNet statistics for an ImageNet ResNet file, [0, 1] from scratch, a teacher.pt's own record."""
    resnet = tmp_path / "resnet18.pth"
    torch.save(build_resnet(18, 0.25).state_dict(), resnet)
    assert simclr_normalize("auto", resnet) == "imagenet"
    assert simclr_normalize("none", resnet) == "none"  # an explicit choice stands
    assert simclr_normalize("auto", None) == "none" and simclr_normalize("imagenet", None) == "imagenet"
    save_teacher(tiny_simclr(normalize="none"), tmp_path / "teacher.pt")
    assert simclr_normalize("auto", tmp_path / "teacher.pt") == "none"
    with pytest.raises(SamoraError, match="cpt.simclr.normalize.*allowed: auto, imagenet, none"):
        simclr_normalize("zscore", resnet)


def test_simclr_checkpoint_with_head(tmp_path, tiny_simclr):
    donor = tiny_simclr()
    for p in donor.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "simclr.pth"
    torch.save({"resnet": donor.backbone.state_dict(), "head": donor.head.state_dict()}, path)
    model = tiny_simclr()
    assert load_simclr_checkpoint(model, path)["head"] == "loaded"
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(model.eval().embed(x), donor.eval().embed(x))


def test_simclr_checkpoint_of_other_width_or_architecture(tmp_path, tiny_mae, tiny_simclr):
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


def test_mae_pretrain_checkpoint_encoder_only(tmp_path, tiny_mae):
    torch.manual_seed(0)
    encoder = _official_encoder()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    model = tiny_mae()
    report = load_mae_checkpoint(model, path)
    assert report["decoder"] == "initialised"
    for key, value in encoder.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mae_full_checkpoint_with_args_and_other_grid(tmp_path, tiny_mae):
    torch.manual_seed(0)
    donor = tiny_mae(img_size=96)  # a 6x6 grid checkpoint for a 4x4 model
    state = donor.state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": state, "args": argparse.Namespace(mask_ratio=0.75), "epoch": 799}, path)
    model = tiny_mae()
    report = load_mae_checkpoint(model, path)
    assert report["decoder"] == "loaded" and any("resampled" in n for n in report["notes"])
    assert torch.equal(model.decoder_pred.weight, state["decoder_pred.weight"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 17, 32)


def test_mae_checkpoint_mismatch_names_keys_and_shapes(tmp_path, tiny_mae, tiny_simclr):
    path = tmp_path / "mae_full.pth"
    torch.save({"model": tiny_mae(decoder_dim=64).state_dict()}, path)
    with pytest.raises(SamoraError, match=r"decoder_embed.weight: file \(64, 32\) vs model \(32, 32\)"):
        load_mae_checkpoint(tiny_mae(), path)
    simclr = tmp_path / "simclr.pth"
    torch.save(tiny_simclr().state_dict(), simclr)
    with pytest.raises(SamoraError, match="missing keys: cls_token"):
        load_mae_checkpoint(tiny_mae(), simclr)


def test_truncated_checkpoint(tmp_path, tiny_mae):
    path = tmp_path / "mae.pth"
    torch.save({"model": tiny_mae().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SamoraError, match="truncated"):
        load_mae_checkpoint(tiny_mae(), path)
    with pytest.raises(SamoraError, match="does not exist"):
        load_mae_checkpoint(tiny_mae(), tmp_path / "missing.pth")


# -------------------------------------------------------------------------------------------- teacher.pt


def test_teacher_file_round_trip(tmp_path, tiny_mae, tiny_simclr):
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


def test_teacher_file_errors(tmp_path, tiny_mae):
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
