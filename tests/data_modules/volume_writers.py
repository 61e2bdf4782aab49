"""Tiny Synapse, LA, PROMISE12 and MSD/nnU-Net datasets written in their exact on-disk formats, and the
overrides of a seconds-long CLI fine-tune on one of them."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from data_modules.io.volume_io import Geometry, write_image

# non-unit spacing, a rotated frame and an offset origin, so a lost or reordered geometry shows
GEOMETRY = Geometry(
    spacing=(3.0, 0.75, 0.5), origin=(-10.0, 20.5, 3.0), direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
)
LA_IDS = (
    "0RZDK210BSMWAA6467LU",
    "1D7CUD1955YZPGK8XHJX",
    "3C2QTUNI0852XV7ZH4Q1",
    "4URSJYI2QUH1T5S5PP47",
    "5QFK2PMHNX7UALK52NNA",
)
PROMISE12_TEST = (12, 13, 16, 20, 23, 28, 34, 35, 43, 49)


def blob_label(rng: np.random.Generator, shape, classes: int = 1) -> np.ndarray:
    """(D, H, W) uint8: class k is a box in rows k-1 of a grid, absent from the first and last slice."""
    label = np.zeros(shape, np.uint8)
    d, h, w = shape
    band = h // (classes + 1)
    for k in range(1, classes + 1):
        r0 = (k - 1) * band + 2 + int(rng.integers(0, 2))
        label[1:-1, r0 : r0 + band - 2, w // 4 : 3 * w // 4 - int(rng.integers(0, 2))] = k
    return label


def image_of(rng: np.random.Generator, label: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """A raw image in which the label shows: offset + scale * (label + noise)."""
    return offset + scale * (label + rng.normal(0.0, 0.2, label.shape))


def write_la(root: Path, ids=LA_IDS, lists: bool = True, shape=(20, 24, 6), seed: int = 0) -> Path:
    """UA-MT's LA layout: '2018LA_Seg_Training Set/<ID>/mri_norm2.h5', (W, H, D), z-scored image, 0/1 label."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for case in ids:
        label = blob_label(rng, shape[::-1]).transpose(2, 1, 0)  # stored (W, H, D)
        image = image_of(rng, label, 0.0, 1.0)
        image = ((image - image.mean()) / image.std()).astype(np.float32)
        folder = root / "2018LA_Seg_Training Set" / case
        folder.mkdir(parents=True)
        with h5py.File(folder / "mri_norm2.h5", "w") as f:
            f["image"] = image
            f["label"] = label
    if lists:
        (root / "train.list").write_text("".join(f"{c}\n" for c in ids[:3]))
        (root / "test.list").write_text("".join(f"{c}\n" for c in ids[3:]))
    return root


def write_promise12(root: Path, train=(0, 1, 2), test=PROMISE12_TEST, shape=(4, 16, 12), seed: int = 0) -> Path:
    """CaseNN.mhd/.raw (int16 MR) and CaseNN_segmentation.mhd/.raw (uint8 0/1) with GEOMETRY."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for n in (*train, *test):
        label = blob_label(rng, shape)
        write_image(root / f"Case{n:02d}.mhd", image_of(rng, label, 200.0, 300.0).astype(np.int16), GEOMETRY)
        write_image(root / f"Case{n:02d}_segmentation.mhd", label, GEOMETRY)
    return root


def write_generic(
    root: Path,
    train=("liver_0", "liver_1", "liver_2", "liver_3", "liver_4"),
    test=(),
    nnunet: bool = False,
    modality: str = "CT",
    shape=(5, 16, 20),
    seed: int = 0,
) -> Path:
    """imagesTr/labelsTr (+ imagesTs/labelsTs) NIfTI pairs with GEOMETRY and a dataset.json of 2 classes;
    MSD naming and labels style by default, nnU-Net v2's (`<case>_0000`, {"name": id}) with nnunet=True."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for cases, images, labels in ((train, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
        for case in cases:
            label = blob_label(rng, shape, classes=2)
            image = image_of(rng, label, -100.0, 150.0).astype(np.float32)
            write_image(root / images / f"{case}{'_0000' if nnunet else ''}.nii.gz", image, GEOMETRY)
            write_image(root / labels / f"{case}.nii.gz", label, GEOMETRY)
    if nnunet:
        info = {
            "channel_names": {"0": modality},
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "file_ending": ".nii.gz",
        }
    else:
        info = {"modality": {"0": modality}, "labels": {"0": "background", "1": "liver", "2": "tumour"}}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def finetune_overrides(tmp_path: Path, name: str, root: Path) -> list[str]:
    """A seconds-long SAMed fine-tune + evaluation on a tiny dataset (tiny profile, 64 px)."""
    return [
        f"data.name={name}",
        f"data.dir={root}",
        f"runs_dir={tmp_path / 'runs'}",
        "run=t",
        "profile=tiny",
        "mode=samed",
        "model.img_size=64",
        "data.batch_size=2",
        "data.val_slices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
    ]


def finetune_folder(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t" / "finetune" / "samed-lora-f1"


def phantom_slice(rng: np.random.Generator, size: int, num_classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A slice whose label is readable from the image: class k occupies a block with intensity k / 10."""
    label = np.zeros((size, size), np.float32)
    cell = size // 4
    ids = rng.permutation(np.arange(1, num_classes + 1))
    for n, k in enumerate(ids[: rng.integers(2, num_classes + 1)]):
        r, c = divmod(n, 4)
        r0, c0 = r * cell + 2 + rng.integers(0, 3), c * cell + 2 + rng.integers(0, 3)
        label[r0 : r0 + cell - 4, c0 : c0 + cell - 4] = k
    image = (label / 10.0).astype(np.float32)
    return image, label


def write_synapse_tree(
    root: Path,
    train_cases=("case0005", "case0006", "case0007"),
    slices_per_case: int = 4,
    test_cases=("case0001", "case0002"),
    depth: int = 5,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny Synapse tree: train_npz/*.npz, test_vol_h5/*.npy.h5 and lists/lists_Synapse/*.txt."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists" / "lists_Synapse").mkdir(parents=True)
    names = []
    for case in train_cases:
        for z in range(slices_per_case):
            name = f"{case}_slice{z:03d}"
            image, label = phantom_slice(rng, size)
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            names.append(name)
    for case in test_cases:
        vol = [phantom_slice(rng, size) for _ in range(depth)]
        image = np.stack([v[0] for v in vol])
        label = np.stack([v[1] for v in vol])
        label[0] = 0  # one slice without foreground
        image[0] = 0.0
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"] = image
            f["label"] = label
    (root / "lists" / "lists_Synapse" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "lists" / "lists_Synapse" / "test_vol.txt").write_text("".join(f"{c}\n" for c in test_cases))
    return root


def small_datamodule(cls, root: Path, **kw):
    """`cls` at test sizes: 32 px, batches of 4, 4 monitoring slices (each overridable by `kw`)."""
    return cls(root=root, **{"img_size": 32, "batch_size": 4, "val_slices": 4, **kw})
