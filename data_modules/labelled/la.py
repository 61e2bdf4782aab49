"""2018 Left Atrium (LA) MRI as distributed with UA-MT, read exactly:

    <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5   (note the space) datasets `image` (float32,
                                                       z-scored per volume) and `label` (uint8, 0/1),
                                                       shape (W, H, D) with D = 88
    <root>/train.list, <root>/test.list                 IDs, one per line (80 / 20); `list_dir` moves them

Axes: the h5 arrays are (W, H, D) and slices are taken along the last axis. Here volumes are (D, H, W), the
stored array transposed (2, 1, 0) as Synapse's preprocessing does with NIfTI, so slice `<ID>_slice<zzz>` is
`image[:, :, zzz].T`. The h5 files store no geometry: unit spacing, identity direction.

Without the two lists a seeded 80/20 split by case is used (with a warning: its numbers do not compare with
published ones) and written as train.list / test.list to the run's split folder. Intensity: the z-scores
are mapped to [0, 1] per volume, by default clipped to the volume's 0.5 / 99.5 percentiles then min-max
(`intensity=`, see `data_modules.labelled.volumes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_modules.io.volume_io import Geometry, open_h5, read_h5
from data_modules.labelled.volumes import CaseReader, CaseSplit, RawCase, VolumeDataModule
from samora_pl.errors import SamoraError

log = logging.getLogger(__name__)

LA_FOLDER = "2018LA_Seg_Training Set"
LA_FILE = "mri_norm2.h5"


# what an LA h5 file must hold, and how to replace a damaged one (the release is the only source)
LA_NEEDS, LA_FIX = "LA cases need 'image' and 'label'", "copy it again"


class LAReader(CaseReader):
    """`<folder>/<ID>/mri_norm2.h5`, read whole or one slice at a time."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def path(self, case: str) -> Path:
        return self.folder / case / LA_FILE

    def _open(self, case: str):
        path = self.path(case)
        f = open_h5(path, f": LA case {case} should be there (UA-MT layout)", LA_NEEDS, LA_FIX)
        problem = None
        if len(f["image"].shape) != 3:
            problem = f"image has shape {f['image'].shape}, expected (W, H, D)"
        elif f["image"].shape != f["label"].shape:
            problem = f"image shape {f['image'].shape} and label shape {f['label'].shape} differ"
        if problem:
            f.close()
            raise SamoraError(f"{path}: {problem}")
        return f

    def depth(self, case: str) -> int:
        with self._open(case) as f:
            return int(f["image"].shape[-1])

    def read(self, case: str) -> RawCase:
        with self._open(case) as f:
            image, label = read_h5(f, "image", fix=LA_FIX), read_h5(f, "label", fix=LA_FIX)
        path = self.path(case)
        return RawCase(image.transpose(2, 1, 0), label.transpose(2, 1, 0), Geometry(), path, path)

    def read_slice(self, case: str, z: int) -> tuple[np.ndarray, np.ndarray]:
        sel = (slice(None), slice(None), int(z))
        with self._open(case) as f:
            return read_h5(f, "image", sel, LA_FIX).T, read_h5(f, "label", sel, LA_FIX).T


class LADataModule(VolumeDataModule):
    """LA (UA-MT layout), K = 1: left atrium. `list_dir` overrides where train.list / test.list are."""

    title = "LA"
    layout = f"'{LA_FOLDER}/<ID>/{LA_FILE}' and train.list / test.list, as distributed with UA-MT"
    num_classes = 1
    class_names = ["left atrium"]
    list_files = ("train.list", "test.list")
    default_list_dir = "."

    def make_reader(self) -> LAReader:
        return LAReader(self.root / LA_FOLDER)

    def default_split(self) -> CaseSplit:
        folder = self.root / LA_FOLDER
        if not folder.is_dir():
            raise SamoraError(
                f"{folder} does not exist: LA cases go there as <ID>/{LA_FILE} (UA-MT layout; note "
                "the space in the folder name)"
            )
        cases = [p.name for p in folder.iterdir() if (p / LA_FILE).is_file()]
        log.warning(
            "LA: no train.list / test.list in %s; using a seeded split by case, whose numbers do not "
            "compare with published ones",
            self.root,
        )
        return self.seeded_split(cases, folder)
