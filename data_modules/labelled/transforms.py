"""Training augmentation and resizing for 2-D segmentation slices (SAMed's recipe, done with torch ops).

SAMed's `RandomGenerator` does, per slice:

1. with probability 0.5: rotate by k*90 degrees (k uniform in 0..3) and flip along a random axis;
2. otherwise, with probability 0.5: rotate by a random angle in [-20, 20] degrees about the centre
   (same size, zero padding);
3. resize to the model size (image: cubic, label: nearest) and make a low-resolution label
   (nearest) at S / low_res_factor, the size of the mask decoder's logits.

The reference does this with `scipy.ndimage` per sample (cubic spline zoom of a 512x512 slice costs tens of
milliseconds). Here every step is a torch op on tensors: `rot90`/`flip`, one `grid_sample` on a
rotation grid built by broadcasting (what `affine_grid` computes, at a fifth of its cost) for the free
rotation (bilinear for the image, nearest for the label; the reference uses nearest for both),
and `F.interpolate` for the resize (bicubic with half-pixel centres for the image, clamped back to [0, 1]
because cubic kernels overshoot; `nearest-exact`, i.e. the same half-pixel geometry, for the labels, so
image and label stay aligned). The low-resolution label is taken from the augmented label at its original
resolution (not from the already resized one), which is the more faithful nearest-neighbour sample.

Randomness comes from torch's global generator only. PyTorch's DataLoader seeds it differently in every
worker and every epoch (from the main process generator, which `seed_everything` sets), so workers never
replay each other's augmentations and a seeded run is reproducible. (MONAI's dictionary transforms were
considered: they keep a NumPy RandomState per transform object that is copied into every worker unless
MONAI's own DataLoader re-seeds it, and they measured 2-3x slower per slice than these plain ops.)

With `train_size` (SAMed's recipe: it trains on its 224 x 224 release of Synapse, which its loader zooms
to 512), every slice is first resized to `train_size` (cubic image, nearest label), augmented at that size,
then resized to the model size; the low-resolution label comes from the `train_size` label.

Images handed in must already be in [0, 1] (the dataset readers' contract).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "SegmentationTransform",
    "rot90_flip",
    "rotate",
    "resize_image",
    "resize_label",
]


def _as_4d(x: ArrayLike, label: bool = False) -> torch.Tensor:
    """(H, W) array or tensor -> tensor (1, 1, H, W), without copying when possible.

    Images become float32. Labels become uint8 when their values fit (cheap flips and nearest resizing;
    torch has no nearest resize for int64), else float32 (exact for ids below 2**24).
    """
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D slice (H, W), got shape {tuple(t.shape)}")
    if not label:
        t = t.to(torch.float32)
    elif t.dtype != torch.uint8:
        if t.is_floating_point():
            t = t.round()
        fits = t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) <= 255)
        t = t.to(torch.uint8 if fits else torch.float32)
    return t[None, None]


def _class_ids(label: torch.Tensor) -> torch.Tensor:
    """Labels leave the transform as uint8 when their ids fit, else int64.

    A uint8 label is an eighth of an int64 one, which at 512x512 cuts a slice's bytes through the worker
    queues and to the GPU from 3.1 to 1.3 MB; the data module casts to int64 on the device.
    """
    return label if label.dtype == torch.uint8 else label.to(torch.int64)


def rot90_flip(image: torch.Tensor, label: torch.Tensor, k: int, flip_axis: int):
    """Rotate (1,1,H,W) tensors by k*90 degrees in the slice plane, then flip along axis 0 (rows) or 1."""
    if k % 4:
        image = torch.rot90(image, k, dims=(2, 3))
        label = torch.rot90(label, k, dims=(2, 3))
    image = torch.flip(image, dims=(2 + flip_axis,))
    label = torch.flip(label, dims=(2 + flip_axis,))
    return image, label


def _rotation_grid(h: int, w: int, c: float, s: float) -> torch.Tensor:
    """`F.affine_grid` of the rotation [[c, -s h/w, 0], [s w/h, c, 0]] (align_corners=False), by broadcasting.

    The grid is separable (a row term plus a column term), so two outer sums replace affine_grid's
    (H*W, 3) x (3, 2) product, which cost more than the sampling itself at 512x512 on a CPU core.
    """
    xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    gx = (c * xs)[None, :] + (-s * h / w * ys)[:, None]
    gy = (s * w / h * xs)[None, :] + (c * ys)[:, None]
    return torch.stack((gx, gy), dim=-1)[None]


def rotate(image: torch.Tensor, label: torch.Tensor, angle_deg: float):
    """Rotate (1,1,H,W) tensors about the slice centre by `angle_deg`, keeping the size, zero padding.

    The image is sampled bilinearly, the label with nearest neighbour. The sampling grid is built in pixel
    units, so non-square slices are rotated without shearing.
    """
    h, w = image.shape[-2:]
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    grid = _rotation_grid(h, w, c, s)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(label.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image, (lab if label.is_floating_point() else lab.round().to(label.dtype))


def resize_image(image: torch.Tensor, size: int | tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Bicubic resize of a (N, C, H, W) float tensor (half-pixel centres), clamped to [0, 1] by default."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
        if clamp:
            image = image.clamp_(0.0, 1.0)
    return image


def resize_label(label: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize (same half-pixel geometry as `resize_image`) of a (N, C, H, W) label map."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(label.shape[-2:]) != size:
        label = F.interpolate(label, size=size, mode="nearest-exact")
    return label


class SegmentationTransform:
    """Slice (image, label) -> dict(image [1,S,S] float32 in [0,1], label [S,S] uint8, low_res_label).

    Args:
        img_size: S, the model's input size.
        low_res_factor: the low-resolution label is S // low_res_factor (4 for SAM's mask decoder).
        augment: apply SAMed's random rot90+flip / rotation (training); False only resizes (validation).
        rot_flip_prob: probability of the rot90 + flip branch (0.5 in SAMed).
        rotate_prob: probability of the free-rotation branch when the first one was not taken (0.5).
        max_angle: free rotations are uniform in [-max_angle, max_angle] degrees (20).
        train_size: resize to this size before the augmentation (SAMed's 224 training slices); None: do not.

    Picklable and stateless, so it is safe in DataLoader workers.
    """

    def __init__(
        self,
        img_size: int,
        low_res_factor: int = 4,
        augment: bool = True,
        rot_flip_prob: float = 0.5,
        rotate_prob: float = 0.5,
        max_angle: float = 20.0,
        train_size: int | None = None,
    ):
        if img_size <= 0 or low_res_factor <= 0 or img_size % low_res_factor:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of low_res_factor ({low_res_factor})")
        self.img_size = int(img_size)
        self.low_res_size = self.img_size // int(low_res_factor)
        self.augment = bool(augment)
        self.rot_flip_prob = float(rot_flip_prob)
        self.rotate_prob = float(rotate_prob)
        self.max_angle = float(max_angle)
        if train_size is not None and int(train_size) <= 0:
            raise ValueError(f"train_size ({train_size}) must be a positive integer or None")
        self.train_size = None if train_size is None else int(train_size)

    def augment_pair(self, image: torch.Tensor, label: torch.Tensor):
        """Apply the random geometric augmentation to (1,1,H,W) tensors (draws from torch's global RNG)."""
        u = torch.rand(2).tolist()
        if u[0] < self.rot_flip_prob:
            k = int(torch.randint(0, 4, ()).item())
            axis = int(torch.randint(0, 2, ()).item())
            return rot90_flip(image, label, k, axis)
        if u[1] < self.rotate_prob:
            angle = (2.0 * float(torch.rand(()).item()) - 1.0) * self.max_angle
            return rotate(image, label, angle)
        return image, label

    def __call__(self, image: ArrayLike, label: ArrayLike) -> dict[str, torch.Tensor]:
        img = _as_4d(image)
        lab = _as_4d(label, label=True)
        if img.shape != lab.shape:
            raise ValueError(f"image {tuple(img.shape[-2:])} and label {tuple(lab.shape[-2:])} differ in shape")
        if self.train_size is not None:  # the slice as SAMed's 224 release holds it
            img = resize_image(img, self.train_size)
            lab = resize_label(lab, self.train_size)
        if self.augment:
            img, lab = self.augment_pair(img, lab)
        out_img = resize_image(img, self.img_size)
        out_lab = resize_label(lab, self.img_size)
        low = resize_label(lab, self.low_res_size)
        return {
            "image": out_img[0].contiguous(),
            "label": _class_ids(out_lab[0, 0]),
            "low_res_label": _class_ids(low[0, 0]),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, low_res_size={self.low_res_size}, "
            f"augment={self.augment}, rot_flip_prob={self.rot_flip_prob}, rotate_prob={self.rotate_prob}, "
            f"max_angle={self.max_angle}, train_size={self.train_size})"
        )
