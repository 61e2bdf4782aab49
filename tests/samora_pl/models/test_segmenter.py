import pytest
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.segmenter import SAMoraSegmenter


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(variant="tiny", img_size=128, num_classes=3)
    args.update(kw)
    return SAMoraSegmenter(**args)


@pytest.mark.parametrize("img_size,grid", [(128, 32), (224, 56)])
def test_logits_shape_all_classes_with_background(img_size, grid):
    m = tiny(img_size=img_size)
    out = m(torch.rand(2, 1, img_size, img_size))
    assert out.shape == (2, 4, grid, grid)
    assert m.predict(torch.rand(1, 3, img_size, img_size)).shape == (1, grid, grid)


def test_batch_equals_per_image(randomize_lora):
    m = tiny()
    randomize_lora(m.lora)
    x = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        batched = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def _grads(m, x):
    m.zero_grad(set_to_none=True)
    out = m(x)
    (out.square().mean() + m.aux_loss()).backward()
    return {n for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", ["hl_attn", "mole", "lac"])
def test_samora_mode_trains_fusion_and_decoder_only(randomize_lora, fusion):
    m = tiny(fusion=fusion)
    randomize_lora(m.lora)
    assert m.trainable_mode == "samora"
    names = set(m.trainable_parameter_names())
    assert names and all(n.startswith(("encoder.fusion.", "mask_decoder.")) for n in names)
    assert any(n.startswith("encoder.fusion.") for n in names) == (fusion != "lac")  # LAC learns nothing
    assert m.trainable_parameter_count() == sum(p.numel() for p in m.fusion.parameters()) + sum(
        p.numel() for n, p in m.mask_decoder.named_parameters() if not n.startswith("iou_prediction_head")
    )
    got = _grads(m, torch.rand(2, 1, 128, 128))
    assert got == names  # every trainable parameter is used (DDP-safe), nothing else gets a gradient


def test_two_experts_fuse_with_one_hl_attn_unit(randomize_lora):
    m = tiny(experts=("image", "patch"), fusion="hl_attn")  # the level ablation's pairs
    randomize_lora(m.lora)
    assert m.experts == ("image", "patch") and m.fusion[0].order == ("patch", "image")
    names = set(m.trainable_parameter_names())
    assert not any(".ca2." in n or n.endswith(".g2") for n in names)
    assert _grads(m, torch.rand(2, 1, 128, 128)) == names


def test_samed_mode(randomize_lora):
    m = tiny(experts=("samed",), fusion="single:samed", trainable="samed")
    names = set(m.trainable_parameter_names())
    assert {n for n in names if "lora_" in n} == {n for n, _ in m.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert not any("lora_scale" in n or "image_encoder" in n for n in names)
    assert any(n.startswith("prompt_encoder.") for n in names) and any(n.startswith("mask_decoder.") for n in names)
    got = _grads(m, torch.rand(2, 1, 128, 128))
    assert got == names
    assert "prompt_encoder.no_mask_embed.weight" in got
    with pytest.raises(SamoraError, match="one LoRA expert"):
        tiny().set_trainable("samed")


@pytest.mark.parametrize("fusion", ["single:patch", "hl_attn", "mole"])
def test_distill_mode_trains_one_expert(fusion):
    m = tiny(fusion=fusion, trainable="distill:patch")
    names = set(m.trainable_parameter_names())
    assert names == {n for n, _ in m.named_parameters() if n.startswith("encoder.lora.experts.patch.")}
    assert any("lora_scale" in n for n in names)
    m.zero_grad(set_to_none=True)
    out, tokens = m.encoder(torch.rand(2, 1, 128, 128), return_tokens=True)
    (out.square().mean() + tokens.square().mean()).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == names


def test_other_modes_and_errors():
    m = tiny()
    m.set_trainable("none")
    assert m.trainable_parameter_count() == 0
    m.set_trainable("all")
    assert m.trainable_parameter_count() == sum(p.numel() for p in m.parameters())
    with pytest.raises(SamoraError, match="trainable mode"):
        m.set_trainable("everything")
    with pytest.raises(SamoraError, match="no LoRA expert"):
        m.set_trainable("distill:organ")
    with pytest.raises(SamoraError, match="three experts"):
        tiny(experts=("samed",))
    with pytest.raises(SamoraError, match="built for 128x128"):
        m(torch.rand(1, 1, 64, 64))


def test_aux_loss_only_for_mole():
    m = tiny(fusion="mole")
    m(torch.rand(2, 1, 128, 128))
    assert m.aux_loss().requires_grad
    m = tiny()
    m(torch.rand(2, 1, 128, 128))
    assert m.aux_loss().item() == 0.0


def test_expert_files_round_trip_through_segmenter(tmp_path, randomize_lora):
    a = tiny(fusion="hl_attn", hl_init="zero")
    randomize_lora(a.lora)
    b = tiny(fusion="hl_attn", hl_init="zero")  # same seed: same SAM weights, fresh experts
    for level in a.experts:
        a.save_expert(level, tmp_path / f"{level}.safetensors")
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)  # hl_init=zero: plain SAM at init, experts invisible
        a.fusion.apply(lambda mod: setattr(mod, "init", "paper") if hasattr(mod, "init") else None)
        b.fusion.apply(lambda mod: setattr(mod, "init", "paper") if hasattr(mod, "init") else None)
        assert not torch.allclose(a(x), b(x), atol=1e-4)
        for level in a.experts:
            meta = b.load_expert(level, tmp_path / f"{level}.safetensors")
            assert meta["level"] == level and meta["variant"] == "tiny"
        assert torch.equal(a(x), b(x))


def test_low_precision_runs():
    """bf16 autocast (Lightning's bf16-mixed) and a model cast to bf16 (bf16-true) both work."""
    m = tiny(fusion="mole")
    x = torch.rand(2, 1, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        loss = out.float().square().mean() + m.aux_loss()
    loss.backward()
    assert out.shape == (2, 4, 32, 32)
    m = m.to(torch.bfloat16)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
