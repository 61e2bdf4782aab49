"""Loading official SAM 2 checkpoints (``sam2.1_hiera_*.pt``, ``sam2_hiera_*.pt``) into the image parts.

A SAM 2 file is ``torch.load(f)["model"]`` (read here with ``weights_only=True``, no code executed),
a flat state dict with the prefixes ``image_encoder.`` (trunk and neck), ``sam_prompt_encoder.``,
``sam_mask_decoder.`` (with ``conv_s0``/``conv_s1``), the top-level ``no_mem_embed``, and the video
memory modules, which a single-image segmenter does not build and which are dropped by name
(:data:`MEMORY_PREFIXES`, :data:`MEMORY_KEYS`; the 2.0 files lack some of them, so 2.0 and 2.1 both load).
Every other key the model lacks is an error.

Image sides other than the checkpoints' 1024 need no resizing: Hiera interpolates its background position
embedding to the stride-4 map at run time (bicubic) and tiles the 8 x 8 window embedding, the neck has a
fixed sine encoding and the prompt encoder random Fourier features. The mask decoder's mask tokens and
hypernetwork MLPs are sized for K + 1 classes; with SAM 2's 3 + 1 they stay freshly initialised, as for
SAM (``sam.adapt_sam_state_dict``, reused here under SAM's prefix names).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from samora_pl.errors import SamoraError
from samora_pl.models.sam.build import LoadReport, adapt_sam_state_dict

log = logging.getLogger(__name__)

__all__ = ["MEMORY_PREFIXES", "MEMORY_KEYS", "read_sam2_checkpoint", "load_sam2_checkpoint"]

MEMORY_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
)
MEMORY_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")

# SAM 2 prefix -> the name of the same part in a SAM segmenter (so sam.adapt_sam_state_dict applies)
_RENAME = {
    "image_encoder.": "image_encoder.",
    "sam_prompt_encoder.": "prompt_encoder.",
    "sam_mask_decoder.": "mask_decoder.",
}


def _is_memory_key(key: str) -> bool:
    return key.startswith(MEMORY_PREFIXES) or key in MEMORY_KEYS


def read_sam2_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict of a SAM 2 checkpoint; a SAM (v1) file or anything else is refused clearly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SamoraError(
            f"SAM 2 checkpoint not found: {path}; download the official file (e.g. sam2.1_hiera_base_plus.pt) "
            f"and set model.checkpoint to its path, or model.checkpoint=none to start from a random SAM 2 on purpose"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SamoraError(f"cannot read SAM 2 checkpoint {path}: {exc}; re-download the file") from exc
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    keys = [k for k in sd if isinstance(k, str)] if isinstance(sd, dict) else []
    if any(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in keys) and not any(
        k.startswith("sam_mask_decoder.") for k in keys
    ):
        raise SamoraError(
            f"{path} is a SAM (v1) checkpoint, not SAM 2: use it with model.family=sam (and a vit_* model.variant), "
            f"or give model.family=sam2 a sam2.1_hiera_*.pt file"
        )
    if not any(k.startswith("image_encoder.trunk.") for k in keys):
        raise SamoraError(f"{path} is not a SAM 2 checkpoint: it has no image_encoder.trunk.* tensors")
    return sd


def load_sam2_checkpoint(
    path,
    image_encoder: nn.Module,
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    no_mem_embed: nn.Parameter,
    *,
    reuse_hypernetworks: bool = False,
) -> LoadReport:
    """Load a SAM 2 file into the four single-image parts; memory keys dropped, others must fit."""
    sd = read_sam2_checkpoint(path)
    renamed: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in sd.items():
        if _is_memory_key(key):
            dropped.append(key)
            continue
        new = key
        for old, sam_name in _RENAME.items():
            if key.startswith(old):
                new = sam_name + key[len(old) :]
                break
        renamed[new] = value
    modules = {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
    model_state = {f"{p}.{k}": v for p, mod in modules.items() for k, v in mod.state_dict().items()}
    model_state["no_mem_embed"] = no_mem_embed.detach()
    new_sd, report = adapt_sam_state_dict(
        renamed, model_state, (), path=os.fspath(path), reuse_hypernetworks=reuse_hypernetworks
    )
    with torch.no_grad():
        for prefix, mod in modules.items():
            part = {k[len(prefix) + 1 :]: v for k, v in new_sd.items() if k.startswith(prefix + ".")}
            mod.load_state_dict(part, strict=False)
        if "no_mem_embed" in new_sd:
            no_mem_embed.copy_(new_sd["no_mem_embed"])
    report.ignored.extend(dropped)
    log.info("loaded SAM 2 checkpoint %s; %d video-memory tensors dropped", report.summary(), len(dropped))
    if report.missing:
        log.warning(
            "SAM 2 checkpoint %s lacks %d model tensors (kept random): %s",
            path,
            len(report.missing),
            ", ".join(report.missing[:10]),
        )
    return report
