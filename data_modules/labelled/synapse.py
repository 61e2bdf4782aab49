"""Synapse multi-organ CT (BTCV abdomen, 8 organs) in TransUNet's preprocessed layout, read exactly:

    <root>/train_npz/caseXXXX_sliceYYY.npz      keys `image`, `label` (float32, H x W, 512 x 512)
    <root>/test_vol_h5/caseXXXX.npy.h5           keys `image`, `label` (D, H, W)
    <root>/lists/lists_Synapse/train.txt         training slice names, without extension
    <root>/lists/lists_Synapse/test_vol.txt      test case names

Images are CT clipped to [-125, 275] HU and scaled by (x + 125) / 400 to [0, 1]; labels 0..8 (ids below).
`list_dir` can point elsewhere (SAMed and TransUNet keep the lists in their code checkout).
The h5 files store no voxel spacing, so volumes report unit spacing (HD95 in voxels, as the protocol wants).

Loading checks cheaply (file exists and opens, keys present, shapes agree, values finite, labels integral
in 0..K) and raises a SamoraError naming the file; `validate()` reads everything and reports every problem
at once.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_modules.io.volume_io import open_h5, read_h5
from data_modules.labelled.base import SegmentationDataModule, Volume, as_label_map, label_problems, read_name_list
from samora_pl.errors import SamoraError

SYNAPSE_CLASS_NAMES = [
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "pancreas",
]
# TransUNet's 12 test volumes (docs/method.md, section Data formats); the other 18 labelled cases of the release
# are for training.
SYNAPSE_TEST_CASES = tuple(f"case{n:04d}" for n in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))


# how TransUNet's preprocessing maps Synapse's raw organ ids (data_modules/prepare/raw.py does the same)
LABEL_HINT = f"map the raw organ ids to 0..{len(SYNAPSE_CLASS_NAMES)} as TransUNet's preprocessing does"


def _array_problems(image: np.ndarray, label: np.ndarray, ndim: int, class_names: Sequence[str]) -> list[str]:
    problems = []
    if image.ndim != ndim:
        problems.append(f"image has shape {image.shape}, expected {ndim}-D")
    if image.shape != label.shape:
        problems.append(f"image shape {image.shape} and label shape {label.shape} differ")
    lo, hi = (image.min(), image.max()) if image.size else (0.0, 0.0)  # min/max propagate NaN: one pass each
    if not (np.isfinite(lo) and np.isfinite(hi)):
        problems.append("image contains NaN or Inf values (re-run the preprocessing for this case)")
    elif lo < -1e-3 or hi > 1.0 + 1e-3:
        problems.append(
            f"image values span {lo:.4g}..{hi:.4g} but must be in [0, 1]: apply the Synapse "
            "windowing (clip HU to [-125, 275], then (x + 125) / 400) as TransUNet's preprocessing does"
        )
    problems += label_problems(label, class_names, LABEL_HINT)
    return problems


def load_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, raw label) of a training slice; SamoraError naming the file if it is missing,
    unreadable or lacks a key. Values are not checked."""
    if not path.is_file():
        raise SamoraError(
            f"{path} does not exist but is named in the training list: restore the file or remove its name "
            "from train.txt"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("image", "label") if k not in keys]
            if missing:
                raise SamoraError(
                    f"{path} has no {' or '.join(repr(k) for k in missing)} array (it has: "
                    f"{', '.join(sorted(keys)) or 'nothing'}): labelled slices need keys 'image' and 'label'"
                )
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"])
    except SamoraError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SamoraError(
            f"{path} cannot be read ({type(e).__name__}: {e}): the file is corrupt; re-create it"
        ) from None
    return image, label


def read_npz_slice(path: Path, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one training slice (SamoraError with the file name for any problem)."""
    image, label = load_npz_arrays(path)
    problems = _array_problems(image, label, 2, class_names)
    if problems:
        raise SamoraError(f"{path}: " + "; ".join(problems))
    return image, as_label_map(label, len(class_names))


class SynapseSliceReader:
    """Picklable `name -> (image, label)` for `<folder>/<name>.npz` slices."""

    def __init__(self, folder: Path, class_names: Sequence[str]):
        self.folder = Path(folder)
        self.class_names = list(class_names)

    def __call__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return read_npz_slice(self.folder / f"{name}.npz", self.class_names)


def _open_h5(path: Path):
    return open_h5(
        path,
        " but is named in the test list: restore the file or remove its name from test_vol.txt",
        "test volumes need datasets 'image' and 'label' of shape (D, H, W)",
        "re-create it",
    )


def load_h5_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, raw label) of a test volume; SamoraError naming the file if it is missing, unreadable
    or lacks a dataset. Values are not checked."""
    with _open_h5(path) as f:
        return np.asarray(read_h5(f, "image"), dtype=np.float32), np.asarray(read_h5(f, "label"))


class SynapseDataModule(SegmentationDataModule):
    """Synapse (TransUNet layout), K = 8: spleen, right kidney, left kidney, gallbladder, liver, stomach,
    aorta, pancreas (ids 1..8). See `SegmentationDataModule` for the arguments; `list_dir` overrides
    `<root>/lists/lists_Synapse`."""

    num_classes = 8
    class_names = list(SYNAPSE_CLASS_NAMES)
    list_subdir = Path("lists") / "lists_Synapse"

    def __init__(self, root, *args, list_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(root, *args, **kwargs)
        if not self.root.is_dir():
            raise SamoraError(
                f"Synapse data folder {self.root} does not exist: download and preprocess Synapse (TransUNet "
                "layout: train_npz/, test_vol_h5/, lists/lists_Synapse/) there, or set the data directory "
                "(DATA_DIR=... / data.dir=...)"
            )
        self.list_dir = Path(list_dir) if list_dir is not None else self.root / self.list_subdir
        self.train_dir = self.root / "train_npz"
        self.test_dir = self.root / "test_vol_h5"
        self._train_names: list[str] | None = None
        self._test_cases: list[str] | None = None

    # ------------------------------------------------------------------ lists
    def _read_list(self, fname: str, what: str) -> list[str]:
        path = self.list_dir / fname
        if not path.is_file():
            raise SamoraError(
                f"{path} does not exist: Synapse needs the {what} list there (one name per line, as in "
                "TransUNet's lists/lists_Synapse); copy it in or pass list_dir=..."
            )
        return read_name_list(path, what)

    def train_names(self) -> list[str]:
        if self._train_names is None:
            self._train_names = self._read_list("train.txt", "training")
        return list(self._train_names)

    def test_cases(self) -> list[str]:
        if self._test_cases is None:
            self._test_cases = [
                c[: -len(".npy.h5")] if c.endswith(".npy.h5") else c for c in self._read_list("test_vol.txt", "test")
            ]
        return list(self._test_cases)

    def case_of(self, name: str) -> str:
        return name.split("_slice")[0] if "_slice" in name else name.rsplit("_", 1)[0]

    def slice_path(self, name: str) -> Path:
        return self.train_dir / f"{name}.npz"

    def volume_path(self, case: str) -> Path:
        return self.test_dir / f"{case}.npy.h5"

    # ------------------------------------------------------------------ readers
    def slice_reader(self) -> SynapseSliceReader:
        if not self.train_dir.is_dir():
            raise SamoraError(
                f"{self.train_dir} does not exist: Synapse training slices go there as caseXXXX_sliceYYY.npz"
            )
        return SynapseSliceReader(self.train_dir, self.class_names)

    def load_volume(self, case: str) -> Volume:
        path = self.volume_path(case)
        image, label = load_h5_arrays(path)
        problems = _array_problems(image, label, 3, self.class_names)
        if problems:
            raise SamoraError(f"{path}: " + "; ".join(problems))
        return Volume(
            case=case,
            image=image,
            label=as_label_map(label, self.num_classes),
            spacing=(1.0, 1.0, 1.0),
            meta={"path": str(path)},
        )

    # ------------------------------------------------------------------ full check
    def validate(self, progress: bool = False) -> dict:
        """Open every listed file and check keys, shapes, finite values and label range 0..K.

        Collects every problem and raises one SamoraError listing them all (one line per file); returns
        a summary dict (counts, slice shapes, label values seen) when the dataset is fine.
        """
        problems: list[str] = []
        summary = {
            "root": str(self.root),
            "train_slices": 0,
            "test_volumes": 0,
            "slice_shapes": set(),
            "volume_shapes": [],
            "labels_seen": set(),
        }

        def add(path, msg):
            problems.append(f"{path}: {msg}")

        train, test = [], []
        for fname, what, out in (("train.txt", "training", train), ("test_vol.txt", "test", test)):
            path = self.list_dir / fname
            if not path.is_file():
                add(path, f"missing ({what} list)")
                continue
            names = read_name_list(path, what)
            if not names:
                add(path, f"the {what} list is empty")
            dups = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
            if dups:
                add(path, f"names listed more than once: {', '.join(dups[:10])}")
            out.extend(dict.fromkeys(names))
        test = [c[: -len(".npy.h5")] if c.endswith(".npy.h5") else c for c in test]

        for folder, listed, what in ((self.train_dir, train, "training slices"), (self.test_dir, test, "test volumes")):
            if listed and not folder.is_dir():
                add(folder, f"folder missing ({len(listed)} listed {what} should be there)")
                listed.clear()

        def checked(items, path_of, read, ndim: int, desc: str, unit: str):
            """(image, label) of every item that reads and passes the checks; the others' problems added."""
            if progress:
                from samora_pl.training.progress import track

                items = track(items, desc, unit)
            for item in items:
                path = path_of(item)
                try:
                    image, label = read(path)
                except SamoraError as e:
                    problems.append(str(e))
                    continue
                msgs = _array_problems(image, label, ndim, self.class_names)
                for msg in msgs:
                    add(path, msg)
                if not msgs:
                    summary["labels_seen"].update(np.unique(label).astype(int).tolist())
                    yield image, label

        for image, _ in checked(train, self.slice_path, load_npz_arrays, 2, "train slices", "slice"):
            summary["train_slices"] += 1
            summary["slice_shapes"].add(tuple(image.shape))
        for image, _ in checked(test, self.volume_path, load_h5_arrays, 3, "test volumes", "volume"):
            summary["test_volumes"] += 1
            summary["volume_shapes"].append(tuple(image.shape))

        if problems:
            raise SamoraError(
                f"{len(problems)} problem(s) in the Synapse dataset at {self.root}:\n  - " + "\n  - ".join(problems)
            )
        summary["slice_shapes"] = sorted(summary["slice_shapes"])
        summary["labels_seen"] = sorted(int(v) for v in summary["labels_seen"])
        return summary
