"""SAM 2 parts built with random weights: the Hiera table, shapes at several sides, bad sizes."""

import os

import pytest
import torch
from omegaconf import OmegaConf

from samora_pl.errors import SamoraError
from samora_pl.models.sam2.build import (
    HIERA_VARIANTS,
    build_hiera_trunk,
    build_sam2_parts,
    get_hiera_variant,
    sam2_modules,
)

sam2 = pytest.importorskip("sam2")

CONFIG_NAMES = {"t": "hiera_t", "s": "hiera_s", "b+": "hiera_b+", "l": "hiera_l"}
# per-stage dims, heads, q-pool and global blocks, trunk parameters (millions), from the package's configs
TABLE = {
    "t": ((96, 192, 384, 768), (1, 2, 4, 8), (1, 3, 10), (5, 7, 9), (8, 4, 14, 7), 26.85),
    "s": ((96, 192, 384, 768), (1, 2, 4, 8), (1, 3, 14), (7, 10, 13), (8, 4, 14, 7), 33.95),
    "b+": ((112, 224, 448, 896), (2, 4, 8, 16), (2, 5, 21), (12, 16, 20), (8, 4, 14, 7), 68.68),
    "l": ((144, 288, 576, 1152), (2, 4, 8, 16), (2, 8, 44), (23, 33, 43), (8, 4, 16, 8), 212.15),
}


@pytest.mark.parametrize("version", ["sam2.1", "sam2"])
@pytest.mark.parametrize("name", ["t", "s", "b+", "l"])
def test_table_equals_the_packaged_configs(name, version):
    path = os.path.join(os.path.dirname(sam2.__file__), "configs", version, f"{version}_{CONFIG_NAMES[name]}.yaml")
    cfg = OmegaConf.load(path).model.image_encoder
    v = get_hiera_variant(name)
    hiera = sam2_modules()["Hiera"].__init__.__defaults__  # defaults where the yaml is silent (b+)
    trunk = cfg.trunk
    assert trunk.embed_dim == v.embed_dim and trunk.num_heads == v.num_heads
    assert tuple(trunk.get("stages", (2, 3, 16, 3))) == v.stages
    assert tuple(trunk.get("global_att_blocks", (12, 16, 20))) == v.global_att_blocks
    assert tuple(trunk.get("window_spec", (8, 4, 14, 7))) == v.window_spec
    assert tuple(trunk.get("window_pos_embed_bkg_spatial_size", (14, 14))) == v.pos_embed_bkg
    assert (2, 3, 16, 3) in hiera and (12, 16, 20) in hiera  # the defaults assumed above are the package's
    assert list(cfg.neck.backbone_channel_list) == list(v.stage_dims[::-1])
    assert cfg.neck.d_model == v.d_model and cfg.scalp == 1


def _trunk_facts(trunk):
    blocks = trunk.blocks
    q_pool = tuple(i for i, b in enumerate(blocks) if b.dim != b.dim_out)
    global_ = tuple(i for i, b in enumerate(blocks) if b.window_size == 0)
    dims = tuple(blocks[e].dim_out for e in trunk.stage_ends)
    heads = tuple(blocks[e].attn.num_heads for e in trunk.stage_ends)
    return q_pool, global_, dims, heads


@pytest.mark.parametrize("name", ["t", "s", "b+", pytest.param("l", marks=pytest.mark.slow)])
def test_each_variant_built_with_random_weights_matches_its_table(name):
    torch.manual_seed(0)
    v = get_hiera_variant(name)
    trunk = build_hiera_trunk(sam2_modules(), v)  # the trunk build_sam2_parts uses
    dims, heads, q_pool, global_, windows, params = TABLE[name]
    assert len(trunk.blocks) == v.depth == sum(v.stages)
    assert _trunk_facts(trunk) == (q_pool, global_, dims, heads)
    assert v.q_pool_blocks == q_pool and v.stage_dims == dims
    for i, blk in enumerate(trunk.blocks):
        assert tuple(blk.attn.qkv.weight.shape) == (3 * blk.dim_out, blk.dim)
        stage = sum(i > e for e in trunk.stage_ends)  # the stage the block's output belongs to
        lag = stage - 1 if i in q_pool else stage  # a q-pool block partitions with the previous window
        assert blk.window_size == (0 if i in global_ else windows[lag])
    assert round(sum(p.numel() for p in trunk.parameters()) / 1e6, 2) == params


def test_tiny_variant_has_every_kind_of_block():
    parts = build_sam2_parts("tiny", 224, 8)
    q_pool, global_, dims, _ = _trunk_facts(parts.image_encoder.trunk)
    assert q_pool == (1, 2, 4) and global_ == (3,) and dims == (16, 32, 64, 128)
    assert parts.mask_decoder.num_mask_tokens == 9


@pytest.mark.parametrize("side", [224, 512, 1024])
def test_tiny_shapes_at_each_side(side):
    from samora_pl.models.sam2.segmenter import SAM2Segmenter

    model = SAM2Segmenter(variant="tiny", img_size=side, num_classes=3).eval()
    x = torch.rand(1, 1, side, side)
    with torch.no_grad():
        maps = model.encoder.trunk_features(x)
        fpn = model.encoder.forward_fpn(x)
        logits = model(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(side // s, side // s) for s in (4, 8, 16, 32)]
    assert [tuple(f.shape[1:]) for f in fpn] == [(64, side // s, side // s) for s in (4, 8, 16)]
    assert tuple(logits.shape) == (1, 4, side // 4, side // 4)


@pytest.mark.parametrize("side", [224, 512])
def test_hiera_t_shapes(side):
    from samora_pl.models.sam2.segmenter import SAM2Segmenter

    model = SAM2Segmenter(variant="t", img_size=side, num_classes=2, fusion="sum").eval()
    with torch.no_grad():
        emb, tokens = model.encoder(torch.rand(1, 1, side, side), return_tokens=True)
    assert tuple(emb.shape) == (1, 256, side // 16, side // 16)
    assert tuple(tokens.shape) == (1, side // 16, side // 16, 256)


@pytest.mark.parametrize("side", [240, 100, 0])
def test_side_not_a_multiple_of_32_is_refused(side):
    with pytest.raises(SamoraError, match="model.img_size"):
        build_sam2_parts("tiny", side, 8)


def test_unknown_hiera_size_is_refused():
    with pytest.raises(SamoraError, match=r"Hiera size 'xl'.*t, s, b\+, l"):
        get_hiera_variant("xl")
    assert set(HIERA_VARIANTS) == {"t", "s", "b+", "l", "tiny"}
