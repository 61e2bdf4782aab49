"""The prompt-free SAM 2 segmenter: K + 1 masks through SAM 2's image path, gradients, trainable sets,
the config keys (model.family / model.variant / model.img_size) and the factory."""

import pytest
import torch

from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.config.specs import ExpertLayout
from samora_pl.errors import SamoraError
from samora_pl.models.factory import base_fingerprint, build_segmenter
from samora_pl.models.sam2.segmenter import SAM2Segmenter

pytest.importorskip("sam2")


def _model(**kw):
    torch.manual_seed(0)
    return SAM2Segmenter(**{"variant": "tiny", "img_size": 128, "num_classes": 4, **kw})


def test_logits_follow_the_package_image_path():
    model = _model().eval()
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        logits = model(x)
        # by hand, as SAM2Base.forward_image + _forward_sam_heads do it (without the object-score gate)
        out = model.encoder.image_encoder(model.encoder.normalise(x))
        fpn = out["backbone_fpn"]
        high = [model.mask_decoder.conv_s0(fpn[0]), model.mask_decoder.conv_s1(fpn[1])]
        emb = fpn[2] + model.encoder.no_mem_embed.view(1, -1, 1, 1)
        pts = (torch.zeros(2, 1, 2), -torch.ones(2, 1, dtype=torch.int32))
        sparse, dense = model.prompt_encoder(points=pts, boxes=None, masks=None)
        masks, *_ = model.mask_decoder(
            emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True, False, high_res_features=high
        )
    assert tuple(logits.shape) == (2, 5, 32, 32)
    # forward(multimask_output=True) drops token 0; ours keeps all K + 1 (background first)
    torch.testing.assert_close(logits[:, 1:], masks, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_mask_logits_even_when_the_object_score_is_negative():
    model = _model(trainable="samora", hl_init="residual_mean")  # the init whose gamma starts at 0
    with torch.no_grad():  # an object score far below 0: SAM 2's video path would set every logit to -1024
        model.mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-100.0)
    x = torch.rand(2, 1, 128, 128)
    logits = model(x)
    assert logits.requires_grad and logits.abs().max() < 1000
    logits.logsumexp(1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"].abs().sum() > 0
    assert grads["mask_decoder.conv_s0.weight"].abs().sum() > 0 and grads["mask_decoder.conv_s1.weight"].abs().sum() > 0
    assert all(f.gamma.grad is not None for f in model.fusion)
    # DDP needs every trainable parameter in the graph: nothing trainable is left without a gradient
    assert [n for n, g in grads.items() if g is None] == []


def test_trainable_sets_and_no_memory_modules():
    model = _model(trainable="samora")
    names = model.trainable_parameter_names()
    assert not [n for n in names if n.startswith(("encoder.image_encoder", "encoder.lora", "prompt_encoder"))]
    assert not [n for n in names if "iou_prediction_head" in n or "pred_obj_score_head" in n]
    assert "encoder.no_mem_embed" not in names
    assert not [n for n, _ in model.named_modules() if "memory" in n or "obj_ptr" in n]
    samed = _model(experts=("samed",), fusion="single:samed", trainable="samed")
    lora = [n for n in samed.trainable_parameter_names() if "lora_" in n]
    assert lora and all("lora_A" in n or "lora_B" in n for n in lora)
    assert "prompt_encoder.no_mask_embed.weight" in samed.trainable_parameter_names()


def test_frozen_tensors_are_bit_identical_after_a_step():
    model = _model(trainable="samora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.rand(2, 1, 128, 128)).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_experts_save_and_load_alone(tmp_path):
    a = _model(experts=("image", "patch", "pixel"))
    with torch.no_grad():
        for p in a.lora["patch"].parameters():
            p.normal_()
    path = a.save_expert("patch", tmp_path / "patch.safetensors")
    b = _model(experts=("image", "patch", "pixel"))
    b.load_expert("patch", path)
    assert all(torch.equal(x, y) for x, y in zip(a.lora["patch"].parameters(), b.lora["patch"].parameters()))
    other = SAM2Segmenter(variant="tiny", img_size=128, num_classes=4, lora_rank=8)
    with pytest.raises(SamoraError, match="rank"):
        other.load_expert("patch", path)


def test_config_keys_and_factory(tmp_path):
    cfg = compose("finetune", ["model.family=sam2", "model.variant=tiny", "model.img_size=128", f"data.dir={tmp_path}"])
    model = build_segmenter(build_plan(cfg).segmenter, ExpertLayout(("image", "patch", "pixel"), "hl_attn"), 8)
    assert isinstance(model, SAM2Segmenter) and len(base_fingerprint(model)) == 64
    assert base_fingerprint(model) == base_fingerprint(
        build_segmenter(build_plan(cfg).segmenter, ExpertLayout(("image",), "single:image"), 8)
    )
    with pytest.raises(SamoraError, match="model.variant.*model.family=sam2.*b\\+"):
        compose("finetune", ["model.family=sam2", "model.variant=vit_b"])
    with pytest.raises(SamoraError, match="model.variant.*model.family=sam\\b"):
        compose("finetune", ["model.variant=b+"])
    with pytest.raises(SamoraError, match="model.img_size.*multiple of 32"):
        compose("finetune", ["model.family=sam2", "model.img_size=240"])
    with pytest.raises(SamoraError, match="model.family"):
        compose("finetune", ["model.family=sam3"])


def test_samed_mode_gives_every_trainable_parameter_a_gradient():
    model = _model(experts=("samed",), fusion="single:samed", trainable="samed")
    model(torch.rand(2, 1, 128, 128)).logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
