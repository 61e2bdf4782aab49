"""The SAMora image encoder on SAM 2's Hiera: LoRA experts and per-block fusion inside every Hiera block.

The ``sam2`` package's ``ImageEncoder`` (Hiera trunk + FPN neck) runs as is; only each block's ``attn``
(``MultiScaleAttention``) is replaced by :class:`LoRAHieraAttention`, which takes over the same ``qkv``,
``proj`` and q-pooling modules (state-dict names unchanged: ``trunk.blocks.<i>.attn.qkv.weight``) and
keeps the package's ``MultiScaleBlock.forward`` around it (norm, window partition, pooled shortcut,
unpartition, MLP). Per block, on the attention's input ``xn`` [B*windows, h, w, C_in]::

    q, k, v   = qkv(xn)                                   (each C_out wide; C_in != C_out in q-pool blocks)
    q_e, v_e  = q + s_e dQ_e(xn), v + s_e dV_e(xn)         A (r, C_in), B (C_out, r): all of q and v adapted
    q*        = maxpool(q*)                                in q-pool blocks (after the LoRA update, as SAM 2)
    o_0..o_E  = one batched SDPA over [q; q_1..q_E]
    out       = proj(o_0) + Fuse({e: proj_without_bias(o_e - o_0)})

Fusion acts on the attention output in the attention's own layout: the batch axis is B x windows
(padding windows included) in windowed blocks and B in global blocks, and the width is the block's
C_out, which doubles per stage (one fusion module per block, built for that width). Fusing there and not
on the whole block output keeps HL-Attn's cross-attention inside the same windows the block attends
over: over the whole stage-1 map it would be quadratic in 16K (512 px) to 65K (1024 px) tokens.

With ``single:<level>`` fusion only that expert's stream is computed (SAMed's LoRA), and ``lac`` merges
its weighted experts into that one stream at ``qkv``; without LoRA the package's own attention arithmetic
runs. With every B = 0 the output equals the package's encoder. MoLE's gate, one distribution per sample,
is one per window in windowed blocks (the batch axis there is B x windows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import Fusion, LACFusion, SingleFusion, mole_balance_loss
from samora_pl.models.adapters.lora import MultiExpertLoRA
from samora_pl.models.sam.encoder import prepare_images

__all__ = ["LoRAHieraAttention", "SAMoraHieraEncoder", "hiera_block_widths", "IMAGENET_MEAN", "IMAGENET_STD"]

# SAM 2's image transform (sam2.utils.transforms.SAM2Transforms): ImageNet mean/std on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hiera_block_widths(trunk: nn.Module) -> tuple[tuple[int, int], ...]:
    """(qkv input width, q/v width) of every Hiera block."""
    return tuple((int(b.dim), int(b.dim_out)) for b in trunk.blocks)


def hiera_block_heads(trunk: nn.Module) -> tuple[int, ...]:
    return tuple(int(b.attn.num_heads) for b in trunk.blocks)


class LoRAHieraAttention(nn.Module):
    """Stand-in for one block's ``MultiScaleAttention`` that adds the experts and the fusion.

    The LoRA experts and fusion modules belong to the owning :class:`SAMoraHieraEncoder` (registered
    there once); this module reaches them through a plain attribute, so its own state dict holds exactly
    the package attention's keys.
    """

    def __init__(self, attn: nn.Module, index: int, owner: SAMoraHieraEncoder) -> None:
        super().__init__()
        self.dim, self.dim_out, self.num_heads = int(attn.dim), int(attn.dim_out), int(attn.num_heads)
        self.qkv, self.proj, self.q_pool = attn.qkv, attn.proj, attn.q_pool
        self.index = int(index)
        self.__dict__["_owner"] = owner  # not a submodule: no second copy of the experts in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner
        fusion: Fusion | None = None if owner.fusion is None else owner.fusion[self.index]
        Bw, H, W, _ = x.shape
        C, nh = self.dim_out, self.num_heads
        q, k, v = self.qkv(x).reshape(Bw, H * W, 3, C).unbind(2)  # [Bw, N, C]
        if fusion is None:
            levels, q_all, v_all = (), q.unsqueeze(0), v.unsqueeze(0)
        else:  # Single and LAC: one stream, the deltas act at qkv (LAC merges its weighted experts there)
            levels = fusion.levels
            one = isinstance(fusion, (SingleFusion, LACFusion))
            mix = fusion.weights if isinstance(fusion, LACFusion) else None
            q_all, v_all = owner.lora.streams(
                self.index, x.reshape(Bw, H * W, -1), q, v, levels, with_base=not one, mix=mix
            )
        S = q_all.shape[0]
        h, w = H, W
        if self.q_pool is not None:  # q pooled after projection (and after the LoRA update), as SAM 2 does
            pooled = self.q_pool(q_all.reshape(S * Bw, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            h, w = pooled.shape[1:3]
            q_all = pooled.reshape(S, Bw, h * w, C)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [S, Bw, n, C] -> [S*Bw, nh, n, hd]
            return t.reshape(S * Bw, t.shape[-2], nh, C // nh).transpose(1, 2)

        keys = k.reshape(Bw, H * W, nh, C // nh).transpose(1, 2)
        if S > 1:
            keys = keys.unsqueeze(0).expand(S, -1, -1, -1, -1).reshape(S * Bw, nh, H * W, C // nh)
        o = F.scaled_dot_product_attention(heads(q_all), keys, heads(v_all))
        o = o.transpose(1, 2).reshape(S, Bw, h, w, C)
        if S == 1:
            return self.proj(o[0])
        base, streams = o.split([1, S - 1])  # split, not indexing: its backward concatenates, no zero fill
        deltas = F.linear(streams - base, self.proj.weight)  # every expert's residual in one matmul
        return self.proj(base.squeeze(0)) + fusion(dict(zip(levels, deltas.unbind(0))))


class SAMoraHieraEncoder(nn.Module):
    """SAM 2 image encoder + LoRA experts + one fusion module per Hiera block.

    ``forward(images)`` -> the image embedding [B, d_model, S/16, S/16]: the neck's stride-16 map plus
    ``no_mem_embed`` (SAM 2's single-image path), what the mask decoder, the image-level and the
    pixel-level distillation read. :meth:`forward_tokens` gives the stride-16 map as tokens for
    patch-level distillation; :meth:`forward_fpn` the neck's three maps for the decoder.
    Inputs are [0, 1] images, normalised with ImageNet mean/std as SAM 2's transforms do.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        no_mem_embed: nn.Parameter,
        lora: MultiExpertLoRA | None = None,
        fusions: Sequence[Fusion] | None = None,
        *,
        img_size: int,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.no_mem_embed = no_mem_embed
        self.lora = lora
        self._img_size = int(img_size)
        trunk = image_encoder.trunk
        if (lora is None) != (fusions is None):
            raise ValueError("pass both lora and fusions, or neither")
        self.fusion = None
        if fusions is not None:
            fusions = list(fusions)
            if len(fusions) != len(trunk.blocks):
                raise ValueError(f"need one fusion per block ({len(trunk.blocks)}), got {len(fusions)}")
            if tuple(lora.widths) != hiera_block_widths(trunk):
                raise SamoraError(
                    f"LoRA experts are for block widths {list(lora.widths)}, the Hiera trunk has "
                    f"{list(hiera_block_widths(trunk))}; use experts distilled for the same model.variant"
                )
            for f in fusions:
                missing = [n for n in f.levels if n not in lora.names]
                if missing:
                    raise SamoraError(f"fusion needs experts {missing} the model lacks (experts: {list(lora.names)})")
            self.fusion = nn.ModuleList(fusions)
        for i, blk in enumerate(trunk.blocks):
            blk.attn = LoRAHieraAttention(blk.attn, i, self)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def depth(self) -> int:
        return len(self.image_encoder.trunk.blocks)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`forward_tokens` (the neck's d_model), which patch-level distillation projects."""
        return int(self.image_encoder.neck.d_model)

    @property
    def embedding_dim(self) -> int:
        """Width of the image embedding (the neck's d_model)."""
        return int(self.image_encoder.neck.d_model)

    embedding_stride = 16

    # -- forward --------------------------------------------------------------------------------------
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = prepare_images(images, self.img_size)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def trunk_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Hiera's four stage maps [B, C_k, S/4..S/32, ...] (strides 4, 8, 16, 32)."""
        return self.image_encoder.trunk(self.normalise(images))

    def forward_fpn(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The neck's maps at strides 4, 8, 16 (d_model wide; the stride-32 level dropped, ``scalp``=1),
        as ``ImageEncoder.forward`` returns them in ``backbone_fpn``."""
        ie = self.image_encoder
        features, _ = ie.neck(self.trunk_features(images))
        return features[: -ie.scalp] if ie.scalp > 0 else features

    def add_no_mem(self, embedding: torch.Tensor) -> torch.Tensor:
        """SAM 2's image path: ``no_mem_embed`` added to every stride-16 token."""
        return embedding + self.no_mem_embed.to(embedding.dtype).view(1, -1, 1, 1)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The stride-16 feature map as tokens [B, S/16, S/16, d_model]: the neck's stride-16 level, the
        trunk's stage 3 plus the upsampled stage 4. Not the stage-3 trunk tokens alone: stage 4's blocks
        would then get no gradient, and their patch-level expert would never train."""
        return self.forward_fpn(images)[-1].permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        s16 = self.forward_fpn(images)[-1]
        embedding = self.add_no_mem(s16)
        return (embedding, s16.permute(0, 2, 3, 1)) if return_tokens else embedding

    def aux_loss(self) -> torch.Tensor:
        """MoLE's balance loss over every gated block of the last forward (``fusion.mole_balance_loss``);
        0 if no block has a gate. A windowed block's gate has one row per window, so each block's gate is
        averaged over its rows first: every block weighs the same, as when all have one row per image."""
        gates = [] if self.fusion is None else [f.last_gate for f in self.fusion if f.last_gate is not None]
        if not gates:
            return self.no_mem_embed.new_zeros(())
        return mole_balance_loss([g.mean(0, keepdim=True) for g in gates])
