"""The allowed values of the data layer's own options; `samora_pl.config.choices` takes them from here."""

INTENSITIES = ("none", "ct_window", "mr_percentile")
INTENSITY_OPTIONS = ("auto", *INTENSITIES)  # auto: the dataset's own default
FRACTION_MODES = ("slice", "case", "list")
