"""One frozen, typed plan per stage, built once from the validated configuration.

`samora <stage>` composes and validates the configuration (`config/compose.py`), then `build_plan` turns it
into the stage's plan: the only code that reads the configuration after validation. Every derived fact
(the fine-tune's tag and folder, its expert layout, the levels it fuses, the trainer's epochs, the data a
stage reads) is computed here once; stages read the plan, and the layers below them take the plan's plain
specs (`SegmenterSpec`, `LabelledDataSpec`, `PoolSpec`, `TrainerSpec`), never the configuration.

A plan also says which settings shape its output (`shaping`, `changed_in`): the rule that decides whether a
finished or interrupted stage folder may be reused. Its parts are the schema's own dataclasses
(`OmegaConf.to_object`), so they are typed like the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from data_modules.labelled.base import subset_policy
from data_modules.labelled.spec import LabelledDataSpec
from data_modules.pool.spec import PoolSpec
from samora_pl.config.choices import LEVELS, TEACHERS, Decoder, Family, Fusion, Mode
from samora_pl.config.compose import changed_since, flat_config, resolved_dict
from samora_pl.config.schema import (
    CptConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LoraHubConfig,
    LossConfig,
    OptimConfig,
    PredictConfig,
    ProbeConfig,
)
from samora_pl.config.specs import ExpertLayout, RunFolders, SegmenterSpec, TrainerSpec
from samora_pl.config.validate import checkpoint_path, levels_of
from samora_pl.training.effective_batch import accumulation, known_world_size

SAMED_EXPERT = "samed"  # the one LoRA slot of mode=samed (SAMed's own LoRA)
LORAHUB_SLOT = "hub"  # the one composed LoRA of fusion=lorahub (stages/finetune/lorahub.py)
TEACHER_OF_LEVEL = {"image": "simclr", "patch": "mae", "pixel": None}
EXPERT_FILE = "expert.safetensors"
FINAL_FILE = "final.safetensors"  # a fine-tune's whole model
TEACHER_FILE = "teacher.pt"
# settings that shape a CPT teacher besides its own cpt.<teacher> block; data.list_dir / data.split_seed
# choose the test cases the pool leaves out
CPT_KEYS = (
    "seed",
    "data.name",
    "data.dir",
    "data.list_dir",
    "data.split_seed",
    "cpt.sources",
    "cpt.skip_bad_files",
    "cpt.include_test_cases",
)
# what changes an expert; the image level also sees CPT's SimCLR views (SIMCLR_VIEW_KEYS)
DISTILL_KEYS = (
    "model.family",
    "model.variant",
    "model.img_size",
    "model.checkpoint",
    "model.init_seed",
    "model.lora_rank",
    "distill.",
    "cpt.sources",
    "cpt.include_test_cases",
    "data.name",
    "data.dir",
    "data.list_dir",
    "data.split_seed",
    "seed",
)
SIMCLR_VIEW_KEYS = ("crop_scale", "rotation_deg", "jitter", "blur_prob", "noise_std")
# what a fine-tune makes; data.cache, under data., does not change it (same slices, same augmentation)
FINETUNE_KEYS = ("model.", "data.", "optim.", "loss.", "mode", "seed", "finetune.")
# settings a SAMed fine-tune (one LoRA, no experts, no fusion) does not read
SAMED_UNREAD = (
    "model.fusion",
    "model.hl_",
    "model.lac_weights",
    "model.mole_balance_weight",
    "finetune.levels",
    "finetune.experts.",
    "finetune.zero_experts",
    "finetune.train_experts",
    "finetune.lorahub.",
)


def _typed(node: Any) -> Any:
    """A config section as the schema's dataclass instance (plain, typed values)."""
    return OmegaConf.to_object(node)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def folders_of(cfg: DictConfig) -> RunFolders:
    return RunFolders(Path(cfg.runs_dir), cfg.run)


def trainer_spec(cfg: DictConfig, max_epochs: int, accumulate: int = 1) -> TrainerSpec:
    t = cfg.trainer
    devices = _plain(t.devices)
    return TrainerSpec(
        accelerator=t.accelerator,
        devices=tuple(devices) if isinstance(devices, list) else devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=max_epochs,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        image_log_every_n_epochs=t.image_log_every_n_epochs,
        deterministic=cfg.deterministic,
        threads=cfg.threads,
        skip_nonfinite=cfg.skip_nonfinite,
        logger=cfg.logger,
        accumulate_grad_batches=accumulate,
    )


def segmenter_spec(cfg: DictConfig) -> SegmenterSpec:
    m = cfg.model
    return SegmenterSpec(
        family=Family(m.family).value,
        variant=m.variant,
        img_size=m.img_size,
        lora_rank=m.lora_rank,
        hl_order=m.hl_order,
        hl_width=m.hl_width,
        hl_heads=m.hl_heads,
        hl_init=m.hl_init,
        lac_weights=None if m.lac_weights is None else tuple(float(w) for w in m.lac_weights),
        checkpoint=checkpoint_path(cfg.model.checkpoint),
        grad_checkpoint=m.grad_checkpoint,
        encoder_seed=m.init_seed,
        seed=cfg.seed,
        pos_embed_resize=m.pos_embed_resize,
        decoder=Decoder(m.decoder).value,
        hsam_cmattn=m.hsam_cmattn,
        hsam_cmattn_heads=m.hsam_cmattn_heads,
        hsam_noise=m.hsam_noise,
        hsam_inference=m.hsam_inference,
    )


def dataset_options(cfg: DictConfig) -> dict[str, Any]:
    """The dataset options the user set (data.intensity, data.list_dir, data.split_seed); unset ones are left
    out, so a dataset without them is only refused when they are asked for."""
    options = {
        "intensity": None if cfg.data.intensity == "auto" else cfg.data.intensity,
        "list_dir": cfg.data.list_dir,
        "split_seed": cfg.data.split_seed,
    }
    return {key: value for key, value in options.items() if value is not None}


def dataset_spec(cfg: DictConfig, **options: Any) -> LabelledDataSpec:
    """The labelled dataset as every stage reads it: its own options plus the caller's."""
    return LabelledDataSpec(cfg.data.name, cfg.data.dir, {**options, **dataset_options(cfg)})


def labelled_data_spec(cfg: DictConfig, split_dir: Path) -> LabelledDataSpec:
    """The fine-tune's labelled data: the fraction, its subset, augmentation and the run's split folder."""
    d = cfg.data
    return dataset_spec(
        cfg,
        img_size=cfg.model.img_size,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        fraction=d.fraction,
        fraction_by=d.fraction_by,
        fraction_list=d.fraction_list,
        seed=cfg.seed,
        subset_seed=d.subset_seed,
        split_dir=split_dir,
        augment=d.augment,
        val_slices=d.val_slices,
        cache=d.cache,
        train_size=d.train_size,
    )


def pool_spec(cfg: DictConfig) -> PoolSpec:
    """The unlabeled pool CPT and distillation read (cpt.sources, else the dataset's images)."""
    index = Path(cfg.cpt.index_cache) if cfg.cpt.index_cache else Path(cfg.runs_dir) / ".cache" / "cpt_pool_index.json"
    return PoolSpec(
        dataset=cfg.data.name,
        root=cfg.data.dir,
        sources=tuple(_plain(s) for s in cfg.cpt.sources),
        skip_bad_files=cfg.cpt.skip_bad_files,
        index_path=index,
        cache_volumes=cfg.cpt.cache_volumes,
        include_test_cases=cfg.cpt.include_test_cases,
        num_workers=cfg.data.num_workers,
        test_split={"seed": cfg.seed, **dataset_options(cfg)},
    )


def _select(flat: dict, keys: tuple, ignore: tuple) -> dict:
    return {k: v for k, v in flat.items() if k.startswith(keys) and not k.startswith(ignore)}


@dataclass(frozen=True)
class StagePlan:
    """What every stage plan has: where the run lives, its seed, and the resolved config it saves."""

    stage: ClassVar[str] = ""
    folders: RunFolders
    seed: int
    overwrite: bool
    config: dict = field(repr=False)  # the resolved configuration, as config.yaml and the manifest keep it

    def shaping_keys(self, sub: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(dotted key prefixes that shape the output `sub`, prefixes among them that do not)."""
        raise NotImplementedError(f"the {self.stage} stage reuses no output")

    def shaping(self, sub: str) -> dict:
        """{dotted key: value} of the settings that decide whether output `sub` may be reused."""
        return self.values(*self.shaping_keys(sub))

    def values(self, keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> dict:
        """{dotted key: value} of the resolved settings under the prefixes `keys`, less those under `ignore`."""
        return _select(flat_config(OmegaConf.create(self.config)), keys, ignore)

    def changed_in(self, folder: Path, sub: str, watch: tuple = (), ignore: tuple = ()) -> list[str]:
        """Shaping keys (plus `watch`, less `ignore`) whose values differ from the config `folder` was made
        with; empty when the folder may be reused or has no saved config."""
        keys, skip = self.shaping_keys(sub)
        return changed_since(Path(folder) / "config.yaml", OmegaConf.create(self.config), keys + watch, skip + ignore)


@dataclass(frozen=True)
class CptPlan(StagePlan):
    stage: ClassVar[str] = "cpt"
    teachers: tuple[str, ...]
    cpt: CptConfig
    pool: PoolSpec
    trainer: dict[str, TrainerSpec]  # per teacher: its own cpt.<teacher>.max_epochs
    requires_checkpoints: bool = False

    def folder(self, kind: str) -> Path:
        return self.folders.stage("cpt", kind)

    def teacher_file(self, kind: str) -> Path:
        return self.folder(kind) / TEACHER_FILE

    def shaping_keys(self, sub: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """More CPT epochs continue the same teacher."""
        return CPT_KEYS + (f"cpt.{sub}",), (f"cpt.{sub}.max_epochs",)


@dataclass(frozen=True)
class DistillPlan(StagePlan):
    stage: ClassVar[str] = "distill"
    levels: tuple[str, ...]
    distill: DistillConfig
    segmenter: SegmenterSpec
    pool: PoolSpec
    trainer: TrainerSpec
    teacher_files: dict[str, Path]  # image / patch: distill.teacher or the run's CPT output
    teacher_given: bool  # distill.teacher names the file (else the run's CPT output)
    simclr_views: dict[str, Any]  # the image level's views: CPT's SimCLR augmentation
    dataset: str

    def folder(self, level: str) -> Path:
        return self.folders.stage("distill", level)

    def shaping_keys(self, sub: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The image level also sees CPT's SimCLR views; the level itself changes nothing an expert is."""
        views = tuple(f"cpt.simclr.{key}" for key in SIMCLR_VIEW_KEYS) if sub == "image" else ()
        return DISTILL_KEYS + views, ("distill.level",)


def fusion_label(mode: str, fusion: str, hl_init: str) -> str:
    """The fusion as every results table states it, e.g. `hl_attn (hl_init=paper)`."""
    if mode == "samed":
        return "none (mode=samed, one LoRA)"
    if fusion == "hl_attn":
        return f"hl_attn (hl_init={hl_init})"
    return fusion


def finetune_tag(cfg: DictConfig) -> str:
    """`finetune.tag`, else `<mode>-<fusion>[-levels][-zero][-trainexp][-decoder]-f<fraction>`."""
    if cfg.finetune.tag:
        return cfg.finetune.tag
    samed = cfg.mode == "samed"
    fusion = "lora" if samed else cfg.model.fusion.replace(":", "-")
    zero = "-zero" if cfg.finetune.zero_experts and not samed else ""
    zero += "-trainexp" if cfg.finetune.train_experts and not samed else ""
    levels = "" if samed or cfg.finetune.levels is None else "-" + "+".join(levels_of(cfg.finetune.levels))
    decoder = "" if cfg.model.decoder == "sam" else f"-{cfg.model.decoder}"
    return f"{cfg.mode}-{fusion}{levels}{zero}{decoder}-f{cfg.data.fraction:g}"


@dataclass(frozen=True)
class FinetunePlan(StagePlan):
    """A fine-tune (or the model of a finished one, for evaluate / predict) and its evaluation."""

    stage: ClassVar[str] = "finetune"
    tag: str
    folder: Path
    mode: str  # a Mode value
    levels: tuple[str, ...]  # the experts fused (mode=samora)
    layout: ExpertLayout  # the segmenter's LoRA slots and fusion
    fusion_label: str
    segmenter: SegmenterSpec
    data: LabelledDataSpec
    source: LabelledDataSpec  # the dataset alone (its own options, model size): what predict reads its rule from
    data_settings: DataConfig
    optim: OptimConfig
    loss: LossConfig
    eval: EvalConfig
    lorahub: LoraHubConfig
    trainer: TrainerSpec  # max_epochs: where training stops (trainer.stop_epoch, else the schedule's end)
    schedule_epochs: int  # the LR schedule's span (trainer.max_epochs)
    expert_files: dict[str, Path]  # level -> distilled expert (finetune.experts.<level>, else the run's)
    experts_given: dict[str, bool]  # level -> finetune.experts.<level> was set
    zero_experts: bool
    train_experts: bool
    evaluate: bool
    uses_lorahub: bool
    mole_aux_weight: float  # MoLE's gate-balance loss weight (0 for every other fusion)
    include_test_cases: bool  # cpt.include_test_cases: this run's stage 1 read the test images
    subset_policy: str
    dataset: str

    def shaping_keys(self, sub: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A fine-tune's evaluation or cache changes nothing it makes; SAMed reads no fusion setting."""
        ignore = ("finetune.evaluate", "data.cache") + (SAMED_UNREAD if self.mode == Mode.SAMED else ())
        return FINETUNE_KEYS, ignore

    @property
    def reads_experts(self) -> bool:
        return self.mode == Mode.SAMORA and not self.uses_lorahub and not self.zero_experts


def _finetune_plan(cfg: DictConfig, config: dict) -> FinetunePlan:
    folders = folders_of(cfg)
    tag = finetune_tag(cfg)
    folder = folders.stage("finetune", tag)
    levels = levels_of(cfg.finetune.levels)
    mode = Mode(cfg.mode).value
    samed = mode == Mode.SAMED
    lorahub = not samed and cfg.model.fusion == Fusion.LORAHUB
    if samed:
        layout = ExpertLayout((SAMED_EXPERT,), f"single:{SAMED_EXPERT}")
    elif lorahub:
        layout = ExpertLayout((LORAHUB_SLOT,), f"single:{LORAHUB_SLOT}")
    else:
        layout = ExpertLayout(levels, cfg.model.fusion)
    given: dict[str, bool] = {str(lv): bool(cfg.finetune.experts[lv]) for lv in LEVELS}
    files = {
        lv: Path(cfg.finetune.experts[lv]) if given[lv] else folders.stage("distill", lv) / EXPERT_FILE for lv in levels
    }
    world = known_world_size(_plain(cfg.trainer.devices), cfg.trainer.num_nodes)
    accumulate = accumulation(cfg.data.effective_batch_size, cfg.data.batch_size, world)
    d = cfg.data
    return FinetunePlan(
        folders=folders,
        seed=cfg.seed,
        overwrite=cfg.overwrite,
        config=config,
        tag=tag,
        folder=folder,
        mode=mode,
        levels=levels,
        layout=layout,
        fusion_label=fusion_label(cfg.mode, cfg.model.fusion, cfg.model.hl_init),
        segmenter=segmenter_spec(cfg),
        data=labelled_data_spec(cfg, folder / "splits"),
        source=dataset_spec(cfg, img_size=cfg.model.img_size),
        data_settings=_typed(cfg.data),
        optim=_typed(cfg.optim),
        loss=_typed(cfg.loss),
        eval=_typed(cfg.eval),
        lorahub=_typed(cfg.finetune.lorahub),
        trainer=trainer_spec(cfg, cfg.trainer.stop_epoch or cfg.trainer.max_epochs, accumulate),
        schedule_epochs=cfg.trainer.max_epochs,
        expert_files=files,
        experts_given=given,
        zero_experts=cfg.finetune.zero_experts and not samed,
        train_experts=cfg.finetune.train_experts,
        evaluate=cfg.finetune.evaluate,
        uses_lorahub=lorahub,
        mole_aux_weight=cfg.model.mole_balance_weight if not samed and cfg.model.fusion == Fusion.MOLE else 0.0,
        include_test_cases=cfg.cpt.include_test_cases,
        subset_policy=subset_policy(d.fraction_by, d.fraction_list, d.subset_seed, d.fraction),
        dataset=d.name,
    )


def _cpt_plan(cfg: DictConfig, config: dict) -> CptPlan:
    teachers = TEACHERS if cfg.cpt.teacher == "all" else (cfg.cpt.teacher,)
    return CptPlan(
        folders=folders_of(cfg),
        seed=cfg.seed,
        overwrite=cfg.overwrite,
        config=config,
        teachers=teachers,
        cpt=_typed(cfg.cpt),
        pool=pool_spec(cfg),
        trainer={kind: trainer_spec(cfg, cfg.cpt[kind].max_epochs) for kind in TEACHERS},
        requires_checkpoints=cfg.requires_checkpoints,
    )


def _distill_plan(cfg: DictConfig, config: dict) -> DistillPlan:
    folders = folders_of(cfg)
    levels = LEVELS if cfg.distill.level == "all" else (cfg.distill.level,)
    teacher = cfg.distill.teacher
    files = {
        lv: Path(teacher) if teacher else folders.stage("cpt", kind) / TEACHER_FILE
        for lv, kind in TEACHER_OF_LEVEL.items()
        if kind is not None
    }
    views = {key: _plain(cfg.cpt.simclr[key]) for key in SIMCLR_VIEW_KEYS}
    views["crop_scale"] = tuple(views["crop_scale"])
    return DistillPlan(
        folders=folders,
        seed=cfg.seed,
        overwrite=cfg.overwrite,
        config=config,
        levels=levels,
        distill=_typed(cfg.distill),
        segmenter=segmenter_spec(cfg),
        pool=pool_spec(cfg),
        trainer=trainer_spec(cfg, cfg.distill.max_epochs),
        teacher_files=files,
        teacher_given=bool(teacher),
        simclr_views=views,
        dataset=cfg.data.name,
    )


@dataclass(frozen=True)
class CheckPlan(StagePlan):
    stage: ClassVar[str] = "check"
    data: LabelledDataSpec


def _check_plan(cfg: DictConfig, config: dict) -> CheckPlan:
    return CheckPlan(folders_of(cfg), cfg.seed, cfg.overwrite, config, dataset_spec(cfg, img_size=cfg.model.img_size))


@dataclass(frozen=True)
class PreparePlan(StagePlan):
    """`samora prepare`: the raw download `raw` of `dataset` (or of `source`) into the layout at `out`."""

    stage: ClassVar[str] = "prepare"
    dataset: str
    raw: str | None
    out: str
    source: str | None


def _prepare_plan(cfg: DictConfig, config: dict) -> PreparePlan:
    p = cfg.prepare
    out = p.out or cfg.data.dir
    return PreparePlan(folders_of(cfg), cfg.seed, cfg.overwrite, config, cfg.data.name, p.raw, out, p.source)


@dataclass(frozen=True)
class ProbePlan(StagePlan):
    """`samora probe`: the run's teachers and experts, probed on its labelled training slices."""

    stage: ClassVar[str] = "probe"
    folder: Path
    probe: ProbeConfig
    data: LabelledDataSpec
    img_size: int
    teacher_files: dict[str, Path]  # kind -> the run's CPT output
    expert_files: dict[str, Path]  # level -> the run's distilled expert
    accelerator: str
    threads: int | None
    logger: str  # the run's tracker: the scores go there too
    dataset: str


def _probe_plan(cfg: DictConfig, config: dict) -> ProbePlan:
    folders = folders_of(cfg)
    folder = folders.root / "probe"
    return ProbePlan(
        folders=folders,
        seed=cfg.seed,
        overwrite=cfg.overwrite,
        config=config,
        folder=folder,
        probe=_typed(cfg.probe),
        data=labelled_data_spec(cfg, folder / "splits"),
        img_size=cfg.model.img_size,
        teacher_files={kind: folders.stage("cpt", kind) / TEACHER_FILE for kind in TEACHERS},
        expert_files={lv: folders.stage("distill", lv) / EXPERT_FILE for lv in LEVELS},
        accelerator=cfg.trainer.accelerator,
        threads=cfg.threads,
        logger=cfg.logger,
        dataset=cfg.data.name,
    )


@dataclass(frozen=True)
class PredictPlan(StagePlan):
    """`samora predict`: the command's settings, and the model of a finished fine-tune (`config/finished.py`)."""

    stage: ClassVar[str] = "predict"
    predict: PredictConfig
    model: FinetunePlan  # from the fine-tune's own saved config.yaml
    weights: Path
    threads: int | None
    accelerator: str
    batch_size: int  # eval.batch_size of this command


# stage -> its plan builder; `evaluate` and `predict` read a finished fine-tune (`config/finished.py`)
PLANS: dict[str, Callable[[DictConfig, dict], StagePlan]] = {
    "cpt": _cpt_plan,
    "distill": _distill_plan,
    "finetune": _finetune_plan,
    "evaluate": _finetune_plan,
    "check": _check_plan,
    "prepare": _prepare_plan,
    "probe": _probe_plan,
}


def build_plan(cfg: DictConfig) -> StagePlan:
    """The plan of the validated configuration `cfg` of its stage (`cfg.stage`); for `evaluate` the plan of
    the fine-tune that `cfg` describes (`config/finished.py` finds a finished one)."""
    return PLANS[cfg.stage](cfg, resolved_dict(cfg))
