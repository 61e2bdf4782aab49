"""The pre-processing and slice-by-slice inference a samora_pl MONAI bundle runs (copied to `scripts/slices.py`).

This file is copied as it is into every bundle `samora bundle` writes, and the bundle's `configs/inference.json`
names its classes (`scripts.slices.ScaleIntensityd`, `scripts.slices.SliceInferer`); `monai.bundle run` puts
the bundle folder on `sys.path` first. So it must import nothing from samora_pl or data_modules: only numpy,
scipy, torch and monai. It restates, in a few lines, what `samora predict` does, and the bundle tests prove the
two give the same labels:

- intensity (data_modules/io/readers.py `intensity`, `volume_stats`): `none` clips to [0, 1], `ct_window` maps
  the HU window [-125, 275] to [0, 1], `mr_percentile` maps the volume's 0.5 / 99.5 percentiles of the stored
  values to [0, 1];
- slices (samora_pl/evaluation/inference.py `predict_volume`): the volume is sliced along its last MONAI axis
  (the first axis of the (D, H, W) array samora reads), each (H, W) slice is resized to the model size with
  `scipy.ndimage.zoom(order=3)` (skipped when the size matches; `two_step`: via `two_step_size` first), the
  TorchScript model (`models/model.ts`) turns a stack of them into labels at the model size, and each label
  slice is resized back with `scipy.ndimage.zoom(order=0)`.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data.utils import convert_to_dst_type
from monai.inferers import Inferer
from monai.transforms import MapTransform
from scipy import ndimage

CT_WINDOW = (-125.0, 275.0)
MR_PERCENTILES = (0.5, 99.5)
RULES = ("none", "ct_window", "mr_percentile")


def intensity(array: np.ndarray, rule: str) -> np.ndarray:
    """Raw values -> float32 in [0, 1] by one of RULES (the percentiles come from the stored values)."""
    if rule not in RULES:
        raise ValueError(f"intensity={rule!r}; choose one of {', '.join(RULES)}")
    stats = [float(v) for v in np.percentile(array, MR_PERCENTILES)] if rule == "mr_percentile" else None
    array = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if rule == "ct_window":
        low, high = CT_WINDOW
        array = (np.clip(array, low, high) - low) / (high - low)
    elif rule == "mr_percentile":
        low, high = stats
        if high <= low:
            return np.zeros_like(array)
        array = (np.clip(array, low, high) - low) / (high - low)
    return np.clip(array, 0.0, 1.0).astype(np.float32, copy=False)


class ScaleIntensityd(MapTransform):
    """The run's intensity rule on `keys`, keeping the image's geometry (MetaTensor)."""

    def __init__(self, keys, rule: str = "ct_window", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if rule not in RULES:
            raise ValueError(f"intensity={rule!r}; choose one of {', '.join(RULES)}")
        self.rule = rule

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            raw = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            d[key] = convert_to_dst_type(intensity(raw, self.rule), image, dtype=torch.float32)[0]
        return d


def zoom_to(array: np.ndarray, size: tuple, order: int) -> np.ndarray:
    """`scipy.ndimage.zoom` to an exact (h, w); the slice itself when it already has that size."""
    h, w = array.shape
    if (h, w) == tuple(size):
        return array
    out = ndimage.zoom(array, (size[0] / h, size[1] / w), order=order)
    if out.shape != tuple(size):
        raise RuntimeError(f"resize produced {out.shape} instead of {tuple(size)}")
    return out


def model_slice(slice_2d: np.ndarray, img_size: int, resize: str, two_step_size: int) -> np.ndarray:
    if resize == "two_step":
        slice_2d = zoom_to(slice_2d, (two_step_size, two_step_size), 3)
    return zoom_to(slice_2d, (img_size, img_size), 3)


class SliceInferer(Inferer):
    """[B, 1, X, Y, Z] images (MONAI's axis order) -> [B, 1, X, Y, Z] uint8 labels in the same geometry.

    Slices are taken along Z and given to the network as samora reads them, (Y, X); the network (the bundle's
    TorchScript model) maps [N, 1, S, S] float32 to [N, S, S] labels and batches the slices itself. The slices go
    to `device`, by default the device of the network's weights.
    """

    def __init__(self, img_size: int, resize: str = "direct", two_step_size: int = 224, device=None):
        super().__init__()
        if resize not in ("direct", "two_step"):
            raise ValueError(f"resize={resize!r}; choose direct or two_step")
        self.img_size, self.resize, self.two_step_size = int(img_size), resize, int(two_step_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected one-channel 3-D images [B, 1, X, Y, Z], got {tuple(inputs.shape)}")
        out = torch.zeros_like(inputs, dtype=torch.uint8)  # a MetaTensor keeps the input's geometry
        for b in range(inputs.shape[0]):
            volume = inputs[b, 0].detach().cpu().numpy().transpose(2, 1, 0)  # (D, H, W) as samora reads it
            if not np.issubdtype(volume.dtype, np.floating):
                volume = volume.astype(np.float32)
            depth, height, width = volume.shape
            stack = np.stack([model_slice(s, self.img_size, self.resize, self.two_step_size) for s in volume])
            batch = torch.from_numpy(np.ascontiguousarray(stack)).float().unsqueeze(1)
            labels = network(batch.to(self.device or _device_of(network))).cpu().numpy()
            back = np.stack([zoom_to(labels[d], (height, width), 0) for d in range(depth)])
            out[b, 0] = torch.from_numpy(np.ascontiguousarray(back.transpose(2, 1, 0))).to(out.device)
        return out


def _device_of(network) -> torch.device:
    """Where the network's weights are (MONAI Label moves the network itself); the CPU for a weightless one."""
    for param in network.parameters():
        return param.device
    return torch.device("cpu")


def predict_all(dataset, inferer, network, postprocessing) -> list:
    """Every item of `dataset` through `inferer` and `postprocessing` (which writes it); the written items."""
    done = []
    for index in range(len(dataset)):
        item = dataset[index]
        pred = inferer(item["image"][None], network)[0]
        done.append(postprocessing(dict(item, pred=pred)))
    return done
