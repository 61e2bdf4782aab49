"""`samora predict`: label maps of new volumes from a finished fine-tuning run, as NIfTI in the source frame.

The model is rebuilt from the run's saved `config.yaml` and `final.safetensors` (`finetune.load_finetuned`),
so the command line only names the run (`run`, and `finetune.tag` when it holds several fine-tunes, see
`finetune.finished_folder`); the weights file holds the whole model, so the SAM .pth the run was trained
from is not needed.
`predict.input` is one volume or a folder searched recursively for `.nii.gz`, `.nii`, `.mhd`, `.mha`
(read with their geometry) and `.h5` / `.hdf5` (dataset `image`; no geometry: unit spacing, identity
direction; the h5 volumes of LA are (W, H, D) and are transposed as `data_modules.labelled.la` reads them). Label
files (`*_segmentation.*`, PROMISE12's naming) are skipped.

Intensity (`predict.intensity`): `auto` applies the rule training applied to the run's dataset. For
volume datasets (la, promise12, generic) that is the data module's rule (data.intensity, else its
default: per-volume 0.5/99.5 percentiles, or the CT window for a generic CT set), so auto needs the run's
data folder to exist. Synapse-layout data (synapse, demo) is stored already windowed: h5 inputs are taken
as they are, and NIfTI / MHD inputs are taken as raw CT in HU and get Synapse's [-125, 275] window.
`none`, `ct_window` and `mr_percentile` force one rule for every input.

Each volume is predicted slice by slice with the run's evaluation protocol (`predict_volume`, the saved
`eval.resize`) and written to `<output>/<sub-folder>/<case>_pred.nii.gz` (the input's sub-folders
mirrored, nothing written elsewhere) with the source spacing, origin and direction;
`predict.overlay=true` adds `<case>_overlay.png`.
"""

import logging
import os
from pathlib import Path

import torch

from data_modules import LabelledDataSpec, build_datamodule, datamodule_class
from data_modules.io.readers import intensity as scale_intensity
from data_modules.io.volume_io import IMAGE_SUFFIXES, Geometry, read_image, strip_image_suffix, write_image
from data_modules.labelled.volumes import VolumeDataModule, volume_stats
from samora_pl.config.plans import PredictPlan
from samora_pl.errors import SamoraError
from samora_pl.evaluation import predict_volume
from samora_pl.evaluation.overlay import write_overlay
from samora_pl.records.manifest import verify_input
from samora_pl.stages.finetune.evaluate import load_finetuned
from samora_pl.training.progress import track

log = logging.getLogger(__name__)

H5_SUFFIXES = (".npy.h5", ".h5", ".hdf5")
VOLUME_SUFFIXES = IMAGE_SUFFIXES + H5_SUFFIXES
H5_AXES = {"la": (2, 1, 0)}  # datasets whose h5 volumes are stored (W, H, D), as data_modules/labelled/la.py reads them
LABEL_MARK = "_segmentation"


def is_h5(path: Path) -> bool:
    return path.name.lower().endswith(H5_SUFFIXES)


def case_name(path: Path) -> str:
    """'case0001.npy.h5' -> 'case0001', 'img.nii.gz' -> 'img'."""
    name = path.name
    for suffix in H5_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return strip_image_suffix(name)


def find_volumes(source: Path, out: Path) -> list:
    """(file, output folder) of every volume under `source`; the output folders mirror its sub-folders."""
    if source.is_file():
        if not source.name.lower().endswith(VOLUME_SUFFIXES):
            raise SamoraError(f"{source}: unknown volume format; predict reads {', '.join(VOLUME_SUFFIXES)}")
        return [(source, out)]
    if not source.is_dir():
        raise SamoraError(f"{source}: predict.input (IN) does not exist; give a volume or a folder of volumes")
    found = []
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() != out)
        for name in sorted(files):
            path = Path(folder) / name
            wanted = name.lower().endswith(VOLUME_SUFFIXES) and not case_name(path).endswith(LABEL_MARK)
            if wanted and not name.startswith("."):
                found.append((path, out / path.parent.relative_to(source)))
    if not found:
        raise SamoraError(
            f"{source}: no volumes to predict in this folder or below (looked for {', '.join(VOLUME_SUFFIXES)})"
        )
    targets = {}
    for path, folder in found:
        target = folder / f"{case_name(path)}_pred.nii.gz"
        if target in targets:
            raise SamoraError(f"{path} and {targets[target]} would both be predicted to {target}; rename one")
        targets[target] = path
    return found


def read_volume(path: Path, dataset: str) -> tuple:
    """(array (D, H, W), Geometry) of a NIfTI / MHD / MHA or h5 volume."""
    if not is_h5(path):
        return read_image(path, "image")
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "image" not in handle:
                keys = ", ".join(sorted(handle.keys())) or "nothing"
                raise SamoraError(f"{path}: no 'image' dataset (it has: {keys}); predict reads the volume from 'image'")
            array = handle["image"][()]
    except OSError as err:
        raise SamoraError(f"{path} cannot be read as HDF5 ({err}); check the file") from None
    if array.ndim != 3:
        raise SamoraError(f"{path}: 'image' has shape {array.shape}; expected a 3-D volume")
    return (array.transpose(H5_AXES[dataset]) if dataset in H5_AXES else array), Geometry()


def dataset_intensity(spec: LabelledDataSpec):
    """The intensity rule of a volume dataset's training data; None for Synapse-layout data (stored windowed)."""
    if not issubclass(datamodule_class(spec.name), VolumeDataModule):
        return None
    try:
        data = build_datamodule(spec)
    except SamoraError as err:
        raise SamoraError(
            f"predict.intensity=auto takes the rule of the run's dataset, which could not be opened "
            f"({err}); set predict.intensity=none|ct_window|mr_percentile instead."
        ) from None
    return data.intensity


def run(plan: PredictPlan) -> dict:
    """Predict every input volume with the run's fine-tuned model; returns what was written."""
    settings, saved, folder = plan.predict, plan.model, plan.model.folder
    out = Path(settings.output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SamoraError(f"{out}: predict.output (OUT) is a file; give a folder")
    volumes = find_volumes(Path(settings.input).expanduser().resolve(), out)
    verify_input(plan.weights, folder)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    use_cuda = torch.cuda.is_available() and plan.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    model = load_finetuned(saved, plan.weights).to(device).eval()
    rule = dataset_intensity(saved.source) if settings.intensity == "auto" else settings.intensity
    log.info("predict: %d volume(s) with %s (%s, %d classes)", len(volumes), folder, saved.dataset, model.num_classes)

    @torch.no_grad()
    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device)).float().cpu()

    written = []
    for path, target in track(volumes, "predict", "volume"):
        image, geometry = read_volume(path, saved.dataset)
        mode = rule or ("none" if is_h5(path) else "ct_window")
        scaled = scale_intensity(image, mode, volume_stats(image, mode))
        label = predict_volume(
            logits,
            scaled,
            saved.segmenter.img_size,
            batch_size=plan.batch_size,
            resize=saved.eval.resize,
            two_step_size=saved.eval.two_step_size,
        )
        written.append(write_image(target / f"{case_name(path)}_pred.nii.gz", label, geometry))
        if settings.overlay:
            write_overlay(
                target / f"{case_name(path)}_overlay.png", scaled, label, model.num_classes, settings.overlay_slices
            )
    log.info(
        "predict: wrote %d label map(s)%s to %s (intensity %s, resize %s)",
        len(written),
        " and overlays" if settings.overlay else "",
        out,
        rule or "ct_window for NIfTI/MHD, none for h5",
        saved.eval.resize,
    )
    return {"model": str(folder), "output": str(out), "predictions": [str(p) for p in written]}
