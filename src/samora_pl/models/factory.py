"""Build the segmenter a stage needs from its plan's `SegmenterSpec` and `ExpertLayout`, the same way in every stage.

Without an official SAM checkpoint the frozen encoder is randomly initialised from `model.init_seed` (not
the run seed), so distillation and fine-tuning of one run, whatever their seeds, share the same frozen
encoder; the experts record a fingerprint of it, and fine-tuning refuses experts distilled on another
encoder. Everything trainable (LoRA experts, fusion, mask decoder and prompt encoder heads) starts from the
run `seed`, so an experiment's seeds vary the initialisation too.
"""

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from samora_pl.config.choices import Family
from samora_pl.config.specs import ExpertLayout, SegmenterSpec
from samora_pl.models.segmenter import SAMoraSegmenter
from samora_pl.records.manifest import file_record

log = logging.getLogger(__name__)


def sam_checkpoint_record(path: str | None) -> dict | None:
    """The public SAM file a stage starts its frozen encoder from (`config.sam_checkpoint`), as its manifest
    records an input (path, sha256, bytes); None for a random SAM."""
    return file_record(Path(path)) if path else None


def build_segmenter(
    spec: SegmenterSpec, layout: ExpertLayout, num_classes: int, *, load_sam: bool = True
) -> SAMoraSegmenter:
    """SAM + the layout's LoRA experts and fusion: the frozen encoder from the checkpoint or `encoder_seed`,
    the trainable parts from the run `seed`.

    `load_sam=False` skips the checkpoint (weights from `encoder_seed`) for callers that overwrite every
    weight anyway, such as loading a finished fine-tune."""
    settings = dict(
        variant=spec.variant,
        img_size=spec.img_size,
        num_classes=num_classes,
        experts=tuple(layout.experts),
        lora_rank=spec.lora_rank,
        fusion=layout.fusion,
        hl_order=spec.hl_order,
        hl_width=spec.hl_width,
        hl_heads=spec.hl_heads,
        hl_init=spec.hl_init,
        lac_weights=None if spec.lac_weights is None else list(spec.lac_weights),
        checkpoint=spec.checkpoint if load_sam else None,
        grad_checkpoint=spec.grad_checkpoint,
        encoder_seed=spec.encoder_seed,
        seed=spec.seed,
    )
    cls = SEGMENTERS[spec.family]()
    if spec.family == Family.SAM:  # SAM (v1) only: its position-embedding resize and H-SAM's decoder
        settings.update(
            pos_embed_resize=spec.pos_embed_resize,
            decoder=spec.decoder,
            hsam_cmattn=spec.hsam_cmattn,
            hsam_cmattn_heads=spec.hsam_cmattn_heads,
            hsam_noise=spec.hsam_noise,
            hsam_inference=spec.hsam_inference,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return cls(**settings)


def _sam2_segmenter() -> type:
    # imported only when used: `import sam2` sets up Hydra's global state
    from samora_pl.models.sam2.segmenter import SAM2Segmenter

    return SAM2Segmenter


# model.family -> the segmenter class (a loader, so a family's package is imported only when it is built)
SEGMENTERS: dict[str, Callable[[], type]] = {Family.SAM: lambda: SAMoraSegmenter, Family.SAM2: _sam2_segmenter}


def base_fingerprint(model: SAMoraSegmenter) -> str:
    """sha256 of the frozen SAM (or SAM 2) image-encoder weights (LoRA and fusion excluded)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def log_trainable(model: torch.nn.Module, where: str) -> int:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %s trainable of %s parameters (%.2f%%)", where, f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return trainable
