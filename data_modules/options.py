"""The allowed values of the data layer's own options; `samora_pl.config.choices` takes them from here."""

from enum import StrEnum


class Intensity(StrEnum):
    """How a volume's values map to [0, 1] (data_modules/io/readers.py)."""

    NONE = "none"  # already in [0, 1]: only clipped
    CT_WINDOW = "ct_window"  # Synapse's [-125, 275] HU window
    MR_PERCENTILE = "mr_percentile"  # the volume's 0.5 / 99.5 percentiles, then min-max


class FractionMode(StrEnum):
    """How the labelled fraction is drawn: by slice, by case, or from a list file."""

    SLICE = "slice"
    CASE = "case"
    LIST = "list"


INTENSITIES = tuple(member.value for member in Intensity)
INTENSITY_OPTIONS = ("auto", *INTENSITIES)  # auto: the dataset's own default
FRACTION_MODES = tuple(member.value for member in FractionMode)
