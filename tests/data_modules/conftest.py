"""Fixtures for the data-module tests: tiny Synapse trees in the exact TransUNet layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest


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


@pytest.fixture
def synapse_root(tmp_path) -> Path:
    return write_synapse_tree(tmp_path / "synapse")


@pytest.fixture
def make_synapse(tmp_path):
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_synapse_tree(tmp_path / f"synapse{next(counter)}", **kwargs)

    return make
