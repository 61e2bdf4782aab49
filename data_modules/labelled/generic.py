"""Any labelled dataset in the Medical Segmentation Decathlon / nnU-Net layout:

    <root>/dataset.json               `labels` maps ids to names, MSD style {"0": "background", "1": "liver"}
                                      or nnU-Net v2 style {"background": 0, "liver": 1}; ids 0..K, 0 background
    <root>/imagesTr/<case>.nii.gz     or <case>_0000.nii.gz (nnU-Net's channel 0; other channels are unused)
    <root>/labelsTr/<case>.nii.gz
    <root>/imagesTs/ + labelsTs/      optional labelled test set (MSD's imagesTs has no labels: not used)

Any format SimpleITK reads works (.nii.gz, .nii, .mhd, .mha); hidden files (macOS `._*`) are skipped.
Test cases are those of imagesTs when labelsTs exists, else a seeded 80/20 split by case of imagesTr,
written as train.txt / test.txt to the run's split folder; `list_dir` with train.txt / test.txt overrides
both. Intensity default: `ct_window` when dataset.json says channel 0 is CT (MSD `modality`, nnU-Net v2
`channel_names`), else `mr_percentile`. Volumes keep the files' geometry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_modules.io.volume_io import has_image_suffix, strip_image_suffix
from data_modules.labelled.volumes import CaseSplit, FilePairReader, VolumeDataModule
from samora_pl.errors import SamoraError

CHANNEL = re.compile(r"(.+)_(\d{4})")


def read_dataset_json(path: Path) -> tuple[list, str]:
    """(foreground class names for ids 1..K, name of channel 0) from a MSD or nnU-Net v2 dataset.json."""
    if not path.is_file():
        raise SamoraError(
            f'{path} does not exist: the generic layout needs a dataset.json whose "labels" map '
            "ids to names, as the Medical Segmentation Decathlon and nnU-Net write it"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SamoraError(f"{path} cannot be read as JSON ({err}); fix the file") from None
    labels = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise SamoraError(f'{path} has no "labels" mapping; add one, e.g. {{"0": "background", "1": "liver"}}')
    names = {}
    for key, value in labels.items():
        if str(key).strip().isdigit():  # MSD: "1": "liver"
            label_id, name = int(key), str(value)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: "liver": 1
            label_id, name = value, str(key)
        else:
            raise SamoraError(
                f'{path}: label entry "{key}": {json.dumps(value)} is neither "id": "name" (MSD) '
                'nor "name": id (nnU-Net v2); region labels (lists of ids) are not supported'
            )
        if label_id in names:
            raise SamoraError(f"{path}: label id {label_id} is given twice ({names[label_id]}, {name})")
        names[label_id] = name
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise SamoraError(f"{path}: label ids {sorted(names)} must run 0..K without gaps (0 background, K >= 1)")
    channels = info.get("channel_names") or info.get("modality") or {}
    channel0 = str(channels.get("0", "")) if isinstance(channels, dict) else ""
    return [names[i] for i in range(1, len(names))], channel0


def find_cases(images: Path, labels: Path) -> dict:
    """case -> (image file, label file) of an images folder; the label file may not exist (found on reading)."""
    if not images.is_dir():
        raise SamoraError(
            f"{images} does not exist: the generic layout keeps images there (<case>.nii.gz or <case>_0000.nii.gz)"
        )
    label_files = {}
    if labels.is_dir():
        label_files = {
            strip_image_suffix(p.name): p
            for p in labels.iterdir()
            if not p.name.startswith(".") and has_image_suffix(p.name)
        }
    pairs: dict = {}
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not has_image_suffix(path.name):
            continue
        case = strip_image_suffix(path.name)
        suffix = path.name[len(case) :]
        channel = CHANNEL.fullmatch(case)
        if case not in label_files and channel and channel.group(1) in label_files:
            if channel.group(2) != "0000":
                continue  # another channel of an nnU-Net case
            case = channel.group(1)
        if case in pairs:
            raise SamoraError(f"{path} and {pairs[case][0]} are both images of case {case}: keep one")
        pairs[case] = (path, label_files.get(case, labels / f"{case}{suffix}"))
    return pairs


class GenericReader(FilePairReader):
    def __init__(self, pairs: dict, images: Path, labels: Path):
        super().__init__()
        self.pairs = dict(pairs)
        self.images, self.labels = Path(images), Path(labels)

    def files(self, case: str) -> tuple[Path, Path]:
        if case in self.pairs:
            return self.pairs[case]
        return self.images / f"{case}.nii.gz", self.labels / f"{case}.nii.gz"


class GenericDataModule(VolumeDataModule):
    """MSD / nnU-Net layout; K and the class names come from dataset.json. `list_dir` holds train.txt and
    test.txt naming cases of imagesTr (or imagesTs when labelsTs exists)."""

    title = "generic"
    layout = "dataset.json, imagesTr/<case>.nii.gz and labelsTr/<case>.nii.gz (MSD / nnU-Net)"
    list_files = ("train.txt", "test.txt")

    def __init__(self, root, *args, **kwargs):
        super().__init__(root, *args, **kwargs)
        self.class_names, self.channel0 = read_dataset_json(self.root / "dataset.json")
        self.num_classes = len(self.class_names)

    def default_intensity(self) -> str:
        return "ct_window" if self.channel0.strip().upper() == "CT" else "mr_percentile"

    def _has_test_labels(self) -> bool:
        return (self.root / "labelsTs").is_dir() and (self.root / "imagesTs").is_dir()

    def make_reader(self) -> GenericReader:
        pairs = find_cases(self.root / "imagesTr", self.root / "labelsTr")
        if self._has_test_labels():
            test = find_cases(self.root / "imagesTs", self.root / "labelsTs")
            both = sorted(set(pairs) & set(test))
            if both:
                raise SamoraError(
                    f"{self.root}: cases in both imagesTr and imagesTs: {', '.join(both[:10])}; rename them"
                )
            pairs.update(test)
        return GenericReader(pairs, self.root / "imagesTr", self.root / "labelsTr")

    def default_split(self) -> CaseSplit:
        train = list(find_cases(self.root / "imagesTr", self.root / "labelsTr"))
        if self._has_test_labels():
            test = list(find_cases(self.root / "imagesTs", self.root / "labelsTs"))
            return CaseSplit(train, test, f"{self.root / 'imagesTr'} (training) and {self.root / 'imagesTs'} (test)")
        return self.seeded_split(train, self.root / "imagesTr")
