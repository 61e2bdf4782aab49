"""The one configuration schema of samora_pl, as OmegaConf structured dataclasses.

Every key a user can set lives here with its default, so an unknown key or a value of the wrong type is
caught by OmegaConf before any work starts; `config/compose.py` adds the checks types cannot express (allowed
values, ranges). Stage YAML files in `experiments/` only change values, never add keys.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    name: str = "demo"  # demo | synapse | la | promise12 | generic
    dir: str | None = None  # default: data/<name>
    batch_size: int = 8  # per device (one micro-batch)
    # fine-tune: slices per optimiser step over all devices; none -> batch_size x devices. Reached by
    # accumulating effective / (batch_size x devices) micro-batches (SAMed: 24, H-SAM: 16; effective_batch.py)
    effective_batch_size: int | None = None
    num_workers: int = 0
    fraction: float = 1.0  # labelled fraction, in (0, 1]
    fraction_by: str = "slice"  # one of choices.FRACTION_MODES
    fraction_list: str | None = None  # file of slice names, with fraction_by=list
    subset_seed: int | None = None  # seeds the labelled subset alone (fixed across seeds); none -> the run seed
    val_slices: int = 32  # monitoring only (TensorBoard), from training slices; the final model is the last epoch
    augment: bool = True
    # fine-tune: training (and monitoring) slices go to this size first (cubic image, nearest label), are
    # augmented there, then resized to model.img_size, as SAMed trains on its 224 release zoomed to 512;
    # none -> straight to model.img_size
    train_size: int | None = None
    cache: bool = False  # hold the labelled training slices in memory after one read (Synapse 10 %: 0.3 GB per rank)
    # Dataset options; set for a dataset that lacks them, they are refused by name.
    intensity: str = "auto"  # la, promise12, generic: one of choices.INTENSITY_OPTIONS (auto: the dataset's)
    list_dir: str | None = None  # folder of the dataset's train/test list files; none -> the dataset's own place
    split_seed: int | None = None  # la, generic without lists: seeds the split by case (none -> 0; not the run seed)


@dataclass
class ModelConfig:
    family: str = "sam"  # one of choices.FAMILIES (sam2: SAM 2's Hiera encoder, from the sam2 package)
    variant: str = "tiny"  # family sam: tiny | vit_b | vit_l | vit_h; family sam2: tiny | t | s | b+ | l
    img_size: int = 128
    checkpoint: str | None = None  # official SAM .pth; unset -> random init from init_seed ("none": on purpose)
    init_seed: int = 0  # seeds the frozen encoder's random init only (trainable parts follow the run seed)
    lora_rank: int = 4
    fusion: str = "hl_attn"  # one of choices.FUSIONS (docs/baselines.md)
    hl_order: str = "pixel-patch-image"  # one of choices.HL_ORDERS
    hl_width: int | None = None  # HL-Attn inner width; none -> encoder width (authors')
    hl_heads: int | None = None  # none -> encoder heads
    hl_init: str = "paper"  # one of choices.HL_INITS; the authors' form (docs/design.md, HL-Attn initialisation)
    lac_weights: list[float] | None = None  # fusion=lac: one fixed weight per expert, summing to 1; none -> 1/N
    mole_balance_weight: float = 0.5  # fusion=mole: alpha of MoLE's gate-balance loss (0.5 as published)
    grad_checkpoint: bool = False
    pos_embed_resize: str = "bilinear"  # bilinear (SAMed, H-SAM) | bicubic: SAM's 64x64 position embedding to S/16
    decoder: str = "sam"  # sam | hsam (H-SAM's two-stage decoder, docs/hsam.md)
    hsam_cmattn: str = "released"  # released (inert, X' = 2X, as the authors' code) | working (sigmoid map)
    hsam_cmattn_heads: int | None = None  # class-wise attention heads, must divide (img_size/16)^2; none -> <= 8
    hsam_noise: float = 0.2  # training-only embedding noise before stage 2, times the batch's embedding range
    hsam_inference: str = "mean"  # mean (of both upsampled stages, released default) | stage2


@dataclass
class TrainerConfig:
    max_epochs: int = 20  # fine-tune: also the span of the LR schedule, in epochs
    # fine-tune: stop after this many epochs of the max_epochs schedule (SAMed's stop_epoch: 160 of 200, so
    # the last LR is ~0.25x base); none -> train all max_epochs
    stop_epoch: int | None = None
    accelerator: str = "auto"
    devices: Any = 1  # GPUs (-1 or auto: all), or CPU processes where there is no GPU; >1 means DDP
    num_nodes: int = 1
    strategy: str = "auto"  # auto: Lightning picks ddp when there is more than one device or node
    precision: str = "32-true"  # one of choices.PRECISIONS
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_train_batches: Any = None  # int batches or float fraction; for smoke runs
    image_log_every_n_epochs: int = 1  # TensorBoard image panels


@dataclass
class OptimConfig:
    lr: float = 0.005
    weight_decay: float = 0.1  # matrices only; biases, norms, gates and temperatures (<= 1-D) are not decayed
    decay_all: bool = False  # true: every trainable parameter decays (the samed / hsam profiles: their trainers)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # iterations; overrides warmup_epochs (SAMed, H-SAM: 250)
    poly_power: float = 0.9
    # poly decay (1 - t/T)^p: T counted after the warm-up (after_warmup), or SAMed's/H-SAM's
    # (1 - (step - warmup)/total)^p over all steps (total; the LR then ends above 0)
    poly_horizon: str = "after_warmup"


@dataclass
class LossConfig:
    ce_weight: float = 0.2
    dice_weight: float = 0.8


@dataclass
class ExpertPaths:
    image: str | None = None  # none -> runs/<run>/distill/image/expert.safetensors
    patch: str | None = None
    pixel: str | None = None


@dataclass
class LoraHubConfig:
    """model.fusion=lorahub: LoRAHub's gradient-free search of the expert weights (see stages/finetune/lorahub.py)."""

    holdout: float = 0.2  # share of the selected training slices scoring the candidates (they stay in training)
    max_slices: int = 16  # at most this many scoring slices (keeps the search seconds-long)
    budget: int = 40  # NGOpt evaluations (LoRAHub's max_inference_step)
    l1: float = 0.05  # LoRAHub's penalty: objective = loss + l1 * mean_e |w_e|
    bound: float = 1.5  # each weight is searched in [-bound, bound]
    start: str = "uniform"  # uniform (the warm-up composition, 1/E each) | zero (LoRAHub's own start: no LoRA)
    warmup: float = 0.5  # share of the decoder's training steps on the uniform composition before the search


@dataclass
class FinetuneConfig:
    tag: str | None = None  # run sub-folder; none -> <mode>-<fusion>-f<fraction>
    experts: ExpertPaths = field(default_factory=ExpertPaths)
    levels: list[str] | None = None  # experts fused in stage 2, e.g. [image, patch]; none -> all three
    zero_experts: bool = False  # ablation: untrained experts (B = 0) instead of distilled ones
    # ablation (not the paper's: it freezes them): mode=samora also trains the experts' LoRA A/B with the labels
    train_experts: bool = False
    evaluate: bool = True  # evaluate the test volumes after training
    lorahub: LoraHubConfig = field(default_factory=LoraHubConfig)  # model.fusion=lorahub only


@dataclass
class EvalConfig:
    resize: str = "direct"  # one of choices.RESIZE_MODES (two_step: the reference code's 512 -> 224 -> 512)
    two_step_size: int = 224
    batch_size: int = 8
    workers: int = 1  # processes for the Dice/HD95 computation
    checkpoint: str | None = None  # `samora evaluate`: model weights; none -> the fine-tune's final.safetensors


@dataclass
class PrepareConfig:
    """`samora prepare`: a public raw download -> the layout the data module of data.name reads."""

    raw: str | None = None  # the download (RAW); searched recursively for the dataset's files
    out: str | None = None  # where the layout is written (OUT); none -> data.dir (data/<name>)
    # what RAW holds when it is not data.name's own download: colin27 = MRIcron's Colin27 T1 + AAL atlas
    # (Debian's mricron-data), written in the generic layout (data.name=generic); none -> data.name's
    source: str | None = None


@dataclass
class PredictConfig:
    """`samora predict`: label maps of new volumes from a finished fine-tuning run (run, finetune.tag)."""

    input: str | None = None  # a volume (.nii.gz, .nii, .mhd, .mha, .h5) or a folder searched recursively
    output: str | None = None  # folder for <case>_pred.nii.gz (and <case>_overlay.png)
    intensity: str = "auto"  # one of choices.INTENSITY_OPTIONS (auto: the run's dataset rule, stages/predict.py)
    overlay: bool = False  # also a PNG montage of a few slices with the predicted labels
    overlay_slices: int = 6


@dataclass
class ProbeConfig:
    """`samora probe`: linear / k-NN probes and CKA of a run's teachers and experts (docs/diagnostics.md)."""

    max_slices: int = 256  # labelled TRAINING slices read (seeded sample); never a test volume
    holdout: float = 0.3  # share of their cases (of the slices, for a single case) the probes are scored on
    seed: int = 0  # seeds the sample and the split
    knn_k: int = 5  # neighbours of the k-NN probe
    l2: float = 0.01  # L2 penalty of the logistic probe (on standardised features)
    max_patches: int = 20000  # positions sampled for the patch-level probe (seeded)
    batch_size: int = 16  # slices per forward pass


@dataclass
class SimclrConfig:
    depth: int = 50  # ResNet depth: 18 | 34 | 50 | 101 | 152
    width: float = 1.0  # channel multiplier: 1 or 2 (SimCLRv2 1x / 2x); fractions for CPU-sized runs
    selective_kernel: bool = False  # timm SK blocks (SimCLRv2's "+SK": 140M parameters at R50-2x)
    checkpoint: str | None = None  # public SimCLRv2 weights: SimCLRv2-Pytorch's .pth or torchvision/timm keys
    from_scratch: bool = False  # profiles with requires_checkpoints: start without a checkpoint on purpose
    proj_dim: int = 128
    proj_hidden_dim: int | None = None  # none -> the backbone's feature width (SimCLRv2)
    temperature: float = 0.1
    gather_negatives: bool = True  # negatives from every DDP rank
    lr: float = 0.0003  # AdamW
    weight_decay: float = 1.0e-6
    batch_size: int = 32  # per device
    max_epochs: int = 100
    warmup_epochs: float = 1.0
    img_size: int = 224
    # input normalisation inside the teacher: auto | imagenet | none. auto follows the starting weights: none
    # (SimCLRv2's [0, 1]) for SimCLRv2-Pytorch files and from scratch, imagenet for torchvision / timm ResNets
    normalize: str = "auto"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rotation_deg: float = 20.0
    jitter: float = 0.4  # brightness and contrast strength
    blur_prob: float = 0.5
    noise_std: float = 0.05  # Gaussian noise, std drawn from [0, noise_std], p 0.5
    channels_last: bool = True  # NHWC ResNet: 1.15-1.25x faster steps on CPU (benchmarks/cpt_step.py)


@dataclass
class MaeConfig:
    variant: str = "vit_base_patch16_224"  # timm ViT name (vit_large_patch16_224 in the paper)
    embed_dim: int | None = None  # overrides of the variant's sizes (tiny CPU profile)
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    checkpoint: str | None = None  # official mae_pretrain_*.pth or *_full.pth
    from_scratch: bool = False  # profiles with requires_checkpoints: start without a checkpoint on purpose
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    base_lr: float = 1.5e-4  # lr = base_lr * global batch / 256
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    batch_size: int = 64  # per device
    max_epochs: int = 100
    warmup_epochs: float = 1.0
    img_size: int = 224
    normalize: str = "imagenet"  # imagenet | none
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class UnlabeledSource:
    path: str = "???"
    format: str = "auto"  # auto | npz | h5 | nifti | mhd | dicom | png | synapse | la | promise12
    intensity: str = "auto"  # one of choices.INTENSITY_OPTIONS (auto: the format's usual)
    axis: int | None = None  # slicing axis for volumes; none -> the format's (nifti 2, la 2, others 0)
    key: str = "image"  # array key inside npz/h5


@dataclass
class CptConfig:
    teacher: str = "all"  # all or one of choices.TEACHERS
    sources: list[UnlabeledSource] = field(default_factory=list)  # empty -> the dataset's unlabeled pool
    # the dataset's test cases are left out of the pool (wherever it reads data.dir); true: transductive
    include_test_cases: bool = False
    skip_bad_files: bool = False
    index_cache: str | None = None  # pool index JSON; none -> <runs_dir>/.cache/cpt_pool_index.json
    cache_volumes: int = 2  # whole volumes kept per data worker (nii.gz, mhd have no cheap slice access)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)


@dataclass
class DistillConfig:
    level: str = "all"  # all or one of choices.LEVELS
    teacher: str | None = None  # teacher.pt; none -> runs/<run>/cpt/<simclr|mae>/teacher.pt
    lr: float = 0.001
    weight_decay: float = 0.1  # matrices only; biases, norms and per-block LoRA scales are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 1.0
    poly_power: float = 0.9
    max_epochs: int = 30
    batch_size: int = 16
    # image level: two views at model.img_size with CPT's SimCLR augmentation (cpt.simclr.crop_scale, ...);
    # the teacher sees them resized to its own img_size
    image_pairing: str = "same"  # same (student(v) vs teacher(v)) | cross (student(v1) vs teacher(v2), and back)
    image_hidden: int | None = 2048  # projection MLP hidden width (pooled neck -> hidden -> teacher proj_dim)
    # patch level: MAE teacher masks mask_ratio of its patches; student tokens taken at the visible ones
    mask_ratio: float = 0.75
    patch_hidden: int | None = None  # none -> LayerNorm + Linear (student width -> teacher token width)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # patch and pixel levels: crop + flip
    # pixel level: denoising from the neck, no teacher
    noise_sigma: float = 0.08
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.5])  # pixels at model.img_size
    pixel_width: int = 128  # decoder width of the first x2 stage (halved per stage, 4 stages for 16-px patches)
    pixel_overlap_weight: float = 0.9
    pixel_mse_weight: float = 0.1


@dataclass
class RootConfig:
    stage: str = "finetune"  # cpt | distill | finetune | evaluate | check | prepare | predict | probe
    run: str = "default"
    runs_dir: str = "runs"
    profile: str | None = None  # tiny | paper; none -> tiny for demo data, paper otherwise
    # set by GPU-scale profiles: cpt, distill and finetune refuse to start without the public weights
    # (model.checkpoint, cpt.<teacher>.checkpoint) unless model.checkpoint=none / cpt.<teacher>.from_scratch=true
    requires_checkpoints: bool = False
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; none -> torch's default
    deterministic: bool = False
    overwrite: bool = False
    # experiment tracker of every stage: one of choices.LOGGERS (tensorboard | csv | mlflow | wandb), under the run
    logger: str = "tensorboard"
    skip_nonfinite: bool = False  # skip batches with a NaN/inf training loss (counted) instead of stopping
    mode: str = "samora"  # one of choices.MODES (samed: one LoRA + decoder + prompt encoder, no experts needed)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cpt: CptConfig = field(default_factory=CptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
