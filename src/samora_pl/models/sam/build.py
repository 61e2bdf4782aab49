"""SAM building blocks at any image size, and loading of official SAM checkpoints.

segment-anything's own builders (`build_sam_vit_b` ...) hard-code a 1024-pixel input. SAMora trains at
224 (SAMed: 512), so this module builds the same modules (`ImageEncoderViT`, `PromptEncoder`,
`MaskDecoder` with a `TwoWayTransformer`, all imported from segment-anything, not copied) at any
``img_size`` and adapts a 1024 checkpoint on load:

* ``image_encoder.pos_embed`` [1, 64, 64, C] is resized to the new patch grid, bilinearly by default as
  SAMed's and H-SAM's loaders do (``F.interpolate(..., mode="bilinear")``), bicubically on request
  (``pos_embed_resize="bicubic"``, config ``model.pos_embed_resize``);
* ``rel_pos_h`` / ``rel_pos_w`` of the *global* attention blocks ([2*64-1, head_dim] at 1024) are
  resized along the length axis with linear interpolation, which is exactly what segment-anything's
  ``get_rel_pos`` would do at run time if the table had the wrong length; windowed blocks keep their
  window-size tables (2*14-1 = 27 rows) untouched;
* the mask decoder's mask tokens, hypernetwork MLPs and the last layer of the IoU head are sized for
  ``K + 1`` outputs; when the checkpoint was trained with another number (SAM: 3 + 1) they are left at
  their fresh initialisation (see ``load_sam_checkpoint(reuse_hypernetworks=...)``).

Any other shape mismatch or any key the model does not have is a :class:`SamoraError` naming the key and
both shapes, because it means the checkpoint belongs to another variant (or is not a SAM checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from samora_pl.config import choices
from samora_pl.errors import SamoraError

log = logging.getLogger(__name__)

__all__ = [
    "SamVariant",
    "VARIANTS",
    "get_variant",
    "build_image_encoder",
    "build_prompt_encoder",
    "build_mask_decoder",
    "LoadReport",
    "load_sam_checkpoint",
    "adapt_sam_state_dict",
    "POS_EMBED_RESIZE",
]

POS_EMBED_RESIZE = choices.POS_EMBED_RESIZE


@dataclass(frozen=True)
class SamVariant:
    """Sizes of one SAM model (encoder and the prompt-free decoder)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck width = prompt/decoder width
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # CPU tests and the demo: same structure (windowed + global blocks, rel-pos, neck, decoder), tiny sizes.
    "tiny": SamVariant(
        "tiny",
        embed_dim=64,
        depth=4,
        num_heads=4,
        global_attn_indexes=(1, 3),
        window_size=4,
        out_chans=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
        iou_head_hidden_dim=64,
    ),
}


def get_variant(variant) -> SamVariant:
    """Return the :class:`SamVariant` for a name (or pass a SamVariant through)."""
    if isinstance(variant, SamVariant):
        return variant
    if variant not in VARIANTS:
        raise SamoraError(f"unknown SAM variant {variant!r}; choose one of {sorted(VARIANTS)} (model.variant=...)")
    return VARIANTS[variant]


def _check_img_size(v: SamVariant, img_size: int) -> None:
    if not isinstance(img_size, int) or img_size <= 0 or img_size % v.patch_size:
        raise SamoraError(
            f"img_size={img_size!r} must be a positive multiple of the patch size {v.patch_size} "
            f"(e.g. 224 or 512); set model.img_size accordingly"
        )


def build_image_encoder(variant, img_size: int) -> ImageEncoderViT:
    """segment-anything's ``ImageEncoderViT`` for ``variant`` at ``img_size`` (random init)."""
    v = get_variant(variant)
    _check_img_size(v, img_size)
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=v.patch_size,
        in_chans=3,
        embed_dim=v.embed_dim,
        depth=v.depth,
        num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio,
        out_chans=v.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=v.window_size,
        global_attn_indexes=tuple(v.global_attn_indexes),
    )


def build_prompt_encoder(variant, img_size: int) -> PromptEncoder:
    """segment-anything's ``PromptEncoder`` for an ``img_size`` input (embedding grid img_size/16)."""
    v = get_variant(variant)
    _check_img_size(v, img_size)
    grid = img_size // v.patch_size
    return PromptEncoder(
        embed_dim=v.out_chans,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=v.mask_in_chans,
    )


def build_mask_decoder(variant, num_multimask_outputs: int) -> MaskDecoder:
    """segment-anything's ``MaskDecoder`` with ``num_multimask_outputs + 1`` mask tokens.

    For prompt-free segmentation with K foreground classes pass ``num_multimask_outputs=K``: token 0 is
    the background map, tokens 1..K the classes.
    """
    v = get_variant(variant)
    if int(num_multimask_outputs) < 1:
        raise SamoraError(
            f"num_classes must be >= 1 (foreground classes, background excluded), got {num_multimask_outputs}"
        )
    return MaskDecoder(
        num_multimask_outputs=int(num_multimask_outputs),
        transformer=TwoWayTransformer(
            depth=v.decoder_depth,
            embedding_dim=v.out_chans,
            mlp_dim=v.decoder_mlp_dim,
            num_heads=v.decoder_heads,
        ),
        transformer_dim=v.out_chans,
        iou_head_depth=3,
        iou_head_hidden_dim=v.iou_head_hidden_dim,
    )


# ----------------------------------------------------------------------------------------------------
# checkpoint loading
# ----------------------------------------------------------------------------------------------------

_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@dataclass
class LoadReport:
    """What :func:`load_sam_checkpoint` did. All key names carry the ``image_encoder.`` etc. prefix."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # always empty: unexpected keys raise
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reinitialised: list[str] = field(default_factory=list)  # decoder heads sized for another K
    ignored: list[str] = field(default_factory=list)  # checkpoint decoder heads the model has no slot for

    def summary(self) -> str:
        return (
            f"{self.path}: {len(self.loaded)} tensors loaded, {len(self.resized)} resized, "
            f"{len(self.reinitialised)} decoder tensors freshly initialised, {len(self.ignored)} ignored, "
            f"{len(self.missing)} missing"
        )


def _resize_pos_embed(t: torch.Tensor, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    # [1, H, W, C] -> [1, C, H, W] -> bilinear | bicubic -> back
    if mode not in POS_EMBED_RESIZE:
        raise SamoraError(f"model.pos_embed_resize={mode!r}; choose one of {', '.join(POS_EMBED_RESIZE)}")
    x = t.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode=mode, align_corners=False)
    return x.permute(0, 2, 3, 1).to(t.dtype).contiguous()


def _resize_rel_pos(t: torch.Tensor, length: int) -> torch.Tensor:
    # [L, head_dim] -> [length, head_dim], linear along L (as segment_anything's get_rel_pos does)
    x = t.float().t().unsqueeze(0)  # [1, head_dim, L]
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.squeeze(0).t().to(t.dtype).contiguous()


def _decoder_head_key(key: str) -> bool:
    """Decoder tensors whose count/shape depends on the number of mask tokens."""
    return (
        key.startswith("mask_decoder.mask_tokens.")
        or key.startswith("mask_decoder.output_hypernetworks_mlps.")
        or key.startswith("mask_decoder.iou_prediction_head.")
    )


def adapt_sam_state_dict(
    state_dict: dict[str, torch.Tensor],
    model_state: dict[str, torch.Tensor],
    global_blocks: tuple[int, ...],
    *,
    path: str = "<state_dict>",
    reuse_hypernetworks: bool = False,
    pos_embed_resize: str = "bilinear",
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Adapt a full SAM state dict (prefixed keys) to ``model_state`` (same prefixes, wanted shapes).

    Returns the dict to load (a subset of the model's keys) and a report. Raises SamoraError on an
    unexpected key or on a shape mismatch that is not one of the documented adaptations.
    """
    report = LoadReport(path=str(path))
    out: dict[str, torch.Tensor] = {}
    ckpt_tokens = state_dict.get("mask_decoder.mask_tokens.weight")
    model_tokens = model_state.get("mask_decoder.mask_tokens.weight")
    same_k = ckpt_tokens is None or model_tokens is None or tuple(ckpt_tokens.shape) == tuple(model_tokens.shape)
    global_rel = {f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in global_blocks for a in ("h", "w")}

    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise SamoraError(f"{path}: entry {key!r} is not a tensor; is this a SAM checkpoint?")
        if key not in model_state:
            if _decoder_head_key(key) and not same_k:
                report.ignored.append(key)  # e.g. hypernetwork 3 of SAM's 3+1 when K+1 = 2
                continue
            report.unexpected.append(key)
            continue
        want = tuple(model_state[key].shape)
        have = tuple(value.shape)
        if _decoder_head_key(key) and not same_k:
            keep = reuse_hypernetworks and key.startswith("mask_decoder.output_hypernetworks_mlps.")
            keep = keep or (key.startswith("mask_decoder.iou_prediction_head.") and have == want)
            if keep and have == want:
                out[key] = value
            else:
                report.reinitialised.append(key)
            continue
        if have == want:
            out[key] = value
            continue
        if key == "image_encoder.pos_embed" and len(have) == 4 and have[3] == want[3] and have[0] == 1:
            out[key] = _resize_pos_embed(value, (want[1], want[2]), pos_embed_resize)
            report.resized[key] = (have, want)
            continue
        if key in global_rel and len(have) == 2 and have[1] == want[1]:
            out[key] = _resize_rel_pos(value, want[0])
            report.resized[key] = (have, want)
            continue
        raise SamoraError(
            f"{path}: tensor {key!r} has shape {list(have)} in the checkpoint but the model expects "
            f"{list(want)}; the checkpoint is probably for another SAM variant (check model.variant) "
            f"or another window size"
        )
    if report.unexpected:
        shown = ", ".join(report.unexpected[:8])
        more = f" (and {len(report.unexpected) - 8} more)" if len(report.unexpected) > 8 else ""
        raise SamoraError(
            f"{path}: {len(report.unexpected)} checkpoint tensors do not exist in the model: {shown}{more}; "
            f"the checkpoint is probably for another SAM variant (check model.variant)"
        )
    # a checkpoint without the mask-token count of the model: the dependent heads stay fresh
    if not same_k:
        for key in model_state:
            if _decoder_head_key(key) and key not in out and key not in report.reinitialised:
                report.reinitialised.append(key)
    report.loaded = sorted(out)
    report.missing = sorted(k for k in model_state if k not in out and k not in report.reinitialised)
    return out, report


def _read_checkpoint(path) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SamoraError(
            f"SAM checkpoint not found: {path}; download the official file (e.g. sam_vit_b_01ec64.pth) "
            f"and set model.checkpoint to its path, or model.checkpoint=none to start from a random SAM on purpose"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise SamoraError(f"cannot read SAM checkpoint {path}: {exc}; re-download the file") from exc
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # tolerate the common {"model": state_dict} wrapper
    if isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("sam_mask_decoder.") for k in sd):
        raise SamoraError(
            f"{path} is a SAM 2 checkpoint: use it with model.family=sam2 and its Hiera size as model.variant "
            f"(t, s, b+ or l), or give model.family=sam a SAM (v1) .pth file"
        )
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith(_PREFIXES) for k in sd):
        raise SamoraError(f"{path} is not a SAM checkpoint: expected keys starting with {', '.join(_PREFIXES)}")
    return sd


def load_sam_checkpoint(
    path,
    image_encoder: ImageEncoderViT,
    prompt_encoder: PromptEncoder | None = None,
    mask_decoder: MaskDecoder | None = None,
    *,
    reuse_hypernetworks: bool = False,
    pos_embed_resize: str = "bilinear",
) -> LoadReport:
    """Load an official SAM checkpoint (any variant-matching one, trained at any size) into the modules.

    ``reuse_hypernetworks`` only matters when the decoder has another number of mask tokens than the
    checkpoint: False (default; docs/method.md, section Decoder and what trains) leaves mask tokens, all
    hypernetwork MLPs and the IoU head's last layer freshly initialised; True keeps the checkpoint's hypernetwork MLPs
    for the indices that exist in both (as SAMed's loader does).
    ``pos_embed_resize``: bilinear (SAMed, H-SAM) or bicubic.
    Keys for modules that are not passed (e.g. ``prompt_encoder=None``) are skipped silently.
    """
    sd = _read_checkpoint(path)
    modules = {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
    model_state: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        if mod is not None:
            model_state.update({f"{prefix}.{k}": v for k, v in mod.state_dict().items()})
    wanted = {
        k: v
        for k, v in sd.items()
        if not (isinstance(k, str) and k.startswith(_PREFIXES) and modules[k.split(".", 1)[0]] is None)
    }
    global_blocks = tuple(i for i, blk in enumerate(image_encoder.blocks) if getattr(blk, "window_size", 0) == 0)
    new_sd, report = adapt_sam_state_dict(
        wanted,
        model_state,
        global_blocks,
        path=os.fspath(path),
        reuse_hypernetworks=reuse_hypernetworks,
        pos_embed_resize=pos_embed_resize,
    )
    for prefix, mod in modules.items():
        if mod is None:
            continue
        part = {k[len(prefix) + 1 :]: v for k, v in new_sd.items() if k.startswith(prefix + ".")}
        with torch.no_grad():
            mod.load_state_dict(part, strict=False)
    log.info("loaded SAM checkpoint %s", report.summary())
    for key, (a, b) in report.resized.items():
        log.debug("resized %s from %s to %s", key, list(a), list(b))
    if report.reinitialised:
        log.info(
            "mask decoder heads sized for another number of classes, freshly initialised: %s",
            ", ".join(sorted({k.rsplit(".", 2)[0] for k in report.reinitialised})),
        )
    if report.missing:
        log.warning(
            "SAM checkpoint %s lacks %d model tensors (kept random): %s",
            path,
            len(report.missing),
            ", ".join(report.missing[:10]),
        )
    return report
