"""`samora prepare`: turn a public raw download into the layout a data module reads.

The layouts are those of docs/method.md, section Data formats.

- synapse: RAW holds `img/img00XX.nii.gz` + `label/label00XX.nii.gz` (the release's `RawData/Training`);
  OUT gets TransUNet's layout, `train_npz/`, `test_vol_h5/`, `lists/lists_Synapse/`.
- promise12: RAW holds `CaseNN.mhd/.raw` + `CaseNN_segmentation.mhd/.raw` in any sub-folders; OUT gets the
  same files in one folder (geometry kept) and `lists/train.txt` + `lists/test.txt`.
- la: RAW holds `2018LA_Seg_Training Set/<ID>/mri_norm2.h5` and maybe `train.list` + `test.list`; OUT gets
  the same layout (hard links where possible, else copies), the lists when RAW has them, and `index.json`.

Synapse follows TransUNet's preprocessing: the NIfTI array in (D, H, W) order (nibabel's transposed (2, 1, 0),
which is SimpleITK's), CT clipped to [-125, 275] then (x + 125) / 400, the 13 organ ids mapped to 8, every
slice of a training case as one npz and each of the 12 test cases as one h5, all float32.

Each case is a unit. Every unit is planned from file headers first, so a missing label or a label whose shape
differs from its image stops the run before anything is written. `OUT/prepare.json` records the source, each
unit's source files (size, mtime) and output files; a second run rewrites only the units whose sources
changed (none: nothing is written), and removes what an earlier preparation wrote and this one does not.
OUT must be new, empty, or an earlier preparation of the same dataset from the same RAW; anything else is
refused unless overwrite=true, which also rewrites every unit (files no preparation wrote are never touched).
Files are written atomically, and prepare.json names the planned files before the first is written, so an
interrupted run resumes instead of being refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_modules.io.readers import intensity as scale_intensity
from data_modules.io.volume_io import open_h5, read_h5, read_image, read_shape, write_image
from data_modules.labelled.base import label_problems
from data_modules.labelled.la import LA_FILE, LA_FIX, LA_FOLDER, LA_NEEDS, LADataModule
from data_modules.labelled.promise12 import CASE_FILE, PROMISE12_TEST, Promise12DataModule
from data_modules.labelled.synapse import SYNAPSE_TEST_CASES
from data_modules.prepare.colin27 import plan_colin27
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "prepare.json"
VERSION = 1
# BTCV organ ids -> TransUNet's 8 classes; 5 oesophagus, 9 IVC, 10 portal/splenic vein, 12, 13 adrenals -> 0
SYNAPSE_LABELS = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
# the 13 organ ids of the raw release (BTCV), 1..13 in this order
SYNAPSE_RAW_NAMES = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
SYNAPSE_IMAGE = re.compile(r"img(\d+)\.nii(\.gz)?")
SYNAPSE_LABEL = re.compile(r"label(\d+)\.nii(\.gz)?")
BINARY_HINT = "this dataset's masks must be 0 (background) or 1"


@dataclass
class Unit:
    """One case: the source files it reads, the files it writes (relative to OUT) and how."""

    key: str
    sources: list
    files: list
    write: Callable[[Path], None]


@dataclass
class Plan:
    units: list
    texts: dict  # small files derived from the plan (lists, index): relative path -> content
    counts: dict = field(default_factory=dict)  # what the layout holds, for the summary


# ------------------------------------------------------------------------------------------ helpers


def _walk(root: Path, skip: Path) -> Iterator[tuple[Path, list, list]]:
    """os.walk in sorted order, without hidden entries and without the `skip` folder (OUT inside RAW)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() != skip)
        yield Path(folder), dirs, sorted(f for f in files if not f.startswith("."))


def _check_label(label: np.ndarray, path: Path, class_names, hint: str) -> None:
    """The data modules' label check, on the raw label (an empty one is left to the data module)."""
    problems = label_problems(label, class_names, hint) if label.size else []
    if problems:
        raise SamoraError(f"{path}: " + "; ".join(problems))


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _save_h5(path: Path, **arrays) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        for key, array in arrays.items():
            handle.create_dataset(key, data=array, compression="gzip", compression_opts=1)


def _link_or_copy(source: Path, path: Path) -> None:
    """A hard link to `source` (no extra space) where the file system allows it, else a copy."""
    with atomic_path(path) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


# ------------------------------------------------------------------------------------------ synapse


def synapse_labels(label: np.ndarray, path: Path) -> np.ndarray:
    """Raw organ ids 0..13 -> TransUNet's 0..8 (float32); any other value is an error naming the file."""
    _check_label(label, path, SYNAPSE_RAW_NAMES, f"Synapse's raw labels are organ ids 0..{len(SYNAPSE_RAW_NAMES)}")
    table = np.zeros(len(SYNAPSE_RAW_NAMES) + 1, np.float32)
    for raw_id, class_id in SYNAPSE_LABELS.items():
        table[raw_id] = class_id
    return table[np.rint(label).astype(np.int64)]


def _synapse_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image, _ = read_image(image_path, "image")
    label, _ = read_image(label_path, "label")
    return scale_intensity(image, "ct_window"), synapse_labels(label, label_path)


def _write_synapse_train(image_path: Path, label_path: Path, case: str) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        image, label = _synapse_case(image_path, label_path)
        for z in range(image.shape[0]):
            _save_npz(out / "train_npz" / f"{case}_slice{z:03d}.npz", image=image[z], label=label[z])

    return write


def _write_synapse_test(image_path: Path, label_path: Path, case: str) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        image, label = _synapse_case(image_path, label_path)
        _save_h5(out / "test_vol_h5" / f"{case}.npy.h5", image=image, label=label)

    return write


def _synapse_folders(raw: Path, skip: Path) -> tuple[Path, Path]:
    pairs = [
        (folder / "img", folder / "label") for folder, dirs, _ in _walk(raw, skip) if "img" in dirs and "label" in dirs
    ]
    if not pairs:
        raise SamoraError(
            f"{raw}: no 'img' folder with a 'label' folder beside it; Synapse's raw release has "
            "RawData/Training/img/img00XX.nii.gz and RawData/Training/label/label00XX.nii.gz: point "
            "RAW at the download"
        )
    if len(pairs) > 1:
        raise SamoraError(
            f"{raw}: several img/label folder pairs ({', '.join(str(p[0].parent) for p in pairs)}); "
            "point RAW at the one to prepare"
        )
    return pairs[0]


def plan_synapse(raw: Path, skip: Path) -> Plan:
    img_dir, label_dir = _synapse_folders(raw, skip)
    labels = {int(m.group(1)): p for p in label_dir.iterdir() if (m := SYNAPSE_LABEL.fullmatch(p.name))}
    images = {int(m.group(1)): p for p in img_dir.iterdir() if (m := SYNAPSE_IMAGE.fullmatch(p.name))}
    if not images:
        raise SamoraError(f"{img_dir}: no img00XX.nii.gz files (Synapse's raw release)")
    units, train, test = [], [], []
    for number, image_path in sorted(images.items()):
        case = f"case{number:04d}"
        label_path = labels.get(number)
        if label_path is None:
            raise SamoraError(f"{image_path}: no label file for it in {label_dir} (expected label{number:04d}.nii.gz)")
        shape, label_shape = read_shape(image_path, "image"), read_shape(label_path, "label")
        if shape != label_shape:
            raise SamoraError(
                f"{label_path}: label shape {label_shape} differs from the image's {shape} "
                f"({image_path}); image and label must be voxel-aligned"
            )
        if case in SYNAPSE_TEST_CASES:
            test.append(case)
            units.append(
                Unit(
                    case,
                    [image_path, label_path],
                    [f"test_vol_h5/{case}.npy.h5"],
                    _write_synapse_test(image_path, label_path, case),
                )
            )
        else:
            names = [f"{case}_slice{z:03d}" for z in range(shape[0])]
            train += names
            units.append(
                Unit(
                    case,
                    [image_path, label_path],
                    [f"train_npz/{n}.npz" for n in names],
                    _write_synapse_train(image_path, label_path, case),
                )
            )
    if not test or len(test) == len(units):
        raise SamoraError(
            f"{img_dir}: {len(test)} of {len(units)} cases are Synapse test cases "
            f"({', '.join(SYNAPSE_TEST_CASES)}); the fixed split needs both test and training cases"
        )
    texts = {
        "lists/lists_Synapse/train.txt": "".join(f"{n}\n" for n in train),
        "lists/lists_Synapse/test_vol.txt": "".join(f"{c}\n" for c in test),
    }
    counts = {"training cases": len(units) - len(test), "training slices": len(train), "test volumes": len(test)}
    return Plan(units, texts, counts)


# ------------------------------------------------------------------------------------------ promise12


def _write_promise12(image_path: Path, label_path: Path, case: str) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        image, geometry = read_image(image_path, "image")
        label, label_geometry = read_image(label_path, "label")
        _check_label(label, label_path, Promise12DataModule.class_names, BINARY_HINT)
        write_image(out / f"{case}.mhd", image, geometry)
        write_image(out / f"{case}_segmentation.mhd", label, label_geometry)

    return write


def plan_promise12(raw: Path, skip: Path) -> Plan:
    found: dict = {}
    for folder, _, files in _walk(raw, skip):
        for name in files:
            if CASE_FILE.fullmatch(name):
                case = name[: -len(".mhd")]
                if case in found:
                    raise SamoraError(
                        f"{folder / name}: {case} is also at {found[case]}; point RAW at one copy "
                        "of the training release"
                    )
                found[case] = folder / name
    if not found:
        raise SamoraError(
            f"{raw}: no CaseNN.mhd files (PROMISE12's training release: CaseNN.mhd/.raw and "
            "CaseNN_segmentation.mhd/.raw)"
        )
    units = []
    for case, image_path in sorted(found.items()):
        label_path = image_path.with_name(f"{case}_segmentation.mhd")
        if not label_path.is_file():
            raise SamoraError(
                f"{image_path}: no {label_path.name} beside it; the training release has a "
                "segmentation per case (point RAW at the training data only)"
            )
        shape, label_shape = read_shape(image_path, "image"), read_shape(label_path, "label")
        if shape != label_shape:
            raise SamoraError(
                f"{label_path}: label shape {label_shape} differs from the image's {shape} "
                f"({image_path}); image and label must be voxel-aligned"
            )
        sources = [
            p
            for p in (image_path, image_path.with_suffix(".raw"), label_path, label_path.with_suffix(".raw"))
            if p.is_file()
        ]
        files = [f"{case}.mhd", f"{case}.raw", f"{case}_segmentation.mhd", f"{case}_segmentation.raw"]
        units.append(Unit(case, sources, files, _write_promise12(image_path, label_path, case)))
    test = [c for c in PROMISE12_TEST if c in found]
    train = [c for c in sorted(found) if c not in test]
    texts = {"lists/train.txt": "".join(f"{c}\n" for c in train), "lists/test.txt": "".join(f"{c}\n" for c in test)}
    return Plan(units, texts, {"training cases": len(train), "test cases": len(test)})


# ------------------------------------------------------------------------------------------ la


def _la_shape(path: Path) -> tuple:
    """Shape of a case from its h5 header, after checking keys and shapes."""
    with open_h5(path, "", LA_NEEDS, LA_FIX) as handle:
        shape, label_shape = handle["image"].shape, handle["label"].shape
    if len(shape) != 3 or shape != label_shape:
        raise SamoraError(
            f"{path}: image shape {shape} and label shape {label_shape}; both must be the same 3-D (W, H, D) shape"
        )
    return tuple(int(s) for s in shape)


def _write_la(source: Path, relative: str) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        with open_h5(source, "", LA_NEEDS, LA_FIX) as handle:
            image, label = read_h5(handle, "image", fix=LA_FIX), read_h5(handle, "label", fix=LA_FIX)
        if not np.isfinite(image).all():
            raise SamoraError(f"{source}: image contains NaN or Inf values")
        _check_label(label, source, LADataModule.class_names, BINARY_HINT)
        _link_or_copy(source, out / relative)

    return write


def _la_lists(folders: list, cases: set) -> dict:
    """train.list / test.list from the first folder that has either, checked against the cases found."""
    for folder in folders:
        paths = [folder / "train.list", folder / "test.list"]
        if not any(p.is_file() for p in paths):
            continue
        texts = {}
        for path in paths:
            if not path.is_file():
                raise SamoraError(f"{path} is missing but its partner list is there; LA's split needs both lists")
            text = path.read_text()
            unknown = [n for n in (line.strip() for line in text.splitlines()) if n and n not in cases]
            if unknown:
                raise SamoraError(f"{path} names cases that are not in the data: {', '.join(unknown[:5])}")
            texts[path.name] = text
        return texts
    return {}


def plan_la(raw: Path, skip: Path) -> Plan:
    roots = [raw] if raw.name == LA_FOLDER else []
    roots += [folder / LA_FOLDER for folder, dirs, _ in _walk(raw, skip) if LA_FOLDER in dirs]
    if len(roots) != 1:
        found = f"{len(roots)} '{LA_FOLDER}' folders ({', '.join(map(str, roots))})" if roots else f"no '{LA_FOLDER}'"
        raise SamoraError(
            f"{raw}: {found}; RAW must hold exactly one (UA-MT's layout: '{LA_FOLDER}/<ID>/{LA_FILE}', note the space)"
        )
    root = roots[0]
    cases = sorted(p.name for p in root.iterdir() if (p / LA_FILE).is_file())
    if not cases:
        raise SamoraError(f"{root}: no <ID>/{LA_FILE} files")
    units, index = [], {}
    for case in cases:
        source, relative = root / case / LA_FILE, f"{LA_FOLDER}/{case}/{LA_FILE}"
        index[case] = list(_la_shape(source))
        units.append(Unit(case, [source], [relative], _write_la(source, relative)))
    texts = _la_lists([root.parent, raw], set(cases))
    texts["index.json"] = json.dumps(index, indent=1) + "\n"
    lists = "train.list + test.list" if len(texts) > 1 else "none (the data module makes a seeded split)"
    return Plan(units, texts, {"cases": len(cases), "lists": lists})


PLANNERS = {"synapse": plan_synapse, "promise12": plan_promise12, "la": plan_la, "colin27": plan_colin27}
# prepare.source -> the data.name whose layout it writes (sources other than a dataset's own download)
SOURCES = {"colin27": "generic"}


# ------------------------------------------------------------------------------------------ running a plan


def _signature(unit: Unit, raw: Path) -> list:
    return [[str(p.relative_to(raw)), p.stat().st_size, p.stat().st_mtime_ns] for p in unit.sources]


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _written_by(manifest: dict) -> set:
    units = manifest.get("units") or {}
    return {f for record in units.values() for f in record.get("files", [])} | set(manifest.get("texts") or [])


def _previous(out: Path, name: str, raw: Path, overwrite: bool) -> dict:
    """What an earlier preparation left in OUT; refuses a folder that holds anything else (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise SamoraError(f"{out} is a file; OUT must be a folder (new, empty, or prepared earlier)")
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
    manifest = _read_manifest(out)
    if not present or overwrite:
        return manifest
    if manifest.get("dataset") != name or manifest.get("source") != str(raw):
        what = (
            f"{manifest.get('dataset')} prepared from {manifest.get('source')}"
            if manifest
            else f"files that `samora prepare` did not write (no readable {MANIFEST})"
        )
        raise SamoraError(
            f"{out} already holds {what}; choose another OUT (an empty or new folder), or add "
            "overwrite=true to prepare into it anyway"
        )
    foreign = [f for f in present if f not in _written_by(manifest) | {MANIFEST}]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise SamoraError(
            f"{out} holds files this preparation did not write ({', '.join(foreign[:5])}{more}); "
            "move them away, choose another OUT, or add overwrite=true"
        )
    return manifest


def _write_manifest(out: Path, name: str, raw: Path, units: dict, plan: Plan, status: str) -> None:
    manifest = {
        "format": "samora prepare",
        "version": VERSION,
        "dataset": name,
        "source": str(raw),
        "status": status,
        "counts": plan.counts,
        "texts": sorted(plan.texts),
        "units": units,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def prepare(name: str, raw, out, overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare dataset `name` from the download `raw` into `out`; returns a summary of what was written."""
    if name not in PLANNERS:
        raise SamoraError(
            f"`samora prepare` knows {', '.join(sorted(PLANNERS))}, not data.name={name!r} (the demo "
            "writes itself; the generic layout is read as it is)"
        )
    raw, out = Path(raw).expanduser().resolve(), Path(out).expanduser().resolve()
    if not raw.is_dir():
        raise SamoraError(f"{raw}: RAW (prepare.raw) must be the folder of the {name} download")
    if out == raw or raw.is_relative_to(out):
        raise SamoraError(f"OUT ({out}) must not be RAW or a folder holding it; choose a new folder")
    plan = PLANNERS[name](raw, out)
    previous = _previous(out, name, raw, overwrite)
    reusable = previous.get("units", {}) if (previous.get("version") == VERSION and not overwrite) else {}
    records, todo = {}, []
    for unit in plan.units:
        record = {"sources": _signature(unit, raw), "files": unit.files}
        if reusable.get(unit.key) == record and all((out / f).is_file() for f in unit.files):
            records[unit.key] = record
        else:
            records[unit.key] = {"sources": None, "files": unit.files}  # ours, not yet written
            todo.append((unit, record))
    texts = {
        rel: text for rel, text in plan.texts.items() if not (out / rel).is_file() or (out / rel).read_text() != text
    }
    stale = sorted(_written_by(previous) - {f for u in plan.units for f in u.files} - set(plan.texts))
    summary = {
        "dataset": name,
        "source": str(raw),
        "out": str(out),
        "cases": len(plan.units),
        "cases_written": len(todo),
        "files_written": sum(len(u.files) for u, _ in todo) + len(texts),
        "files_removed": len(stale),
        **plan.counts,
    }
    if not todo and not texts and not stale and previous.get("status") == "complete":
        log.info("prepare %s: %s is up to date with %s (%d cases); nothing written.", name, out, raw, len(plan.units))
        return summary

    from samora_pl.training.progress import track

    out.mkdir(parents=True, exist_ok=True)
    for rel in stale:  # written by an earlier preparation and no longer part of this one
        (out / rel).unlink(missing_ok=True)
    _write_manifest(out, name, raw, records, plan, "incomplete")
    for unit, record in track(todo, f"prepare {name}", "case") if progress else todo:
        unit.write(out)
        records[unit.key] = record
    for rel, text in texts.items():
        atomic_write_text(out / rel, text)
    _write_manifest(out, name, raw, records, plan, "complete")
    counts = ", ".join(f"{k}: {v}" for k, v in plan.counts.items())
    log.info(
        "prepare %s: wrote %d files (%d of %d cases, %d list/index files)%s to %s: %s. Check it with "
        "`samora check data.name=%s data.dir=%s`.",
        name,
        summary["files_written"],
        len(todo),
        len(plan.units),
        len(texts),
        f", removed {len(stale)} stale" if stale else "",
        out,
        counts,
        SOURCES.get(name, name),
        out,
    )
    return summary


def run(dataset: str, raw: str | None, out: str, source: str | None = None, overwrite: bool = False) -> dict:
    """`samora prepare`: `raw` (prepare.raw) of `dataset` (data.name), or of `source` (prepare.source), into the
    layout at `out` (prepare.out, default data.dir)."""
    if not raw:
        raise SamoraError(
            f"prepare.raw (RAW) is missing: give the folder of the {dataset} download, e.g. "
            f"`make prepare DATA={dataset} RAW=/downloads/{dataset} OUT=data/{dataset}`"
        )
    if source and dataset != SOURCES.get(source, dataset):
        raise SamoraError(
            f"prepare.source={source} writes the {SOURCES[source]} layout; "
            f"set data.name={SOURCES[source]} (DATA={SOURCES[source]}), not {dataset}"
        )
    return prepare(source or dataset, raw, out, overwrite=overwrite)
