"""Run folders, atomic writes, checksums and stage manifests: how stages hand work to each other.

Layout (docs/design.md, section Run folders): `runs/<run>/<stage>/<sub>/` holds a stage's outputs, `config.yaml` and
`manifest.json`; `runs/<run>/tb/<stage>/<sub>` its TensorBoard events. Only rank zero writes.
"""

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from samora_pl.errors import SamoraError

MANIFEST = "manifest.json"


def is_rank_zero() -> bool:
    """True on the process that writes files (global rank 0, also before DDP has started)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") != "0":
            return False
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return True


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.run


def stage_dir(cfg: DictConfig, stage: str, sub: str) -> Path:
    return run_dir(cfg) / stage / sub


def tb_root(cfg: DictConfig) -> Path:
    return run_dir(cfg) / "tb"


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; once the writer is done it is fsynced and renamed onto `path`.

    On any error (a full disk midway, an interrupt) the temporary file is removed and `path` keeps its
    previous content, so a reader never sees a half-written file. The fsync before the rename makes the
    new content durable before it replaces the old (a power cut leaves one or the other, not a mix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno and err.filename in (None, tmp):
            # name the file the user knows (a write error names none, or the vanished temporary one)
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save(path: Path, writer: Callable[[Path], None]) -> None:
    """Run `writer(tmp_path)` and move the result onto `path` only if it finished."""
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    path = Path(path)
    return {"path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size}


def read_manifest(folder: Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SamoraError(
            f"Manifest {path} is unreadable ({err}); delete the folder or re-run with overwrite=true."
        ) from err


def verify_input(path: Path, producer: Path) -> dict:
    """Check a hand-off file against the sha256 its producing stage recorded; return its record."""
    path = Path(path)
    if not path.exists():
        raise SamoraError(f"Missing input file {path}.")
    record = file_record(path)
    manifest = read_manifest(producer)
    if manifest:
        expected = manifest.get("outputs", {}).get(path.name, {}).get("sha256")
        if expected and expected != record["sha256"]:
            raise SamoraError(
                f"{path} does not match the checksum in {Path(producer) / MANIFEST} (file changed or truncated); "
                "re-run the stage that produced it."
            )
    return record


def package_versions() -> Dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("samora_pl", "torch", "lightning", "segment-anything", "monai", "timm", "omegaconf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class StageRecord:
    """Collects what one stage consumed and produced, and writes its manifest when it ends."""

    def __init__(self, cfg: DictConfig, folder: Path):
        self.cfg = cfg
        self.folder = Path(folder)
        self.inputs: Dict[str, dict] = {}
        self.outputs: Dict[str, dict] = {}
        self.metrics: Dict[str, object] = {}
        self.started = time.time()

    def add_input(self, name: str, record: dict) -> None:
        self.inputs[name] = record

    def add_output(self, path: Path) -> None:
        self.outputs[Path(path).name] = file_record(path)

    def write(self, status: str = "complete") -> dict:
        manifest = {
            "stage": self.cfg.stage,
            "status": status,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "wall_time_s": round(time.time() - self.started, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": package_versions(),
            "git_revision": git_revision(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        if is_rank_zero():
            atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return manifest


def save_config(cfg: DictConfig, folder: Path) -> None:
    if is_rank_zero():
        atomic_write_text(Path(folder) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
