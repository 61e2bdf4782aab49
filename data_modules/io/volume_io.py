"""3-D volumes with their geometry: read NIfTI / MHD (SimpleITK) and write label maps back in the same frame.

Arrays are in numpy order (D, H, W) = SimpleITK's (z, y, x), the order the reference Synapse preprocessing
gets from a NIfTI file with nibabel and `transpose(2, 1, 0)`. `Geometry` keeps what a viewer needs to
overlay a prediction on its source: spacing per array axis (mm), and SimpleITK's origin and direction
(physical x, y, z). Volumes stored without geometry (the h5 files of Synapse and LA) get `Geometry()`:
unit spacing, zero origin, identity direction.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")


@dataclass(frozen=True)
class Geometry:
    spacing: tuple = (1.0, 1.0, 1.0)  # along the array axes (D, H, W), in mm
    origin: tuple = (0.0, 0.0, 0.0)  # SimpleITK (x, y, z)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # SimpleITK, row-major 3x3

    def to_meta(self) -> dict:
        """Plain lists, for `Volume.meta['geometry']` and JSON files."""
        return {key: [float(v) for v in value] for key, value in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict | None) -> Geometry:
        if not meta:
            return cls()
        return cls(tuple(meta["spacing"]), tuple(meta["origin"]), tuple(meta["direction"]))


def has_image_suffix(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    """'case01.nii.gz' -> 'case01' (any suffix of IMAGE_SUFFIXES)."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | os.PathLike, what: str = "volume") -> tuple[np.ndarray, Geometry]:
    """(array (D, H, W), geometry) of a 3-D NIfTI or MHD/MHA file; a 2-D file becomes one slice.

    An unreadable file, a missing .raw, several components per voxel or a 4-D image is one SamoraError
    naming the file.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise SamoraError(f"{path}: {what} file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[-200:]
        raise SamoraError(
            f"{path}: cannot read this {what} ({detail}); check the file and, for .mhd, its "
            "ElementDataFile (.raw) beside it"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SamoraError(f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; grey volumes only")
    if image.GetDimension() not in (2, 3):
        raise SamoraError(f"{path}: a {image.GetDimension()}-D image; expected a 3-D volume")
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        array = array[None]
        spacing = (1.0, *reversed(image.GetSpacing()))
        origin = (*image.GetOrigin(), 0.0)
        d = image.GetDirection()
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
    else:
        spacing = tuple(reversed(image.GetSpacing()))
        origin, direction = image.GetOrigin(), image.GetDirection()
    geometry = Geometry(
        tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(float(v) for v in direction)
    )
    return array, geometry


def read_shape(path: str | os.PathLike, what: str = "volume") -> tuple:
    """The (D, H, W) shape `read_image` would return, from the file header only (cheap for .nii.gz)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise SamoraError(f"{path}: {what} file not found")
    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    try:
        header.ReadImageInformation()
    except RuntimeError as err:
        detail = " ".join(str(err).split())[-200:]
        raise SamoraError(f"{path}: cannot read this {what}'s header ({detail}); check the file") from None
    size = tuple(int(s) for s in reversed(header.GetSize()))
    return (1, *size) if len(size) == 2 else size  # a 2-D file is one slice, as in read_image


def to_sitk(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image of a (D, H, W) array placed in `geometry`."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(geometry.spacing)))
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a (D, H, W) array as NIfTI or MHD (by suffix) in `geometry`, atomically (temporary + rename).

    For .mhd the .raw data file is written first and the header renamed last, so a reader never sees a
    header whose data is incomplete.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not has_image_suffix(path):
        raise SamoraError(f"{path}: write predictions as .nii.gz, .nii, .mhd or .mha")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next(s for s in IMAGE_SUFFIXES if str(path).lower().endswith(s))
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(to_sitk(array, geometry), str(tmp), useCompression=suffix != ".mhd")
            if suffix == ".mhd":  # header + data file: give the data its final name and point the header at it
                raw = path.with_suffix(".raw")
                os.replace(tmp.with_suffix(".raw"), raw)
                tmp.write_text(tmp.read_text().replace(tmp.with_suffix(".raw").name, raw.name))
        finally:
            if tmp.with_suffix(".raw").exists():
                tmp.with_suffix(".raw").unlink()
    return path


def open_h5(path: Path, not_found: str, need: str, fix: str):
    """An HDF5 file with datasets 'image' and 'label', open for reading. Each SamoraError names the file:
    `not_found` says where it should come from, `need` what it must hold, `fix` how to replace a corrupt one."""
    import h5py

    if not path.is_file():
        raise SamoraError(f"{path} does not exist{not_found}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SamoraError(f"{path} cannot be opened as HDF5 ({err}): the file is truncated or corrupt; {fix}") from None
    missing = [k for k in ("image", "label") if k not in f]
    if missing:
        keys = ", ".join(sorted(f.keys())) or "nothing"
        f.close()
        raise SamoraError(f"{path} has no {' or '.join(repr(k) for k in missing)} dataset (it has: {keys}): {need}")
    return f


def read_h5(f, key: str, sel=(), fix: str = "re-create it") -> np.ndarray:
    """Dataset `key` of an open HDF5 file (optionally the selection `sel`); SamoraError if it is damaged."""
    try:
        return np.asarray(f[key][sel])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SamoraError(f"{f.filename}: reading '{key}' failed ({err}): the file is corrupt; {fix}") from None
