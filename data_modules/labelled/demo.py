"""Built-in demo data: a small synthetic abdominal-CT phantom set in the exact Synapse (TransUNet) layout.

`ensure_demo(root)` writes, seeded and in a few seconds:

    <root>/train_npz/caseXXXX_sliceYYY.npz     n_train cases, every slice (keys image, label; float32)
    <root>/test_vol_h5/caseXXXX.npy.h5          n_test volumes (datasets image, label; (D, H, W) float32)
    <root>/lists/lists_Synapse/train.txt        slice names;  test_vol.txt: case names
    <root>/unlabeled/caseXXXX_sliceYYY.npz      n_unlabeled slices (key image only) of further phantom
                                                cases, the pool for continual pre-training
    <root>/demo.json                            the parameters; written last, marks the set complete

A second call with the same parameters re-uses the set; other parameters rewrite it. Every file is written
to a temporary name and renamed, and generation is serialised with a lock file, so concurrent callers
(DDP ranks) are safe.

The phantom (axial slices, row 0 anterior, column 0 = the patient's right as in radiological display):
a body ellipse with subcutaneous fat and an abdominal-wall muscle ring, a vertebra with cortical rim and
spinous process, paraspinal muscles, a textured fat/bowel background, the inferior vena cava (unlabelled
distractor), and the 8 Synapse organs as smoothly deformed 3-D ellipsoids at plausible places: liver large
on the right (with a left lobe), gallbladder under the liver, spleen posterior left, both kidneys posterior
beside the spine (cortex brighter than medulla), stomach anterior left (enhancing wall, fluid content),
pancreas elongated across the midline towards the spleen, aorta a contrast-bright tube left-anterior of the
spine through every slice. Intensities are after Synapse windowing (HU + 125) / 400 clipped to [0, 1]:
air 0, fat ~0.1-0.2, muscle ~0.45, liver ~0.55, spleen ~0.58, kidney ~0.7, bile ~0.33, aorta ~0.85,
bone ~0.95. Each case varies body size, organ positions, sizes, orientations and shapes, contrast, and has
smooth texture, slight blur (partial volume) and Gaussian noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import ndimage

from data_modules.labelled.synapse import SynapseDataModule
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_path, atomic_write_text

DEMO_VERSION = 1
DEFAULT_PARAMS = dict(
    seed=0,
    n_train=8,
    n_test=12,  # as Synapse: twelve test volumes, so that case-to-case noise averages out
    size=128,
    min_slices=16,
    max_slices=24,
    n_unlabeled=200,
)
# Synapse's test case ids first, then the training ones (names only; the content is synthetic).
_TEST_IDS = [1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38]
_TRAIN_IDS = [5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40]

# label id -> (name, centre x, centre y, centre z, radius x, radius y, radius z, in-plane angle in degrees)
# x: -1 image left (patient right) .. +1; y: -1 anterior .. +1 posterior; z: 0 inferior .. 1 superior.
_ORGANS = {
    5: ("liver", -0.38, 0.00, 0.74, 0.40, 0.40, 0.36, 10.0),
    1: ("spleen", 0.56, 0.22, 0.72, 0.13, 0.20, 0.18, 35.0),
    2: ("right kidney", -0.36, 0.36, 0.36, 0.10, 0.15, 0.20, -20.0),
    3: ("left kidney", 0.38, 0.36, 0.40, 0.10, 0.15, 0.20, 20.0),
    6: ("stomach", 0.28, -0.22, 0.68, 0.22, 0.15, 0.22, 30.0),
    8: ("pancreas", 0.12, 0.10, 0.52, 0.32, 0.065, 0.11, -15.0),
    4: ("gallbladder", -0.26, -0.10, 0.46, 0.075, 0.095, 0.12, 20.0),
}
_AORTA = (0.08, 0.24, 0.05)  # centre x, y, radius
_IVC = (-0.12, 0.22, 0.055)
_BASE_INTENSITY = {1: 0.58, 2: 0.70, 3: 0.70, 4: 0.33, 5: 0.55, 6: 0.50, 7: 0.85, 8: 0.50}


def _coarse_field(rng: np.random.Generator, shape, coarse=(6, 10, 10), amplitude=1.0) -> np.ndarray:
    """Smooth random field of `shape` (D, H, W): coarse Gaussian noise, upsampled in-plane with bicubic
    and along D with linear interpolation (torch, fast and deterministic)."""
    import torch
    import torch.nn.functional as F

    d = max(2, min(coarse[0], shape[0]))
    small = torch.from_numpy(rng.standard_normal((d, coarse[1], coarse[2])).astype(np.float32))
    plane = F.interpolate(small[:, None], size=shape[1:], mode="bicubic", align_corners=True)[:, 0]
    field = F.interpolate(plane.permute(1, 2, 0), size=shape[0], mode="linear", align_corners=True)
    return amplitude * field.permute(2, 0, 1).numpy()


def make_phantom_case(rng: np.random.Generator, n_slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT volume: image (D, H, W) float32 in [0, 1], label (D, H, W) uint8 0..8."""
    D, H, W = int(n_slices), int(size), int(size)
    z = np.linspace(0.0, 1.0, D, dtype=np.float32)[:, None, None] + rng.uniform(-0.03, 0.03)
    y = np.linspace(-1.0, 1.0, H, dtype=np.float32)[None, :, None]
    x = np.linspace(-1.0, 1.0, W, dtype=np.float32)[None, None, :]
    shape = (D, H, W)

    body_scale = rng.uniform(0.9, 1.05)
    gx, gy = rng.uniform(-0.04, 0.04, size=2)
    # body: an ellipse that widens slightly towards the top of the abdomen
    bax = 0.88 * body_scale * (1.0 + 0.04 * z)
    bay = 0.66 * body_scale * (1.0 + 0.03 * z)
    r_body = ((x - gx) / bax) ** 2 + ((y - 0.05 - gy) / bay) ** 2
    wobble = _coarse_field(rng, shape, (3, 6, 6), 0.04)
    body = r_body < 1.0 + wobble
    inner = r_body < (0.86 + wobble) ** 2  # inside the subcutaneous fat
    cavity = r_body < (0.80 + wobble) ** 2  # inside the abdominal wall muscle

    label = np.zeros(shape, np.uint8)
    image = np.zeros(shape, np.float32)
    fat = rng.uniform(0.10, 0.18)
    image[body] = fat
    image[inner & ~cavity] = 0.45  # abdominal wall muscle
    # intra-abdominal background: fat mixed with bowel loops of soft-tissue density
    bowel = _coarse_field(rng, shape, (8, 14, 14), 1.0)
    background = np.where(bowel > 0.3, 0.40, fat + 0.06).astype(np.float32)
    image = np.where(cavity, background, image)

    # spine: vertebral body (cortex + cancellous bone), spinous process, paraspinal muscles
    vx, vy, vr = gx, 0.44 + gy * 0.5, 0.095 * body_scale
    rv = np.sqrt((x - vx) ** 2 + (y - vy) ** 2) / vr
    pm = (((x - vx) ** 2 / (0.20 * body_scale) ** 2 + (y - vy - 0.16) ** 2 / 0.10**2) < 1.0) & body
    image[pm] = 0.46
    spinous = np.broadcast_to((((x - vx) / 0.03) ** 2 + ((y - vy - 0.15) / 0.07) ** 2) < 1.0, shape)
    image[spinous] = 0.92
    image[np.broadcast_to(rv < 1.0, shape)] = 0.78
    image[np.broadcast_to((rv >= 0.8) & (rv < 1.0), shape)] = 1.0

    # organs, each a smoothly deformed ellipsoid; painted in order, later ones win
    jitter = lambda a: rng.uniform(-a, a)  # noqa: E731
    contrast = rng.uniform(-0.03, 0.03)
    for lab in (5, 1, 2, 3, 6, 8, 4):
        _, cx, cy, cz, rx, ry, rz, ang = _ORGANS[lab]
        s = rng.uniform(0.88, 1.12, size=3)
        cx, cy, cz = cx * body_scale + gx + jitter(0.04), cy * body_scale + gy + jitter(0.04), cz + jitter(0.04)
        t = math.radians(ang + jitter(10.0))
        xr = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
        yr = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
        dist = (
            (xr / (rx * s[0] * body_scale)) ** 2 + (yr / (ry * s[1] * body_scale)) ** 2 + ((z - cz) / (rz * s[2])) ** 2
        )
        mask = dist < 1.0 + _coarse_field(rng, shape, (4, 8, 8), 0.18)
        if lab == 5:  # left lobe of the liver reaching across the midline
            xl, yl = x - (0.02 + gx + jitter(0.03)), y - (-0.24 + gy + jitter(0.03))
            lobe = (xl / 0.26) ** 2 + (yl / 0.13) ** 2 + ((z - cz - 0.04) / (0.6 * rz)) ** 2 < 1.0
            mask |= lobe
        mask &= cavity
        label[mask] = lab
        level = _BASE_INTENSITY[lab] + contrast + jitter(0.02)
        if lab in (2, 3):  # cortex brighter than medulla
            level = np.where(dist < 0.35, level - 0.08, level)
        if lab == 6:  # enhancing wall, fluid content
            level = np.where(dist < 0.55, 0.32, level)
        image = np.where(mask, level, image)

    # vessels: aorta (labelled, every slice) and IVC (unlabelled distractor)
    ax, ay, ar = _AORTA
    ax, ay, ar = ax * body_scale + gx + jitter(0.02), ay * body_scale + gy + jitter(0.02), ar * rng.uniform(0.85, 1.15)
    aorta = ((x - ax) ** 2 + (y - ay) ** 2 < ar**2) & np.ones_like(z, bool)
    ix, iy, ir = _IVC
    ivc = ((x - ix * body_scale - gx) ** 2 + (y - iy * body_scale - gy) ** 2 < ir**2) & np.ones_like(z, bool)
    image = np.where(ivc & (label == 0), 0.62 + contrast, image)
    label[aorta] = 7
    image = np.where(aorta, _BASE_INTENSITY[7] + contrast + jitter(0.04), image)

    # texture, partial-volume blur and noise
    texture = _coarse_field(rng, shape, (D, max(4, H // 6), max(4, W // 6)), 0.025)
    image = image + np.where(body, texture, 0.0)
    image = ndimage.gaussian_filter(image, sigma=(0.0, 0.7, 0.7))
    image = image + rng.normal(0.0, rng.uniform(0.015, 0.03), size=shape).astype(np.float32) * body
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image, label


# ---------------------------------------------------------------------- writing
def _write_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression="gzip", compression_opts=1)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=1)


@contextmanager
def _lock(root: Path):
    """Exclusive lock on <root>/.demo.lock (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".demo.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _params(**params) -> dict:
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise SamoraError(f"unknown demo parameter(s) {', '.join(unknown)}: known are {', '.join(DEFAULT_PARAMS)}")
    p = {**DEFAULT_PARAMS, **{k: int(v) for k, v in params.items()}}
    if not 1 <= p["n_test"] <= len(_TEST_IDS) or not 1 <= p["n_train"] <= len(_TRAIN_IDS):
        raise SamoraError(
            f"demo n_train={p['n_train']} / n_test={p['n_test']} must be in 1..{len(_TRAIN_IDS)} / 1..{len(_TEST_IDS)}"
        )
    if p["size"] < 32 or not 8 <= p["min_slices"] <= p["max_slices"] or p["n_unlabeled"] < 0:
        raise SamoraError(
            f"demo parameters need size >= 32, 8 <= min_slices <= max_slices and n_unlabeled >= 0 (got {p})"
        )
    return p


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / "demo.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("params") != params or info.get("version") != DEMO_VERSION:
        return False
    counts = info.get("counts", {})
    try:
        return (
            len(list((root / "train_npz").glob("*.npz"))) == counts["train_slices"]
            and len(list((root / "test_vol_h5").glob("*.npy.h5"))) == counts["test_volumes"]
            and len(list((root / "unlabeled").glob("*.npz"))) == counts["unlabeled_slices"]
            and (root / "lists" / "lists_Synapse" / "train.txt").is_file()
            and (root / "lists" / "lists_Synapse" / "test_vol.txt").is_file()
        )
    except (KeyError, OSError):
        return False


_OWNED = ("train_npz", "test_vol_h5", "unlabeled", "lists", "demo.json", ".demo_in_progress")


def ensure_demo(root: str | os.PathLike = "data/demo", **params) -> Path:
    """Write the demo set to `root` unless a complete one with the same parameters is there; return root.

    Parameters (all integers): seed, n_train (cases, all slices go to train_npz), n_test (volumes),
    size (slice H = W; real Synapse is 512), min_slices / max_slices (slices per case), n_unlabeled.
    """
    p = _params(**params)
    root = Path(root).expanduser()
    if _is_complete(root, p):
        return root
    if root.exists() and not root.is_dir():
        raise SamoraError(f"demo folder {root} is a file: choose another path for the demo data")
    if root.is_dir():
        ours = (root / "demo.json").exists() or (root / ".demo_in_progress").exists()
        entries = [c.name for c in root.iterdir() if c.name != ".demo.lock"]
        if entries and not ours:
            raise SamoraError(
                f"{root} is not empty and is not a demo folder (no demo.json): the demo would overwrite it; "
                "point the demo at an empty or new folder"
            )
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if _is_complete(root, p):  # another process finished it while we waited
            return root
        _generate(root, p)
    return root


def _generate(root: Path, p: dict) -> None:
    (root / ".demo_in_progress").write_text("generation started; remove the folder if this stays\n")
    for name in ("demo.json", "train_npz", "test_vol_h5", "unlabeled", "lists"):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    train_dir, test_dir, unl_dir = root / "train_npz", root / "test_vol_h5", root / "unlabeled"
    list_dir = root / "lists" / "lists_Synapse"
    for d in (train_dir, test_dir, unl_dir, list_dir):
        d.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(p["seed"])
    slices_of = lambda: int(rng.integers(p["min_slices"], p["max_slices"] + 1))  # noqa: E731
    train_names, test_cases = [], []
    for cid in _TRAIN_IDS[: p["n_train"]]:
        image, label = make_phantom_case(rng, slices_of(), p["size"])
        case = f"case{cid:04d}"
        for k in range(image.shape[0]):
            name = f"{case}_slice{k:03d}"
            _write_npz(train_dir / f"{name}.npz", image=image[k], label=label[k].astype(np.float32))
            train_names.append(name)
    for cid in _TEST_IDS[: p["n_test"]]:
        image, label = make_phantom_case(rng, slices_of(), p["size"])
        case = f"case{cid:04d}"
        _write_h5(test_dir / f"{case}.npy.h5", image, label.astype(np.float32))
        test_cases.append(case)
    n_unl, cid = 0, 101
    while n_unl < p["n_unlabeled"]:
        image, _ = make_phantom_case(rng, slices_of(), p["size"])
        for k in range(image.shape[0]):
            if n_unl == p["n_unlabeled"]:
                break
            _write_npz(unl_dir / f"case{cid:04d}_slice{k:03d}.npz", image=image[k])
            n_unl += 1
        cid += 1
    atomic_write_text(list_dir / "train.txt", "".join(f"{n}\n" for n in train_names))
    atomic_write_text(list_dir / "test_vol.txt", "".join(f"{c}\n" for c in test_cases))
    info = {
        "version": DEMO_VERSION,
        "format": "synapse (TransUNet layout), synthetic phantom",
        "params": p,
        "counts": {"train_slices": len(train_names), "test_volumes": len(test_cases), "unlabeled_slices": n_unl},
        "train_cases": [f"case{c:04d}" for c in _TRAIN_IDS[: p["n_train"]]],
        "test_cases": test_cases,
        "class_names": SynapseDataModule.class_names,
    }
    atomic_write_text(root / "demo.json", json.dumps(info, indent=2) + "\n")
    (root / ".demo_in_progress").unlink()


class DemoDataModule(SynapseDataModule):
    """SynapseDataModule over `ensure_demo(root, **demo_params)`; everything else is plain Synapse."""

    def __init__(self, root: str | os.PathLike = "data/demo", *args, demo_params: dict | None = None, **kwargs):
        root = ensure_demo(root, **(demo_params or {}))
        super().__init__(root, *args, **kwargs)
