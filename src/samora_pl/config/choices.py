"""The allowed values of every option that takes one of a fixed set, as `StrEnum`s.

Config validation (`config/validate.py`, `CHOICES`), the error messages and the modules that act on an option
all read these, so a value added in one place is known everywhere. A `StrEnum` member equals its string
(`Mode.SAMED == "samed"`), so code compares plain strings with members; the tuples below hold the members'
plain string values, in their documented order, as validation lists them and as saved files and checkpoints
keep them (a checkpoint read with `weights_only=True` cannot hold an enum member).
"""

from enum import StrEnum
from itertools import permutations

from data_modules.options import FRACTION_MODES, INTENSITIES, INTENSITY_OPTIONS  # noqa: F401 (the data layer's)


class Level(StrEnum):
    """The three LoRA experts, in canonical order."""

    IMAGE = "image"
    PATCH = "patch"
    PIXEL = "pixel"


class Mode(StrEnum):
    SAMORA = "samora"  # experts + fusion + decoder
    SAMED = "samed"  # one LoRA + decoder + prompt encoder, no experts


class Family(StrEnum):
    """model.family: SAM's ViT, or SAM 2's Hiera (docs/sam2.md)."""

    SAM = "sam"
    SAM2 = "sam2"


class Fusion(StrEnum):
    """models/adapters/fusion.py builds all but lorahub, which the fine-tuning stage composes
    (stages/finetune/lorahub.py); `single:<level>` (not a member) keeps one expert's residual."""

    HL_ATTN = "hl_attn"
    SUM = "sum"
    LAC = "lac"
    MOLE = "mole"
    LORAHUB = "lorahub"


class HLInit(StrEnum):
    RESIDUAL_MEAN = "residual_mean"
    ZERO = "zero"
    PAPER = "paper"


class Decoder(StrEnum):
    """SAM's one-stage mask decoder, H-SAM's two-stage one (models/decoders/hsam.py)."""

    SAM = "sam"
    HSAM = "hsam"


class HSAMClassAttention(StrEnum):
    """H-SAM's class-wise attention: inert as released, or a working map."""

    RELEASED = "released"
    WORKING = "working"


class HSAMInference(StrEnum):
    """H-SAM's prediction: mean of both stages' logits, or stage 2 alone."""

    MEAN = "mean"
    STAGE2 = "stage2"


class PosEmbedResize(StrEnum):
    """SAM's 64x64 position embedding to the image's grid."""

    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class PolyHorizon(StrEnum):
    """training/schedules.py warmup_poly: T counted after the warm-up, or over all steps."""

    AFTER_WARMUP = "after_warmup"
    TOTAL = "total"


class LoraHubStart(StrEnum):
    UNIFORM = "uniform"
    ZERO = "zero"


class ResizeMode(StrEnum):
    DIRECT = "direct"
    TWO_STEP = "two_step"  # the reference code's 512 -> 224 -> 512


class Teacher(StrEnum):
    SIMCLR = "simclr"
    MAE = "mae"


class ImagePairing(StrEnum):
    """distill.image_pairing: student(v) vs teacher(v), or the two views crossed."""

    SAME = "same"
    CROSS = "cross"


class PrepareSource(StrEnum):
    """prepare.source: raw files that are not a dataset's own download (data_modules/prepare/colin27.py)."""

    COLIN27 = "colin27"


def _values(options: type[StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in options)


LEVELS = _values(Level)
HL_ORDERS = tuple("-".join(order) for order in permutations(LEVELS))
FUSION_NAMES = _values(Fusion)
FUSIONS = FUSION_NAMES + tuple(f"single:{level}" for level in LEVELS)
LORAHUB_STARTS = _values(LoraHubStart)
HL_INITS = _values(HLInit)
FAMILIES = _values(Family)
# model.variant per family: models/sam/build.py and models/sam2/build.py hold their sizes
VARIANTS = {Family.SAM.value: ("tiny", "vit_b", "vit_l", "vit_h"), Family.SAM2.value: ("tiny", "t", "s", "b+", "l")}
DECODERS = _values(Decoder)
HSAM_CMATTN = _values(HSAMClassAttention)
HSAM_INFERENCE = _values(HSAMInference)
POS_EMBED_RESIZE = _values(PosEmbedResize)
POLY_HORIZONS = _values(PolyHorizon)
MODES = _values(Mode)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # Lightning's names
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")  # Lightning's names
RESIZE_MODES = _values(ResizeMode)
TEACHERS = _values(Teacher)
IMAGE_PAIRINGS = _values(ImagePairing)
PREPARE_SOURCES = _values(PrepareSource)
# logger: the experiment tracker of every stage (training/loggers.py); tensorboard is the default
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
