"""Run folders, checksums and stage manifests: how stages hand work to each other.

Layout (docs/design.md, section Run folders): `runs/<run>/<stage>/<sub>/` holds a stage's outputs, `config.yaml` and
`manifest.json`; `runs/<run>/tb/<stage>/<sub>` its TensorBoard events. Only rank zero writes.
"""

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_write_text

MANIFEST = "manifest.json"


def is_rank_zero() -> bool:
    """True on the process that writes files: Lightning's global rank (from RANK / LOCAL_RANK / SLURM_PROCID
    before the strategy has started, the strategy's rank after)."""
    return rank_zero_only.rank == 0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    path = Path(path)
    return {"path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size}


def read_manifest(folder: Path) -> dict | None:
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


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("samora_pl", "torch", "lightning", "segment-anything", "monai", "timm", "omegaconf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class StageRecord:
    """Collects what one stage consumed and produced, and writes its manifest when it ends."""

    def __init__(self, stage: str, config: dict, folder: Path):
        self.stage, self.config = stage, config
        self.folder = Path(folder)
        self.inputs: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.metrics: dict[str, object] = {}
        self.started = time.time()

    def add_input(self, name: str, record: dict) -> None:
        self.inputs[name] = record

    def add_output(self, path: Path) -> None:
        self.outputs[Path(path).name] = file_record(path)

    def write(self, status: str = "complete") -> dict:
        manifest = {
            "stage": self.stage,
            "status": status,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "wall_time_s": round(time.time() - self.started, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": package_versions(),
            "git_revision": git_revision(),
            "config": self.config,
        }
        if is_rank_zero():
            atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return manifest


def save_config(config: dict, folder: Path) -> None:
    """The resolved configuration a stage ran with, as `folder/config.yaml` (what reuse checks compare)."""
    if is_rank_zero():
        atomic_write_text(Path(folder) / "config.yaml", OmegaConf.to_yaml(config))
