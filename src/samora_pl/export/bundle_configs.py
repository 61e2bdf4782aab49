"""`configs/metadata.json` and `configs/inference.json` of a samora_pl MONAI bundle, from plain values.

The metadata follows the MONAI bundle specification (docs.monai.io, "MONAI Bundle Specification"): versions,
task, description, authors, copyright and `network_data_format`, which describes `models/model.ts` itself:
one-channel float32 slices at the model size in, one uint8 label map with a `channel_def` of the run's class
names out. MONAI Label's `monaibundle` app reads its label names from `outputs.pred.channel_def`.

The inference config is MONAI's usual preprocessing / inferer / postprocessing (the keys MONAI Label's
`monaibundle` app reads), run by a plain loop (`predict_all`; no pytorch-ignite needed): LoadImaged (NIfTI,
the stored dtype) -> the run's intensity rule -> `SliceInferer` (slice by slice as `samora predict`,
`scripts/slices.py`) -> SaveImaged of `<case>_pred.nii.gz` in the source geometry (no resampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import monai
import numpy as np
import torch

import samora_pl

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
MODALITY = {"ct_window": ("CT", "hounsfield"), "mr_percentile": ("MR", "magnitude"), "none": ("any", "magnitude")}


@dataclass(frozen=True)
class BundleFacts:
    """What the bundle's configs say about the run: taken once from its saved config and weights."""

    run: str
    tag: str
    dataset: str
    mode: str
    family: str
    variant: str
    decoder: str
    fusion: str
    img_size: int
    class_names: tuple
    intensity: str
    resize: str = "direct"
    two_step_size: int = 224
    batch_size: int = 8
    version: str = "0.1.0"
    authors: str = "SAMora authors (samora_pl)"
    extra: dict = field(default_factory=dict)


def channel_def(facts: BundleFacts) -> dict:
    return {"0": "background", **{str(i): name for i, name in enumerate(facts.class_names, start=1)}}


def metadata(facts: BundleFacts) -> dict:
    modality, value_format = MODALITY[facts.intensity]
    size = facts.img_size
    model = f"{facts.family} {facts.variant}, mode={facts.mode}, fusion={facts.fusion}, decoder={facts.decoder}"
    return {
        "schema": SCHEMA,
        "version": facts.version,
        "changelog": {facts.version: f"exported by samora_pl {samora_pl.__version__} from {facts.run}/{facts.tag}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "scipy": _version("scipy")},
        "optional_packages_version": {},
        "name": f"samora_{facts.dataset}_{facts.tag}",
        "task": f"Automatic {len(facts.class_names)}-class segmentation of {facts.dataset} {modality} volumes",
        "description": (
            f"A SAMora fine-tune ({model}) exported from samora_pl run {facts.run!r}, fine-tune {facts.tag!r}. "
            f"Prompt-free: every slice along the volume's last axis is resized to {size}x{size} (cubic spline), "
            "labelled, and its label map resized back (nearest neighbour); the label volume keeps the input's "
            f"geometry. Inputs are intensity-normalised with {facts.intensity!r} as in training."
        ),
        "authors": facts.authors,
        "copyright": "Copyright (c) SAMora authors; Apache-2.0 (see LICENSE)",
        "data_source": f"samora_pl dataset {facts.dataset!r}",
        "data_type": "nibabel",
        "image_classes": f"one channel, {facts.intensity} to [0, 1], {size}x{size} slices",
        "label_classes": ", ".join(f"{k}: {v}" for k, v in channel_def(facts).items()),
        "pred_classes": ", ".join(f"{k}: {v}" for k, v in channel_def(facts).items()),
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": value_format,
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 1,
                    "spatial_shape": [size, size],
                    "dtype": "uint8",
                    "value_range": list(range(len(facts.class_names) + 1)),
                    "is_patch_data": False,
                    "channel_def": channel_def(facts),
                }
            },
        },
        "samora": {
            "run": facts.run,
            "tag": facts.tag,
            "mode": facts.mode,
            "family": facts.family,
            "variant": facts.variant,
            "fusion": facts.fusion,
            "decoder": facts.decoder,
            "intensity": facts.intensity,
            "resize": facts.resize,
            "two_step_size": facts.two_step_size,
            **facts.extra,
        },
    }


def inference(facts: BundleFacts) -> dict:
    """The `monai.bundle run` config; `dataset_dir`, `output_dir`, `device`, `intensity` are overridable."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "device": "cpu",
        "dataset_dir": "$@bundle_root + '/sample'",
        "output_dir": "$@bundle_root + '/eval'",
        "intensity": facts.intensity,
        "datalist": (
            "$[f for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join("
            "@dataset_dir, '*.nii'))) if not os.path.basename(f).split('.')[0].endswith('_segmentation')]"
        ),
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "dtype": None},
                {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
                {"_target_": "scripts.slices.ScaleIntensityd", "keys": "image", "rule": "@intensity"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "scripts.slices.SliceInferer",
            "img_size": facts.img_size,
            "resize": facts.resize,
            "two_step_size": facts.two_step_size,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "pred",
                    "output_ext": ".nii.gz",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                }
            ],
        },
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', False)"],
        "run": [
            {
                "_target_": "scripts.slices.predict_all",
                "dataset": "@dataset",
                "inferer": "@inferer",
                "network": "@network",
                "postprocessing": "@postprocessing",
            }
        ],
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
