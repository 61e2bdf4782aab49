"""`samora prepare data.name=generic prepare.source=colin27`: real MRI from files a package ships.

Debian's `mricron-data` (and MRIcron itself) ship the Colin27 single-subject T1 template (`ch2.nii.gz`,
181 x 217 x 181 at 1 mm, MNI space) and the AAL atlas (`aal.nii.gz`), which was delineated by hand on
that very brain (Tzourio-Mazoyer et al. 2002), on the same voxel grid. This planner turns the pair into
a small labelled dataset in the generic (Decathlon / nnU-Net) layout, so the framework can be measured
on real MR anatomy that nobody here drew:

- cases are axial slabs of `SLAB` consecutive slices (the generic reader slices along the last NIfTI
  axis, i.e. axially); slabs with no labelled voxel (above the vertex, below the cerebellum) are dropped;
- three classes from AAL's 116 regions: cerebral cortex (AAL 1-70 and 79-90, hippocampus and amygdala
  included), deep grey nuclei (71-78: caudate, putamen, pallidum, thalamus) and cerebellum (91-116,
  vermis included);
- every `TEST_EVERY`-th slab (from `TEST_OFFSET`) goes to imagesTs/labelsTs, so the test slabs cover the
  whole height of the brain and no slice of a test slab is in a training slab (nor in the CPT pool,
  which the generic data module builds from the training cases).

One brain is small: the slabs are parts of one subject, so test slabs share the subject (not the voxels)
with the training slabs. That is the honest limit of what a package ships; docs/results.md says so next
to every number measured on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_modules.io.volume_io import Geometry, read_image, write_image
from samora_pl.errors import SamoraError

T1_FILE, ATLAS_FILE = "ch2.nii.gz", "aal.nii.gz"
SLAB = 8  # slices per case
TEST_EVERY, TEST_OFFSET = 5, 2  # slabs 2, 7, 12, ... are test cases
CLASSES = {  # class id -> (name, AAL ids)
    1: ("cerebral cortex", [*range(1, 71), *range(79, 91)]),
    2: ("deep grey nuclei", list(range(71, 79))),
    3: ("cerebellum", list(range(91, 117))),
}


def colin27_labels(atlas: np.ndarray) -> np.ndarray:
    """AAL region ids -> the three classes above (0 elsewhere), as uint8."""
    lookup = np.zeros(256, dtype=np.uint8)
    for class_id, (_, regions) in CLASSES.items():
        lookup[regions] = class_id
    if atlas.min() < 0 or atlas.max() > 255:
        raise SamoraError(f"AAL ids must lie in 0..255, found {atlas.min()}..{atlas.max()}")
    return lookup[atlas.astype(np.int64)]


def _slab_geometry(geometry: Geometry, start: int) -> Geometry:
    """The geometry of slices start.. of a volume: the origin moves `start` slices along the slice axis."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    step = direction[:, 2] * geometry.spacing[0]  # SimpleITK's z axis is the array's axis 0
    origin = tuple(float(o) for o in np.asarray(geometry.origin) + start * step)
    return Geometry(geometry.spacing, origin, geometry.direction)


def _write_slab(t1: Path, atlas: Path, start: int, image_rel: str, label_rel: str) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        image, geometry = read_image(t1, "Colin27 T1")
        labels = colin27_labels(read_image(atlas, "AAL atlas")[0])
        slab_geometry = _slab_geometry(geometry, start)
        write_image(out / image_rel, image[start : start + SLAB].astype(np.float32), slab_geometry)
        write_image(out / label_rel, labels[start : start + SLAB], slab_geometry)

    return write


def plan_colin27(raw: Path, skip: Path):
    """The generic layout's units (one per slab) and dataset.json, from `ch2.nii.gz` + `aal.nii.gz` in RAW."""
    from data_modules.prepare.raw import Plan, Unit

    t1, atlas = raw / T1_FILE, raw / ATLAS_FILE
    missing = [p.name for p in (t1, atlas) if not p.is_file()]
    if missing:
        raise SamoraError(
            f"{raw}: no {' or '.join(missing)}; RAW must be the MRIcron templates folder (Debian's mricron-data "
            "installs it at /usr/share/mricron/templates)"
        )
    image, _ = read_image(t1, "Colin27 T1")
    labels = colin27_labels(read_image(atlas, "AAL atlas")[0])
    if image.shape != labels.shape:
        raise SamoraError(f"{atlas}: shape {labels.shape} differs from {t1}'s {image.shape}; use MRIcron's pair")
    units, train, test = [], [], []
    starts = [s for s in range(0, image.shape[0] - SLAB + 1, SLAB) if labels[s : s + SLAB].any()]
    for index, start in enumerate(starts):
        case = f"colin27_z{start:03d}"
        split = "Ts" if index % TEST_EVERY == TEST_OFFSET else "Tr"
        (test if split == "Ts" else train).append(case)
        files = [f"images{split}/{case}.nii.gz", f"labels{split}/{case}.nii.gz"]
        units.append(Unit(case, [t1, atlas], files, _write_slab(t1, atlas, start, *files)))
    dataset = {
        "name": "Colin27 AAL slabs",
        "description": f"axial slabs of {SLAB} slices of the Colin27 T1 template with 3 classes from AAL",
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, **{name: class_id for class_id, (name, _) in CLASSES.items()}},
        "numTraining": len(train),
        "file_ending": ".nii.gz",
    }
    texts = {"dataset.json": json.dumps(dataset, indent=2) + "\n"}
    return Plan(units, texts, {"training slabs": len(train), "test slabs": len(test), "slices per slab": SLAB})
