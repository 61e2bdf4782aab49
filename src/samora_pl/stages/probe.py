"""`samora probe`: what each stage-1 product has learnt, measured on the run's labelled training slices.

Part 1, teachers: a linear and a k-NN probe of per-slice organ presence on the features of each CPT
teacher (`cpt/<kind>/teacher.pt`, loaded as distillation loads it), of the same teacher before CPT (its
starting weights, rebuilt from the CPT stage's saved config) and of a random teacher of the same
architecture (seed + 1). Does CPT learn anything here?

Part 2, experts: the same probe on SAM's pooled neck features with each distilled expert on
(`distill/<level>/expert.safetensors`), with the bare encoder and with SAMed's label-trained LoRA of any
`mode=samed` fine-tune of the run; a patch-level probe (which class covers most of the 16-px patch, each
organ against the rest) on the neck's positions; and the linear CKA between the teacher's and the
student's features on the held-out slices
(image level: SimCLR projection vs pooled neck; patch level: MAE tokens vs last-block tokens at the same
positions), for the expert and for the bare encoder.

Only training slices are read (never a test volume); the held-out part is a seeded share of their cases.
Writes `runs/<run>/probe/{metrics.json, results.md, manifest.json, config.yaml}` and TensorBoard scalars
`probe/<subject>/<metric>` under `runs/<run>/tb/probe`. docs/diagnostics.md says how to read them.
"""

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from data_modules import build_datamodule
from samora_pl.config.compose import load_saved
from samora_pl.config.plans import FINAL_FILE, ProbePlan, build_plan
from samora_pl.diagnostics.cka import linear_cka
from samora_pl.diagnostics.features import encoder_features, teacher_features
from samora_pl.diagnostics.probe_data import load_slices, patch_classes
from samora_pl.diagnostics.probing import probe_scores
from samora_pl.errors import SamoraError
from samora_pl.models.adapters.lora import read_expert_metadata
from samora_pl.models.factory import base_fingerprint
from samora_pl.models.teachers.factory import build_teacher
from samora_pl.models.teachers.files import load_teacher
from samora_pl.records.atomic import atomic_write_text
from samora_pl.records.manifest import StageRecord, is_rank_zero, save_config, verify_input
from samora_pl.stages.cpt.run import initial_teacher
from samora_pl.stages.distill import run as distill
from samora_pl.stages.distill.targets import to_teacher_grid
from samora_pl.stages.finetune.evaluate import load_finetuned

log = logging.getLogger(__name__)
LEVEL_OF = {"simclr": "image", "mae": "patch"}  # the distillation level each teacher feeds
COLUMNS = (
    "linear_bacc",
    "linear_auroc",
    "knn_bacc",
    "knn_auroc",
    "patch_linear_bacc",
    "patch_linear_auroc",
    "cka_vs_teacher",
    "cka_vs_simclr",
    "cka_vs_mae",
)


def _device(accelerator: str) -> torch.device:
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _inputs(plan: ProbePlan):
    """The run's teachers {kind: path}, experts {level: path} and SAMed fine-tunes {tag: folder}."""
    teachers = {kind: path for kind, path in plan.teacher_files.items() if path.is_file()}
    experts = {level: path for level, path in plan.expert_files.items() if path.is_file()}
    samed = {}
    for folder in sorted((plan.folders.root / "finetune").glob("*")):
        finished = (folder / FINAL_FILE).is_file() and (folder / "config.yaml").is_file()
        if finished and load_saved(folder / "config.yaml").mode == "samed":
            samed[folder.name] = folder
    return teachers, experts, samed


class Prober:
    """Holds the slices, their split and targets, and scores any features with both probes."""

    def __init__(self, settings, slices):
        self.p = settings
        self.slices = slices
        self.presence = slices.presence()
        self.train, self.test = slices.train, slices.test

    def slice_level(self, pooled: torch.Tensor) -> dict:
        y = self.presence
        return probe_scores(
            pooled[self.train], y[self.train], pooled[self.test], y[self.test], knn_k=self.p.knn_k, l2=self.p.l2
        )

    def patch_level(self, neck: torch.Tensor) -> dict:
        """Linear probe of each organ against everything else (background and the other organs) as the majority
        class of a patch, on the neck's positions (at most max_patches each part). Organ against background
        alone is too easy to tell encoders apart: a brain or an abdomen is found by intensity."""
        grid = neck.shape[1:3]
        classes = self.slices.num_classes
        target = F.one_hot(patch_classes(self.slices.labels, grid, classes), classes + 1)[..., 1:]
        generator = torch.Generator().manual_seed(int(self.p.seed))

        def rows(index):
            x = neck[index].reshape(-1, neck.shape[-1])
            y = target[index].reshape(-1, classes).float()
            if x.shape[0] > self.p.max_patches:
                keep = torch.randperm(x.shape[0], generator=generator)[: self.p.max_patches]
                x, y = x[keep], y[keep]
            return x, y

        (train_x, train_y), (test_x, test_y) = rows(self.train), rows(self.test)
        return probe_scores(train_x, train_y, test_x, test_y, l2=self.p.l2, prefix="patch_", knn=False)


def _start_and_random(path: Path, kind: str, trained, notes: list) -> dict:
    """The teacher before CPT (rebuilt from the CPT stage's saved config, as CPT started it) and a random one
    of the same architecture (the CPT seed + 1); `start` is None, with a note, when it cannot be rebuilt."""
    saved = path.parent / "config.yaml"
    if not saved.is_file():
        notes.append(f"teacher_{kind}_start: skipped, {saved} is missing (the starting weights cannot be rebuilt)")
        return {"start": None, "random": _random_teacher(kind, trained, 1)}
    start_plan = build_plan(load_saved(saved))
    try:
        start, _ = initial_teacher(start_plan.cpt, start_plan.seed, kind)
    except SamoraError as err:  # e.g. the public checkpoint CPT started from has moved
        notes.append(f"teacher_{kind}_start: skipped, its starting weights cannot be loaded ({err})")
        return {"start": None, "random": _random_teacher(kind, trained, start_plan.seed + 1)}
    if dict(start.arch) != dict(trained.arch):
        notes.append(f"teacher_{kind}_start: skipped, {saved} describes another architecture than {path}")
        start = None
    else:
        start.eval().requires_grad_(False)
    return {"start": start, "random": _random_teacher(kind, trained, start_plan.seed + 1)}


def _random_teacher(kind: str, trained, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_teacher(kind, dict(trained.arch)).eval().requires_grad_(False)


def probe_teachers(prober, teachers, record, device, notes) -> tuple:
    """Part 1: {subject: scores} for each teacher after CPT, before CPT and random; the CPT teachers' held-out
    features (for part 2's CKA)."""
    scores, held_out = {}, {}
    images, batch = prober.slices.images, prober.p.batch_size
    for kind, path in teachers.items():
        record.add_input(f"teacher_{kind}", verify_input(path, path.parent))
        trained = load_teacher(path, kind=kind)
        variants = {"cpt": trained, **_start_and_random(path, kind, trained, notes)}
        for name, teacher in variants.items():
            if teacher is None:
                continue
            print(f"probe: part 1/2, teacher {kind} ({name})", flush=True)
            feats = teacher_features(teacher, images, batch, device)
            scores[f"teacher_{kind}_{name}"] = prober.slice_level(feats["pooled"])
            if "tokens" in feats:  # MAE: the same patch probe as SAM's neck, on its patch tokens
                scores[f"teacher_{kind}_{name}"].update(prober.patch_level(feats["tokens"]))
            if name == "cpt":
                held_out[kind] = {k: v[prober.test] for k, v in feats.items() if k != "pooled"}
    return scores, held_out


def _cka(feats: dict, teacher: dict, kind: str, test) -> float:
    if kind == "simclr":
        return linear_cka(teacher["embed"], feats["pooled"][test])
    target = teacher["tokens"]
    student = to_teacher_grid(feats["tokens"][test], target.shape[1:3])
    return linear_cka(target.reshape(-1, target.shape[-1]), student.reshape(-1, student.shape[-1]))


def probe_encoders(prober, experts, samed, held_out, record, device, notes) -> dict:
    """Part 2: {subject: scores} for SAM's encoder with each expert, bare, and with SAMed's LoRA."""
    scores, bare = {}, {}
    images, batch, test = prober.slices.images, prober.p.batch_size, prober.test

    def measure(subject: str, model, cka_kinds) -> dict:
        print(f"probe: part 2/2, {subject}", flush=True)
        feats = encoder_features(model, images, batch, device)
        out = {**prober.slice_level(feats["pooled"]), **prober.patch_level(feats["neck"])}
        for kind, key in cka_kinds:
            if kind in held_out:
                out[key] = _cka(feats, held_out[kind], kind, test)
        scores[subject] = out
        return out

    for level, path in experts.items():
        saved = path.parent / "config.yaml"
        if not saved.is_file():
            notes.append(f"expert_{level}: skipped, {saved} is missing (the encoder it was distilled on is unknown)")
            continue
        model = distill.build_student(build_plan(load_saved(saved)).segmenter, level)
        fingerprint = base_fingerprint(model)
        if fingerprint not in bare:
            subject = "encoder_bare" if not bare else f"encoder_bare_{level}"
            measure(subject, model, (("simclr", "cka_vs_simclr"), ("mae", "cka_vs_mae")))
            bare[fingerprint] = subject
        if read_expert_metadata(path).get("base_fingerprint") not in (None, fingerprint):
            notes.append(f"expert_{level}: skipped, {path} was distilled on another SAM encoder than {saved} builds")
            continue
        record.add_input(f"expert_{level}", verify_input(path, path.parent))
        model.load_expert(level, path)
        kind = distill.TEACHER_KIND[level]
        measure(f"expert_{level}", model, ((kind, "cka_vs_teacher"),) if kind else ())
    if not samed:
        notes.append("samed: no mode=samed fine-tune in this run, so no label-trained LoRA to compare with")
    for tag, folder in samed.items():
        record.add_input(f"samed_{tag}", verify_input(folder / FINAL_FILE, folder))
        model = load_finetuned(build_plan(load_saved(folder / "config.yaml")), folder / FINAL_FILE)
        measure(f"samed_{tag}", model, (("simclr", "cka_vs_simclr"), ("mae", "cka_vs_mae")))
    return scores


def _fmt(value) -> str:
    if value is None:
        return ""
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def format_table(scores: dict) -> str:
    """A Markdown table: one row per subject, the columns any of them has."""
    columns = [c for c in COLUMNS if any(c in row for row in scores.values())]
    lines = ["| subject | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for subject, row in scores.items():
        lines.append(f"| {subject} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _no_nan(tree):
    """NaN (a score with no scorable class) as null, so metrics.json is strict JSON."""
    if isinstance(tree, dict):
        return {key: _no_nan(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_no_nan(value) for value in tree]
    return None if isinstance(tree, float) and math.isnan(tree) else tree


def _write_events(logger: str, run_root: Path, scores: dict, table: str) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    if logger != "tensorboard":  # the run's other tracker gets the scalars (the table is results.md)
        return _log_to_tracker(logger, run_root, scores)
    folder = run_root / "tb" / "probe"
    for old in folder.glob("events.out.tfevents.*"):  # one probe's scalars at a time
        old.unlink()
    writer = SummaryWriter(log_dir=str(folder))
    for subject, row in scores.items():
        for metric, value in row.items():
            if isinstance(value, float) and not math.isnan(value):
                writer.add_scalar(f"probe/{subject}/{metric}", value, 0)
    writer.add_text("probe/results", table, 0)
    writer.close()
    return folder


def _log_to_tracker(logger_kind: str, run_root: Path, scores: dict) -> Path:
    from samora_pl.training.loggers import build_logger, logger_dir

    logger = build_logger(logger_kind, logger_dir(run_root, logger_kind), "probe", "results")
    logger.log_metrics(
        {
            f"probe/{subject}/{metric}": value
            for subject, row in scores.items()
            for metric, value in row.items()
            if isinstance(value, float) and not math.isnan(value)
        },
        step=0,
    )
    logger.finalize("success")
    return logger_dir(run_root, logger_kind)


def run(plan: ProbePlan) -> dict:
    """`samora probe`: both parts on the run's products; returns {subject: scores}."""
    teachers, experts, samed = _inputs(plan)
    run, root, dataset = plan.folders.run, plan.folders.root, plan.dataset
    if not teachers and not experts:
        raise SamoraError(
            f"Run '{run}' in {plan.folders.runs_dir} has nothing to probe: no CPT teacher "
            f"({root / 'cpt'}/{{simclr,mae}}/teacher.pt) and no distilled expert "
            f"({root / 'distill'}/<level>/expert.safetensors). Make them first with `make cpt RUN={run} "
            f"DATA={dataset}` and `make distill LEVEL=all RUN={run} DATA={dataset}`, or name "
            "another run with run=... (RUN=...)."
        )
    if plan.threads:
        torch.set_num_threads(plan.threads)
    folder = plan.folder
    record = StageRecord(plan.stage, plan.config, folder)
    data = build_datamodule(plan.data)
    p = plan.probe
    slices = load_slices(data, plan.img_size, p.max_slices, p.holdout, p.seed)
    info = slices.summary()
    print(
        f"probe: {info['slices']} labelled training slices ({info['train_slices']} to fit, "
        f"{info['heldout_slices']} held out by {info['split_by']}); no test volume is read",
        flush=True,
    )
    device, notes = _device(plan.accelerator), []
    prober = Prober(p, slices)
    scores, held_out = probe_teachers(prober, teachers, record, device, notes)
    if not experts:
        notes.append("experts: none distilled in this run (part 2 skipped)")
    scores.update(probe_encoders(prober, experts, samed, held_out, record, device, notes))
    table = format_table(scores)
    metrics = {"run": run, "slices": info, "scores": scores, "notes": notes}
    if is_rank_zero():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metrics.json", json.dumps(_no_nan(metrics), indent=2))
        where = (
            f"{info['slices']} labelled training slices: {info['train_slices']} to fit, {info['heldout_slices']} "
            f"held out by {info['split_by']} ({', '.join(info['heldout_cases'])}); no test volume read."
        )
        text = f"# Probe of run {run}\n\n{where}\n\n{table}\n\n" + "".join(f"- {note}\n" for note in notes)
        atomic_write_text(folder / "results.md", text)
        save_config(plan.config, folder)
        _write_events(plan.logger, plan.folders.root, scores, table)
        record.add_output(folder / "metrics.json")
        record.add_output(folder / "results.md")
        record.metrics.update({f"{s}/{m}": v for s, row in scores.items() for m, v in row.items()})
        record.write()
        print(table)
        for note in notes:
            print(f"probe: note: {note}")
    return scores
