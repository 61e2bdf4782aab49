"""SAM2Segmenter: SAMora on SAM 2's Hiera encoder with SAM 2's mask decoder, prompt-free, K + 1 masks.

The image path follows the ``sam2`` package's ``SAM2Base.forward_image`` and ``_forward_sam_heads``:
the neck's stride-4 and stride-8 maps pass through the decoder's ``conv_s0`` / ``conv_s1`` (the
high-resolution features the decoder adds while upscaling), ``no_mem_embed`` is added to the stride-16
embedding, and the unprompted call encodes one padding point (label -1) with the no-mask dense embedding.
The decoder then predicts its K + 1 mask tokens (background + one per class) at side/4.

The object-score gate of ``_forward_sam_heads`` (every logit set to -1024 where the object score is <= 0,
which blocks gradients) belongs to video tracking and is not applied: ``MaskDecoder.predict_masks`` is
called directly, and the object-score head's output is discarded (its head is frozen as unused).

Everything else (trainable modes, experts on disk, ``predict``) is :class:`SAMoraSegmenter`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import build_fusion
from samora_pl.models.adapters.lora import DEFAULT_EXPERTS, MultiExpertLoRA
from samora_pl.models.sam.build import LoadReport
from samora_pl.models.sam.encoder import prepare_images
from samora_pl.models.sam2.build import build_sam2_parts, get_hiera_variant
from samora_pl.models.sam2.checkpoint import load_sam2_checkpoint
from samora_pl.models.sam2.encoder import SAMoraHieraEncoder, hiera_block_heads, hiera_block_widths
from samora_pl.models.segmenter import SAMoraSegmenter

log = logging.getLogger(__name__)

__all__ = ["SAM2Segmenter", "UNUSED_DECODER_PARTS"]

# decoder outputs the prompt-free segmenter discards: their weights stay frozen in every trainable mode
UNUSED_DECODER_PARTS = ("iou_prediction_head.", "pred_obj_score_head.")


class SAM2Segmenter(SAMoraSegmenter):
    """Prompt-free SAM 2 with fused LoRA experts: images [B, 1|3, S, S] in [0, 1] -> logits [B, K+1, S/4, S/4].

    Same keyword arguments as :class:`SAMoraSegmenter`; ``variant`` is a Hiera size (t, s, b+, l, tiny),
    ``checkpoint`` a SAM 2 ``.pt`` file. Every block gets its own fusion module at that block's width and
    head count (``hl_width`` / ``hl_heads``, when set, apply to every block).
    """

    encoder: SAMoraHieraEncoder  # SAM 2's encoder in the slot SAMoraSegmenter types as either encoder

    def __init__(
        self,
        *,
        variant: str = "tiny",
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
    ) -> None:
        nn.Module.__init__(self)  # SAMoraSegmenter.__init__ builds SAM (v1) parts; only its methods are shared
        if grad_checkpoint:
            raise SamoraError("model.grad_checkpoint=true is not supported with model.family=sam2; set it to false")
        v = get_hiera_variant(variant)
        self.variant = v.name
        self.img_size = int(img_size)
        self.num_classes = int(num_classes)
        self.fusion_name = fusion
        parts = build_sam2_parts(v, self.img_size, self.num_classes, encoder_seed=encoder_seed)
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.load_report: LoadReport | None = None
        if checkpoint is not None:
            self.load_report = load_sam2_checkpoint(
                checkpoint,
                parts.image_encoder,
                parts.prompt_encoder,
                parts.mask_decoder,
                parts.no_mem_embed,
                reuse_hypernetworks=reuse_hypernetworks,
            )
        else:
            log.warning("no SAM 2 checkpoint given (model.checkpoint=null): Hiera-%s is randomly initialised", v.name)
        trunk = parts.image_encoder.trunk
        widths, heads = hiera_block_widths(trunk), hiera_block_heads(trunk)
        lora = MultiExpertLoRA(
            tuple(experts), depth=len(widths), dim=widths[0][0], rank=lora_rank, seed=seed, widths=widths
        )
        fusions = [
            build_fusion(
                fusion,
                lora.names,
                dim_out,
                num_heads=h,
                hl_order=hl_order,
                hl_width=hl_width,
                hl_heads=hl_heads,
                hl_init=hl_init,
                lac_weights=lac_weights,
            )
            for (_, dim_out), h in zip(widths, heads)
        ]
        self.encoder = SAMoraHieraEncoder(parts.image_encoder, parts.no_mem_embed, lora, fusions, img_size=img_size)
        self.trainable_mode: str | None = None
        if trainable is not None:
            self.set_trainable(trainable)

    def decode_features(self, fpn) -> torch.Tensor:
        """Neck maps [s4, s8, s16] -> logits [B, K+1, 4h, 4w] (SAM 2's image path, no prompt)."""
        dec = self.mask_decoder
        high_res = [dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1])]
        embedding = self.encoder.add_no_mem(fpn[2])
        B = embedding.shape[0]
        points = (embedding.new_zeros(B, 1, 2), -torch.ones(B, 1, dtype=torch.int32, device=embedding.device))
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=None)
        if dense.shape[-2:] != embedding.shape[-2:]:
            raise SamoraError(
                f"image embeddings are {tuple(embedding.shape[-2:])} but the prompt encoder expects "
                f"{tuple(dense.shape[-2:])}; inputs must be {self.img_size}x{self.img_size}"
            )
        masks, _, _, _ = dec.predict_masks(
            image_embeddings=embedding,
            image_pe=self._dense_pe().to(embedding.dtype),
            sparse_prompt_embeddings=sparse.to(embedding.dtype),
            dense_prompt_embeddings=dense.to(embedding.dtype),
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise SamoraError("SAM 2's decoder needs the high-resolution features too; call forward(images)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_features(self.encoder.forward_fpn(prepare_images(images, self.img_size)))

    def _decoder_trainable(self) -> None:
        for n, p in self.mask_decoder.named_parameters():
            if not n.startswith(UNUSED_DECODER_PARTS):
                p.requires_grad_(True)
