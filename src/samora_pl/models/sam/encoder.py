"""The SAMora image encoder: SAM's ViT with LoRA experts fused inside every block.

segment-anything's ``ImageEncoderViT`` is reused as is (patch embedding, position embedding, blocks'
norms / qkv / proj / MLP / relative position tables, neck); only the block loop is driven from here.
Per block, with ``xn = norm1(x)`` (window-partitioned for windowed blocks, as SAM does)::

    q, k, v      = qkv(xn)
    q_e, v_e     = q + s_e dQ_e(xn),  v + s_e dV_e(xn)          (k shared by all)
    o_0, o_1..E  = one batched attention over [q; q_1..q_E] with SAM's decomposed rel-pos bias
    base         = proj(o_0),   r_e = proj_without_bias(o_e - o_0)     (proj is linear)
    x            = x + base + Fuse({e: r_e});   x = x + mlp(norm2(x))

Attention uses ``F.scaled_dot_product_attention`` with SAM's relative-position bias folded into extra
query/key features (exact; see :func:`sdpa_attention`), so no N x N bias is materialised. With
``single:<level>`` fusion the block runs SAMed's computation directly,
``x + proj(attn(qkv(xn) + [dQ, 0, dV]))``, without a separate base pass; ``lac`` runs the same single
attention with the weighted sum of the experts' deltas, ``qkv(xn) + sum_e w_e [dQ_e, 0, dV_e]``, which is
SAM attention with the merged weight ``W + sum_e w_e dW_e``. Without LoRA the original segment-anything
``Block.forward`` runs.

:func:`naive_block_forward` is the slow reference: it calls the original ``Attention`` module once for
the base and once per expert (with a forward hook adding the expert's delta to ``qkv``'s output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import Fusion, LACFusion, SingleFusion, mole_balance_loss
from samora_pl.models.adapters.lora import LoRAQV, MultiExpertLoRA

__all__ = ["SAMoraEncoder", "rel_pos_terms", "rel_pos_bias", "sdpa_attention", "naive_block_forward", "prepare_images"]


def prepare_images(images: torch.Tensor, img_size: int | None = None) -> torch.Tensor:
    """[B, 1|3, H, W] in [0, 1] -> [B, 3, H, W] (grey repeated; pixel mean 0, std 1: no normalisation)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise SamoraError(f"images must be [B, 1, H, W] or [B, 3, H, W], got shape {list(images.shape)}")
    if img_size is not None and (images.shape[-2] != img_size or images.shape[-1] != img_size):
        raise SamoraError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
            f"{img_size}x{img_size}; resize the inputs or set model.img_size={images.shape[-1]}"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def rel_pos_terms(attn: Attention, q: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative-position terms for queries ``q`` [..., H*W, hd]:
    ``rel_h`` [..., N, H] (query against each key row) and ``rel_w`` [..., N, W] (against each key column)."""
    H, W = hw
    Rh = get_rel_pos(H, H, attn.rel_pos_h)  # [H, H, hd]
    Rw = get_rel_pos(W, W, attn.rel_pos_w)  # [W, W, hd]
    lead = q.shape[:-2]
    rq = q.reshape(*lead, H, W, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", rq, Rh).reshape(*lead, H * W, H)
    rel_w = torch.einsum("...hwc,wkc->...hwk", rq, Rw).reshape(*lead, H * W, W)
    return rel_h, rel_w


def rel_pos_bias(attn: Attention, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The [..., N, N] bias ``add_decomposed_rel_pos`` adds to the logits (computed from the unscaled q)."""
    H, W = hw
    rel_h, rel_w = rel_pos_terms(attn, q, hw)
    lead = q.shape[:-2]
    bias = rel_h.reshape(*lead, H * W, H, 1) + rel_w.reshape(*lead, H * W, 1, W)
    return bias.reshape(*lead, H * W, H * W)


HEAD_ALIGN = 32  # head size multiple for the augmented attention (see sdpa_attention)


def _key_position_features(hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """[N, H + W]: the one-hot row and one-hot column of every key token."""
    H, W = hw
    rows = torch.arange(H, device=like.device).repeat_interleave(W)
    cols = torch.arange(W, device=like.device).repeat(H)
    return torch.cat([F.one_hot(rows, H), F.one_hot(cols, W)], -1).to(like.dtype)


def sdpa_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw) -> torch.Tensor:
    """softmax(q k^T * scale + relpos(q)) v via ``scaled_dot_product_attention``; q, k, v [M, h, N, hd].

    The bias is never built: since ``relpos(q)[n, m] = rel_h[n, row(m)] + rel_w[n, col(m)]``, appending
    ``rel_h, rel_w`` to the (scaled) queries and the one-hot row and column to the keys gives exactly the
    same logits as a plain dot product. Without an [M, h, N, N] float mask SDPA can use its fused
    (flash / memory-efficient) kernels, which matters at 512 px where global blocks have N = 1024.
    ``v`` is zero-padded to the same width because those kernels want one head size (dropped after),
    and all three are zero-padded to a multiple of ``HEAD_ALIGN``: CPU SDPA at head size 96 runs about
    11 % faster than at the exact 92 of a 14-token window (64 + 14 + 14), forward and backward.
    """
    if not attn.use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    rel_h, rel_w = rel_pos_terms(attn, q, hw)
    width = q.shape[-1] + sum(hw)
    pad = -width % HEAD_ALIGN
    zeros = q.new_zeros(()).expand(*q.shape[:-1], pad)
    q_aug = torch.cat([q * attn.scale, rel_h.to(q.dtype), rel_w.to(q.dtype), zeros], -1)
    keys = F.pad(_key_position_features(hw, k), (0, pad)).expand(*k.shape[:-2], -1, -1)
    k_aug = torch.cat([k, keys], -1)
    v_aug = F.pad(v, (0, q_aug.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., : v.shape[-1]]


def naive_block_forward(
    blk: Block,
    x: torch.Tensor,
    lora_blocks: dict[str, LoRAQV],
    fusion: Fusion | None,
) -> torch.Tensor:
    """Reference block: the original Attention called once for the base and once per expert.

    ``lora_blocks`` maps expert name -> that expert's :class:`LoRAQV` for this block. With a
    :class:`SingleFusion` (or an empty dict) only one attention call is made, SAMed style; with a
    :class:`LACFusion` one call with ``sum_e w_e`` of the experts' qkv deltas.
    """
    shortcut = x
    xn = blk.norm1(x)
    H, W = xn.shape[1], xn.shape[2]
    if blk.window_size > 0:
        xn, pad_hw = window_partition(xn, blk.window_size)

    def attn_with(lbs: Sequence[tuple[float, LoRAQV]]) -> torch.Tensor:
        if not lbs:
            y = blk.attn(xn)
        else:
            delta = lambda inp: sum(w * lb.qkv_delta(inp) for w, lb in lbs)  # noqa: E731
            handle = blk.attn.qkv.register_forward_hook(lambda m, inp, out: out + delta(inp[0]))
            try:
                y = blk.attn(xn)
            finally:
                handle.remove()
        if blk.window_size > 0:
            y = window_unpartition(y, blk.window_size, pad_hw, (H, W))
        return y

    if fusion is None or not lora_blocks:
        x = shortcut + attn_with(())
    elif isinstance(fusion, SingleFusion):
        x = shortcut + attn_with([(1.0, lora_blocks[fusion.level])])
    elif isinstance(fusion, LACFusion):
        x = shortcut + attn_with([(float(w), lora_blocks[n]) for n, w in zip(fusion.levels, fusion.weights)])
    else:
        base = attn_with(())
        residuals = {n: attn_with([(1.0, lora_blocks[n])]) - base for n in fusion.levels}
        x = shortcut + base + fusion(residuals)
    return x + blk.mlp(blk.norm2(x))


class SAMoraEncoder(nn.Module):
    """SAM image encoder + LoRA experts + one fusion module per block.

    Args:
        image_encoder: segment-anything ``ImageEncoderViT`` (built at any ``img_size``).
        lora: the experts (None: plain SAM).
        fusions: one :class:`Fusion` per block (None: plain SAM).
        grad_checkpoint: recompute each block in backward (``torch.utils.checkpoint``) to save memory.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        lora: MultiExpertLoRA | None = None,
        fusions: Sequence[Fusion] | None = None,
        *,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.lora = lora
        depth = len(image_encoder.blocks)
        if (lora is None) != (fusions is None):
            raise ValueError("pass both lora and fusions, or neither")
        if fusions is not None:
            fusions = list(fusions)
            if len(fusions) != depth:
                raise ValueError(f"need one fusion per block ({depth}), got {len(fusions)}")
            for f in fusions:
                missing = [n for n in f.levels if n not in lora.names]
                if missing:
                    raise SamoraError(f"fusion needs experts {missing} the model lacks (experts: {list(lora.names)})")
            if lora.depth != depth or lora.dim != image_encoder.pos_embed.shape[-1]:
                raise SamoraError(
                    f"LoRA experts are for depth {lora.depth} / width {lora.dim}, the encoder has depth "
                    f"{depth} / width {image_encoder.pos_embed.shape[-1]}"
                )
            self.fusion = nn.ModuleList(fusions)
        else:
            self.fusion = None
        self.grad_checkpoint = bool(grad_checkpoint)

    # -- properties -----------------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return int(self.image_encoder.img_size)

    @property
    def depth(self) -> int:
        return len(self.image_encoder.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.image_encoder.patch_embed.proj.out_channels)

    # -- blocks ---------------------------------------------------------------------------------------
    def _fused_qkv(self, i: int, blk: Block, xn: torch.Tensor, levels: Sequence[str], with_base: bool, mix=None):
        """Batched attention for one block on (windowed) ``xn`` [Bw, h, w, C].

        Returns proj-without-bias outputs [S, Bw, h, w, C] where S = len(levels) (+1 base first when
        ``with_base``), or S = 1 for the one stream of the ``mix``-weighted experts (LAC).
        """
        attn = blk.attn
        Bw, h, w, C = xn.shape
        N, nh = h * w, attn.num_heads
        hd = C // nh
        q, k, v = attn.qkv(xn).reshape(Bw, N, 3, C).unbind(2)  # [Bw, N, C]
        q_all, v_all = self.lora.streams(i, xn.reshape(Bw, N, C), q, v, levels, with_base=with_base, mix=mix)
        S = q_all.shape[0]

        def heads(t):  # [S, Bw, N, C] -> [S*Bw, nh, N, hd]
            return t.reshape(S * Bw, N, nh, hd).transpose(1, 2)

        k_all = k.reshape(Bw, N, nh, hd).transpose(1, 2)
        if S > 1:
            k_all = k_all.unsqueeze(0).expand(S, -1, -1, -1, -1).reshape(S * Bw, nh, N, hd)
        o = sdpa_attention(attn, heads(q_all), k_all, heads(v_all), (h, w))  # [S*Bw, nh, N, hd]
        o = o.transpose(1, 2).reshape(S, Bw, h, w, C)
        return F.linear(o, attn.proj.weight)

    def _unpartition(self, blk: Block, y: torch.Tensor, pad_hw, hw) -> torch.Tensor:
        """[S, Bw, ws, ws, C] -> [S, B, H, W, C]."""
        if blk.window_size == 0:
            return y
        S = y.shape[0]
        y = window_unpartition(y.reshape(S * y.shape[1], *y.shape[2:]), blk.window_size, pad_hw, hw)
        return y.reshape(S, -1, *y.shape[1:])

    def block_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on tokens [B, H, W, C] (the fast batched implementation)."""
        blk = self.image_encoder.blocks[i]
        fusion = None if self.fusion is None else self.fusion[i]
        if fusion is None:
            return blk(x)
        shortcut = x
        xn = blk.norm1(x)
        H, W = xn.shape[1], xn.shape[2]
        pad_hw = (H, W)
        if blk.window_size > 0:
            xn, pad_hw = window_partition(xn, blk.window_size)
        if isinstance(fusion, (SingleFusion, LACFusion)):  # one attention call: the deltas act at qkv
            mix = fusion.weights if isinstance(fusion, LACFusion) else None
            y = self._fused_qkv(i, blk, xn, fusion.levels, with_base=False, mix=mix)
            y = self._unpartition(blk, y, pad_hw, (H, W)).squeeze(0)
            x = shortcut + y + blk.attn.proj.bias
        else:
            levels = fusion.levels
            y = self._unpartition(blk, self._fused_qkv(i, blk, xn, levels, with_base=True), pad_hw, (H, W))
            base, *streams = y.unbind(0)  # unbind, not indexing: its backward stacks, no zero-filled copies
            residuals = {n: s - base for n, s in zip(levels, streams)}
            x = shortcut + (base + blk.attn.proj.bias) + fusion(residuals)
        return x + blk.mlp(blk.norm2(x))

    def naive_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` through :func:`naive_block_forward` (reference)."""
        blk = self.image_encoder.blocks[i]
        if self.fusion is None:
            return blk(x)
        lora_blocks = {n: self.lora.experts[n].blocks[i] for n in self.lora.names}
        return naive_block_forward(blk, x, lora_blocks, self.fusion[i])

    # -- forward --------------------------------------------------------------------------------------
    def forward_tokens(self, images: torch.Tensor, *, naive: bool = False) -> torch.Tensor:
        """Last block's tokens [B, H/16, W/16, C] (before the neck)."""
        enc = self.image_encoder
        x = enc.patch_embed(prepare_images(images, self.img_size))
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        block = self.naive_block if naive else self.block_forward
        for i in range(self.depth):
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, i, x, use_reentrant=False)
            else:
                x = block(i, x)
        return x

    def neck(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w, C] tokens -> [B, neck, h, w]."""
        return self.image_encoder.neck(tokens.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor, return_tokens: bool = False, *, naive: bool = False):
        """images [B, 1|3, S, S] in [0, 1] -> neck output [B, neck, S/16, S/16]
        (and the last block's tokens [B, S/16, S/16, C] when ``return_tokens``)."""
        tokens = self.forward_tokens(images, naive=naive)
        out = self.neck(tokens)
        return (out, tokens) if return_tokens else out

    def aux_loss(self) -> torch.Tensor:
        """MoLE's balance loss over every gated block of the last forward (:func:`mole_balance_loss`); 0 if
        no block has a gate."""
        gates = [] if self.fusion is None else [f.last_gate for f in self.fusion if f.last_gate is not None]
        if not gates:
            return self.image_encoder.pos_embed.new_zeros(())
        return mole_balance_loss(gates)
