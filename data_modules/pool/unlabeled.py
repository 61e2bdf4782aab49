"""The unlabeled slice pool of continual pre-training (CPT), as a LightningDataModule.

A pool is a list of sources (`cpt.sources`; empty means the dataset's own images, labels ignored):

- folders or single files of slices or volumes: npz, h5, NIfTI, MHD/MHA, DICOM series, PNG
  (`format: auto` picks the reader by extension and skips label-like files: names containing
  `segmentation`, `_seg.`, or starting with `label`, and folders named labelsTr, labelsTs, labels, masks, gt);
- dataset layouts: `synapse` (train_npz/*.npz and test_vol_h5/*.h5), `la` (`2018LA_Seg_Training Set/<ID>/
  mri_norm2.h5`, sliced along the last axis), `promise12` (`CaseNN.mhd`, segmentations skipped).

Each source has an intensity mode: `none` (values already in [0, 1]; clipped), `ct_window` (Synapse: clip
[-125, 275], then (x + 125) / 400), `mr_percentile` (clip to the volume's 0.5 / 99.5 percentiles, scale to
[0, 1]) or `auto` (synapse, npz, h5, png: none; la, promise12, nifti, mhd, dicom: mr_percentile). Every
slice comes out as float32 [1, H, W] in [0, 1].

No test image before the final evaluation: the pool leaves out the test cases of the configured dataset
(`data.name` / `data.dir`: the split fine-tuning evaluates, from its list files or its seeded split), matched
by patient id across the dataset's naming schemes (`data_modules/io/patient_ids.py`: Synapse's `caseXXXX`,
`imgXXXX`, `labelXXXX`; PROMISE12's `CaseNN`; LA's case folders; generic case names, with `_sliceNNN` or
nnU-Net channel suffixes). A matching file under `data.dir` is left out; one anywhere else (a copy, the raw
release) stops the run with a message naming it, its test case and the opt-in.
`cpt.include_test_cases=true` reads them anyway (transductive pre-training); the pool summary
(`inputs.pool` of the CPT and distill manifests) records the case ids read (`cases`), the evaluation cases
left out (`excluded_cases`), the test cases read (`included_test_cases`) and `include_test_cases`.

Indexing reads headers only (plus, for `mr_percentile` volumes, one pass for the percentiles) and is
cached in a JSON file keyed by path + size + mtime, so a large pool starts in seconds the second time.
Unreadable files are all reported together; they stop the run unless `skip_bad_files` is set.
"""

import functools
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from data_modules.io.patient_ids import file_patient_ids, patient_id
from data_modules.io.readers import (
    DEFAULT_AXIS,
    ReadError,
    Volume,
    VolumeCache,
    dicom_series,
    intensity,
    is_dicom_file,
    probe,
    read_slice,
    volume_stats,
)
from data_modules.labelled.sampling import training_sampler
from data_modules.labelled.spec import LabelledDataSpec
from data_modules.options import INTENSITY_OPTIONS
from data_modules.pool.spec import PoolSpec
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_write_text
from samora_pl.records.manifest import is_rank_zero, sha256

log = logging.getLogger(__name__)

FORMATS = ("auto", "npz", "h5", "nifti", "mhd", "dicom", "png", "synapse", "la", "promise12")
INDEX_VERSION = 1
AUTO_INTENSITY = {
    "npz": "none",
    "h5": "none",
    "png": "none",
    "nifti": "mr_percentile",
    "mhd": "mr_percentile",
    "dicom": "mr_percentile",
    "synapse": "none",
    "la": "mr_percentile",
    "promise12": "mr_percentile",
}
EXTENSIONS = {
    ".npz": "npz",
    ".h5": "h5",
    ".hdf5": "h5",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mhd": "mhd",
    ".mha": "mhd",
    ".png": "png",
    ".dcm": "dicom",
}
LABEL_FOLDERS = {"labelstr", "labelsts", "label", "labels", "mask", "masks", "gt", "segmentations"}
LA_FOLDER = "2018LA_Seg_Training Set"
MAX_LISTED = 40
CASE_FILE_SUFFIXES = (".npy.h5", ".nii.gz", ".nii", ".mhd", ".mha", ".npz", ".h5", ".hdf5", ".png", ".dcm")
SLICE_SUFFIX = re.compile(r"_slice\d+$")
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net: <case>_0000.nii.gz is channel 0 of <case>
NNUNET_IMAGE_FOLDERS = ("imagestr", "imagests")


# ------------------------------------------------------------------------------------------------ sources


def source_dict(source, position: int = 0) -> dict:
    """A source (dict, DictConfig or dataclass) as a plain dict with every key filled and checked."""
    if isinstance(source, DictConfig):
        raw = OmegaConf.to_container(source, resolve=True)  # keeps a missing path as "???"
    elif hasattr(source, "items"):
        raw = dict(source.items())
    else:
        raw = dict(vars(source))
    out = {"path": None, "format": "auto", "intensity": "auto", "axis": None, "key": "image"}
    unknown = set(raw) - set(out)
    if unknown:
        raise SamoraError(f"cpt.sources[{position}] has unknown keys {sorted(unknown)}; known: {', '.join(out)}.")
    out.update({k: v for k, v in raw.items() if v is not None or k == "axis"})
    where = f"cpt.sources[{position}]"
    if not out["path"] or out["path"] == "???":
        raise SamoraError(f"{where}.path is not set; give the folder or file of unlabeled images.")
    if out["format"] not in FORMATS:
        raise SamoraError(f"{where}.format is {out['format']!r}; allowed values: {', '.join(FORMATS)}.")
    if out["intensity"] not in INTENSITY_OPTIONS:
        raise SamoraError(f"{where}.intensity is {out['intensity']!r}; allowed values: {', '.join(INTENSITY_OPTIONS)}.")
    if out["axis"] is not None and out["axis"] not in (0, 1, 2):
        raise SamoraError(
            f"{where}.axis is {out['axis']!r}; allowed values: 0, 1, 2 (or null for the format's default)."
        )
    return out


def pool_sources(spec: PoolSpec) -> list[dict]:
    """The pool's sources (`cpt.sources`), or when there are none the images of its dataset (labels ignored).
    The demo's data are written here when missing."""
    if spec.sources:
        return [source_dict(s, i) for i, s in enumerate(spec.sources)]
    name, root = spec.dataset, Path(spec.root)
    if name == "demo":
        try:
            from data_modules.labelled.demo import ensure_demo
        except ImportError as err:
            raise SamoraError(
                f"The demo data writer (data_modules/labelled/demo.py) is not available ({err}); "
                "set cpt.sources to a folder of unlabeled images."
            ) from err
        root = Path(ensure_demo(root))
        return [source_dict({"path": str(root / "unlabeled"), "format": "npz", "intensity": "none"})]
    if name in ("synapse", "la", "promise12"):
        return [source_dict({"path": str(root), "format": name})]
    return [source_dict({"path": str(root), "format": "auto"})]


# -------------------------------------------------------------------------------------- test cases


@dataclass(frozen=True)
class HeldOut:
    """The evaluation cases of dataset `dataset`, matched by patient id across its naming schemes
    (`data_modules.io.patient_ids`) in every pool file: under `root` such a file is left out, elsewhere it
    stops the run, unless `included` (cpt.include_test_cases=true) keeps both."""

    root: Path | None = None
    cases: tuple[str, ...] = ()
    included: bool = False
    dataset: str = ""
    files: tuple[tuple[str, str, int], ...] = ()  # (path, case, bytes) of each test volume's image file

    def test_case_of(self, volume: Volume) -> str | None:
        """The test case whose patient `volume` holds, by its name, any of its patient ids, or a byte-equal
        copy of its image file (hashed only when the sizes agree, so the check stays cheap); else None."""
        if not self.cases:
            return None
        names, ids = case_names(volume), file_patient_ids(self.dataset, volume.path)
        named = next((c for c, pid in self._ids.items() if c in names or pid in ids), None)
        return named or self._copy_of(volume.path)

    @functools.cached_property
    def _ids(self) -> dict[str, str | None]:
        return {case: patient_id(self.dataset, case) for case in self.cases}

    def _copy_of(self, path: str) -> str | None:
        try:
            size = os.path.getsize(path) if self.files and not os.path.isdir(path) else None
        except OSError:
            return None
        for test, case, test_size in self.files:
            if size == test_size and _digest(path) == _digest(test):
                return case
        return None

    def leaves_out(self, volume: Volume) -> bool:
        if self.included or self.root is None or not Path(volume.path).is_relative_to(self.root):
            return False
        return self.test_case_of(volume) is not None


NOTHING_HELD_OUT = HeldOut()


def _digest(path: str) -> str:
    stat = os.stat(path)
    return _cached_sha256(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))


def held_out_cases(spec: PoolSpec) -> HeldOut:
    """The test cases fine-tuning evaluates on the pool's dataset (its list files or its seeded split by
    case), to keep out of the pool wherever its sources are (a copy elsewhere is the same patient).

    Without the dataset's folder (a pool of other images, the dataset not on this machine) there is nothing
    to compare with. A dataset without a test split has nothing to leave out (warned); asking to include
    its test cases (`spec.include_test_cases`, cpt.include_test_cases=true) is then a mistake, refused
    before any work."""
    from data_modules import build_datamodule

    root = Path(spec.root).expanduser().resolve()
    reads_root = any(_overlaps(Path(s["path"]).expanduser().resolve(), root) for s in pool_sources(spec))
    if not reads_root and not root.is_dir():
        return NOTHING_HELD_OUT
    try:
        data = build_datamodule(LabelledDataSpec(spec.dataset, spec.root, dict(spec.test_split)))
        cases = tuple(data.test_cases())
        if not cases:
            raise SamoraError("its test list is empty")
    except SamoraError as err:
        if spec.include_test_cases:
            raise SamoraError(
                f"cpt.include_test_cases=true puts the test cases of the dataset into the pool, but {spec.dataset} "
                f"at {spec.root} has no test split ({err}). Remove cpt.include_test_cases=true, or fix the dataset "
                "so that fine-tuning can evaluate it."
            ) from err
        log.warning(
            "CPT pool: %s at %s has no test split (%s); there is no evaluation case to leave out.",
            spec.dataset,
            spec.root,
            err,
        )
        return NOTHING_HELD_OUT
    root = Path(data.root).expanduser().resolve()
    return HeldOut(root, cases, spec.include_test_cases, spec.dataset, _test_files(data, cases))


def _test_files(data, cases) -> tuple:
    """(path, case, bytes) of each test volume's image file, for the content check; none when the data
    module does not say where its volumes are."""
    try:
        path_of = data.volume_path if hasattr(data, "volume_path") else data.reader().path  # Synapse h5 / image
        paths = [Path(path_of(case)).resolve() for case in cases]
    except (AttributeError, SamoraError):
        return ()
    return tuple((str(p), case, p.stat().st_size) for p, case in zip(paths, cases) if p.is_file())


def _overlaps(path: Path, root: Path) -> bool:
    return path.is_relative_to(root) or root.is_relative_to(path)


def case_of(volume: Volume) -> str:
    """The case id a pool summary lists for `volume`: LA's case folder, a DICOM series' folder, else the file
    name without extension and `_sliceNNN` suffix (and, in imagesTr / imagesTs, nnU-Net's channel suffix)."""
    path = Path(volume.path)
    if volume.reader == "dicom":
        return path.name
    if path.name == "mri_norm2.h5":
        return path.parent.name
    stem = path.name
    for suffix in CASE_FILE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = SLICE_SUFFIX.sub("", stem)
    if path.parent.name.lower() in NNUNET_IMAGE_FOLDERS:
        stem = CHANNEL_SUFFIX.sub("", stem)
    return stem


def case_names(volume: Volume) -> set:
    """The names the case of `volume` may go by: its case id, and without an nnU-Net channel suffix."""
    case = case_of(volume)
    return {case, CHANNEL_SUFFIX.sub("", case)}


def _is_label_like(path: Path, root: Path) -> bool:
    name = path.name.lower()
    if "segmentation" in name or "_seg." in name or name.startswith("label"):
        return True
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        parts = ()
    return any(part.lower() in LABEL_FOLDERS for part in parts)


def _reader_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    return EXTENSIONS.get(path.suffix.lower())


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder) / n for n in sorted(names) if not n.startswith("."))
    return files


def scan_source(source: dict, index: dict) -> tuple[list[Volume], dict[str, str]]:
    """The volumes of one source (not read yet) and the files that already failed while grouping."""
    root = Path(source["path"]).expanduser()
    fmt = source["format"]
    if not root.exists():
        raise SamoraError(f"CPT source {root} does not exist; fix its path in cpt.sources (format {fmt}).")
    files: list[tuple[Path, str]] = []  # (path, reader)
    axis_default: dict[str, int] = dict(DEFAULT_AXIS)
    if fmt == "synapse":
        found = [(p, "npz") for p in sorted((root / "train_npz").glob("*.npz"))]
        found += [(p, "h5") for p in sorted((root / "test_vol_h5").glob("*.h5"))]
        if not found:
            raise SamoraError(f"{root} is not a Synapse folder: no train_npz/*.npz or test_vol_h5/*.h5 inside.")
        files = found
    elif fmt == "la":
        base = root / LA_FOLDER if (root / LA_FOLDER).is_dir() else root
        files = [(p, "h5") for p in sorted(base.glob("*/mri_norm2.h5"))]
        if not files:
            raise SamoraError(f"{root} is not an LA folder: no '{LA_FOLDER}/<ID>/mri_norm2.h5' inside.")
        axis_default["h5"] = 2
    elif fmt == "promise12":
        files = [(p, "mhd") for p in sorted(root.rglob("Case*.mhd")) if "segmentation" not in p.name.lower()]
        if not files:
            raise SamoraError(f"{root} is not a PROMISE12 folder: no CaseNN.mhd inside.")
    elif fmt == "dicom":
        files = [(p, "dicom") for p in _walk(root) if is_dicom_file(p)]
    else:
        for path in _walk(root):
            reader = _reader_of(path)
            if reader is None or (fmt != "auto" and reader != fmt):
                continue
            if fmt == "auto" and _is_label_like(path, root):
                continue
            files.append((path, reader))

    volumes: list[Volume] = []
    errors: dict[str, str] = {}
    mode = source["intensity"]
    dicom_groups: dict[Path, list[Path]] = {}
    for path, reader in files:
        if reader == "dicom":
            dicom_groups.setdefault(path.parent, []).append(path)
            continue
        volumes.append(
            Volume(
                path=str(path.resolve()),
                reader=reader,
                key=source["key"],
                axis=source["axis"] if source["axis"] is not None else axis_default[reader],
                intensity=AUTO_INTENSITY[fmt if fmt in ("synapse", "la", "promise12") else reader]
                if mode == "auto"
                else mode,
            )
        )
    for folder, members in sorted(dicom_groups.items()):
        series, bad = _dicom_folder(folder.resolve(), sorted(p.resolve() for p in members), index)
        errors.update(bad)
        for volume in series:
            volume.axis = source["axis"] if source["axis"] is not None else DEFAULT_AXIS["dicom"]
            volume.intensity = AUTO_INTENSITY["dicom"] if mode == "auto" else mode
            volumes.append(volume)
    return volumes, errors


def _dicom_folder(folder: Path, members: list[Path], index: dict) -> tuple[list[Volume], dict[str, str]]:
    """Series of one DICOM folder, from the index when the folder's files have not changed."""
    try:
        stats = [os.stat(p) for p in members]
    except OSError as err:
        return [], {str(folder): f"{type(err).__name__}: {err}"}
    signature = [len(members), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]
    key = f"dicomdir|{folder}"
    cached = index.get(key)
    if cached and cached.get("sig") == signature:
        series = [
            Volume(path=str(folder), reader="dicom", files=s["files"], series=s["series"]) for s in cached["series"]
        ]
        return series, dict(cached.get("errors", {}))
    series, errors = dicom_series(folder, members)
    index[key] = {
        "sig": signature,
        "errors": errors,
        "series": [{"series": v.series, "files": v.files} for v in series],
    }
    return series, errors


# ---------------------------------------------------------------------------------------------- the pool


class SlicePool:
    """The readable volumes of a pool, with how many slices each gives and their intensity statistics."""

    def __init__(
        self,
        volumes: list[Volume],
        slices: Sequence[int],
        stats: Sequence,
        bad: dict[str, str],
        index_path: Path | None = None,
        sources: Sequence[dict] = (),
        held_out: HeldOut = NOTHING_HELD_OUT,
    ):
        self.volumes = list(volumes)
        self.held_out = held_out
        self.slices = np.asarray(slices, dtype=np.int64)
        self.stats = list(stats)
        self.bad = dict(bad)
        self.index_path = index_path
        self.sources = list(sources)
        self.ends = np.cumsum(self.slices)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, item: int) -> tuple[int, int]:
        """(volume number, slice number) of pool slice `item`."""
        if not 0 <= item < len(self):
            raise IndexError(item)
        volume = int(np.searchsorted(self.ends, item, side="right"))
        start = int(self.ends[volume - 1]) if volume else 0
        return volume, item - start

    def summary(self) -> dict:
        return {
            "sources": self.sources,
            "volumes": len(self.volumes),
            "slices": len(self),
            "skipped_files": self.bad,
            "index": str(self.index_path) if self.index_path else None,
            "cases": sorted({case_of(v) for v in self.volumes}),
            "excluded_cases": [] if self.held_out.included else list(self.held_out.cases),
            "include_test_cases": self.held_out.included,
            # the test cases read (cpt.include_test_cases=true), under any of their names
            "included_test_cases": sorted({c for v in self.volumes if (c := self.held_out.test_case_of(v))}),
        }


def _load_index(path: Path | None) -> dict:
    if path is None or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("Ignoring unreadable pool index %s; it will be rebuilt.", path)
        return {}
    if data.get("version") != INDEX_VERSION:
        return {}
    return dict(data.get("entries", {}))


def _probe_entry(volume: Volume, signature: list) -> dict:
    try:
        facts = probe(volume)
        stats = volume_stats(volume)
        return {"sig": signature, "shape": facts["shape"], "slices": facts["slices"], "stats": stats, "error": None}
    except ReadError as err:
        return {"sig": signature, "error": str(err)}


def build_pool(
    sources: Iterable,
    skip_bad_files: bool = False,
    index_path: Path | None = None,
    workers: int = 8,
    held_out: HeldOut = NOTHING_HELD_OUT,
) -> SlicePool:
    """Scan and index every source, leaving out the `held_out` test cases; SamoraError on unreadable files
    (unless skipped) or an empty pool."""
    sources = [source_dict(s, i) for i, s in enumerate(sources)]
    if not sources:
        raise SamoraError("No CPT sources: set cpt.sources (a list of {path, format, intensity}) or a dataset.")
    index_path = Path(index_path) if index_path else None
    entries = _load_index(index_path)
    volumes: list[Volume] = []
    bad: dict[str, str] = {}
    for source in sources:
        found, errors = scan_source(source, entries)
        volumes.extend(v for v in found if not held_out.leaves_out(v))
        bad.update({path: why for path, why in errors.items() if not _in_held_out_case(path, held_out)})
    if held_out.cases and not held_out.included:
        _refuse_test_patients(volumes, held_out)
        log.info("CPT pool: the %d test cases of %s are left out.", len(held_out.cases), held_out.root)

    records: dict[str, dict] = {}
    todo: list[tuple[Volume, list]] = []
    for volume in volumes:
        try:
            signature = volume.signature()
        except OSError as err:
            records[volume.cache_key] = {"sig": None, "error": f"{type(err).__name__}: {err}"}
            continue
        cached = entries.get(volume.cache_key)
        if cached and cached.get("sig") == signature:
            records[volume.cache_key] = cached
        else:
            todo.append((volume, signature))
    if todo:
        log.info("Indexing %d new or changed files of the CPT pool.", len(todo))
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            for (volume, _), record in zip(todo, pool.map(lambda item: _probe_entry(*item), todo)):
                records[volume.cache_key] = record

    good, slices, stats = [], [], []
    for volume in volumes:
        record = records[volume.cache_key]
        if record.get("error"):
            bad[_display(volume)] = record["error"]
            continue
        good.append(volume)
        slices.append(record["slices"])
        stats.append(record.get("stats"))

    if index_path is not None and is_rank_zero():
        entries.update(records)
        try:
            atomic_write_text(index_path, json.dumps({"version": INDEX_VERSION, "entries": entries}))
        except OSError as err:
            log.warning("Could not write the pool index %s (%s); indexing will repeat next time.", index_path, err)

    listed = "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items())[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if bad and not skip_bad_files:
        raise SamoraError(
            f"{len(bad)} file(s) of the CPT pool cannot be read:\n{listed}{more}\n"
            "Fix or remove them, or set cpt.skip_bad_files=true to pre-train without them."
        )
    if bad:
        warnings.warn(
            f"Skipping {len(bad)} unreadable file(s) of the CPT pool (cpt.skip_bad_files=true):\n{listed}{more}",
            stacklevel=2,
        )
    pool = SlicePool(good, slices, stats, bad, index_path, sources, held_out)
    if len(pool) == 0:
        paths = ", ".join(f"{s['path']} ({s['format']})" for s in sources)
        raise SamoraError(
            f"The CPT pool is empty: no readable slices in {paths}. "
            "Point cpt.sources at folders of images (npz, h5, nii/nii.gz, mhd, dicom, png)."
        )
    return pool


def _refuse_test_patients(volumes: list[Volume], held_out: HeldOut) -> None:
    """A test patient outside the dataset's folder (a copy, the raw release) is refused, not left out: the
    user decides whether the name match is that patient (remove it) or a transductive run (opt in)."""
    found = [(_display(v), case) for v in volumes if (case := held_out.test_case_of(v)) is not None]
    if not found:
        return
    listed = "\n".join(f"  {path}: test case {case}" for path, case in found[:MAX_LISTED])
    more = f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    raise SamoraError(
        f"{len(found)} file(s) of the CPT pool belong to test cases of {held_out.dataset} at {held_out.root} "
        f"(the patients fine-tuning evaluates, here under another name or folder):\n{listed}{more}\n"
        "Remove them from cpt.sources (rename them if they are other patients that only share the name), or set "
        "cpt.include_test_cases=true to pre-train on the test images on purpose (transductive; the results then "
        "say so)."
    )


def _in_held_out_case(path: str, held_out: HeldOut) -> bool:
    """An unreadable file (or DICOM folder) of a left-out test case is not reported: it is not read."""
    return held_out.leaves_out(Volume(path=str(path), reader="dicom" if Path(path).is_dir() else "file"))


def _display(volume: Volume) -> str:
    return f"{volume.path} (series {volume.series})" if volume.series else volume.path


# ------------------------------------------------------------------------------------ dataset and module


class UnlabeledSlices(Dataset):
    """Pool slices as float32 [1, H, W] in [0, 1], passed through `transform` (e.g. two SSL views)."""

    def __init__(
        self,
        pool: SlicePool,
        transform: Callable | None = None,
        cache_volumes: int = 2,
        skip_bad_files: bool = False,
    ):
        self.pool = pool
        self.transform = transform
        self.cache = VolumeCache(cache_volumes)
        self.skip_bad_files = skip_bad_files
        self._warned = set()

    def __len__(self) -> int:
        return len(self.pool)

    def slice(self, item: int) -> torch.Tensor:
        number, index = self.pool.locate(item)
        volume = self.pool.volumes[number]
        raw = read_slice(volume, index, self.cache)
        scaled = intensity(raw, volume.intensity, self.pool.stats[number])
        return torch.from_numpy(np.ascontiguousarray(scaled))[None]

    def __getitem__(self, item: int):
        for _attempt in range(10):
            try:
                image = self.slice(item)
                break
            except ReadError as err:
                number, index = self.pool.locate(item)
                where = _display(self.pool.volumes[number])
                if not self.skip_bad_files:
                    raise SamoraError(
                        f"Cannot read slice {index} of {where}: {err}. Fix or remove the file, "
                        "or set cpt.skip_bad_files=true."
                    ) from err
                if where not in self._warned:
                    self._warned.add(where)
                    warnings.warn(f"Skipping unreadable slice {index} of {where}: {err}", stacklevel=2)
                item = (item + 1) % len(self.pool)
        else:
            raise SamoraError("Ten consecutive slices of the CPT pool could not be read; check the files named above.")
        return self.transform(image) if self.transform is not None else image


class UnlabeledDataModule(L.LightningDataModule):
    """Training batches from the unlabeled pool; Lightning adds the DistributedSampler under DDP."""

    def __init__(
        self,
        sources: Iterable | None = None,
        transform: Callable | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        skip_bad_files: bool = False,
        index_path: Path | None = None,
        cache_volumes: int = 2,
        pool: SlicePool | None = None,
        drop_last: bool = True,
        held_out: HeldOut = NOTHING_HELD_OUT,
    ):
        super().__init__()
        if pool is None and sources is None:
            raise ValueError("give either sources or an already built pool")
        self.sources = list(sources) if sources is not None else None
        self.transform = transform
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.skip_bad_files = skip_bad_files
        self.index_path = index_path
        self.cache_volumes = cache_volumes
        self.pool = pool
        self.drop_last = drop_last
        self.held_out = held_out
        self.dataset: UnlabeledSlices | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pool is None:
            self.pool = build_pool(self.sources, self.skip_bad_files, self.index_path, held_out=self.held_out)
        if self.drop_last and len(self.pool) < self.batch_size:
            raise SamoraError(
                f"The CPT pool has {len(self.pool)} slices, fewer than one batch ({self.batch_size}); "
                "add images or lower the teacher's batch_size."
            )
        if self.dataset is None:
            self.dataset = UnlabeledSlices(self.pool, self.transform, self.cache_volumes, self.skip_bad_files)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        # under DDP the DistributedSampler, already at the epoch about to run (data_modules/labelled/sampling.py)
        sampler = training_sampler(self.dataset, self.trainer)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            # fresh workers every epoch, seeded from the main process's generator, which every checkpoint
            # keeps (callbacks.RandomState): persistent workers would carry their own generators across epochs,
            # which no checkpoint holds, so a resumed run would draw other views, masks and noise
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
