"""`samora bundle` (`make bundle RUN=... [OUT=...]`): a finished fine-tune as a MONAI bundle.

The fine-tune is the one `samora predict` would use (`finished_folder`: `finetune.tag`, or the keys a tag is
made of, or the run's only one), its model rebuilt by `load_finetuned` from the run's `config.yaml` and
`final.safetensors`. The bundle, written to OUT (default `<runs_dir>/<run>/bundle/<tag>`; an existing OUT is
refused, never overwritten), runs with MONAI alone:

    OUT/configs/metadata.json   MONAI bundle metadata (versions, task, network_data_format with channel_def)
    OUT/configs/inference.json  LoadImaged -> intensity -> slice-by-slice labels -> SaveImaged (source geometry)
    OUT/models/model.ts         TorchScript of the whole model (experts and fusion baked in) + argmax
    OUT/scripts/slices.py       the intensity transform and the slice inferer (numpy, scipy, torch, monai only)
    OUT/docs/README.md, OUT/LICENSE

    python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT \\
        --dataset_dir <folder of .nii.gz> --output_dir <folder>

gives the label maps `samora predict` writes for the same NIfTI volumes (tests/samora_pl/export). The bundle
is assembled in a temporary folder beside OUT and renamed into place, so OUT is complete or absent.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from data_modules import LabelledDataSpec, build_datamodule, datamodule_class
from samora_pl.config.plans import PredictPlan
from samora_pl.errors import SamoraError
from samora_pl.export import bundle_script
from samora_pl.export.bundle_configs import BundleFacts, inference, metadata
from samora_pl.export.bundle_readme import bundle_readme, license_text
from samora_pl.export.torchscript import save_scripted, script_model
from samora_pl.records.manifest import verify_input
from samora_pl.stages.finetune.evaluate import load_finetuned
from samora_pl.stages.predict import dataset_intensity

log = logging.getLogger(__name__)


def class_names(source: LabelledDataSpec, num_classes: int) -> tuple:
    """The run's class names (the data module's; a generic set's from its dataset.json), else class_<k>."""
    names = list(getattr(datamodule_class(source.name), "class_names", []) or [])
    if not names:
        try:  # a generic dataset names its classes in its dataset.json, read when the module is built
            names = list(build_datamodule(source).class_names)
        except (SamoraError, OSError) as err:
            log.warning("bundle: class names of %s not readable (%s); naming them class_<k>", source.name, err)
    if len(names) != num_classes:
        names = [f"class_{k}" for k in range(1, num_classes + 1)]
    return tuple(str(name) for name in names)


def bundle_intensity(setting: str, source: LabelledDataSpec) -> str:
    """The rule `samora predict` applies to a NIfTI volume of this run (predict.intensity, auto by default)."""
    if setting != "auto":
        return str(setting)
    return dataset_intensity(source) or "ct_window"  # Synapse-layout data: NIfTI inputs are raw CT in HU


def check_output(out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists() or out.is_symlink():
        raise SamoraError(f"{out} already exists; bundle writes a new folder: remove it or give another OUT=...")
    return out


def export(plan: PredictPlan, out: str | None = None) -> dict:
    """Write the bundle of the plan's fine-tune (OUT, default `runs/<run>/bundle/<tag>`); returns its folder,
    files and size."""
    saved = plan.model
    folder = saved.folder
    out_dir = check_output(Path(out) if out else plan.folders.root / "bundle" / folder.name)
    verify_input(plan.weights, folder)
    model = load_finetuned(saved, plan.weights).eval()
    spec = saved.segmenter
    facts = BundleFacts(
        run=plan.folders.run,
        tag=folder.name,
        dataset=saved.dataset,
        mode=saved.mode,
        family=spec.family,
        variant=spec.variant,
        decoder=spec.decoder,
        fusion=saved.fusion_label,
        img_size=spec.img_size,
        class_names=class_names(saved.source, model.num_classes),
        intensity=bundle_intensity(plan.predict.intensity, saved.source),
        resize=saved.eval.resize,
        two_step_size=saved.eval.two_step_size,
        batch_size=plan.batch_size,
    )
    if plan.threads:
        torch.set_num_threads(plan.threads)
    log.info("bundle: tracing %s (%s, %d px)", folder, facts.fusion, facts.img_size)
    scripted = script_model(model, facts.img_size, facts.batch_size)
    return write_bundle(out_dir, facts, scripted)


def write_bundle(out_dir: Path, facts: BundleFacts, scripted) -> dict:
    """Assemble the bundle beside `out_dir` and rename it into place (nothing is left behind on an error)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        meta = metadata(facts)
        _write_json(staging / "configs" / "metadata.json", meta)
        _write_json(staging / "configs" / "inference.json", inference(facts))
        save_scripted(scripted, staging / "models" / "model.ts", {"metadata.json": json.dumps(meta)})
        (staging / "scripts").mkdir()
        (staging / "scripts" / "__init__.py").write_text("")
        shutil.copyfile(bundle_script.__file__, staging / "scripts" / "slices.py")
        (staging / "docs").mkdir()
        (staging / "docs" / "README.md").write_text(bundle_readme(facts))
        (staging / "LICENSE").write_text(license_text())
        check_output(out_dir)  # nobody made it meanwhile
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    log.info("bundle: wrote %s (%d files, %.1f MB)", out_dir, len(files), size / 1e6)
    return {"bundle": str(out_dir), "files": files, "bytes": size}


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def run(plan: PredictPlan, out: str | None = None) -> dict:
    """`samora bundle [out=FOLDER] key=value ...`: the fine-tune `samora predict` would read, as a bundle."""
    return export(plan, out)
