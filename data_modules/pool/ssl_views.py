"""Augmented views of grey medical slices for the self-supervised teachers (SimCLR pairs, MAE crops).

Inputs and outputs are float32 tensors [1, H, W] in [0, 1]; the teachers repeat grey to 3 channels
themselves. Only transforms that make sense for grey slices: random resized crop, horizontal flip,
rotation, brightness/contrast, Gaussian blur, Gaussian noise (no hue, saturation or grey-scale drop).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T


class RandomGaussianNoise(torch.nn.Module):
    """With probability `p`, add N(0, s^2) noise with s drawn uniformly from [0, max_std]."""

    def __init__(self, p: float = 0.5, max_std: float = 0.05):
        super().__init__()
        self.p, self.max_std = p, max_std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.max_std <= 0 or torch.rand(()) >= self.p:
            return image
        std = torch.rand(()) * self.max_std
        return image + torch.randn_like(image) * std


class RandomGaussianBlur(torch.nn.Module):
    """With probability `p`, separable Gaussian blur with sigma uniform in `sigma` (pixels), reflect padding.
    Two 1-D passes instead of one 2-D kernel. Note: tiny convolutions like this are slow in a process
    whose 2 intra-op threads compete with training; run augmentation in DataLoader workers (1 thread each)."""

    def __init__(self, p: float = 0.5, sigma: Sequence[float] = (0.1, 2.0), kernel_size: int = 23):
        super().__init__()
        self.p, self.sigma, self.radius = p, tuple(sigma), max(1, int(kernel_size) // 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        low, high = self.sigma
        sigma = float(low + (high - low) * torch.rand(()))
        radius = min(self.radius, image.shape[-1] - 1, image.shape[-2] - 1)
        offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        weights = torch.exp(-(offsets**2) / (2 * sigma**2))
        weights = weights / weights.sum()
        x = F.pad(image.unsqueeze(0), (radius,) * 4, mode="reflect")
        channels = x.shape[1]
        x = F.conv2d(x, weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.conv2d(x, weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        return x.squeeze(0)


class Clamp01(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.clamp(0.0, 1.0)


def simclr_augment(
    size: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    rotation_deg: float = 20.0,
    jitter: float = 0.4,
    blur_prob: float = 0.5,
    noise_std: float = 0.05,
) -> T.Compose:
    """One SimCLR view: crop (aspect 3/4-4/3) and resize, flip, rotate (p 0.5), brightness/contrast
    (p 0.8), blur with sigma 0.1-2.0 px at 224 scaled to `size` (p `blur_prob`), noise (p 0.5)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    sigma = (0.1 * size / 224, 2.0 * size / 224)
    steps = [
        T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if rotation_deg > 0:
        steps.append(T.RandomApply([T.RandomRotation(rotation_deg)], p=0.5))
    if jitter > 0:
        steps.append(T.RandomApply([T.ColorJitter(brightness=jitter, contrast=jitter)], p=0.8))
    if blur_prob > 0:
        steps.append(RandomGaussianBlur(blur_prob, sigma, kernel))
    steps += [RandomGaussianNoise(0.5, noise_std), Clamp01()]
    return T.Compose(steps)


class TwoViews:
    """Two independent draws of `augment` of the same slice (the SimCLR positive pair)."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(image), self.augment(image)


def mae_augment(size: int, crop_scale: Sequence[float] = (0.2, 1.0)) -> T.Compose:
    """MAE's light augmentation: random resized crop (bicubic) and horizontal flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True
            ),
            T.RandomHorizontalFlip(),
            Clamp01(),
        ]
    )
