"""Readers for the unlabeled CPT pool: one "volume" per file (or per DICOM series), read slice by slice.

Every reader answers two questions: `probe(volume)` reads only headers (shape, and for DICOM the slice
order) so indexing a large pool is cheap; `read_slice(volume, index)` returns one raw 2-D float32 slice.
`intensity()` then maps raw values to [0, 1]. Formats:

| reader | files | array | slicing |
|---|---|---|---|
| npz | `*.npz` | key `image` (configurable) | 2-D: one slice; 3-D: along `axis` |
| h5 | `*.h5`, `*.hdf5` | key `image` (configurable) | 2-D: one slice; 3-D: along `axis` (read lazily) |
| nifti | `*.nii`, `*.nii.gz` (nibabel, scaling applied) | nibabel order (x, y, z) | along `axis` (default 2) |
| mhd | `*.mhd`, `*.mha` (SimpleITK) | SimpleITK order (z, y, x) | along `axis` (default 0) |
| dicom | DICOM files of a folder, one volume per SeriesInstanceUID | (z, rows, cols), rescaled | along `axis` (0) |
| png | `*.png` (8- or 16-bit grey; colour is converted to grey) | scaled by its bit depth to [0, 1] | one slice |
"""

import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_modules.options import INTENSITIES

READERS = ("npz", "h5", "nifti", "mhd", "dicom", "png")
CT_WINDOW = (-125.0, 275.0)  # Synapse / TransUNet abdominal window
MR_PERCENTILES = (0.5, 99.5)
DEFAULT_AXIS = {"npz": 0, "h5": 0, "nifti": 2, "mhd": 0, "dicom": 0, "png": 0}


class ReadError(Exception):
    """A file of the pool cannot be read; the message says why (collected and reported together)."""


@dataclass
class Volume:
    """One readable item of the pool: a file, or the files of one DICOM series."""

    path: str  # the file, or the series folder for DICOM
    reader: str  # one of READERS
    key: str = "image"  # array key for npz / h5
    axis: int = 0  # slicing axis for 3-D arrays
    intensity: str = "none"  # one of INTENSITIES
    files: list[str] = field(default_factory=list)  # DICOM: slice files in spatial order
    series: str | None = None  # DICOM SeriesInstanceUID

    @property
    def cache_key(self) -> str:
        series = f"#{self.series}" if self.series else ""
        return f"{self.reader}|{self.path}{series}|{self.key}|{self.axis}|{self.intensity}"

    def signature(self) -> list:
        """What identifies this version of the file(s): size and modification time."""
        paths = self.files or [self.path]
        sizes, mtimes = 0, 0
        for path in paths:
            stat = os.stat(path)
            sizes += stat.st_size
            mtimes = max(mtimes, stat.st_mtime_ns)
        return [len(paths), sizes, mtimes]


# ----------------------------------------------------------------------------------------------- probing


def probe(volume: Volume) -> dict:
    """Header-level facts about `volume`: {"shape": [...], "slices": n}; ReadError if unreadable."""
    try:
        shape = _PROBES[volume.reader](volume)
    except ReadError:
        raise
    except Exception as err:  # every library has its own exception types; all mean "unreadable"
        raise ReadError(f"{type(err).__name__}: {err}") from err
    shape = _squeeze_shape(shape)
    if len(shape) == 2:
        slices = 1
    elif len(shape) == 3:
        if not 0 <= volume.axis < 3:
            raise ReadError(f"slicing axis {volume.axis} is not 0, 1 or 2 for a 3-D array of shape {shape}")
        slices = shape[volume.axis]
    else:
        raise ReadError(f"array of shape {shape} is neither a 2-D slice nor a 3-D volume")
    if slices < 1 or min(shape) < 1:
        raise ReadError(f"empty array of shape {shape}")
    return {"shape": list(shape), "slices": int(slices)}


def _squeeze_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) > 2:
        kept = tuple(s for s in shape if s != 1)
        shape = kept if len(kept) >= 2 else shape[-2:]
    return shape


def _probe_npz(volume: Volume):
    with zipfile.ZipFile(volume.path) as archive:
        name = f"{volume.key}.npy"
        if name not in archive.namelist():
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            raise ReadError(f"no array '{volume.key}' (arrays: {', '.join(keys) or 'none'})")
        with archive.open(name) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(handle)
    return shape


def _probe_h5(volume: Volume):
    import h5py

    with h5py.File(volume.path, "r") as handle:
        if volume.key not in handle:
            raise ReadError(f"no dataset '{volume.key}' (keys: {', '.join(handle.keys()) or 'none'})")
        return handle[volume.key].shape


def _probe_nifti(volume: Volume):
    import nibabel

    return nibabel.load(volume.path).shape


def _probe_mhd(volume: Volume):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(volume.path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    if volume.path.lower().endswith(".mhd"):
        _check_mhd_data(Path(volume.path), size, reader.GetNumberOfComponents())
    return tuple(reversed(size))  # SimpleITK arrays are (z, y, x)


_MET_BYTES = {
    "MET_UCHAR": 1,
    "MET_CHAR": 1,
    "MET_USHORT": 2,
    "MET_SHORT": 2,
    "MET_UINT": 4,
    "MET_INT": 4,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
    "MET_ULONG": 8,
    "MET_LONG": 8,
}


def _check_mhd_data(path: Path, size, components: int) -> None:
    """SimpleITK reads only the header here; make sure the .raw it names exists and is complete."""
    fields = {}
    for line in path.read_text(errors="replace").splitlines():
        if "=" in line:
            name, value = line.split("=", 1)
            fields[name.strip()] = value.strip()
    data = fields.get("ElementDataFile")
    if not data or data == "LOCAL" or data.startswith("LIST") or "%" in data:
        return
    raw = path.parent / data
    if not raw.exists():
        raise ReadError(f"its data file {raw.name} is missing")
    if fields.get("CompressedData", "False").lower() == "true":
        return
    expected = int(np.prod(size)) * components * _MET_BYTES.get(fields.get("ElementType", ""), 1)
    if raw.stat().st_size < expected:
        raise ReadError(
            f"its data file {raw.name} has {raw.stat().st_size} bytes, fewer than the {expected} the header needs"
        )


def _probe_dicom(volume: Volume):
    import pydicom

    header = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
    rows, cols = int(header.Rows), int(header.Columns)
    return (len(volume.files), rows, cols)


def _probe_png(volume: Volume):
    from PIL import Image

    with Image.open(volume.path) as image:
        image.verify()
    with Image.open(volume.path) as image:
        return (image.size[1], image.size[0])


_PROBES = {
    "npz": _probe_npz,
    "h5": _probe_h5,
    "nifti": _probe_nifti,
    "mhd": _probe_mhd,
    "dicom": _probe_dicom,
    "png": _probe_png,
}


# ----------------------------------------------------------------------------------------------- reading


class VolumeCache:
    """Keeps the last few whole volumes of formats without cheap random slice access (nii.gz, mhd)."""

    def __init__(self, size: int = 2):
        self.size = max(int(size), 0)
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str, load) -> np.ndarray:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        if self.size:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def read_volume(volume: Volume) -> np.ndarray:
    """The whole array (2-D or 3-D, singleton axes squeezed), float32, before intensity scaling."""
    try:
        array = _READ_WHOLE[volume.reader](volume)
    except ReadError:
        raise
    except Exception as err:
        raise ReadError(f"{type(err).__name__}: {err}") from err
    array = np.asarray(array)
    if array.ndim > 2:
        array = array.reshape(_squeeze_shape(array.shape))
    return array.astype(np.float32, copy=False)


def read_slice(volume: Volume, index: int, cache: VolumeCache | None = None) -> np.ndarray:
    """Slice `index` (along the volume's axis) as a 2-D float32 array, before intensity scaling."""
    try:
        if volume.reader == "h5":
            array = _read_h5_slice(volume, index)
        elif volume.reader == "dicom" and volume.axis == 0:
            array = _read_dicom_file(volume.files[index])
        elif volume.reader == "nifti" and not volume.path.lower().endswith(".gz"):
            array = _read_nifti_slice(volume, index)
        elif volume.reader in ("npz", "png"):
            array = _take(read_volume(volume), volume.axis, index)
        else:
            whole = cache.get(volume.cache_key, lambda: read_volume(volume)) if cache else read_volume(volume)
            array = _take(whole, volume.axis, index)
    except ReadError:
        raise
    except Exception as err:
        raise ReadError(f"{type(err).__name__}: {err}") from err
    return np.asarray(array, dtype=np.float32)


def _take(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    if array.ndim == 2:
        return array
    return np.take(array, index, axis=axis)


def _read_h5_slice(volume: Volume, index: int) -> np.ndarray:
    import h5py

    with h5py.File(volume.path, "r") as handle:
        dataset = handle[volume.key]
        shape = dataset.shape
        squeezed = _squeeze_shape(shape)
        if len(squeezed) == 2:
            return np.asarray(dataset[()], dtype=np.float32).reshape(squeezed)
        if len(shape) != 3:  # singleton axes: read all, then squeeze
            return _take(np.asarray(dataset[()], dtype=np.float32).reshape(squeezed), volume.axis, index)
        slicer = [slice(None)] * 3
        slicer[volume.axis] = index
        return np.asarray(dataset[tuple(slicer)], dtype=np.float32)


def _read_nifti_slice(volume: Volume, index: int) -> np.ndarray:
    import nibabel

    image = nibabel.load(volume.path)
    if len(_squeeze_shape(image.shape)) != len(image.shape):
        return _take(read_volume(volume), volume.axis, index)
    if len(image.shape) == 2:
        return np.asarray(image.dataobj, dtype=np.float32)
    slicer = [slice(None)] * 3
    slicer[volume.axis] = index
    return np.asarray(image.dataobj[tuple(slicer)], dtype=np.float32)


def _read_npz(volume: Volume) -> np.ndarray:
    with np.load(volume.path, allow_pickle=False) as data:
        if volume.key not in data.files:
            raise ReadError(f"no array '{volume.key}' (arrays: {', '.join(data.files) or 'none'})")
        return data[volume.key]


def _read_h5(volume: Volume) -> np.ndarray:
    import h5py

    with h5py.File(volume.path, "r") as handle:
        return np.asarray(handle[volume.key][()])


def _read_nifti(volume: Volume) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(volume.path).get_fdata(dtype=np.float32))


def _read_mhd(volume: Volume) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.ReadImage(volume.path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ReadError(f"{image.GetNumberOfComponentsPerPixel()} components per pixel; grey images only")
    return sitk.GetArrayFromImage(image)


def _read_dicom_file(path: str) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(path)
    try:
        array = dataset.pixel_array.astype(np.float32)
    except Exception as err:
        raise ReadError(f"{Path(path).name}: cannot decode pixel data ({err})") from err
    if array.ndim != 2:
        raise ReadError(f"{Path(path).name}: pixel data of shape {array.shape}; one grey frame per file expected")
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    return array * slope + intercept


def _read_dicom(volume: Volume) -> np.ndarray:
    return np.stack([_read_dicom_file(path) for path in volume.files])


def _read_png(volume: Volume) -> np.ndarray:
    from PIL import Image

    with Image.open(volume.path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            return array / peak
        if image.mode not in ("L", "F"):
            image = image.convert("L")
        array = np.asarray(image, dtype=np.float32)
        return array if image.mode == "F" else array / 255.0


_READ_WHOLE = {
    "npz": _read_npz,
    "h5": _read_h5,
    "nifti": _read_nifti,
    "mhd": _read_mhd,
    "dicom": _read_dicom,
    "png": _read_png,
}


# --------------------------------------------------------------------------------------------- intensity


def volume_stats(volume: Volume) -> list[float] | None:
    """Per-volume values `intensity()` needs that a single slice cannot give (mr_percentile on 3-D)."""
    if volume.intensity != "mr_percentile":
        return None
    array = read_volume(volume)
    if array.ndim == 2:
        return None  # a 2-D file is its own volume: computed from the slice when read
    low, high = np.percentile(array, MR_PERCENTILES)
    return [float(low), float(high)]


def intensity(array: np.ndarray, mode: str, stats: list[float] | None = None) -> np.ndarray:
    """Map raw values to [0, 1]: none (clip), ct_window (Synapse), mr_percentile (0.5/99.5 per volume)."""
    array = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "none":
        out = array
    elif mode == "ct_window":
        low, high = CT_WINDOW
        out = (np.clip(array, low, high) - low) / (high - low)
    elif mode == "mr_percentile":
        low, high = stats if stats is not None else np.percentile(array, MR_PERCENTILES)
        if high <= low:
            return np.zeros_like(array)
        out = (np.clip(array, low, high) - low) / (high - low)
    else:
        raise ValueError(f"unknown intensity mode {mode!r}; allowed: {', '.join(INTENSITIES)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- DICOM


def dicom_series(folder: Path, files: list[Path]) -> tuple[list[Volume], dict[str, str]]:
    """Group DICOM files of one folder by series and sort each by position along the slice normal."""
    import pydicom

    groups: dict[str, list] = {}
    errors: dict[str, str] = {}
    for path in files:
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
            if "PixelData" not in header and not hasattr(header, "Rows"):
                raise ReadError("no image in this DICOM file")
        except Exception as err:
            errors[str(path)] = f"{type(err).__name__}: {err}"
            continue
        uid = str(getattr(header, "SeriesInstanceUID", "") or "unknown")
        groups.setdefault(uid, []).append((_dicom_position(header), str(path)))
    volumes = []
    for uid, items in sorted(groups.items()):
        items.sort(key=lambda item: (item[0], item[1]))
        volumes.append(Volume(path=str(folder), reader="dicom", files=[p for _, p in items], series=uid))
    return volumes, errors


def _dicom_position(header) -> float:
    position = getattr(header, "ImagePositionPatient", None)
    orientation = getattr(header, "ImageOrientationPatient", None)
    if position is not None and orientation is not None and len(orientation) == 6:
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        return float(np.dot(np.cross(row, col), np.asarray(position, float)))
    number = getattr(header, "InstanceNumber", None)
    return float(number) if number is not None else 0.0


def is_dicom_file(path: Path) -> bool:
    """True for `.dcm` files and for files with the DICOM preamble (many series have no extension)."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False
