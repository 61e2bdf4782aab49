"""SAMoraSegmenter: SAMora encoder + prompt encoder + prompt-free mask decoder -> K+1 logit maps."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from samora_pl.config.choices import DECODERS
from samora_pl.errors import SamoraError
from samora_pl.models.adapters import lora as lora_mod
from samora_pl.models.adapters.fusion import SingleFusion, build_fusion
from samora_pl.models.adapters.lora import DEFAULT_EXPERTS, MultiExpertLoRA
from samora_pl.models.decoders.hsam import HSAMDecoder, HSAMOutput
from samora_pl.models.sam.build import (
    LoadReport,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    get_variant,
    load_sam_checkpoint,
)
from samora_pl.models.sam.encoder import SAMoraEncoder, prepare_images

if TYPE_CHECKING:
    from samora_pl.models.sam2.encoder import SAMoraHieraEncoder

log = logging.getLogger(__name__)

__all__ = ["SAMoraSegmenter", "TRAINABLE_MODES"]

TRAINABLE_MODES = ("samora", "samed", "distill:<level>", "none", "all")


class SAMoraSegmenter(nn.Module):
    """Prompt-free SAM with fused LoRA experts.

    ``forward(images)``: images [B, 1|3, S, S] in [0, 1] (grey repeated to 3 channels, no
    normalisation) -> logits [B, K+1, S/4, S/4] (channel 0 = background; 4x the embedding grid).
    With ``decoder="hsam"`` (H-SAM's two-stage decoder, ``models/decoders/hsam.py``) the logits are
    [B, K+1, S, S], both stages combined as ``hsam_inference`` says; :meth:`forward_stages` gives each.

    Keyword args: ``variant`` (vit_b, vit_l, vit_h, tiny), ``img_size``, ``num_classes`` (K, background
    excluded), ``experts``, ``lora_rank``, ``fusion`` (hl_attn, sum, lac, mole, single:<level>),
    ``hl_order``, ``hl_width``, ``hl_heads``, ``hl_init``, ``lac_weights``, ``checkpoint`` (official SAM .pth
    or None for random init), ``grad_checkpoint``, ``trainable`` (initial :meth:`set_trainable` mode; None leaves
    every parameter trainable), ``reuse_hypernetworks`` (see ``sam.load_sam_checkpoint``),
    ``pos_embed_resize`` (bilinear or bicubic), ``decoder`` (sam or hsam) and, for hsam, ``hsam_cmattn``,
    ``hsam_cmattn_heads``, ``hsam_noise`` and ``hsam_inference`` (see ``HSAMDecoder``).

    Seeds: ``encoder_seed`` seeds only the (frozen) image encoder's random init, so every stage and every
    run seed sees the same encoder; ``seed`` seeds each LoRA expert's A (see ``lora``). The other parts
    (prompt encoder, mask decoder, fusion) draw from the global generator, which the caller seeds with
    the run seed. None: everything from the global generator.
    """

    def __init__(
        self,
        *,
        variant: str = "vit_b",
        img_size: int = 224,
        num_classes: int = 8,
        experts: Sequence[str] = DEFAULT_EXPERTS,
        lora_rank: int = 4,
        fusion: str = "hl_attn",
        hl_order="pixel-patch-image",
        hl_width: int | None = None,
        hl_heads: int | None = None,
        hl_init: str = "paper",
        lac_weights: Sequence[float] | None = None,
        checkpoint=None,
        grad_checkpoint: bool = False,
        trainable: str | None = "samora",
        reuse_hypernetworks: bool = False,
        encoder_seed: int | None = None,
        seed: int | None = None,
        pos_embed_resize: str = "bilinear",
        decoder: str = "sam",
        hsam_cmattn: str = "released",
        hsam_cmattn_heads: int | None = None,
        hsam_noise: float = 0.2,
        hsam_inference: str = "mean",
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise SamoraError(f"model.decoder={decoder!r} is not one of {', '.join(DECODERS)}")
        self.decoder_name = decoder
        v = get_variant(variant)
        self.variant = v.name
        self.img_size = int(img_size)
        self.num_classes = int(num_classes)
        self.fusion_name = fusion
        if encoder_seed is None:
            image_encoder = build_image_encoder(v, self.img_size)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(encoder_seed)
                image_encoder = build_image_encoder(v, self.img_size)
        self.prompt_encoder = build_prompt_encoder(v, self.img_size)
        self.mask_decoder = build_mask_decoder(v, self.num_classes)
        self.load_report: LoadReport | None = None
        if checkpoint is not None:
            self.load_report = load_sam_checkpoint(
                checkpoint,
                image_encoder,
                self.prompt_encoder,
                self.mask_decoder,
                reuse_hypernetworks=reuse_hypernetworks,
                pos_embed_resize=pos_embed_resize,
            )
        else:
            log.warning(
                "no SAM checkpoint given (model.checkpoint=null): %s encoder, prompt encoder and mask "
                "decoder are randomly initialised",
                v.name,
            )
        # H-SAM's stage 2 has no counterpart in SAM's checkpoint: it starts fresh (stage 1 is mask_decoder)
        self.hsam_decoder: HSAMDecoder | None = None
        if decoder == "hsam":
            self.hsam_decoder = HSAMDecoder(
                classes=self.num_classes + 1,
                dim=v.out_chans,
                grid=self.img_size // v.patch_size,
                heads=v.decoder_heads,
                mlp_dim=v.decoder_mlp_dim,
                cmattn=hsam_cmattn,
                cmattn_heads=hsam_cmattn_heads,
                noise=hsam_noise,
                inference=hsam_inference,
            )
        lora = MultiExpertLoRA(tuple(experts), depth=v.depth, dim=v.embed_dim, rank=lora_rank, seed=seed)
        fusions = [
            build_fusion(
                fusion,
                lora.names,
                v.embed_dim,
                num_heads=v.num_heads,
                hl_order=hl_order,
                hl_width=hl_width,
                hl_heads=hl_heads,
                hl_init=hl_init,
                lac_weights=lac_weights,
            )
            for _ in range(v.depth)
        ]
        # SAM 2's subclass (models/sam2/segmenter.py) holds a SAMoraHieraEncoder here
        self.encoder: SAMoraEncoder | SAMoraHieraEncoder = SAMoraEncoder(
            image_encoder, lora, fusions, grad_checkpoint=grad_checkpoint
        )
        self.trainable_mode: str | None = None
        if trainable is not None:
            self.set_trainable(trainable)

    # -- parts ----------------------------------------------------------------------------------------
    @property
    def lora(self) -> MultiExpertLoRA:
        lora = self.encoder.lora
        assert lora is not None  # a segmenter always builds its encoder with experts
        return lora

    @property
    def fusion(self) -> nn.ModuleList:
        fusion = self.encoder.fusion
        assert fusion is not None  # built with the experts, one fusion module per block
        return fusion

    @property
    def experts(self):
        return self.encoder.lora.names

    # -- forward --------------------------------------------------------------------------------------
    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Neck embeddings [B, D, h, w] -> logits [B, K+1, 4h, 4w] with no prompts (H-SAM: [B, K+1, 16h, 16w]).

        The prompt encoder is called without prompts, giving an empty sparse embedding of batch 1 and
        the ``no_mask_embed`` dense embedding; ``predict_masks`` repeats the image embeddings once per
        prompt (here: once), and the one token set broadcasts over the image batch inside the two-way
        transformer, so every image gets its own K+1 masks (tested against per-image calls).
        """
        if self.hsam_decoder is not None:
            return self.decode_stages(embeddings).combined(self.hsam_decoder.inference)
        masks, _ = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self._dense_pe().to(embeddings.dtype),
            **self._prompts(embeddings),
        )
        return masks

    def decode_stages(self, embeddings: torch.Tensor) -> HSAMOutput:
        """H-SAM only: both stages' logits (M1 [B, K+1, 4h, 4w], M2 [B, K+1, 16h, 16w]) and the prior."""
        if self.hsam_decoder is None:
            raise SamoraError("decode_stages needs model.decoder=hsam; this model has SAM's one-stage decoder")
        prompts = self._prompts(embeddings)
        pe = self._dense_pe().to(embeddings.dtype)
        return self.hsam_decoder(
            self.mask_decoder, embeddings, pe, prompts["sparse_prompt_embeddings"], prompts["dense_prompt_embeddings"]
        )

    def _prompts(self, embeddings: torch.Tensor) -> dict:
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        if dense.shape[-2:] != embeddings.shape[-2:]:
            raise SamoraError(
                f"image embeddings are {tuple(embeddings.shape[-2:])} but the prompt encoder expects "
                f"{tuple(dense.shape[-2:])}; inputs must be {self.img_size}x{self.img_size}"
            )
        return {
            "sparse_prompt_embeddings": sparse.to(embeddings.dtype),
            "dense_prompt_embeddings": dense.to(embeddings.dtype),
        }

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's dense positional encoding, computed in float32 even for a model cast to
        half precision (segment-anything builds its coordinate grid in float32)."""
        pe = self.prompt_encoder.pe_layer
        g = pe.positional_encoding_gaussian_matrix
        if g.dtype == torch.float32:
            return self.prompt_encoder.get_dense_pe()
        out = torch.func.functional_call(
            pe, {"positional_encoding_gaussian_matrix": g.float()}, (self.prompt_encoder.image_embedding_size,)
        )
        return out.unsqueeze(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = prepare_images(images, self.img_size)
        return self.decode(self.encoder(images))

    def forward_stages(self, images: torch.Tensor) -> HSAMOutput:
        """H-SAM's training forward: both stages' logits (see :meth:`decode_stages`)."""
        return self.decode_stages(self.encoder(prepare_images(images, self.img_size)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax label map [B, S/4, S/4] (H-SAM: [B, S, S]; class 0 = background)."""
        return self(images).argmax(1)

    def aux_loss(self) -> torch.Tensor:
        """MoLE's gate-balance loss of the last forward, over every gated block (0 for other fusions)."""
        return self.encoder.aux_loss()

    # -- trainability ---------------------------------------------------------------------------------
    def _single_expert(self) -> str:
        f0 = self.fusion[0]
        if isinstance(f0, SingleFusion):
            return f0.level
        if len(self.experts) == 1:
            return self.experts[0]
        raise SamoraError(
            f"trainable mode 'samed' needs one LoRA expert (or fusion=single:<level>); the model has "
            f"{list(self.experts)} with fusion={self.fusion_name!r}"
        )

    def _decoder_trainable(self) -> None:
        for n, p in self.mask_decoder.named_parameters():
            if not n.startswith("iou_prediction_head."):
                p.requires_grad_(True)
        if self.hsam_decoder is not None:
            self.hsam_decoder.requires_grad_(True)

    def set_trainable(self, mode: str) -> None:
        """Choose which parameters require grad.

        ``samora``           fusion modules + mask decoder (encoder, experts incl. scales, prompt encoder frozen)
                             (with ``decoder="hsam"`` the mask decoder is both stages, in every mode)
        ``samed``            the single expert's A/B + mask decoder + prompt encoder (scales frozen at their value)
        ``distill:<level>``  that expert's A/B and scales only (projection heads live outside this class)
        ``none`` / ``all``   everything frozen / trainable

        Parameters the prompt-free forward never uses stay frozen even where their module "trains":
        the IoU head of the mask decoder (its prediction is discarded) and the prompt encoder's point,
        box and mask-input embeddings (only ``no_mask_embed`` is used). They would get no gradient
        anyway; freezing them keeps DDP's unused-parameter check quiet and the counts honest.
        """
        for p in self.parameters():
            p.requires_grad_(False)
        if mode == "samora":
            for p in self.fusion.parameters():
                p.requires_grad_(True)
            self._decoder_trainable()
        elif mode == "samed":
            for p in self.lora[self._single_expert()].ab_parameters():
                p.requires_grad_(True)
            self._decoder_trainable()
            self.prompt_encoder.no_mask_embed.weight.requires_grad_(True)
        elif isinstance(mode, str) and mode.startswith("distill:"):
            level = mode.split(":", 1)[1]
            for n, p in self.lora[level].named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        elif mode == "all":
            for p in self.parameters():
                p.requires_grad_(True)
        elif mode != "none":
            raise SamoraError(f"unknown trainable mode {mode!r}; choose one of {list(TRAINABLE_MODES)}")
        self.trainable_mode = mode

    def train_expert_weights(self) -> None:
        """Also train every expert's A/B (scales stay frozen): the `finetune.train_experts` ablation, which
        asks how much of SAMed's lead comes from adapting the encoder with labels rather than from the
        experts' self-supervised content."""
        for name in self.lora.names:
            for p in self.lora[name].ab_parameters():
                p.requires_grad_(True)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_parameter_names(self):
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- experts on disk ------------------------------------------------------------------------------
    def save_expert(self, level: str, path, **extra_metadata) -> str:
        """Write expert ``level`` (A, B, scales) to a .safetensors file atomically."""
        return lora_mod.save_expert(
            self.lora, level, path, img_size=self.img_size, extra_metadata=dict(extra_metadata, variant=self.variant)
        )

    def load_expert(self, level: str, path, *, source_level: str | None = None) -> dict[str, str]:
        """Load an expert file into slot ``level``; ``source_level`` allows a file of another level."""
        return lora_mod.load_expert(
            self.lora, level, os.fspath(path), source_level=source_level, img_size=self.img_size
        )
