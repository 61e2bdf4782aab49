"""Patient ids from file names, per dataset: the leak check of the CPT pool compares patients, not names.

One patient goes by several names: Synapse/BTCV's case 1 is `case0001` once prepared (TransUNet layout) but
`img0001.nii.gz` / `label0001.nii.gz` in the raw release; PROMISE12's `Case07.mhd` and
`Case07_segmentation.mhd` are one case; an nnU-Net image `<case>_0000.nii.gz` is channel 0 of `<case>`; LA's
volumes are `<ID>/mri_norm2.h5` (UA-MT) or `<ID>/lgemri.nrrd` (the challenge release). Ids are matched
exactly, so `case00011` is not `case0001` and `Case1` is not `Case10`.
"""

import re
from pathlib import PurePath

SYNAPSE = re.compile(r"(?:case|img|label)(\d{4})", re.IGNORECASE)  # BTCV's four-digit ids
PROMISE12 = re.compile(r"case(\d{2})(?:_segmentation)?", re.IGNORECASE)  # Case00 .. Case49
LA_FILES = ("mri_norm2", "lgemri", "laendo")  # a case folder's volume: the folder is the patient
EXTENSIONS = (".npy.h5", ".nii.gz", ".nii", ".mhd", ".mha", ".raw", ".nrrd", ".npz", ".h5", ".hdf5", ".png", ".dcm")
SLICE_SUFFIX = re.compile(r"_slice\d+$", re.IGNORECASE)
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def stem(name: str) -> str:
    """A file name without its (double) extension and `_sliceNNN` suffix."""
    for ext in EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return SLICE_SUFFIX.sub("", name)


def patient_id(dataset: str, name: str) -> str | None:
    """The patient id of one name (a file or folder name, or a case id) under `dataset`'s naming schemes;
    None when the name follows none of them (Synapse, PROMISE12)."""
    base = stem(name)
    if dataset in ("synapse", "demo"):
        match = SYNAPSE.fullmatch(base)
        return match.group(1) if match else None
    if dataset == "promise12":
        match = PROMISE12.fullmatch(base)
        return match.group(1) if match else None
    if dataset == "la":
        return base.upper()
    return base  # generic: the case name itself


def file_patient_ids(dataset: str, path) -> set:
    """Every patient id a pool file may belong to: its own name's, without an nnU-Net channel suffix, and
    its folder's (LA's case folders, a DICOM series' folder, a case folder of slices)."""
    path = PurePath(path)
    names = {path.name, CHANNEL_SUFFIX.sub("", stem(path.name)), path.parent.name}
    if dataset == "la" and stem(path.name).lower() in LA_FILES:
        names = {path.parent.name}
    return {pid for pid in (patient_id(dataset, n) for n in names if n) if pid is not None}
