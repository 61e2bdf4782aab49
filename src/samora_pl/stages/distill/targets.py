"""Tensor operations of stage-1 distillation, image, patch and pixel levels (losses: `losses/distillation.py`).

* :func:`to_teacher_grid` / :func:`gather_positions`: the patch level's student tokens at the MAE teacher's
  visible patches. The student's token map is first brought onto the teacher's patch grid (identity when
  the grids agree, which is the paper's case: SAM at 224 px with 16-px patches and MAE ViT/16 at 224 both
  give 14 x 14), then the teacher's ``ids_keep`` (row-major indices on its grid) pick the tokens.
* :func:`degrade`: the pixel level's corruption of a clean [0, 1] slice (Gaussian blur with a probability,
  then Gaussian noise, clamped back to [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "to_teacher_grid",
    "gather_positions",
    "visible_student_tokens",
    "visible_mask",
    "gaussian_blur",
    "degrade",
]


def to_teacher_grid(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Student tokens [B, hs, ws, C] on the teacher's patch grid (h, w) -> [B, h, w, C].

    Both grids tile the same field of view (the same image, resized for each network). Equal grids:
    returned unchanged (exact token selection). Student finer than the teacher: each teacher patch gets
    the area mean of the student tokens that cover it (``adaptive_avg_pool2d``; exact for integer
    ratios). Student coarser: bilinear interpolation at the teacher patch centres
    (``align_corners=False``, so centres map to centres).
    """
    h, w = int(grid[0]), int(grid[1])
    hs, ws = tokens.shape[1], tokens.shape[2]
    if (hs, ws) == (h, w):
        return tokens
    x = tokens.permute(0, 3, 1, 2)
    if hs >= h and ws >= w:
        x = F.adaptive_avg_pool2d(x, (h, w))
    else:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


def gather_positions(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Tokens [B, h, w, C] and row-major patch indices ids [B, N] -> [B, N, C] (``tokens[b, i // w, i % w]``)."""
    B, h, w, C = tokens.shape
    if ids.dim() != 2 or ids.shape[0] != B:
        raise ValueError(f"ids must be [B={B}, N], got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= h * w):
        raise ValueError(f"patch indices must lie in [0, {h * w}) for a {h}x{w} grid")
    flat = tokens.reshape(B, h * w, C)
    return torch.gather(flat, 1, ids.long().unsqueeze(-1).expand(-1, -1, C))


def visible_student_tokens(tokens: torch.Tensor, ids_keep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The student's tokens at the teacher's visible patches: [B, hs, ws, C] -> [B, N_vis, C]."""
    return gather_positions(to_teacher_grid(tokens, grid), ids_keep)


def visible_mask(ids_keep: torch.Tensor, grid: Sequence[int], images: torch.Tensor) -> torch.Tensor:
    """1 on the teacher's visible patches, 0 on its masked ones, at the size of `images` -> [B, 1, H, W]
    (the patch level's picture: what the teacher sees of each slice)."""
    h, w = int(grid[0]), int(grid[1])
    mask = torch.zeros(ids_keep.shape[0], h * w, device=images.device, dtype=images.dtype)
    mask.scatter_(1, ids_keep.long().to(images.device), 1.0)
    return F.interpolate(mask.reshape(-1, 1, h, w), size=images.shape[-2:], mode="nearest")


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own sigma [B] (pixels), separable, reflect padding."""
    B, C, H, W = images.shape
    sigma = sigma.to(images).clamp_min(1e-3).reshape(B, 1)
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    radius = min(radius, (min(H, W) - 1) // 2) if min(H, W) > 2 else 1
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, K]
    kernel = kernel.repeat_interleave(C, 0)  # [B*C, K]
    k = kernel.shape[1]
    flat = images.reshape(1, B * C, H, W)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel.reshape(B * C, 1, 1, k), groups=B * C)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.reshape(B * C, 1, k, 1), groups=B * C)
    return flat.reshape(B, C, H, W)


def degrade(
    clean: torch.Tensor,
    noise_sigma: float = 0.08,
    blur_prob: float = 0.5,
    blur_sigma: Sequence[float] = (0.5, 1.5),
    generator: torch.Generator = None,
) -> torch.Tensor:
    """Corrupt clean slices [B, C, H, W] in [0, 1]: blur (per image, probability ``blur_prob``, sigma
    uniform in ``blur_sigma`` pixels), add N(0, noise_sigma^2) noise, clamp to [0, 1] (the encoder's
    input range)."""
    B = clean.shape[0]
    device = clean.device
    out = clean
    if blur_prob > 0:
        chosen = torch.rand(B, generator=generator, device=device) < blur_prob
        if bool(chosen.any()):
            lo, hi = float(blur_sigma[0]), float(blur_sigma[1])
            sigma = lo + (hi - lo) * torch.rand(B, generator=generator, device=device)
            blurred = gaussian_blur(clean, sigma)
            out = torch.where(chosen.view(B, 1, 1, 1), blurred, clean)
    if noise_sigma > 0:
        noise = torch.randn(clean.shape, generator=generator, device=device, dtype=clean.dtype)
        out = out + noise_sigma * noise
    return out.clamp(0.0, 1.0)
