"""H-SAM's hierarchical two-stage mask decoder (Cheng et al., "Unleashing the Potential of SAM for Medical
Adaptation via Hierarchical Decoding", CVPR 2024, arXiv 2403.18271; behaviour read from the authors'
public code, github.com/Cccccczh404/H-SAM). Written here from that description, not copied; every
module that SAM already has (``Attention``, ``MLPBlock``, ``MLP``, ``LayerNorm2d``) is segment-anything's.

With K = classes + background, E the image embedding [B, C, h, w] (h = w = S/16) and N = h * w:

* **Stage 1** is SAM's own ``MaskDecoder`` (K mask tokens, no prompts): :func:`stage_one` runs its parts
  and also returns the token-image affinities A = tokens_out @ image_out^T [B, K, N] and the 4x upscaled
  embedding U1 [B, C/8, 4h, 4w] (the skip connection). SAM's block order is kept (token self-attention
  before token->image attention); the released code swaps the two, a declared difference.
* **Prior** P = softmax over classes of M1 bilinearly shrunk to h x w, flattened [B, K, N]; nothing
  learnable, not detached, so the stage-2 loss also reaches stage 1 through P (and U1).
* **Embedding noise** (training only): E + N(0, 1) * ``noise`` * (max E - min E), range over the batch;
  stage 1 sees the clean E.
* **Class-wise self-attention** (:class:`ClassAttention`) on A: the K rows are the sequence, the N
  positions the features; it gives a map S [B, 1, h, w] and X' = X + X * S with X = E + no-mask embedding.
  ``released`` reproduces the authors' code, where S is a softmax over one channel, identically 1: X' = 2X
  and the branch receives zero gradient. ``working`` (a declared deviation) uses a sigmoid, so S depends
  on A and the branch learns.
* **Stage 2** (:class:`MaskGuidedTransformer`): depth 2, K fresh tokens, both cross-attentions scale
  their softmax weights by P (token i -> pixel p and pixel p -> token i by P[i, p]) without
  renormalising, inner width C (SAM: C/2), dropout 0.2 on the token->image update; the final
  token->image attention is SAM's plain one. No IoU token (its output is unused in the released code).
* **Hierarchical pixel decoder**: stage 2's own 4x upscaling concatenated with U1 (C/4 channels), two
  ConvTranspose x2 (LayerNorm2d + GELU after each) to C/16 channels at 16h, and one 5-layer hypernetwork
  MLP per token -> M2 [B, K, S, S].
* **Inference**: ``mean`` (the released default) averages M1 and M2 after bilinear upsampling to S;
  ``stage2`` uses M2 alone.

Every size follows from K, C and S (any multiple of 16); the class-wise attention's heads must divide N.
The released code's label-guided noise on A (224 only, and inert because the branch is) is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import Attention
from torch import nn

from samora_pl.config.choices import HSAM_CMATTN, HSAM_INFERENCE
from samora_pl.errors import SamoraError

__all__ = [
    "CMATTN_MODES",
    "INFERENCE_MODES",
    "HSAMDecoder",
    "HSAMOutput",
    "StageOne",
    "stage_one",
    "probability_prior",
    "embedding_noise",
    "MaskedAttention",
    "ClassAttention",
    "default_cmattn_heads",
]

CMATTN_MODES = HSAM_CMATTN
INFERENCE_MODES = HSAM_INFERENCE
TOKEN_TO_IMAGE_DROPOUT = 0.2
HYPERNET_LAYERS = 5


@dataclass
class StageOne:
    logits: torch.Tensor  # M1 [B, K, 4h, 4w]
    affinity: torch.Tensor  # A [B, K, N]
    upscaled: torch.Tensor  # U1 [B, C/8, 4h, 4w]


@dataclass
class HSAMOutput:
    stage1: torch.Tensor  # M1 [B, K, 4h, 4w]
    stage2: torch.Tensor  # M2 [B, K, 16h, 16w]
    prior: torch.Tensor  # P [B, K, N]

    def combined(self, mode: str = "mean") -> torch.Tensor:
        """The prediction logits at M2's size: mean of both upsampled stages, or stage 2 alone."""
        if mode not in INFERENCE_MODES:
            raise SamoraError(f"model.hsam_inference={mode!r}; choose one of {', '.join(INFERENCE_MODES)}")
        size = self.stage2.shape[-2:]
        m2 = self.stage2
        if mode == "stage2":
            return m2
        m1 = F.interpolate(self.stage1, size=size, mode="bilinear", align_corners=False)
        return (m1 + m2) / 2


def stage_one(
    decoder: MaskDecoder, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> StageOne:
    """SAM's ``MaskDecoder.predict_masks`` step by step, keeping A and U1 (the IoU prediction is skipped)."""
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, keys = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens.expand(b, -1, -1))
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]  # [B, K, C]
    affinity = mask_tokens @ keys.transpose(1, 2)  # [B, K, N]
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    logits = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
    return StageOne(logits, affinity, upscaled)


def probability_prior(stage1_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """P [B, K, h*w]: class softmax of M1 shrunk bilinearly to the embedding grid (sums to 1 over K)."""
    small = F.interpolate(stage1_logits, size=grid, mode="bilinear", align_corners=False)
    return torch.softmax(small.float(), dim=1).to(stage1_logits.dtype).flatten(2)


def embedding_noise(embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """E + N(0, 1) * scale * (max E - min E), the range taken over the whole batch (no gradient through it)."""
    spread = (embeddings.max() - embeddings.min()).detach()
    return embeddings + torch.randn_like(embeddings) * scale * spread


def default_cmattn_heads(tokens: int) -> int:
    """The largest head count <= 8 dividing N: the released 7 at 224 (N 196) and 8 at 512 (N 1024)."""
    return next(h for h in range(8, 0, -1) if tokens % h == 0)


class MaskedAttention(Attention):
    """segment-anything's ``Attention`` whose softmax weights [B, H, Q, T] are multiplied by a prior
    [B, Q, T] (no renormalisation). Without a prior it is the plain attention."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prior: torch.Tensor | None = None):
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        weights = torch.softmax((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5, dim=-1)
        if prior is not None:
            weights = weights * prior.unsqueeze(1).to(weights.dtype)
        return self.out_proj(self._recombine_heads(weights @ v))


class MaskGuidedBlock(nn.Module):
    """SAM's two-way block (token self-attention, token->image, MLP, image->token) with both
    cross-attentions mask-guided by P and dropout on the token->image update."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.token_to_image = MaskedAttention(dim, heads)
        self.image_to_token = MaskedAttention(dim, heads)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.dropout = nn.Dropout(TOKEN_TO_IMAGE_DROPOUT)
        self.skip_first_pe = skip_first_pe

    def forward(self, tokens, keys, token_pe, key_pe, prior):
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norms[0](tokens)
        update = self.token_to_image(tokens + token_pe, keys + key_pe, keys, prior)
        tokens = self.norms[1](tokens + self.dropout(update))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        update = self.image_to_token(keys + key_pe, tokens + token_pe, tokens, prior.transpose(1, 2))
        keys = self.norms[3](keys + update)
        return tokens, keys


class MaskGuidedTransformer(nn.Module):
    """Stage 2's transformer: mask-guided blocks, then SAM's plain final token->image attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MaskGuidedBlock(dim, heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth))
        self.final_attn = Attention(dim, heads, downsample_rate=2)
        self.norm_final = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor, prior: torch.Tensor):
        """src, pe [B, C, h, w]; tokens [B, K, C]; prior [B, K, N] -> (tokens [B, K, C], keys [B, N, C])."""
        if prior.shape[1] != tokens.shape[1]:
            raise SamoraError(f"mask attention needs one prior row per token: {prior.shape[1]} vs {tokens.shape[1]}")
        keys, key_pe = src.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, prior)
        queries = self.norm_final(queries + self.final_attn(queries + tokens, keys + key_pe, keys))
        return queries, keys


class ClassAttention(nn.Module):
    """Class-wise self-attention on A [B, K, N] -> spatial map S [B, 1, h, w].

    MHA over the N features (K classes as the sequence), LayerNorm, a second MHA, an MLP with a residual,
    LayerNorm, then Linear(K -> 1) + ReLU over the classes. ``released``: softmax over the single channel
    (S = 1 exactly, zero gradient); ``working``: sigmoid.
    """

    def __init__(self, tokens: int, classes: int, heads: int, mlp_dim: int, mode: str = "released") -> None:
        super().__init__()
        if mode not in CMATTN_MODES:
            raise SamoraError(f"model.hsam_cmattn={mode!r}; choose one of {', '.join(CMATTN_MODES)}")
        if heads < 1 or tokens % heads:
            raise SamoraError(
                f"model.hsam_cmattn_heads={heads} does not divide the token count N = {tokens} "
                f"((model.img_size/16)^2); choose a divisor of {tokens}, or leave it unset for "
                f"{default_cmattn_heads(tokens)}"
            )
        self.mode = mode
        self.attn1 = nn.MultiheadAttention(tokens, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(tokens)
        self.attn2 = nn.MultiheadAttention(tokens, heads, batch_first=True)
        self.mlp = MLPBlock(tokens, mlp_dim, nn.GELU)
        self.norm2 = nn.LayerNorm(tokens)
        self.to_map = nn.Linear(classes, 1)

    def forward(self, affinity: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm1(self.attn1(affinity, affinity, affinity, need_weights=False)[0])
        x = self.attn2(x, x, x, need_weights=False)[0]
        x = self.norm2(x + self.mlp(x))
        score = F.relu(self.to_map(x.transpose(1, 2)))  # [B, N, 1]
        score = score.transpose(1, 2).reshape(-1, 1, *grid)
        return torch.softmax(score, dim=1) if self.mode == "released" else torch.sigmoid(score)


class HSAMDecoder(nn.Module):
    """Everything H-SAM adds to SAM's decoder: class-wise attention, stage 2 and the pixel decoder.

    Stage 1 is the segmenter's own ``mask_decoder`` (so SAM's checkpoint initialises it by its usual keys);
    :meth:`forward` takes it as an argument. ``classes`` is K (background included), ``dim`` C, ``grid`` h.
    """

    def __init__(
        self,
        *,
        classes: int,
        dim: int,
        grid: int,
        heads: int,
        mlp_dim: int,
        cmattn: str = "released",
        cmattn_heads: int | None = None,
        noise: float = 0.2,
        inference: str = "mean",
    ) -> None:
        super().__init__()
        if inference not in INFERENCE_MODES:
            raise SamoraError(f"model.hsam_inference={inference!r}; choose one of {', '.join(INFERENCE_MODES)}")
        if dim % 16:
            raise SamoraError(f"the H-SAM decoder needs a decoder width divisible by 16, got {dim}")
        tokens = grid * grid
        self.classes, self.grid, self.noise, self.inference = int(classes), int(grid), float(noise), inference
        self.class_attention = ClassAttention(
            tokens, self.classes, cmattn_heads or default_cmattn_heads(tokens), mlp_dim, cmattn
        )
        self.mask_tokens = nn.Embedding(self.classes, dim)
        self.transformer = MaskGuidedTransformer(dim, heads, mlp_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.pixel_decoder = nn.Sequential(
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            LayerNorm2d(dim // 8),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 8, dim // 16, kernel_size=2, stride=2),
            LayerNorm2d(dim // 16),
            nn.GELU(),
        )
        self.hypernetworks = nn.ModuleList(MLP(dim, dim, dim // 16, HYPERNET_LAYERS) for _ in range(self.classes))

    def forward(
        self,
        stage1_decoder: MaskDecoder,
        embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> HSAMOutput:
        if stage1_decoder.num_mask_tokens != self.classes:
            raise SamoraError(
                f"stage 1 has {stage1_decoder.num_mask_tokens} mask tokens but stage 2 {self.classes}: "
                "both stages need one token per class (background included)"
            )
        grid = tuple(embeddings.shape[-2:])
        if grid != (self.grid, self.grid):
            raise SamoraError(f"image embeddings are {grid}, the H-SAM decoder was built for {self.grid}x{self.grid}")
        first = stage_one(stage1_decoder, embeddings, image_pe, sparse, dense)
        prior = probability_prior(first.logits, grid)
        if self.training and self.noise > 0:
            embeddings = embedding_noise(embeddings, self.noise)
        x = embeddings + dense
        x = x + x * self.class_attention(first.affinity, grid)
        b = x.shape[0]
        tokens, keys = self.transformer(
            x, image_pe.expand(b, -1, -1, -1), self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1), prior
        )
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, -1, *grid))
        features = self.pixel_decoder(torch.cat([upscaled, first.upscaled], dim=1))
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        logits = (hyper @ features.flatten(2)).view(b, -1, *features.shape[-2:])
        return HSAMOutput(first.logits, logits, prior)
