"""The two CPT teachers as plain nn.Modules: SimCLRv2 (image level) and MAE (patch level).

Both take grey slices in [0, 1] as [B, 1, H, W] (or already 3-channel), repeat them to 3 channels and
normalise them themselves (`normalize`: "imagenet" matches the public ImageNet checkpoints, "none" keeps
[0, 1]), so callers never prepare inputs.

SimCLRv2: a timm ResNet (depth 18/34/50/101/152) whose channels are all multiplied by `width` (1 and 2 are
SimCLRv2's 1x and 2x; at 2x, ResNet-50 has 94M parameters as in SimCLRv2), optionally with selective
kernels (timm's SK bottleneck with two 3x3 paths and a 1/16 reduction, deep stem and average-pool
shortcut; 140M parameters at 2x, as SimCLRv2's R50-2x+SK), then the 3-layer projection head: Linear
without bias + BatchNorm1d, ReLU after the first two, `proj_dim` (128) out. `embed()` returns the head's
final output (before L2 normalisation): the distillation target.

MAE: timm's VisionTransformer encoder (parameters named exactly as the official MAE checkpoints:
`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`, `norm.*`) and MAE's decoder (`decoder_embed`,
`mask_token`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`, `decoder_pred`). Position
embeddings are fixed 2-D sin-cos, as in MAE. Patches are flattened in MAE's order (row, col, channel), 3
channels, so the official decoder head loads.
"""

from functools import partial
from typing import Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from timm.models.vision_transformer import Block, VisionTransformer

from samora_pl.errors import SamoraError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
NORMALIZE = ("imagenet", "none")


class GreyInput(nn.Module):
    """[B, 1 | 3, H, W] in [0, 1] -> 3 channels, normalised (ImageNet statistics or none)."""

    def __init__(self, normalize: str = "imagenet"):
        super().__init__()
        if normalize not in NORMALIZE:
            raise SamoraError(f"Teacher input normalisation {normalize!r}; allowed: {', '.join(NORMALIZE)}.")
        self.normalize = normalize
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W]; got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    def undo(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] grey (channel mean) for pictures."""
        return (images * self.std + self.mean).mean(dim=1, keepdim=True).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ SimCLR


def build_resnet(depth: int = 50, width: float = 1.0, selective_kernel: bool = False) -> ResNet:
    """A timm ResNet without classifier; `width` multiplies every channel count (stem included)."""
    if depth not in RESNET_DEPTHS:
        raise SamoraError(f"cpt.simclr.depth is {depth}; allowed: {', '.join(map(str, RESNET_DEPTHS))}.")
    if width <= 0:
        raise SamoraError(f"cpt.simclr.width is {width}; it must be positive (1 or 2 for SimCLRv2's 1x / 2x).")
    kind, layers = RESNET_DEPTHS[depth]
    channels = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
    kwargs = dict(layers=list(layers), channels=channels, num_classes=0, global_pool="avg")
    if selective_kernel:
        sk = dict(kernel_size=[3, 3], rd_ratio=1.0 / 16, split_input=False)
        block = SelectiveKernelBottleneck if kind == "bottleneck" else SelectiveKernelBasic
        kwargs.update(
            stem_type="deep",
            stem_width=max(8, int(round(32 * width))),
            avg_down=True,
            block_args=dict(sk_kwargs=sk),
            zero_init_last=False,
        )
        return ResNet(block=block, **kwargs)  # the deep stem already scales: (32w, 32w, 64w)
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    model = ResNet(block=block, **kwargs)
    if channels[0] != 64:
        _scale_stem(model, channels[0])
    return model


def _scale_stem(model: ResNet, width: int) -> None:
    """timm's 7x7 stem is always 64 wide; SimCLRv2 scales it with the rest (2x: 128). Rebuild the stem and
    the layer1 inputs at `width` (same parameter names, so torchvision-layout 2x checkpoints load)."""
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    first = model.layer1[0]
    old = first.conv1
    first.conv1 = nn.Conv2d(
        width, old.out_channels, kernel_size=old.kernel_size, stride=old.stride, padding=old.padding, bias=False
    )
    if first.downsample is not None:
        out = first.downsample[0].out_channels
        if out == width:  # basic blocks: input already matches, no projection (as torchvision)
            first.downsample = None
        else:
            first.downsample[0] = nn.Conv2d(width, out, kernel_size=1, stride=first.downsample[0].stride, bias=False)
    for module in (model.conv1, first.conv1, *(first.downsample or [])):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLRv2's 3-layer head: (Linear no bias, BN, ReLU) x 2, then Linear no bias, BN."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
    )


class SimclrTeacher(nn.Module):
    """SimCLRv2 image-level teacher: ResNet backbone + 3-layer projection head."""

    kind = "simclr"

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        selective_kernel: bool = False,
        proj_dim: int = 128,
        proj_hidden_dim: Optional[int] = None,
        normalize: str = "imagenet",
        img_size: int = 224,
    ):
        super().__init__()
        self.input = GreyInput(normalize)
        self.backbone = build_resnet(depth, width, selective_kernel)
        self.feature_dim = self.backbone.num_features
        hidden = proj_hidden_dim or self.feature_dim
        self.head = projection_head(self.feature_dim, hidden, proj_dim)
        self.proj_dim = proj_dim
        self.img_size = img_size
        self.arch = dict(
            depth=int(depth),
            width=float(width),
            selective_kernel=bool(selective_kernel),
            proj_dim=int(proj_dim),
            proj_hidden_dim=int(hidden),
            normalize=normalize,
            img_size=int(img_size),
        )
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "SimclrTeacher":
        """NHWC memory layout for the backbone and its inputs (faster convolutions on most GPUs)."""
        self.channels_last = bool(enabled)
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Globally pooled backbone features [B, feature_dim]."""
        x = self.input(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Distillation target: the projection head's output [B, proj_dim] (not L2-normalised)."""
        return self.forward(images)


# --------------------------------------------------------------------------------------------------- MAE


def sincos_pos_embed(dim: int, grid: Tuple[int, int], cls_token: bool = True) -> torch.Tensor:
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


def unpatchify(patches: torch.Tensor, patch: int, grid: Tuple[int, int], channels: int = 3) -> torch.Tensor:
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def random_masking(
    batch: int, tokens: int, mask_ratio: float, device=None, noise: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(
        self,
        variant: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        normalize: str = "imagenet",
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        overrides = {
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
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self._init_decoder()

        self.norm_pix_loss = bool(norm_pix_loss)
        self.mask_ratio = float(mask_ratio)
        self.arch = dict(
            variant=variant,
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=int(vit.blocks[0].attn.num_heads),
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

    def _positions(self, table: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid):
            return table
        return resample_abs_pos_embed(table, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1)

    def _encode(self, images: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
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

    def encode_visible(
        self, images: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None
    ):
        """Encoder tokens of the visible patches, for patch-level distillation.

        Returns (tokens [B, N_vis, D] after the final LayerNorm, class token dropped; ids_keep [B, N_vis]:
        row-major indices into the patch grid, sorted; grid (h, w))."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, ids_keep, _, grid, _ = self._encode(images, ratio, noise)
        return latent[:, 1:], ids_keep, grid

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
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

    def forward(self, images: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None):
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


def build_teacher(kind: str, arch: dict) -> nn.Module:
    """A teacher from its kind and the `arch` dict it records (teacher.pt metadata)."""
    if kind == "simclr":
        return SimclrTeacher(**arch)
    if kind == "mae":
        return MaeTeacher(**arch)
    raise SamoraError(f"Unknown teacher kind {kind!r}; expected simclr or mae.")
