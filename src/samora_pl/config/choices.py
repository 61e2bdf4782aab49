"""The allowed values of every option that takes one of a fixed set.

Config validation (`config.CHOICES`), the error messages and the modules that act on an option all read
these tuples, so a value added in one place is known everywhere. Plain tuples, no imports: cheap to load.
"""

from itertools import permutations

LEVELS = ("image", "patch", "pixel")  # the three LoRA experts, in canonical order
HL_ORDERS = tuple("-".join(order) for order in permutations(LEVELS))

# models/adapters/fusion.py builds all but lorahub, which the fine-tuning stage composes (stages/finetune/lorahub.py);
# single:<level> keeps one expert's residual
FUSION_NAMES = ("hl_attn", "sum", "lac", "mole", "lorahub")
FUSIONS = FUSION_NAMES + tuple(f"single:{level}" for level in LEVELS)
LORAHUB_STARTS = ("uniform", "zero")
HL_INITS = ("residual_mean", "zero", "paper")

FAMILIES = ("sam", "sam2")  # model.family: SAM's ViT, or SAM 2's Hiera (docs/sam2.md)
# model.variant per family: models/sam/build.py and models/sam2/build.py hold their sizes
VARIANTS = {"sam": ("tiny", "vit_b", "vit_l", "vit_h"), "sam2": ("tiny", "t", "s", "b+", "l")}
DECODERS = ("sam", "hsam")  # SAM's one-stage mask decoder, H-SAM's two-stage one (models/decoders/hsam.py)
HSAM_CMATTN = ("released", "working")  # H-SAM's class-wise attention: inert as released, or a working map
HSAM_INFERENCE = ("mean", "stage2")  # H-SAM's prediction: mean of both stages' logits, or stage 2 alone
POS_EMBED_RESIZE = ("bilinear", "bicubic")  # SAM's 64x64 position embedding to the image's grid
POLY_HORIZONS = ("after_warmup", "total")  # schedules.warmup_poly
MODES = ("samora", "samed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
# logger: the experiment tracker of every stage (training/loggers.py); tensorboard is the default
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")

INTENSITIES = ("none", "ct_window", "mr_percentile")
INTENSITY_OPTIONS = ("auto",) + INTENSITIES  # auto: the dataset's own default
FRACTION_MODES = ("slice", "case", "list")
RESIZE_MODES = ("direct", "two_step")

TEACHERS = ("simclr", "mae")
# prepare.source: raw files that are not a dataset's own download (data_modules/prepare/colin27.py)
PREPARE_SOURCES = ("colin27",)
