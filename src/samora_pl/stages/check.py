"""`samora check`: validate a dataset (every file, key, shape, label value) without training."""

import logging

from data_modules import build_datamodule
from samora_pl.config.plans import CheckPlan

log = logging.getLogger(__name__)


def run(plan: CheckPlan) -> dict:
    """Run the dataset's full check; it raises one SamoraError listing every problem it finds."""
    data = build_datamodule(plan.data)
    summary = data.validate() or {}
    log.info("%s at %s: no problems found. %s", plan.data.name, plan.data.root, summary)
    return summary
