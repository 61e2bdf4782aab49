"""Slice-by-slice volume prediction under the SAMed / TransUNet / H-SAM test protocol.

The protocol is written out in docs/method.md, section Evaluation protocol.

For every slice ``image[d]`` of a (D, H, W) volume:

1. resize (H, W) -> (S, S) with cubic spline interpolation, ``scipy.ndimage.zoom(order=3)`` exactly
   as the reference test code does, skipped when the size already matches (as there);
   ``resize="two_step"`` reproduces the reference exactly: cubic to ``two_step_size`` (224, its
   training-data size) first, then cubic to S, so at S = 512 a slice goes 512 -> 224 -> 512;
   the slice keeps its dtype between the steps (float32 for Synapse), as in the reference;
2. batch slices and call ``predict_fn`` on a float32 tensor [B, 1, S, S];
3. upsample the logits [B, K+1, s, s] bilinearly to S (``align_corners=False``, as SAM's
   ``postprocess_masks``), softmax, argmax over classes; an H-SAM model (``model.decoder=hsam``) already
   returns its combined prediction at S (the mean of both stages' upsampled logits, or stage 2 alone);
4. resize the label map back to (H, W) with nearest neighbour, ``scipy.ndimage.zoom(order=0)``.

No test-time augmentation. Everything runs under ``torch.no_grad``; nothing is stateful.

A quirk kept on purpose: for some size ratios ``scipy.ndimage.zoom`` (default ``mode="constant"``,
``grid_mode=False``) rounds the last output coordinate just past the last input sample and fills that
row / column with 0. Downsizing 512 -> 224 with ``order=3`` does this, so under the reference protocol
the last row and column of every 224 slice are 0 (after ``two_step``'s way back to 512, the last few rows
and columns are dark); some nearest-neighbour back-resizes (e.g. 32 -> 60) end in a background column.
The reference code has exactly this behaviour, and this module reproduces it bit for bit (the tests
compare with a written-out reference loop); at Synapse's geometry the affected border is air.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from samora_pl.config.choices import RESIZE_MODES
from samora_pl.errors import SamoraError

__all__ = ["predict_volume", "resize_slice", "RESIZE_MODES"]


def _zoom_to(array: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` to an exact (h, w), skipped when the size already matches (as the reference)."""
    h, w = array.shape
    if (h, w) == tuple(size):
        return array
    out = ndimage.zoom(array, (size[0] / h, size[1] / w), order=order)
    if out.shape != tuple(size):  # zoom rounds the output size; guard against a float corner case
        raise SamoraError(f"internal resize produced {out.shape} instead of {tuple(size)}")
    return out


def resize_slice(slice_2d: np.ndarray, img_size: int, resize: str = "direct", two_step_size: int = 224) -> np.ndarray:
    """The model-input version of one (H, W) slice: cubic to ``img_size`` (``two_step``: via ``two_step_size``)."""
    if resize == "two_step":
        slice_2d = _zoom_to(slice_2d, (two_step_size, two_step_size), order=3)
    return _zoom_to(slice_2d, (img_size, img_size), order=3)


def _as_volume(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise SamoraError(f"predict_volume expects a (D, H, W) volume, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # cubic interpolation needs a float input
    return arr


@torch.no_grad()
def predict_volume(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: Any,
    img_size: int,
    batch_size: int = 8,
    resize: str = "direct",
    two_step_size: int = 224,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Label map (D, H, W) uint8 for a (D, H, W) volume, slice by slice.

    Args:
        predict_fn: maps a float32 tensor [B, 1, S, S] to logits [B, K+1, s, s] (background first; any s,
            typically S / 4). It is called under ``torch.no_grad``; put the model in eval mode first.
        image: (D, H, W) array or tensor, already intensity-normalised as in training (Synapse: [0, 1]).
            Slices are taken along the first axis.
        img_size: S, the model input size.
        batch_size: slices per ``predict_fn`` call.
        resize: ``"direct"`` (one cubic resize to S) or ``"two_step"`` (the reference code: cubic to
            ``two_step_size`` then to S).
        two_step_size: the intermediate size of ``two_step`` (224 in the reference code).
        device: where the input tensor is placed (default CPU); logits may come back on any device.
    """
    if resize not in RESIZE_MODES:
        raise SamoraError(f"resize={resize!r} is not one of {RESIZE_MODES}")
    if int(img_size) != img_size or img_size < 1:
        raise SamoraError(f"img_size must be a positive integer, got {img_size!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise SamoraError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(two_step_size) != two_step_size or two_step_size < 1:
        raise SamoraError(f"two_step_size must be a positive integer, got {two_step_size!r}")
    img_size, batch_size, two_step_size = int(img_size), int(batch_size), int(two_step_size)
    volume = _as_volume(image)
    depth, height, width = volume.shape
    out = np.zeros((depth, height, width), dtype=np.uint8)
    for start in range(0, depth, batch_size):
        stop = min(start + batch_size, depth)
        batch = np.stack([resize_slice(volume[d], img_size, resize, two_step_size) for d in range(start, stop)])
        inputs = torch.from_numpy(np.ascontiguousarray(batch)).float().unsqueeze(1)
        if device is not None:
            inputs = inputs.to(device)
        logits = predict_fn(inputs)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[0] != stop - start:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SamoraError(f"predict_fn must return logits [B, K+1, s, s] with B = {stop - start}, got {shape}")
        if logits.shape[1] > 256:
            raise SamoraError(f"{logits.shape[1]} classes do not fit the uint8 label map")
        if tuple(logits.shape[-2:]) != (img_size, img_size):
            logits = F.interpolate(logits.float(), (img_size, img_size), mode="bilinear", align_corners=False)
        labels = torch.argmax(torch.softmax(logits.float(), dim=1), dim=1).to(torch.uint8).cpu().numpy()
        for i, d in enumerate(range(start, stop)):
            out[d] = _zoom_to(labels[i], (height, width), order=0)
    return out
