"""H-SAM's two-stage decoder (models/decoders/hsam.py) and its place in the segmenter."""

import math

import pytest
import torch
import torch.nn.functional as F

from samora_pl.errors import SamoraError
from samora_pl.models.decoders.hsam import (
    HSAMDecoder,
    MaskedAttention,
    default_cmattn_heads,
    embedding_noise,
    stage_one,
)
from samora_pl.models.sam.build import build_mask_decoder, build_prompt_encoder, get_variant
from samora_pl.models.segmenter import SAMoraSegmenter


def vit_b_decoders(img_size, classes=8, cmattn="released", seed=0):
    """ViT-B's 256-wide prompt encoder and stage 1 (SAM's decoder, K = classes + 1 tokens) plus stage 2."""
    torch.manual_seed(seed)
    v = get_variant("vit_b")
    prompt = build_prompt_encoder(v, img_size)
    stage1 = build_mask_decoder(v, classes)
    hsam = HSAMDecoder(
        classes=classes + 1,
        dim=v.out_chans,
        grid=img_size // 16,
        heads=v.decoder_heads,
        mlp_dim=v.decoder_mlp_dim,
        cmattn=cmattn,
    )
    return prompt, stage1, hsam


def run(prompt, stage1, hsam, embeddings):
    sparse, dense = prompt(points=None, boxes=None, masks=None)
    return hsam(stage1, embeddings, prompt.get_dense_pe(), sparse, dense)


def tiny(decoder="hsam", **kw):
    torch.manual_seed(0)
    args = dict(variant="tiny", img_size=128, num_classes=3, decoder=decoder)
    args.update(kw)
    return SAMoraSegmenter(**args)


@pytest.mark.parametrize("img_size,heads", [(224, 7), (512, 8), (320, 8)])
def test_shapes_follow_image_size_and_classes(img_size, heads):
    h = img_size // 16
    prompt, stage1, hsam = vit_b_decoders(img_size)
    embeddings = torch.randn(1, 256, h, h)
    sparse, dense = prompt(points=None, boxes=None, masks=None)
    first = stage_one(stage1, embeddings, prompt.get_dense_pe(), sparse, dense)
    assert first.affinity.shape == (1, 9, h * h)
    assert first.upscaled.shape == (1, 32, 4 * h, 4 * h)
    assert first.logits.shape == (1, 9, 4 * h, 4 * h)
    with torch.no_grad():
        out = run(prompt, stage1, hsam.eval(), embeddings)
    assert out.stage1.shape == (1, 9, 4 * h, 4 * h)
    assert out.prior.shape == (1, 9, h * h)
    assert out.stage2.shape == (1, 9, img_size, img_size)
    cm = hsam.class_attention.attn1
    assert (cm.embed_dim, cm.num_heads) == (h * h, heads)
    # stage 1 is SAM's decoder: its logits equal MaskDecoder.predict_masks
    with torch.no_grad():
        masks, _ = stage1.predict_masks(embeddings, prompt.get_dense_pe(), sparse, dense)
    assert torch.allclose(out.stage1, masks, atol=1e-5)


def test_other_class_counts_build_and_run():
    prompt, stage1, hsam = vit_b_decoders(128, classes=1)
    out = run(prompt, stage1, hsam.eval(), torch.randn(2, 256, 8, 8))
    assert out.stage2.shape == (2, 2, 128, 128)


def test_prior_is_class_softmax_of_shrunk_stage1():
    prompt, stage1, hsam = vit_b_decoders(224)
    out = run(prompt, stage1, hsam.eval(), torch.randn(2, 256, 14, 14))
    assert torch.allclose(out.prior.sum(1), torch.ones(2, 196), atol=1e-5)
    shrunk = F.interpolate(out.stage1, size=(14, 14), mode="bilinear", align_corners=False)
    assert torch.allclose(out.prior, torch.softmax(shrunk, 1).flatten(2), atol=1e-6)
    assert out.prior.requires_grad  # not detached: stage 2's loss reaches stage 1 through P


def test_mask_attention_with_uniform_prior_is_plain_attention_over_k():
    torch.manual_seed(0)
    attn = MaskedAttention(256, 8)
    q, k = torch.randn(2, 9, 256), torch.randn(2, 196, 256)
    bias = attn.out_proj.bias
    plain = attn(q, k, k)
    uniform = attn(q, k, k, torch.full((2, 9, 196), 1 / 9))
    assert torch.allclose(uniform - bias, (plain - bias) / 9, atol=1e-6)
    assert attn.internal_dim == 256  # inner width = embedding width (SAM's cross-attention: half)
    # image -> token: the transposed prior
    back = attn(k, q, q, torch.full((2, 196, 9), 1 / 9))
    assert torch.allclose(back - bias, (attn(k, q, q) - bias) / 9, atol=1e-6)


def test_released_class_attention_is_inert_and_working_one_learns():
    prompt, stage1, hsam = vit_b_decoders(224)
    seen = {}
    hsam.class_attention.register_forward_hook(lambda m, a, out: seen.update(s=out))
    hsam.transformer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    embeddings = torch.randn(2, 256, 14, 14)
    out = run(prompt, stage1, hsam.eval(), embeddings)
    dense = prompt(points=None, boxes=None, masks=None)[1]
    assert torch.equal(seen["s"], torch.ones(2, 1, 14, 14))
    assert torch.equal(seen["x"], 2 * (embeddings + dense))  # X' = X + X * 1 = 2X exactly
    (out.stage1.sum() + out.stage2.sum()).backward()
    grads = [p.grad for p in hsam.class_attention.parameters()]
    assert all(g is None or not g.any() for g in grads)
    assert hsam.transformer.layers[0].token_to_image.q_proj.weight.grad.abs().sum() > 0

    prompt, stage1, hsam = vit_b_decoders(224, cmattn="working")
    hsam.class_attention.register_forward_hook(lambda m, a, out: seen.update(s=out))
    out = run(prompt, stage1, hsam.eval(), embeddings)
    assert not torch.equal(seen["s"], torch.ones(2, 1, 14, 14))
    out.stage2.sum().backward()
    assert sum(p.grad.abs().sum() for p in hsam.class_attention.parameters() if p.grad is not None) > 0


def test_embedding_noise_only_in_training_and_stage1_sees_clean_embeddings():
    prompt, stage1, hsam = vit_b_decoders(224)
    seen = {}
    hsam.transformer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    embeddings = torch.randn(4, 256, 14, 14) * 3
    dense = prompt(points=None, boxes=None, masks=None)[1]
    clean = run(prompt, stage1, hsam.eval(), embeddings)
    assert torch.equal(seen["x"], 2 * (embeddings + dense))
    assert torch.equal(run(prompt, stage1, hsam, embeddings).stage2, clean.stage2)  # eval: deterministic
    noisy = run(prompt, stage1, hsam.train(), embeddings)
    noise = seen["x"] / 2 - embeddings - dense
    spread = (embeddings.max() - embeddings.min()).item()
    assert noise.std().item() == pytest.approx(0.2 * spread, rel=0.05)
    assert torch.allclose(noisy.stage1, clean.stage1)
    e = torch.zeros(2, 3)
    e[0, 0] = 1.0
    assert (embedding_noise(e, 0.5) - e).std().item() > 0.1


def test_combined_prediction_is_mean_of_upsampled_stages_or_stage2():
    m = tiny()
    m.eval()
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        stages = m.forward_stages(x)
        combined = m(x)
    up1 = F.interpolate(stages.stage1, size=(128, 128), mode="bilinear", align_corners=False)
    assert combined.shape == (2, 4, 128, 128)
    assert torch.allclose(combined, (up1 + stages.stage2) / 2, atol=1e-6)
    assert torch.equal(stages.combined("stage2"), stages.stage2)
    assert torch.equal(m.predict(x), combined.argmax(1))
    only2 = tiny(hsam_inference="stage2").eval()
    with torch.no_grad():
        assert torch.allclose(only2(x), only2.forward_stages(x).stage2)
    with pytest.raises(SamoraError, match="hsam_inference"):
        stages.combined("max")


def test_init_stage1_from_sam_stage2_fresh_and_zero_b_is_plain_sam(tiny_ckpt):
    path, sd = tiny_ckpt
    m = tiny(checkpoint=str(path), experts=("samed",), fusion="single:samed", trainable="samed")
    plain = tiny(experts=("samed",), fusion="single:samed")
    for key in ("transformer.layers.0.cross_attn_token_to_image.q_proj.weight", "output_upscaling.0.weight"):
        assert torch.equal(m.mask_decoder.state_dict()[key], sd[f"mask_decoder.{key}"])
    assert torch.equal(m.mask_decoder.iou_token.weight, sd["mask_decoder.iou_token.weight"])
    assert not any(k.startswith("hsam_decoder") for k in m.load_report.loaded + m.load_report.missing)
    # stage 2 comes from the seed alone: the same with and without a checkpoint
    for key, value in m.hsam_decoder.state_dict().items():
        assert torch.equal(value, plain.hsam_decoder.state_dict()[key]), key
    assert all(not p.any() for n, p in m.lora.named_parameters() if "lora_B" in n)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(m.encoder(x), m.encoder.image_encoder(x), atol=1e-5)


def _trainable(decoder, mode):
    experts = ("samed",) if mode == "samed" else ("image", "patch", "pixel")
    fusion = "single:samed" if mode == "samed" else "hl_attn"
    return set(tiny(decoder=decoder, experts=experts, fusion=fusion, trainable=mode).trainable_parameter_names())


@pytest.mark.parametrize("mode", ["samed", "samora"])
def test_trainable_sets_gain_the_whole_hsam_decoder(mode):
    sam, hsam = _trainable("sam", mode), _trainable("hsam", mode)
    m = tiny(decoder="hsam")
    stage2 = {f"hsam_decoder.{n}" for n, _ in m.hsam_decoder.named_parameters()}
    assert hsam == sam | stage2
    assert not any(n.startswith("encoder.image_encoder.") for n in hsam)
    experts = {n for n in hsam if n.startswith("encoder.lora.")}
    if mode == "samora":
        assert not experts and any(n.startswith("encoder.fusion.") for n in hsam)
    else:
        assert experts and "prompt_encoder.no_mask_embed.weight" in hsam


def test_bad_inputs():
    with pytest.raises(SamoraError, match="model.hsam_cmattn_heads=5 does not divide the token count N = 64"):
        tiny(hsam_cmattn_heads=5)
    with pytest.raises(SamoraError, match="model.decoder='unet'"):
        tiny(decoder="unet")
    with pytest.raises(SamoraError, match="model.hsam_cmattn"):
        tiny(hsam_cmattn="on")
    assert default_cmattn_heads(196) == 7 and default_cmattn_heads(1024) == 8 and default_cmattn_heads(100) == 5
    with pytest.raises(SamoraError, match="decode_stages needs model.decoder=hsam"):
        tiny(decoder="sam").forward_stages(torch.rand(1, 1, 128, 128))


def test_cmattn_parameter_count_matches_released_sizes():
    """About 1.11 M parameters at 224 and 12.6 M at 512, as in the released code."""
    for size, millions in ((224, 1.11), (512, 12.6)):
        _, _, hsam = vit_b_decoders(size)
        count = sum(p.numel() for p in hsam.class_attention.parameters()) / 1e6
        assert math.isclose(count, millions, rel_tol=0.02), (size, count)
