"""Build the segmenter a stage needs from the config, the same way in every stage.

Without an official SAM checkpoint the frozen encoder is randomly initialised from `model.init_seed` (not
the run seed), so distillation and fine-tuning of one run, whatever their seeds, share the same frozen
encoder; the experts record a fingerprint of it, and fine-tuning refuses experts distilled on another
encoder. Everything trainable (LoRA experts, fusion, mask decoder and prompt encoder heads) starts from the
run `seed`, so an experiment's seeds vary the initialisation too.
"""

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from samora_pl.config.compose import sam_checkpoint
from samora_pl.models.segmenter import SAMoraSegmenter
from samora_pl.runs.manifest import file_record

SAMED_EXPERT = "samed"
log = logging.getLogger(__name__)


def sam_checkpoint_record(path: str | None) -> dict | None:
    """The public SAM file a stage starts its frozen encoder from (`config.sam_checkpoint`), as its manifest
    records an input (path, sha256, bytes); None for a random SAM."""
    return file_record(Path(path)) if path else None


def build_segmenter(
    cfg: DictConfig, num_classes: int, experts: Sequence[str], fusion: str, *, load_sam: bool = True
) -> SAMoraSegmenter:
    """SAM + the named LoRA experts + `fusion`: the frozen encoder from the checkpoint or `init_seed`, the
    trainable parts from the run `seed`.

    `load_sam=False` skips the checkpoint (weights from `init_seed`) for callers that overwrite every
    weight anyway, such as loading a finished fine-tune."""
    m = cfg.model
    settings = dict(
        variant=m.variant,
        img_size=m.img_size,
        num_classes=num_classes,
        experts=tuple(experts),
        lora_rank=m.lora_rank,
        fusion=fusion,
        hl_order=m.hl_order,
        hl_width=m.hl_width,
        hl_heads=m.hl_heads,
        hl_init=m.hl_init,
        lac_weights=None if m.lac_weights is None else list(m.lac_weights),
        checkpoint=sam_checkpoint(cfg) if load_sam else None,
        grad_checkpoint=m.grad_checkpoint,
        encoder_seed=m.init_seed,
        seed=cfg.seed,
    )
    if m.family == "sam2":  # imported only here: `import sam2` sets up Hydra's global state
        from samora_pl.models.sam2.segmenter import SAM2Segmenter as cls
    else:  # SAM (v1) only: its position-embedding resize and H-SAM's decoder (refused on sam2 by config.py)
        cls = SAMoraSegmenter
        settings.update(
            pos_embed_resize=m.pos_embed_resize,
            decoder=m.decoder,
            hsam_cmattn=m.hsam_cmattn,
            hsam_cmattn_heads=m.hsam_cmattn_heads,
            hsam_noise=m.hsam_noise,
            hsam_inference=m.hsam_inference,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return cls(**settings)


def base_fingerprint(model: torch.nn.Module) -> str:
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
