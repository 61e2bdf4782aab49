"""The plain description of the unlabeled pool that CPT and distillation read, resolved once by the plans."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PoolSpec:
    """`sources` (cpt.sources as plain dicts; empty: the images of `dataset` at `root`), how to read them,
    and whether the dataset's test cases may enter (`include_test_cases`, transductive)."""

    dataset: str
    root: str
    sources: tuple[dict[str, Any], ...] = ()
    skip_bad_files: bool = False
    index_path: Path | None = None
    cache_volumes: int = 2
    include_test_cases: bool = False
    num_workers: int = 0
    test_split: dict[str, Any] = field(default_factory=dict)  # data-module options that decide the test cases
