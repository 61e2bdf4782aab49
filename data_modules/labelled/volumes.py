"""What the labelled datasets kept as whole 3-D volumes (LA, PROMISE12, generic) share.

Such a dataset is a set of cases, each an image volume and a label volume, split by case into training and
test. A subclass says which cases exist, where its list files are, and how to read one case (a picklable
`CaseReader`); this module does the rest once:

- the split: the dataset's two list files (one case per line) in `list_dir`, else in the dataset's own
  place, else the dataset's default split (for LA and generic a split by case seeded by `split_seed`, never
  by the run seed, so all seeds and the stage-1 pool agree on the test cases). The split used is written,
  under the same file names, to the run's split folder, so `list_dir=<that folder>` reproduces it.
- training slices: every slice along D of the training cases, named `<case>_slice<zzz>`; only headers are
  read to list them, slices are read when a batch needs them (a worker keeps its last two volumes).
- intensity, per volume, to [0, 1] (`unlabeled_io.intensity`): `mr_percentile` clips to the volume's
  0.5 / 99.5 percentiles then scales min-max; `ct_window` is Synapse's [-125, 275] HU window; `none` only
  clips (data already in [0, 1]). `intensity=None` takes the dataset's default.
- checks (shapes agree, finite image, labels integral in 0..K) with messages naming the file, and
  `validate()`, which reads every case and reports every problem at once.

Volumes are (D, H, W) with the source geometry in `meta['geometry']` (`Geometry.to_meta()`), the spacing
in `Volume.spacing` and the image file in `meta['path']`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_modules.io.readers import INTENSITIES, MR_PERCENTILES, VolumeCache
from data_modules.io.readers import intensity as scale_intensity
from data_modules.io.volume_io import Geometry, read_image, read_shape, strip_image_suffix
from data_modules.labelled.base import SegmentationDataModule, Volume, as_label_map, label_problems, read_name_list
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_write_text

TEST_FRACTION = 0.2  # of the cases, for a seeded split
SLICE_MARK = "_slice"


@dataclass
class RawCase:
    """One case as stored, reordered to (D, H, W) but not yet scaled or checked."""

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    path: Path  # the image file
    label_path: Path
    label_geometry: Geometry | None = None  # where the label file has its own header (NIfTI, MHD)


@dataclass
class CaseSplit:
    train: list
    test: list
    source: str  # where the split came from, in words (written as a comment above the lists)


def slice_name(case: str, z: int) -> str:
    return f"{case}{SLICE_MARK}{z:03d}"


def parse_slice_name(name: str) -> tuple[str, int]:
    case, _, z = name.rpartition(SLICE_MARK)
    if not case or not z.isdigit():
        raise SamoraError(f"slice name {name!r} is not of the form <case>{SLICE_MARK}<index>")
    return case, int(z)


# ----------------------------------------------------------------------------------------------- readers


class CaseReader(ABC):
    """Reads one case's arrays; picklable, as it travels to DataLoader workers (without its cache)."""

    def __init__(self):
        self._cache = VolumeCache(2)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = VolumeCache(2)
        return state

    @abstractmethod
    def path(self, case: str) -> Path:
        """The case's (image) file, whether or not it exists; named in messages."""

    def label_path(self, case: str) -> Path:
        """The case's label file (the image file when both are in one)."""
        return self.path(case)

    @abstractmethod
    def depth(self, case: str) -> int:
        """Number of slices along D, from the file header only."""

    @abstractmethod
    def read(self, case: str) -> RawCase:
        """The whole case; SamoraError naming the file if it is missing or unreadable."""

    def read_cached(self, case: str) -> RawCase:
        return self._cache.get(case, lambda: self.read(case))

    def read_slice(self, case: str, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (image, label) slice z along D; formats with cheap partial reads override this."""
        raw = self.read_cached(case)
        return raw.image[z], raw.label[z]


class FilePairReader(CaseReader):
    """Cases stored as an image file and a label file that SimpleITK reads (NIfTI, MHD/MHA)."""

    @abstractmethod
    def files(self, case: str) -> tuple[Path, Path]:
        """(image file, label file) of a case."""

    def path(self, case: str) -> Path:
        return self.files(case)[0]

    def label_path(self, case: str) -> Path:
        return self.files(case)[1]

    def depth(self, case: str) -> int:
        return read_shape(self.path(case), "image")[0]

    def read(self, case: str) -> RawCase:
        image_path, label_path = self.files(case)
        image, geometry = read_image(image_path, "image")
        label, label_geometry = read_image(label_path, "label")
        return RawCase(image, label, geometry, image_path, label_path, label_geometry)


# ------------------------------------------------------------------------------------------------ checks


def array_problems(image, label, image_path: Path, label_path: Path, class_names: list) -> list[str]:
    """Every problem of an image/label pair (a volume or one slice), each line naming the file at fault."""
    if image.shape != label.shape:
        return [
            f"{label_path}: label shape {label.shape} differs from the image's {image.shape} "
            f"({image_path}); image and label must be voxel-aligned"
        ]
    problems = []
    if not np.isfinite(image).all():
        problems.append(f"{image_path}: image contains NaN or Inf values")
    problems += [f"{label_path}: {msg}" for msg in label_problems(label, class_names)]
    return problems


def geometry_problems(raw: RawCase) -> list[str]:
    """A label header whose spacing, origin or direction differs from the image's (beyond header rounding,
    0.1 %): the voxels line up by index, but the label was most likely made on another grid."""
    if raw.label_geometry is None:
        return []
    image, label = raw.geometry, raw.label_geometry
    differ = [
        name
        for name in ("spacing", "origin", "direction")
        if not np.allclose(getattr(image, name), getattr(label, name), rtol=1e-3, atol=1e-3)
    ]
    if not differ:
        return []
    detail = "; ".join(f"{name} {tuple(getattr(label, name))} vs {tuple(getattr(image, name))}" for name in differ)
    return [
        f"{raw.label_path}: label {' and '.join(differ)} differ from the image's ({raw.path}): {detail}; "
        "resample the label onto the image grid (nearest neighbour)"
    ]


def case_problems(raw: RawCase, class_names: list) -> list[str]:
    if raw.image.ndim != 3:
        return [f"{raw.path}: image has shape {raw.image.shape}, expected a 3-D volume"]
    return array_problems(raw.image, raw.label, raw.path, raw.label_path, class_names)


def volume_stats(image: np.ndarray, mode: str) -> list | None:
    """What `scale_intensity` needs from the whole volume (the percentiles for mr_percentile)."""
    if mode != "mr_percentile":
        return None
    return [float(v) for v in np.percentile(image, MR_PERCENTILES)]


class VolumeSliceReader:
    """Picklable `<case>_slice<zzz> -> (image (H, W) in [0, 1], label (H, W))` for training."""

    def __init__(self, reader: CaseReader, mode: str, class_names: list):
        self.reader = reader
        self.mode = mode
        self.class_names = list(class_names)
        self._stats: dict = {}  # per case; small, so kept for every case seen

    def __call__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        case, z = parse_slice_name(name)
        if self.mode == "mr_percentile" and case not in self._stats:
            self._stats[case] = volume_stats(self.reader.read_cached(case).image, self.mode)
        image, label = self.reader.read_slice(case, z)
        problems = array_problems(image, label, self.reader.path(case), self.reader.label_path(case), self.class_names)
        if problems:
            raise SamoraError(f"slice {z} of case {case}: " + "; ".join(problems))
        scaled = scale_intensity(image, self.mode, self._stats.get(case))
        return scaled, as_label_map(label, len(self.class_names))


# --------------------------------------------------------------------------------------------- the module


class VolumeDataModule(SegmentationDataModule):
    """Base of the volume datasets. Beyond `SegmentationDataModule`'s arguments:

    intensity: none | ct_window | mr_percentile (see the module doc); None = the dataset's default.
    list_dir: folder holding the dataset's two list files (`list_files`); None = the dataset's own place.
    split_seed: seeds the split by case when there are no list files. Not the run seed: every seed of an
        experiment, and its stage-1 pool, must see the same test cases.

    A subclass sets `title`, `layout` (for messages), `list_files`, `default_list_dir` (relative to the
    root, or None) and implements `make_reader` and `default_split`.
    """

    title = "volume"
    layout = ""
    list_files: tuple = ("train.txt", "test.txt")
    default_list_dir: str | None = None

    def __init__(
        self,
        root,
        *args,
        intensity: str | None = None,
        list_dir: str | os.PathLike | None = None,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(root, *args, **kwargs)
        self.split_seed = int(split_seed)
        if not self.root.is_dir():
            raise SamoraError(
                f"{self.title} data folder {self.root} does not exist: put the data there ({self.layout}) or "
                "set the data directory (DATA_DIR=... / data.dir=...)"
            )
        if intensity is not None and intensity not in INTENSITIES:
            raise SamoraError(f"intensity={intensity!r} is not known: use one of {', '.join(INTENSITIES)}")
        self._intensity = intensity
        self.list_dir = Path(list_dir).expanduser() if list_dir is not None else None
        self._reader: CaseReader | None = None
        self._split: CaseSplit | None = None
        self._train_names: list | None = None

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def make_reader(self) -> CaseReader:
        """The reader of this dataset's cases."""

    @abstractmethod
    def default_split(self) -> CaseSplit:
        """The split when there are no list files."""

    def default_intensity(self) -> str:
        return "mr_percentile"

    # ------------------------------------------------------------------ split
    @property
    def intensity(self) -> str:
        return self._intensity or self.default_intensity()

    def reader(self) -> CaseReader:
        if self._reader is None:
            self._reader = self.make_reader()
        return self._reader

    def split(self) -> CaseSplit:
        """The train/test split by case (computed and checked once)."""
        if self._split is None:
            split = self._find_split()
            problems = self._split_problems(split)
            if problems:
                raise SamoraError("; ".join(problems))
            self._split = split
        return self._split

    def _find_split(self) -> CaseSplit:
        folder = self.list_dir
        if folder is None and self.default_list_dir is not None:
            folder = self.root / self.default_list_dir
        if folder is not None:
            paths = [folder / name for name in self.list_files]
            found = [p.is_file() for p in paths]
            if all(found):
                train, test = (
                    list(map(strip_image_suffix, read_name_list(p, what)))
                    for p, what in zip(paths, ("training", "test"))
                )
                return CaseSplit(train, test, f"the lists {paths[0]} and {paths[1]}")
            if any(found) or self.list_dir is not None:
                missing = next(p for p, ok in zip(paths, found) if not ok)
                raise SamoraError(
                    f"{missing} does not exist: a {self.title} split needs both {' and '.join(self.list_files)} "
                    f"(case names, one per line) in {folder}; add it, or remove both to use the default split"
                )
        return self.default_split()

    def _split_problems(self, split: CaseSplit) -> list[str]:
        problems = []
        for cases, what in ((split.train, "training"), (split.test, "test")):
            if not cases:
                problems.append(f"{split.source}: the {what} list is empty")
            dups = sorted({c for c in cases if cases.count(c) > 1})
            if dups:
                problems.append(f"{split.source}: {what} cases listed more than once: {', '.join(dups[:10])}")
        both = sorted(set(split.train) & set(split.test))
        if both:
            problems.append(f"{split.source}: cases both in training and test: {', '.join(both[:10])}")
        reader = self.reader()
        missing = [c for c in dict.fromkeys(split.train + split.test) if not reader.path(c).is_file()]
        if missing:
            shown = ", ".join(f"{c} ({reader.path(c)})" for c in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(
                f"{split.source}: cases with no file: {shown}{more}; restore the files or leave the "
                f"cases out of {' and '.join(self.list_files)}"
            )
        return problems

    def seeded_split(self, cases, where) -> CaseSplit:
        """An 80/20 split by case of `cases` (found in `where`), seeded by `split_seed`."""
        cases = sorted(cases)
        if len(cases) < 2:
            raise SamoraError(
                f"{where}: found {len(cases)} {self.title} case(s); a train/test split needs at least 2 ({self.layout})"
            )
        n_test = max(1, int(round(TEST_FRACTION * len(cases))))
        order = np.random.default_rng(self.split_seed).permutation(len(cases))
        test = set(np.asarray(cases)[order[:n_test]].tolist())
        return CaseSplit(
            [c for c in cases if c not in test],
            [c for c in cases if c in test],
            f"a seeded split by case (split_seed {self.split_seed}, {n_test} of {len(cases)} cases for test) "
            f"of {where}",
        )

    def write_split(self, split_dir=None):
        """Also write the case split, under the dataset's list names (rank zero only)."""
        written = super().write_split(split_dir)
        if written is not None:
            split = self.split()
            for name, cases in zip(self.list_files, (split.train, split.test)):
                text = f"# {self.title} split from {split.source}\n" + "".join(f"{c}\n" for c in cases)
                atomic_write_text(written.parent / name, text)
        return written

    # ------------------------------------------------------------------ SegmentationDataModule hooks
    def train_names(self) -> list[str]:
        if self._train_names is None:
            reader = self.reader()
            self._train_names = [slice_name(c, z) for c in self.split().train for z in range(reader.depth(c))]
        return list(self._train_names)

    def case_of(self, name: str) -> str:
        return parse_slice_name(name)[0]

    def slice_reader(self) -> VolumeSliceReader:
        return VolumeSliceReader(self.reader(), self.intensity, self.class_names)

    def test_cases(self) -> list[str]:
        return list(self.split().test)

    def load_volume(self, case: str) -> Volume:
        raw = self.reader().read_cached(case)
        problems = case_problems(raw, self.class_names)
        if problems:
            raise SamoraError("; ".join(problems))
        image = scale_intensity(raw.image, self.intensity, volume_stats(raw.image, self.intensity))
        meta = {"path": str(raw.path), "label_path": str(raw.label_path), "geometry": raw.geometry.to_meta()}
        return Volume(
            case=case,
            image=image,
            label=as_label_map(raw.label, self.num_classes),
            spacing=tuple(raw.geometry.spacing),
            meta=meta,
        )

    def validate(self) -> dict:
        """Read every case of the split; raise one SamoraError listing every problem, else return a summary."""
        problems: list[str] = []
        cases: list[str] = []
        train: set = set()
        summary = {
            "root": str(self.root),
            "split": None,
            "intensity": self.intensity,
            "train_cases": 0,
            "test_cases": 0,
            "train_slices": 0,
            "volume_shapes": set(),
            "labels_seen": set(),
        }
        try:
            split = self._find_split()
            reader = self.reader()
        except SamoraError as err:
            problems.append(str(err))
        else:
            problems += self._split_problems(split)
            summary.update(split=split.source, train_cases=len(split.train), test_cases=len(split.test))
            cases = [c for c in dict.fromkeys(split.train + split.test) if reader.path(c).is_file()]
            train = set(split.train)
        for case in cases:
            try:
                raw = reader.read(case)
            except SamoraError as err:
                problems.append(str(err))
                continue
            msgs = case_problems(raw, self.class_names) + geometry_problems(raw)
            problems += msgs
            if not msgs:
                summary["train_slices"] += raw.image.shape[0] if case in train else 0
                summary["volume_shapes"].add(tuple(raw.image.shape))
                summary["labels_seen"].update(np.unique(raw.label).astype(int).tolist())
        if problems:
            raise SamoraError(
                f"{len(problems)} problem(s) in the {self.title} dataset at {self.root}:\n  - "
                + "\n  - ".join(problems)
            )
        summary["volume_shapes"] = sorted(summary["volume_shapes"])
        summary["labels_seen"] = sorted(summary["labels_seen"])
        return summary
