"""PROMISE12 prostate MRI (the training release), read exactly:

    <root>/CaseNN.mhd + CaseNN.raw                       T2-weighted image, NN = 00..49
    <root>/CaseNN_segmentation.mhd + .raw                prostate mask, 0/1
    <root>/lists/train.txt, <root>/lists/test.txt        optional: case names (`Case00`), one per line

The default split is the common few-shot one (docs/method.md, section Data formats): test cases
12 13 16 20 23 28 34 35 43 49, training every other case in the root. The two list files override it
(`make prepare DATA=promise12` writes them; `list_dir` points elsewhere). Volumes keep the files' geometry:
spacing (mm, along D, H, W), origin and direction. Intensity: per volume, clipped to the 0.5 / 99.5
percentiles then min-max to [0, 1] (`intensity=`, see `data_modules.labelled.volumes`).
"""

from __future__ import annotations

import re
from pathlib import Path

from data_modules.labelled.volumes import CaseSplit, FilePairReader, VolumeDataModule

PROMISE12_TEST = tuple(f"Case{n:02d}" for n in (12, 13, 16, 20, 23, 28, 34, 35, 43, 49))
CASE_FILE = re.compile(r"Case\d+\.mhd")


class PromiseReader(FilePairReader):
    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def files(self, case: str) -> tuple[Path, Path]:
        return self.folder / f"{case}.mhd", self.folder / f"{case}_segmentation.mhd"


class Promise12DataModule(VolumeDataModule):
    """PROMISE12, K = 1: prostate. `list_dir` overrides `<root>/lists` (train.txt, test.txt)."""

    title = "PROMISE12"
    layout = "CaseNN.mhd/.raw and CaseNN_segmentation.mhd/.raw, optionally lists/train.txt and lists/test.txt"
    num_classes = 1
    class_names = ["prostate"]
    list_files = ("train.txt", "test.txt")
    default_list_dir = "lists"

    def make_reader(self) -> PromiseReader:
        return PromiseReader(self.root)

    def default_split(self) -> CaseSplit:
        found = sorted(p.stem for p in self.root.iterdir() if CASE_FILE.fullmatch(p.name))
        train = [c for c in found if c not in PROMISE12_TEST]
        return CaseSplit(
            train,
            list(PROMISE12_TEST),
            f"the default PROMISE12 split of {self.root} (test: {' '.join(PROMISE12_TEST)})",
        )
