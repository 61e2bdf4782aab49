"""The protocol evaluation of a fine-tuned model, and `samora evaluate`, which re-evaluates a finished one.

`samora evaluate` picks the run's fine-tune as `samora predict` does (`config/finished.py`) and rebuilds its
model from the `config.yaml` it saved; `eval.checkpoint` instead evaluates a weights file as the model the
command's own config describes.
"""

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_modules import build_datamodule
from samora_pl.config.plans import FINAL_FILE, FinetunePlan
from samora_pl.errors import SamoraError
from samora_pl.evaluation import CaseMetricsPool, gather_rows, predict_volume, shard_cases, summarise, write_results
from samora_pl.evaluation.report import format_table
from samora_pl.models.factory import build_segmenter
from samora_pl.records.manifest import is_rank_zero, read_manifest, verify_input
from samora_pl.training.progress import track
from samora_pl.training.trainer import build_fabric

log = logging.getLogger(__name__)
MASK_TOKENS = "mask_decoder.mask_tokens.weight"  # (K + 1, C): background and one token per class
HSAM_PREFIX = "hsam_decoder."  # H-SAM's stage 2 (model.decoder=hsam); stage 1 is mask_decoder
TRANSDUCTIVE_NOTE = (
    "Transductive: stage-1 pre-training read the test images (cpt.include_test_cases=true); these numbers "
    "do not compare with inductive results."
)


def pretraining_saw_test_cases(plan: FinetunePlan) -> bool:
    """Whether stage 1 read the test images: cpt.include_test_cases=true here, or in the pool record of a
    distilled expert this fine-tune fuses (its manifest's inputs.pool)."""
    if plan.include_test_cases:
        return True
    if plan.mode == "samed" or plan.zero_experts:
        return False
    for path in plan.expert_files.values():
        pool = ((read_manifest(path.parent) or {}).get("inputs") or {}).get("pool") or {}
        if pool.get("include_test_cases"):
            return True
    return False


def evaluation_data(plan: FinetunePlan):
    """The data of a finished fine-tune, with the case split it wrote to `<folder>/splits` (datasets split by
    case), so re-evaluation tests the same cases even after the dataset's own lists or folder changed.
    A `data.list_dir` the user sets still wins."""
    data = build_datamodule(plan.data)
    saved = plan.folder / "splits"
    list_files = getattr(data, "list_files", ())
    if "list_dir" not in plan.data.options and list_files and all((saved / name).is_file() for name in list_files):
        log.info("evaluate: test cases from the run's split in %s", saved)
        data = build_datamodule(plan.data.with_options(list_dir=str(saved)))
    return data


def evaluate_model(plan: FinetunePlan, model, data, device=None, fusion_diagnostics=None) -> dict:
    """The evaluation protocol (docs/method.md) on every test volume; each rank takes its share, rank zero writes.
    `fusion_diagnostics` (the fine-tune's last validation, `FusionDiagnostics.latest`) goes into metrics.json."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    ev = plan.eval

    @torch.no_grad()
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device)).float().cpu()

    every = list(data.test_cases())
    cases = shard_cases(every)  # this rank's share
    shown = "evaluate" if len(cases) == len(every) else f"evaluate (rank 0's share of {len(every)})"
    # eval.workers > 1: each case's Dice/HD95 runs in a worker process while the model predicts the next
    with CaseMetricsPool(data.num_classes, workers=ev.workers) as pool:
        for case in track(cases, shown, "volume"):  # rank zero's line only
            volume = data.load_volume(case)
            pred = predict_volume(
                predict,
                volume.image,
                plan.segmenter.img_size,
                batch_size=ev.batch_size,
                resize=ev.resize,
                two_step_size=ev.two_step_size,
            )
            pool.submit(volume.case, pred, volume.label, volume.spacing)
        rows = pool.rows()
    rows = gather_rows(rows)
    summary = summarise(rows, data.class_names)
    if is_rank_zero():
        transductive = pretraining_saw_test_cases(plan)
        extra = {
            "resize_protocol": ev.resize,
            "hd95_unit": "voxels",
            "tag": plan.folder.name,
            "test_cases_in_pretraining": transductive,
            "fusion": plan.fusion_label,
            "labelled_subset": plan.subset_policy,
        }
        if fusion_diagnostics:
            extra["fusion_diagnostics"] = fusion_diagnostics
        notes = [f"fusion: {plan.fusion_label}", f"Labelled subset: {plan.subset_policy}."]
        notes += [TRANSDUCTIVE_NOTE] if transductive else []
        write_results(rows, data.class_names, plan.folder, extra=extra, notes=notes)
        print(format_table(summary, data.class_names, title=f"{plan.folders.run}/{plan.folder.name}"))
    return {"mean_dice": summary["mean_dice"], "mean_hd95": summary["mean_hd95"]}


def run(plan: FinetunePlan, weights: Path) -> dict:
    """`samora evaluate`: evaluate `weights` as the plan's model (the finished fine-tune's, or `eval.checkpoint`)
    and rewrite the results in the plan's folder."""
    if not weights.is_file():
        raise SamoraError(f"No fine-tuned model at {weights}; check the path (eval.checkpoint) or run the fine-tune.")
    verify_input(weights, plan.folder)
    device = None
    fabric = build_fabric(plan.trainer)
    if fabric.world_size > 1:  # DEVICES=2, -1, NUM_NODES=2: Fabric starts the ranks; each evaluates its share
        fabric.launch()
        device = fabric.device
    data = evaluation_data(plan)
    model = load_finetuned(plan, weights, data.num_classes)
    diagnostics = ((read_manifest(plan.folder) or {}).get("metrics") or {}).get("fusion_diagnostics")
    return evaluate_model(plan, model, data, device, diagnostics)


def weights_of(plan: FinetunePlan, checkpoint: str | None) -> Path:
    """`eval.checkpoint`, else the fine-tune's own final model."""
    return Path(checkpoint) if checkpoint else plan.folder / FINAL_FILE


def load_finetuned(plan: FinetunePlan, weights: Path, num_classes: int | None = None):
    """The stage-2 model of `plan` holding a finished fine-tune's weights (`samora evaluate`, `samora predict`).

    Without `num_classes`, K is read from the weights (the decoder has K + 1 mask tokens), so a prediction
    needs no copy of the training data. The file holds every weight (the load is strict), so SAM's
    `model.checkpoint` is not read: a run still predicts after the .pth moved or on a machine without it."""
    state = load_file(str(weights))
    if num_classes is None:
        if MASK_TOKENS not in state:
            raise SamoraError(f"{weights} holds no {MASK_TOKENS}: it is not a fine-tuned SAMora model.")
        num_classes = state[MASK_TOKENS].shape[0] - 1
    saved = "hsam" if any(key.startswith(HSAM_PREFIX) for key in state) else "sam"
    decoder = plan.segmenter.decoder
    if saved != decoder:
        raise SamoraError(
            f"{weights} holds a model.decoder={saved} model but the run is configured with "
            f"model.decoder={decoder}; set model.decoder={saved} or point at the matching weights."
        )
    model = build_segmenter(plan.segmenter, plan.layout, num_classes, load_sam=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SamoraError(f"{weights} does not match the configured model ({str(err).splitlines()[0]}).") from err
    return model
