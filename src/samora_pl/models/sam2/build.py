"""SAM 2's single-image parts (Hiera image encoder, prompt encoder, mask decoder) at any image side.

The modules are the ``sam2`` package's own (PyPI ``sam2`` 1.1.0, the code of facebookresearch/sam2; SAM 2
paper: Ravi et al., arXiv 2408.00714), built here with random weights and without Hydra or a download, so
that any ``img_size`` works (the package's configs fix 1024). Only what a prompt-free image segmenter uses
is built: ``image_encoder`` (Hiera trunk + FPN neck), ``sam_prompt_encoder``, ``sam_mask_decoder`` (with
its high-resolution convs ``conv_s0``/``conv_s1``) and ``no_mem_embed``; the video memory modules
(memory attention, memory encoder, object pointers) are never built.

Hiera sizes, from the package's ``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`` (the trunk is the same in
the 2.0 configs; a test compares this table with the packaged files):

==========  ===========  =====  =============  ==========  ============  ==============
variant     embed_dim    heads  stages         windows     global        background pos
==========  ===========  =====  =============  ==========  ============  ==============
t           96           1      1, 2, 7, 2     8, 4, 14, 7  5, 7, 9      7 x 7
s           96           1      1, 2, 11, 2    8, 4, 14, 7  7, 10, 13    7 x 7
b+          112          2      2, 3, 16, 3    8, 4, 14, 7  12, 16, 20   14 x 14
l           144          2      2, 6, 36, 4    8, 4, 16, 8  23, 33, 43   7 x 7
==========  ===========  =====  =============  ==========  ============  ==============

Width and heads double at each stage change, whose first block max-pools q (2 x 2, stride 2) and widens
``qkv`` from the old width to the new one ("q-pool blocks"). ``tiny`` is a CPU-sized random variant for
tests and the demo with the same anatomy (windowed, global and q-pool blocks, FPN neck, high-res convs).

Image side: the patch embedding has stride 4 and the 8 x 8 window position embedding is tiled over the
stride-4 map, so the side must be a multiple of 32; the embedding is side/16 and the mask side/4.

``import sam2`` initialises Hydra's global config module; it is imported here lazily, only when
``model.family=sam2`` builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from samora_pl.errors import SamoraError

if TYPE_CHECKING:  # the sam2 package is imported lazily at run time (sam2_modules)
    from sam2.modeling.backbones.image_encoder import ImageEncoder
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

__all__ = [
    "HieraVariant",
    "HIERA_VARIANTS",
    "get_hiera_variant",
    "check_sam2_img_size",
    "Sam2Parts",
    "build_sam2_parts",
]

SIDE_MULTIPLE = 32  # stride-4 patch embedding x 8 x 8 tiled window position embedding


@dataclass(frozen=True)
class HieraVariant:
    """Sizes of one SAM 2 image encoder (Hiera trunk + FPN neck) and its mask decoder."""

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    pos_embed_bkg: tuple[int, int] = (7, 7)
    d_model: int = 256  # neck width = prompt / decoder width
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))

    @property
    def q_pool_blocks(self) -> tuple[int, ...]:
        """The first block of stages 2..4 (as Hiera computes it: one after each stage end)."""
        ends = [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]
        return tuple(e + 1 for e in ends[:-1])


HIERA_VARIANTS: dict[str, HieraVariant] = {
    "t": HieraVariant("t", 96, 1, (1, 2, 7, 2), (5, 7, 9)),
    "s": HieraVariant("s", 96, 1, (1, 2, 11, 2), (7, 10, 13)),
    "b+": HieraVariant("b+", 112, 2, (2, 3, 16, 3), (12, 16, 20), pos_embed_bkg=(14, 14)),
    "l": HieraVariant("l", 144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8)),
    # CPU tests and the demo: 5 blocks (q-pool 1, 2, 4; global 3; windows padded at 224), 64-wide neck.
    "tiny": HieraVariant(
        "tiny",
        16,
        1,
        (1, 1, 2, 1),
        (3,),
        window_spec=(8, 4, 4, 2),
        pos_embed_bkg=(4, 4),
        d_model=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
        iou_head_hidden_dim=64,
    ),
}


def get_hiera_variant(variant) -> HieraVariant:
    if isinstance(variant, HieraVariant):
        return variant
    if variant not in HIERA_VARIANTS:
        raise SamoraError(
            f"unknown SAM 2 Hiera size {variant!r} (model.variant with model.family=sam2); "
            f"choose one of {', '.join(HIERA_VARIANTS)}"
        )
    return HIERA_VARIANTS[variant]


def check_sam2_img_size(img_size) -> int:
    if not isinstance(img_size, int) or img_size <= 0 or img_size % SIDE_MULTIPLE:
        raise SamoraError(
            f"model.img_size={img_size!r} does not suit SAM 2 (model.family=sam2): the side must be a positive "
            f"multiple of {SIDE_MULTIPLE} (Hiera tiles its 8x8 window position embedding over the stride-4 map), "
            f"e.g. model.img_size=224, 512 or 1024"
        )
    return img_size


def sam2_modules():
    """The ``sam2`` package's classes (imported on first use; a clear error when it is not installed)."""
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
    except ImportError as exc:
        raise SamoraError(
            f"model.family=sam2 needs the sam2 package ({exc}); install it with "
            f"`SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0` (make setup does this)"
        ) from exc
    return dict(
        Hiera=Hiera,
        FpnNeck=FpnNeck,
        ImageEncoder=ImageEncoder,
        PositionEmbeddingSine=PositionEmbeddingSine,
        MaskDecoder=MaskDecoder,
        PromptEncoder=PromptEncoder,
        TwoWayTransformer=TwoWayTransformer,
    )


@dataclass
class Sam2Parts:
    image_encoder: ImageEncoder
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    no_mem_embed: nn.Parameter


def build_sam2_parts(variant, img_size: int, num_multimask_outputs: int, encoder_seed=None) -> Sam2Parts:
    """The package's ImageEncoder, PromptEncoder and MaskDecoder (random init) as SAM2Base configures them.

    ``encoder_seed`` seeds the frozen part alone (image encoder and ``no_mem_embed``), so every stage and
    run seed sees the same encoder; the decoder and prompt encoder draw from the global generator.

    The decoder has ``num_multimask_outputs + 1`` mask tokens (prompt-free: background + K classes) and
    the options of the sam2.1 configs (high-resolution features, object-score head as an MLP, sigmoid IoU),
    so official checkpoints load into it.
    """
    v = get_hiera_variant(variant)
    check_sam2_img_size(img_size)
    if int(num_multimask_outputs) < 1:
        raise SamoraError(f"num_classes must be >= 1 (foreground classes), got {num_multimask_outputs}")
    m = sam2_modules()
    with torch.random.fork_rng(devices=[]):
        if encoder_seed is not None:
            torch.manual_seed(int(encoder_seed))
        image_encoder, no_mem_embed = _build_image_encoder(m, v)
    grid = img_size // 16
    prompt_encoder = m["PromptEncoder"](
        embed_dim=v.d_model, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
    )
    mask_decoder = m["MaskDecoder"](
        num_multimask_outputs=int(num_multimask_outputs),
        transformer=m["TwoWayTransformer"](
            depth=2, embedding_dim=v.d_model, mlp_dim=v.decoder_mlp_dim, num_heads=v.decoder_heads
        ),
        transformer_dim=v.d_model,
        iou_head_depth=3,
        iou_head_hidden_dim=v.iou_head_hidden_dim,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
    )
    return Sam2Parts(image_encoder, prompt_encoder, mask_decoder, no_mem_embed)


def build_hiera_trunk(m, v: HieraVariant):
    """The Hiera trunk of variant `v` (random weights); `m` is :func:`sam2_modules`."""
    return m["Hiera"](
        embed_dim=v.embed_dim,
        num_heads=v.num_heads,
        stages=v.stages,
        global_att_blocks=v.global_att_blocks,
        window_spec=v.window_spec,
        window_pos_embed_bkg_spatial_size=v.pos_embed_bkg,
    )


def _build_image_encoder(m, v: HieraVariant):
    """Hiera trunk + FPN neck (``scalp``=1, top-down on the two coarse levels) and ``no_mem_embed``."""
    trunk = build_hiera_trunk(m, v)
    neck = m["FpnNeck"](
        position_encoding=m["PositionEmbeddingSine"](num_pos_feats=v.d_model, normalize=True, temperature=10000),
        d_model=v.d_model,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    no_mem_embed = nn.Parameter(torch.zeros(1, 1, v.d_model))
    nn.init.trunc_normal_(no_mem_embed, std=0.02)  # as SAM2Base
    return m["ImageEncoder"](trunk=trunk, neck=neck, scalp=1), no_mem_embed
