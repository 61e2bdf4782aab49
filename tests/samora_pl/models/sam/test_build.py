import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos

from samora_pl.errors import SamoraError
from samora_pl.models.sam.build import (
    VARIANTS,
    _resize_rel_pos,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    get_variant,
    load_sam_checkpoint,
)
from samora_pl.models.segmenter import SAMoraSegmenter


def test_variants_match_official_sam():
    assert (VARIANTS["vit_b"].embed_dim, VARIANTS["vit_b"].depth, VARIANTS["vit_b"].num_heads) == (768, 12, 12)
    assert VARIANTS["vit_b"].global_attn_indexes == (2, 5, 8, 11)
    assert (VARIANTS["vit_l"].embed_dim, VARIANTS["vit_l"].depth, VARIANTS["vit_l"].num_heads) == (1024, 24, 16)
    assert VARIANTS["vit_l"].global_attn_indexes == (5, 11, 17, 23)
    assert (VARIANTS["vit_h"].embed_dim, VARIANTS["vit_h"].depth, VARIANTS["vit_h"].num_heads) == (1280, 32, 16)
    assert VARIANTS["vit_h"].global_attn_indexes == (7, 15, 23, 31)
    for name in ("vit_b", "vit_l", "vit_h"):
        v = VARIANTS[name]
        assert (v.window_size, v.patch_size, v.out_chans) == (14, 16, 256)
    with pytest.raises(SamoraError, match="vit_b"):
        get_variant("vit_x")


@pytest.mark.parametrize("img_size", [128, 224])
def test_build_encoder_any_size(img_size):
    enc = build_image_encoder("tiny", img_size)
    g = img_size // 16
    v = VARIANTS["tiny"]
    assert tuple(enc.pos_embed.shape) == (1, g, g, v.embed_dim)
    for i, blk in enumerate(enc.blocks):
        L = 2 * g - 1 if i in v.global_attn_indexes else 2 * v.window_size - 1
        assert blk.attn.rel_pos_h.shape[0] == L and blk.attn.rel_pos_w.shape[0] == L
        assert blk.window_size == (0 if i in v.global_attn_indexes else v.window_size)
    out = enc(torch.rand(1, 3, img_size, img_size))
    assert out.shape == (1, v.out_chans, g, g)
    pe = build_prompt_encoder("tiny", img_size)
    assert pe.get_dense_pe().shape == (1, v.out_chans, g, g)
    assert build_mask_decoder("tiny", 5).num_mask_tokens == 6


def test_bad_img_size():
    with pytest.raises(SamoraError, match="multiple of the patch size"):
        build_image_encoder("tiny", 100)


def test_rel_pos_resize_matches_sam_runtime_interpolation():
    table = torch.randn(127, 16)
    resized = _resize_rel_pos(table, 27)
    # segment-anything interpolates a wrong-length table the same way at run time
    assert torch.allclose(get_rel_pos(14, 14, table), get_rel_pos(14, 14, resized), atol=1e-6)


def _load(img_size, path, num_classes=8, **kw):
    enc = build_image_encoder("tiny", img_size)
    pe = build_prompt_encoder("tiny", img_size)
    dec = build_mask_decoder("tiny", num_classes)
    report = load_sam_checkpoint(path, enc, pe, dec, **kw)
    return enc, pe, dec, report


@pytest.mark.parametrize("img_size", [224, 512])
def test_tiny_checkpoint_loads_at_other_sizes(tiny_ckpt, img_size):
    path, sd = tiny_ckpt
    enc, pe, dec, report = _load(img_size, path)
    g = img_size // 16
    v = VARIANTS["tiny"]
    assert report.unexpected == [] and report.missing == []
    assert tuple(enc.pos_embed.shape) == (1, g, g, v.embed_dim)
    assert report.resized["image_encoder.pos_embed"] == ((1, 64, 64, v.embed_dim), (1, g, g, v.embed_dim))
    for i in v.global_attn_indexes:
        assert enc.blocks[i].attn.rel_pos_h.shape == (2 * g - 1, v.head_dim)
        assert f"image_encoder.blocks.{i}.attn.rel_pos_w" in report.resized
    for i in set(range(v.depth)) - set(v.global_attn_indexes):
        assert f"image_encoder.blocks.{i}.attn.rel_pos_h" not in report.resized
        assert torch.equal(enc.blocks[i].attn.rel_pos_h, sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"])
    assert torch.equal(enc.blocks[0].attn.qkv.weight, sd["image_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(
        pe.pe_layer.positional_encoding_gaussian_matrix,
        sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    assert torch.equal(dec.iou_token.weight, sd["mask_decoder.iou_token.weight"])
    # heads sized for K+1 = 9 stay fresh
    assert "mask_decoder.mask_tokens.weight" in report.reinitialised
    assert "mask_decoder.output_hypernetworks_mlps.8.layers.2.weight" in report.reinitialised
    assert "mask_decoder.iou_prediction_head.layers.2.weight" in report.reinitialised
    assert dec.mask_tokens.weight.shape == (9, v.out_chans)
    assert not torch.equal(
        dec.output_hypernetworks_mlps[0].layers[0].weight,
        sd["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"],
    )


def test_same_size_is_identity_and_same_k_loads_all(tiny_ckpt):
    path, sd = tiny_ckpt
    enc, pe, dec, report = _load(1024, path, num_classes=3)
    assert report.resized == {} and report.reinitialised == [] and report.missing == []
    assert torch.equal(enc.pos_embed, sd["image_encoder.pos_embed"])
    assert torch.equal(dec.mask_tokens.weight, sd["mask_decoder.mask_tokens.weight"])


def test_fewer_classes_ignore_extra_hypernetworks(tiny_ckpt):
    path, _ = tiny_ckpt
    _, _, dec, report = _load(224, path, num_classes=1)
    assert any(k.startswith("mask_decoder.output_hypernetworks_mlps.3.") for k in report.ignored)


def test_reuse_hypernetworks_option(tiny_ckpt):
    path, sd = tiny_ckpt
    _, _, dec, _ = _load(224, path, reuse_hypernetworks=True)
    key = "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"
    assert torch.equal(dec.output_hypernetworks_mlps[2].layers[0].weight, sd[key])


def test_unexpected_key_and_shape_mismatch_are_errors(tmp_path, tiny_ckpt):
    _, sd = tiny_ckpt
    bad = dict(sd)
    bad["image_encoder.blocks.9.attn.qkv.weight"] = torch.zeros(3, 3)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    with pytest.raises(SamoraError, match=r"blocks\.9\.attn\.qkv\.weight"):
        _load(224, p)
    bad = dict(sd)
    bad["image_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    torch.save(bad, p)
    with pytest.raises(SamoraError, match=r"blocks\.0\.attn\.qkv\.weight.*\[96, 32\].*\[192, 64\]"):
        _load(224, p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SamoraError, match="not found"):
        _load(224, tmp_path / "nope.pth")
    p = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, p)
    with pytest.raises(SamoraError, match="not a SAM checkpoint"):
        _load(224, p)
    p.write_bytes(b"garbage")
    with pytest.raises(SamoraError, match="cannot read"):
        _load(224, p)


def test_missing_tensors_are_reported(tmp_path, tiny_ckpt):
    _, sd = tiny_ckpt
    part = {k: v for k, v in sd.items() if k != "image_encoder.neck.0.weight"}
    p = tmp_path / "part.pth"
    torch.save(part, p)
    *_, report = _load(224, p)
    assert report.missing == ["image_encoder.neck.0.weight"]


def test_segmenter_loads_tiny_checkpoint(tiny_ckpt):
    path, sd = tiny_ckpt
    m = SAMoraSegmenter(variant="tiny", img_size=224, num_classes=8, checkpoint=path)
    assert m.load_report is not None and m.load_report.unexpected == []
    assert torch.equal(m.encoder.image_encoder.blocks[2].mlp.lin1.weight, sd["image_encoder.blocks.2.mlp.lin1.weight"])
    assert m(torch.rand(1, 1, 224, 224)).shape == (1, 9, 56, 56)


@pytest.mark.slow
def test_official_vit_b_checkpoint_layout(tmp_path):
    """A checkpoint written from segment-anything's own vit_b builder loads at 224 and 512."""
    import segment_anything

    sam = segment_anything.build_sam_vit_b(checkpoint=None)
    ref = sam.state_dict()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(ref, path)
    del sam
    for img_size in (224, 512):
        g = img_size // 16
        m = SAMoraSegmenter(variant="vit_b", img_size=img_size, num_classes=8, checkpoint=path, fusion="single:patch")
        r = m.load_report
        assert r.unexpected == [] and r.missing == []
        ie = m.encoder.image_encoder
        assert ie.pos_embed.shape == (1, g, g, 768)
        for i in (2, 5, 8, 11):
            assert ie.blocks[i].attn.rel_pos_h.shape == (2 * g - 1, 64)
            assert ie.blocks[i].attn.rel_pos_w.shape == (2 * g - 1, 64)
        assert ie.blocks[0].attn.rel_pos_h.shape == (27, 64)
        assert set(r.resized) == {"image_encoder.pos_embed"} | {
            f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"
        }
        assert torch.equal(ie.blocks[7].attn.qkv.weight, ref["image_encoder.blocks.7.attn.qkv.weight"])
        assert m.mask_decoder.mask_tokens.weight.shape == (9, 256)
        del m


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_pos_embed_resize_bilinear_by_default_bicubic_on_request(tiny_ckpt, mode):
    """SAMed and H-SAM resize SAM's 64x64 position embedding bilinearly; bicubic stays an option."""
    path, sd = tiny_ckpt
    kw = {} if mode == "bilinear" else {"pos_embed_resize": "bicubic"}
    enc, _, _, _ = _load(224, path, **kw)
    want = F.interpolate(sd["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(14, 14), mode=mode)
    assert torch.allclose(enc.pos_embed, want.permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(SamoraError, match="model.pos_embed_resize"):
        _load(224, path, pos_embed_resize="nearest")
