"""Evaluation under the SAMed / TransUNet / H-SAM protocol (docs/method.md, section Evaluation protocol).

* :mod:`.metrics`     per-case Dice / HD95 (bitwise equal to medpy, much faster) and aggregation
                      over cases and classes;
* :mod:`.pool`        many cases inline or in a process pool (identical results);
* :mod:`.inference`   slice-by-slice volume prediction with the protocol's resizing;
* :mod:`.report`      results.csv / metrics.json / results.md (atomic) and the console table;
* :mod:`.distributed` case sharding over DDP ranks and gathering every case exactly once.

Names are re-exported lazily (PEP 562) so that metric worker processes import only numpy and scipy,
not torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "case_metrics": "metrics",
    "evaluate_cases": "pool",
    "CaseMetricsPool": "pool",
    "summarise": "metrics",
    "sort_rows": "metrics",
    "predict_volume": "inference",
    "resize_slice": "inference",
    "RESIZE_MODES": "inference",
    "write_results": "report",
    "format_table": "report",
    "shard_cases": "distributed",
    "gather_rows": "distributed",
    "dist_rank_world": "distributed",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import dist_rank_world, gather_rows, shard_cases
    from .inference import RESIZE_MODES, predict_volume, resize_slice
    from .metrics import case_metrics, sort_rows, summarise
    from .pool import CaseMetricsPool, evaluate_cases
    from .report import format_table, write_results


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
