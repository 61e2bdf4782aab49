"""The interface every labelled dataset gives fine-tuning and evaluation.

A dataset subclass only says where its slices and volumes are and how to read one of each; everything the
stages use (training slices with augmentation, the labelled fraction, a monitoring set, test volumes, batch
layout) is implemented once here, so no stage has dataset-specific code.

Batches (dicts, from both `train_dataloader` and `val_dataloader`):

    image          float32 [B, 1, S, S] in [0, 1]      (S = img_size)
    label          uint8   [B, S, S]                   values 0..K (0 = background); int64 when K > 255
    low_res_label  uint8   [B, S/f, S/f]               nearest, f = low_res_factor (4 for SAM)
    name           list[str]                           slice names

Labels travel as uint8 (an eighth of int64's bytes through the worker queues and to the GPU); the
LightningModule receives them as int64, cast on the device by `on_after_batch_transfer`.

Labelled fraction (stage 2's few-shot protocol), chosen once in `setup` and seeded by `subset_seed`, or by
`seed` (the run seed: redrawn per seed, the default) when that is None; a fixed `subset_seed` or a list
file keeps one subset for every seed, as H-SAM's fixed lists do, so seeds vary only the training:

    fraction_by="slice"  a random `fraction` of the training slices (at least one); H-SAM's 10 % list
                         of Synapse is 221 of 2211 slices drawn from all training cases.
    fraction_by="case"   a random `fraction` of the training cases (at least one), with all their slices.
    fraction_by="list"   exactly the slice names in the file `fraction_list` (one per line, '#' comments,
                         an optional .npz suffix is ignored); every name must be in the training list.

The chosen list is written to `<split_dir>/train_selected.txt` with the settings in
`<split_dir>/fraction.json` (rank zero only, atomically).

Validation set: only for monitoring and TensorBoard pictures during fine-tuning, never for model
selection or reported numbers (those come from `test_volumes()` with the volume protocol). It never reads a
test volume: it is `val_slices` labelled training slices that the fraction did not select (foreground
slices first), drawn seeded by `seed` and resized like the training slices but not augmented. When the
fraction selects every training slice there is nothing held out, and the monitoring set is drawn from the
selected slices (it then shows fit, not generalisation; logged). `val_slices=0` disables it.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.labelled.sampling import training_sampler
from data_modules.labelled.transforms import SegmentationTransform
from data_modules.options import FRACTION_MODES
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_write_json, atomic_write_text
from samora_pl.records.manifest import is_rank_zero

VAL_READ_FACTOR = 4  # training slices read to find `val_slices` monitoring slices with foreground
log = logging.getLogger(__name__)

SliceReader = Callable[[str], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class Volume:
    """One test volume in its original geometry.

    image: (D, H, W) float32 in [0, 1]; label: (D, H, W) uint8 (int64 when K > 255), values 0..K;
    spacing: voxel size along (D, H, W), in mm where the format stores it ((1, 1, 1) for Synapse h5).
    `meta` may carry format-specific extras (for example a NIfTI affine) for writing predictions.
    """

    case: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    meta: dict = field(default_factory=dict)


def label_problems(label: np.ndarray, class_names: Sequence[str], hint: str = "") -> list[str]:
    """What is wrong with a label array's values for classes 0..K (empty when nothing is); `hint` says how
    the dataset's own preprocessing maps raw ids to class ids. min/max run first: they are one pass each,
    propagate NaN, and settle the common case (a valid label) without np.unique."""
    if label.size == 0:
        return ["label is empty"]
    lo, hi = label.min(), label.max()
    if np.issubdtype(label.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return ["label contains NaN or Inf"]
        if not np.array_equal(label, np.rint(label)):
            return ["label has non-integer values (expected class ids)"]
    k = len(class_names)
    if lo >= 0 and hi <= k:
        return []
    bad = [f"{v:g}" for v in np.unique(label) if not 0 <= v <= k][:10]
    ids = ", ".join(f"{i} {name}" for i, name in enumerate(class_names, start=1))
    message = f"label has values {', '.join(bad)} that are not class ids: expected 0 (background) to {k} ({ids})"
    return [f"{message}; {hint}" if hint else message]


def as_label_map(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids in the Volume dtype: float labels rounded, uint8 (int64 when K > 255)."""
    if np.issubdtype(label.dtype, np.floating):
        label = np.rint(label)
    return label.astype(np.uint8 if num_classes < 256 else np.int64, copy=False)


def read_name_list(path: Path, what: str) -> list[str]:
    """Read a list file (one name per line; blank lines and '#' comments skipped; '.npz' suffix dropped)."""
    path = Path(path)
    if not path.is_file():
        raise SamoraError(f"{what} list {path} does not exist: create it (one name per line) or fix the path")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith(".npz"):
            line = line[: -len(".npz")]
        names.append(line)
    return names


class SliceDataset(Dataset):
    """2-D slices read by name through a picklable `reader`, passed through `transform`."""

    def __init__(self, names: Sequence[str], reader: SliceReader, transform: SegmentationTransform):
        self.names = list(names)
        self.reader = reader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        name = self.names[i]
        image, label = self.reader(name)
        out = self.transform(image, label)
        out["name"] = name
        return out


class ArraySliceDataset(Dataset):
    """2-D slices held in memory (the validation set; the training set with `cache=True`)."""

    def __init__(self, names, images, labels, transform: SegmentationTransform):
        self.names, self.images, self.labels, self.transform = list(names), images, labels, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        out = self.transform(self.images[i], self.labels[i])
        out["name"] = self.names[i]
        return out


def subset_policy(fraction_by: str, fraction_list=None, subset_seed: int | None = None, fraction=None) -> str:
    """How the labelled subset was chosen, for results tables: seeds compare training only when it is fixed."""
    if fraction_by == "list":
        return f"fixed list {Path(fraction_list).name} (the same for every seed)"
    if fraction is not None and float(fraction) >= 1.0:
        return "every training slice (nothing drawn)"
    if subset_seed is not None:
        return f"drawn once by {fraction_by} (data.subset_seed={subset_seed}; the same for every seed)"
    return f"redrawn by {fraction_by} for each run seed"


class SegmentationDataModule(L.LightningDataModule, ABC):
    """Base of every labelled dataset. Subclasses set `num_classes`, `class_names` and the hooks below.

    Args:
        root: dataset folder.
        img_size: model input size S; slices are resized to S x S.
        batch_size, num_workers: DataLoader settings (see `_loader` for worker seeding).
        fraction: labelled fraction in (0, 1] (ignored for fraction_by="list").
        fraction_by: "slice", "case" or "list" (see the module doc).
        fraction_list: slice-name file for fraction_by="list".
        seed: seeds the fraction selection (unless subset_seed) and the validation slices (training data only).
        subset_seed: seeds the fraction selection alone, the same for every run seed (None: `seed`).
        split_dir: where `train_selected.txt` and `fraction.json` are written (None: not written).
        augment: SAMed's random rot90/flip/rotation on training slices.
        val_slices: size of the monitoring set (0 disables it).
        low_res_factor: low_res_label is S // low_res_factor.
        pin_memory: None = when CUDA is available.
        cache: read the training slices into memory once, in `setup`, instead of from disk every epoch
            (about 1.3 MB per 512x512 slice, on every rank: Synapse's 10 % is 0.3 GB, all of it 2.8 GB).

    Hooks a subclass implements: `train_names`, `case_of`, `slice_reader`, `test_cases`, `load_volume`,
    `validate`.
    """

    num_classes: int = 0
    class_names: list[str] = []

    def __init__(
        self,
        root: str | os.PathLike,
        img_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        fraction: float = 1.0,
        fraction_by: str = "slice",
        fraction_list: str | os.PathLike | None = None,
        seed: int = 0,
        split_dir: str | os.PathLike | None = None,
        augment: bool = True,
        val_slices: int = 32,
        low_res_factor: int = 4,
        pin_memory: bool | None = None,
        cache: bool = False,
        train_size: int | None = None,
        subset_seed: int | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        if fraction_by not in FRACTION_MODES:
            raise SamoraError(f"fraction_by={fraction_by!r} is not known: use one of {', '.join(FRACTION_MODES)}")
        if fraction_by == "list":
            if fraction_list is None:
                raise SamoraError("fraction_by='list' needs fraction_list=<file of slice names, one per line>")
        else:
            if fraction_list is not None:
                raise SamoraError(
                    f"fraction_list={fraction_list} is only used with fraction_by='list' (got {fraction_by!r}): "
                    "set fraction_by=list or drop fraction_list"
                )
            try:
                fraction = float(fraction)
            except (TypeError, ValueError):
                raise SamoraError(f"fraction={fraction!r} must be a number in (0, 1]") from None
            if not (0.0 < fraction <= 1.0) or not np.isfinite(fraction):
                raise SamoraError(f"fraction={fraction} must be in (0, 1] (for example 0.1 for 10 %)")
        if int(img_size) <= 0 or int(img_size) % int(low_res_factor):
            raise SamoraError(f"img_size={img_size} must be a positive multiple of low_res_factor={low_res_factor}")
        if int(batch_size) <= 0:
            raise SamoraError(f"batch_size={batch_size} must be a positive integer")
        if int(num_workers) < 0:
            raise SamoraError(f"num_workers={num_workers} must be >= 0")
        if int(val_slices) < 0:
            raise SamoraError(f"val_slices={val_slices} must be >= 0")
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.fraction = float(fraction) if fraction_by != "list" else 1.0
        self.fraction_by = fraction_by
        self.fraction_list = Path(fraction_list) if fraction_list is not None else None
        self.seed = int(seed)
        self.subset_seed = None if subset_seed is None else int(subset_seed)
        self.split_dir = Path(split_dir) if split_dir is not None else None
        self.augment = bool(augment)
        self.val_slices = int(val_slices)
        self.low_res_factor = int(low_res_factor)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.cache = bool(cache)
        if train_size is not None and int(train_size) <= 0:
            raise SamoraError(f"train_size={train_size} must be a positive integer (e.g. 224) or None")
        self.train_size = None if train_size is None else int(train_size)  # SAMed: 224, zoomed to img_size
        self._selected: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    @abstractmethod
    def train_names(self) -> list[str]:
        """All training slice names, in list order."""

    @abstractmethod
    def case_of(self, name: str) -> str:
        """The case a training slice belongs to (for fraction_by='case')."""

    @abstractmethod
    def slice_reader(self) -> SliceReader:
        """A picklable callable name -> (image (H,W) float32 in [0,1], label (H,W) integer 0..K)."""

    @abstractmethod
    def test_cases(self) -> list[str]:
        """Test case names, in list order."""

    @abstractmethod
    def load_volume(self, case: str) -> Volume:
        """Read one test volume (checked: keys, shapes, label range, finite values)."""

    @abstractmethod
    def validate(self) -> None:
        """Check the whole dataset; raise one SamoraError listing every problem found."""

    # ------------------------------------------------------------------ fraction selection
    def selected_train_names(self) -> list[str]:
        """The labelled training slices for this fraction setting (seeded; computed once)."""
        if self._selected is None:
            self._selected = self._select()
        return list(self._selected)

    def _select(self) -> list[str]:
        names = self.train_names()
        if not names:
            raise SamoraError(f"the training list of {self.root} is empty: it must name at least one slice")
        rng = np.random.default_rng(self.seed if self.subset_seed is None else self.subset_seed)
        if self.fraction_by == "slice":
            n = max(1, int(round(self.fraction * len(names))))
            keep = set(rng.choice(len(names), size=n, replace=False).tolist())
            return [nm for i, nm in enumerate(names) if i in keep]
        if self.fraction_by == "case":
            cases = sorted({self.case_of(nm) for nm in names})
            n = max(1, int(round(self.fraction * len(cases))))
            chosen = {cases[i] for i in rng.choice(len(cases), size=n, replace=False).tolist()}
            return [nm for nm in names if self.case_of(nm) in chosen]
        # explicit list
        wanted = read_name_list(self.fraction_list, "fraction")
        known = set(names)
        missing = [nm for nm in wanted if nm not in known]
        if missing:
            shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise SamoraError(
                f"fraction list {self.fraction_list} names slices that are not in the training list of "
                f"{self.root}: {shown}. Use names from the training list (without extension)."
            )
        if not wanted:
            raise SamoraError(f"fraction list {self.fraction_list} is empty: it must name at least one slice")
        return list(dict.fromkeys(wanted))  # unique, file order

    def write_split(self, split_dir: str | os.PathLike | None = None) -> Path | None:
        """Write the chosen training list and fraction settings to `split_dir` (rank zero only)."""
        out = Path(split_dir) if split_dir is not None else self.split_dir
        if out is None or not is_rank_zero():
            return None
        selected = self.selected_train_names()
        atomic_write_text(out / "train_selected.txt", "".join(f"{nm}\n" for nm in selected))
        info = {
            "dataset": type(self).__name__,
            "root": str(self.root),
            "fraction": self.fraction if self.fraction_by != "list" else None,
            "fraction_by": self.fraction_by,
            "fraction_list": str(self.fraction_list) if self.fraction_list else None,
            "seed": self.seed,
            "subset_seed": self.subset_seed,
            "subset_policy": subset_policy(self.fraction_by, self.fraction_list, self.subset_seed, self.fraction),
            "num_selected": len(selected),
            "num_train_slices": len(self.train_names()),
            "cases": sorted({self.case_of(nm) for nm in selected}),
        }
        atomic_write_json(out / "fraction.json", info, indent=2)
        return out / "train_selected.txt"

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            names = self.selected_train_names()
            transform = self.transform(augment=self.augment)
            if self.cache:
                self.train_set = self._cached_train_set(names, transform)
            else:
                self.train_set = SliceDataset(names, self.slice_reader(), transform)
            self.write_split()
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._build_val_set()

    def transform(self, augment: bool) -> SegmentationTransform:
        """The slice transform of training (augment) and monitoring (not): the same sizes for both."""
        return SegmentationTransform(self.img_size, self.low_res_factor, augment=augment, train_size=self.train_size)

    def _cached_train_set(self, names: list[str], transform: SegmentationTransform) -> Dataset:
        """The training slices read (and checked) once into memory, so that an epoch costs only the
        augmentation. Loaded before the DataLoader forks its workers, which then share the arrays
        copy-on-write instead of each holding its own copy."""
        from samora_pl.training.progress import track

        reader = self.slice_reader()
        images, labels = [], []
        for name in track(names, "cache training slices", "slice") if len(names) >= 64 else names:
            image, label = reader(name)
            images.append(image)
            labels.append(label)
        return ArraySliceDataset(names, images, labels, transform)

    def _build_val_set(self) -> Dataset:
        transform = self.transform(augment=False)
        if self.val_slices == 0:
            return ArraySliceDataset([], [], [], transform)
        selected = set(self.selected_train_names())
        candidates = [name for name in self.train_names() if name not in selected]
        if not candidates:
            log.info(
                "validation: the fraction selects every training slice, so the monitoring set is drawn from "
                "them (it shows fit, not generalisation); test volumes are never read before the evaluation"
            )
            candidates = sorted(selected)
        # a seeded sample a few times larger than needed, read in name order (one case after another, which
        # the readers' volume caches like); foreground slices first
        rng = np.random.default_rng(self.seed)
        n_read = min(len(candidates), VAL_READ_FACTOR * self.val_slices)
        order = rng.permutation(len(candidates))[:n_read]
        reader = self.slice_reader()
        read = {candidates[i]: reader(candidates[i]) for i in sorted(order.tolist())}
        ranked = sorted(order.tolist(), key=lambda i: not np.any(read[candidates[i]][1]))  # stable: seeded order
        names = sorted(candidates[i] for i in ranked[: self.val_slices])
        images = [np.ascontiguousarray(read[nm][0], dtype=np.float32) for nm in names]
        labels = [np.ascontiguousarray(read[nm][1]) for nm in names]
        return ArraySliceDataset(names, images, labels, transform)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Training (shuffle): fresh workers every epoch, seeded from the main process's generator, which every
        checkpoint keeps (callbacks.RandomState); persistent workers would carry augmentation generators no
        checkpoint holds, and a resumed run would augment differently. Validation (no randomness) keeps its
        workers and seeds them from a generator of its own, so it never moves the training's random stream.
        Under DDP training gets its DistributedSampler here, already at the epoch about to run (sampling.py)."""
        sampler = training_sampler(dataset, self.trainer) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and not shuffle,
            generator=None if shuffle else torch.Generator(),
            pin_memory=self.pin_memory,
            drop_last=False,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Labels travel as uint8 to keep batches small; on the device they become the int64 the losses need."""
        if isinstance(batch, dict):
            for key in ("label", "low_res_label"):
                if key in batch:
                    batch[key] = batch[key].long()
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        if self.val_set is None:
            self.setup("validate")
        if len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, shuffle=False)

    def test_volumes(self, cases: Sequence[str] | None = None) -> Iterator[Volume]:
        """Yield the test volumes (all, or the named cases) one at a time, in list order."""
        for case in self.test_cases() if cases is None else cases:
            yield self.load_volume(case)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, K={self.num_classes}, img_size={self.img_size}, "
            f"fraction={self.fraction}, fraction_by={self.fraction_by!r}, seed={self.seed})"
        )

    __str__ = __repr__
