"""Training-loader throughput: samora_pl's Synapse loader versus a per-sample scipy pipeline.

Both read the same 512x512 phantom slices (TransUNet npz layout, written to a temporary folder) through a
DataLoader with the same workers and batch size; they differ only in the augmentation + resize:

- samora:    data_modules.SynapseDataModule (torch rot90/flip, grid_sample rotation, F.interpolate resize,
             uint8 labels); `samora_cached` is the same with `cache=True` (slices read once, into memory)
- reference: SAMed's RandomGenerator recipe with scipy.ndimage per sample (rot90 + flip, or
             ndimage.rotate order 0 within +-20 degrees; zoom order 3 for the image and 0 for the label,
             then order 0 to the low-resolution label)

The loaders take turns epoch by epoch, so a change in machine load hits all of them alike. Prints
`name: value` lines, `ratio_cached`, and a final `ratio: X` (samora slices/s over reference slices/s,
reading from disk every epoch like the reference; goal >= 2).

    python benchmarks/data_loader.py [--slices 96] [--img-size 224] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from data_modules.labelled.demo import make_phantom_case  # noqa: E402
from data_modules.labelled.synapse import SynapseDataModule  # noqa: E402


def write_slices(root: Path, n_slices: int, size: int, seed: int = 0) -> list[str]:
    """Phantom cases of 16 slices at size x size in the Synapse layout (uncompressed npz, like np.savez)."""
    rng = np.random.default_rng(seed)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    (root / "lists" / "lists_Synapse").mkdir(parents=True)
    names, case = [], 0
    while len(names) < n_slices:
        image, label = make_phantom_case(rng, 16, size)
        for k in range(image.shape[0]):
            if len(names) == n_slices:
                break
            name = f"case{case + 1:04d}_slice{k:03d}"
            np.savez(root / "train_npz" / f"{name}.npz", image=image[k], label=label[k].astype(np.float32))
            names.append(name)
        case += 1
    (root / "lists" / "lists_Synapse" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "lists" / "lists_Synapse" / "test_vol.txt").write_text("")
    return names


class ScipyReferenceDataset(Dataset):
    """The reference per-sample pipeline (SAMed's RandomGenerator, scipy.ndimage)."""

    def __init__(self, folder: Path, names: list[str], img_size: int, low_res: int):
        self.folder, self.names, self.img_size, self.low_res = folder, names, img_size, low_res

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        data = np.load(self.folder / f"{self.names[i]}.npz")
        image, label = data["image"], data["label"]
        if np.random.random() > 0.5:
            k = np.random.randint(0, 4)
            image, label = np.rot90(image, k), np.rot90(label, k)
            axis = np.random.randint(0, 2)
            image, label = np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()
        elif np.random.random() > 0.5:
            angle = np.random.randint(-20, 20)
            image = ndimage.rotate(image, angle, order=0, reshape=False)
            label = ndimage.rotate(label, angle, order=0, reshape=False)
        x, y = image.shape
        if (x, y) != (self.img_size, self.img_size):
            image = ndimage.zoom(image, (self.img_size / x, self.img_size / y), order=3)
            label = ndimage.zoom(label, (self.img_size / x, self.img_size / y), order=0)
        lh, lw = label.shape
        low = ndimage.zoom(label, (self.low_res / lh, self.low_res / lw), order=0)
        return {
            "image": torch.from_numpy(image.astype(np.float32))[None],
            "label": torch.from_numpy(label.astype(np.int64)),
            "low_res_label": torch.from_numpy(low.astype(np.int64)),
            "name": self.names[i],
        }


def _seed_worker(worker_id: int) -> None:
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def epoch_time(loader) -> tuple[int, float]:
    """(slices, seconds) of one full pass."""
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
    return n, time.perf_counter() - t0


def interleaved_throughput(loaders: dict, epochs: int) -> dict:
    """Slices/s of each loader over `epochs` passes, taken in turns (A, B, A, B, ...) after one warm-up pass
    each (it starts the persistent workers), so that a change in machine load hits both alike."""
    for loader in loaders.values():
        epoch_time(loader)
    totals = {name: [0, 0.0] for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            n, dt = epoch_time(loader)
            totals[name][0] += n
            totals[name][1] += dt
    return {name: n / dt for name, (n, dt) in totals.items()}


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=96)
    ap.add_argument("--size", type=int, default=512, help="stored slice size (Synapse: 512)")
    ap.add_argument("--img-size", type=int, default=224, help="model input size S")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)

    with tempfile.TemporaryDirectory(prefix="samora_bench_") as tmp:
        root = Path(tmp) / "synapse"
        names = write_slices(root, args.slices, args.size)
        print(f"slices: {len(names)}")
        print(f"slice_size: {args.size}")
        print(f"img_size: {args.img_size}")
        print(f"workers: {args.workers}")
        print(f"batch_size: {args.batch_size}")

        loaders = {}
        for name, cache in (("samora", False), ("samora_cached", True)):
            dm = SynapseDataModule(
                root,
                img_size=args.img_size,
                batch_size=args.batch_size,
                num_workers=args.workers,
                val_slices=0,
                pin_memory=False,
                cache=cache,
            )
            loaders[name] = dm.train_dataloader()
        ref_set = ScipyReferenceDataset(root / "train_npz", names, args.img_size, args.img_size // 4)
        ref_loader = DataLoader(
            ref_set,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            worker_init_fn=_seed_worker,
        )
        loaders["reference"] = ref_loader
        rates = interleaved_throughput(loaders, args.epochs)

    ref = rates["reference"]
    print(f"samora_slices_per_s: {rates['samora']:.1f}")
    print(f"samora_cached_slices_per_s: {rates['samora_cached']:.1f}")
    print(f"scipy_reference_slices_per_s: {ref:.1f}")
    print(f"ratio_cached: {rates['samora_cached'] / ref:.2f}")
    ratio = rates["samora"] / ref
    print(f"ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
