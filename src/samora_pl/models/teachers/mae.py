"""The patch-level teacher: MAE as a plain nn.Module.

timm's VisionTransformer encoder (parameters named exactly as the official MAE checkpoints: `cls_token`,
`pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*`) and MAE's decoder (`decoder_embed`, `mask_token`,
`decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`, `decoder_pred`). Position embeddings are fixed 2-D
sin-cos, as in MAE. Patches are flattened in MAE's order (row, col, channel), 3 channels, so the official
decoder head loads. Inputs are grey slices in [0, 1] ([B, 1, H, W] or 3-channel); `GreyInput` repeats and
normalises them.
"""

from functools import partial
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.grey_input import GreyInput


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, [1, (1 +) gh * gw, dim], cls position all zeros."""
    if dim % 4:
        raise SamoraError(f"MAE embedding width {dim} must be a multiple of 4 for 2-D sin-cos positions.")
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(positions):
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(xs), encode(ys)], axis=1)  # first half: column (w), second: row (h)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches row-major, pixels (row, col, channel) as MAE."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def random_masking(
    batch: int, tokens: int, mask_ratio: float, device=None, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking: keep the int(N * (1 - ratio)) tokens of lowest noise.

    Returns ids_keep [B, N_vis] (sorted, row-major grid indices) and mask [B, N] (1 = masked)."""
    keep = max(1, int(tokens * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(batch, tokens, device=device)
    ids_keep = torch.argsort(noise, dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, tokens, device=noise.device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


def norm_pix_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's per-patch normalised targets: (x - mean) / sqrt(var + eps), unbiased variance per patch."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def _gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MaeTeacher(nn.Module):
    """MAE patch-level teacher: ViT encoder on visible patches, light decoder predicting masked pixels."""

    kind = "mae"
    teacher_meta: dict  # the metadata of the teacher.pt it was loaded from (files.load_teacher sets it)

    def __init__(
        self,
        variant: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        normalize: str = "imagenet",
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        overrides: dict[str, Any] = {  # forwarded to the timm model class as keyword arguments
            k: v
            for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads).items()
            if v is not None
        }
        try:
            vit = timm.create_model(variant, pretrained=False, img_size=img_size, num_classes=0, **overrides)
        except (RuntimeError, ValueError, TypeError, AssertionError) as err:
            raise SamoraError(f"cpt.mae.variant {variant!r} with {overrides} cannot be built by timm: {err}") from err
        if (
            not isinstance(vit, VisionTransformer)
            or vit.cls_token is None
            or vit.num_reg_tokens
            or vit.no_embed_class
            or not isinstance(vit.norm, nn.LayerNorm)
        ):
            raise SamoraError(
                f"cpt.mae.variant {variant!r} is not a plain ViT with a class token "
                "(use vit_base_patch16_224, vit_large_patch16_224, vit_huge_patch14_224 or similar)."
            )
        self.input = GreyInput(normalize)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.img_size = int(img_size)
        if self.img_size % self.patch_size:
            raise SamoraError(f"cpt.mae.img_size {img_size} is not a multiple of the patch size {self.patch_size}.")
        self.grid = (self.img_size // self.patch_size,) * 2
        self.embed_dim = int(vit.embed_dim)
        self.patch_embed = vit.patch_embed
        self.patch_embed.strict_img_size = False  # other sizes work: positions are resampled
        self.cls_token = vit.cls_token
        self.pos_embed = nn.Parameter(sincos_pos_embed(self.embed_dim, self.grid), requires_grad=False)
        self.blocks = vit.blocks
        self.norm = vit.norm
        nn.init.normal_(self.cls_token, std=0.02)

        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, self.grid), requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [
                # timm annotates norm_layer as type[nn.Module] but only calls it, and passes partials itself
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)  # type: ignore[arg-type]
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self._init_decoder()

        self.norm_pix_loss = bool(norm_pix_loss)
        self.mask_ratio = float(mask_ratio)
        first_block: Any = vit.blocks[0]  # whichever timm block class the variant uses: each has .attn.num_heads
        self.arch = dict(
            variant=variant,
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=int(first_block.attn.num_heads),
            decoder_dim=int(decoder_dim),
            decoder_depth=int(decoder_depth),
            decoder_heads=int(decoder_heads),
            norm_pix_loss=self.norm_pix_loss,
            normalize=normalize,
            mask_ratio=self.mask_ratio,
        )

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _positions(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid):
            return table
        return resample_abs_pos_embed(table, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1)

    def _encode(self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.input(images)
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        pos = self._positions(self.pos_embed, grid)
        tokens = self.patch_embed(x) + pos[:, 1:]
        ids_keep, mask = random_masking(tokens.shape[0], tokens.shape[1], mask_ratio, tokens.device, noise)
        visible = _gather_tokens(tokens, ids_keep)
        cls = (self.cls_token + pos[:, :1]).expand(visible.shape[0], -1, -1)
        latent = torch.cat([cls, visible], dim=1)
        for block in self.blocks:
            latent = block(latent)
        return self.norm(latent), ids_keep, mask, grid, x

    def encode_visible(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """Encoder tokens of the visible patches, for patch-level distillation.

        Returns (tokens [B, N_vis, D] after the final LayerNorm, class token dropped; ids_keep [B, N_vis]:
        row-major indices into the patch grid, sorted; grid (h, w))."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, ids_keep, _, grid, _ = self._encode(images, ratio, noise)
        return latent[:, 1:], ids_keep, grid

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Pixel predictions for every patch [B, N, p*p*3] from the encoder output (with class token)."""
        x = self.decoder_embed(latent)
        batch, dim = x.shape[0], x.shape[-1]
        tokens = grid[0] * grid[1]
        full = self.mask_token.to(x.dtype).expand(batch, tokens, dim)
        full = torch.scatter(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self._positions(self.decoder_pos_embed, grid)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def targets(self, normalised_images: torch.Tensor) -> torch.Tensor:
        patches = patchify(normalised_images, self.patch_size)
        return norm_pix_targets(patches) if self.norm_pix_loss else patches

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """(loss, pred [B, N, p*p*3], mask [B, N]) for a batch of [0, 1] slices."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, ids_keep, mask, grid, x = self._encode(images, ratio, noise)
        pred = self.decode(latent, ids_keep, grid)
        return self.loss(pred, self.targets(x), mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Pictures in [0, 1] grey: (input, masked input, reconstruction with the visible patches pasted)."""
        x = self.input(images)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patches = patchify(x, self.patch_size)
        pred = pred.float()
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        keep = (1 - mask).unsqueeze(-1)
        masked = unpatchify(patches * keep, self.patch_size, grid)
        masked = self.input.undo(masked) * unpatchify(keep.expand_as(patches), self.patch_size, grid)[:, :1]
        pasted = unpatchify(patches * keep + pred * (1 - keep), self.patch_size, grid)
        return self.input.undo(x), masked, self.input.undo(pasted)
