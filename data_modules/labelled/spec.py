"""The plain description of one labelled data module: what the stages' plans hand to `build_datamodule`.

A stage never passes its configuration down: its plan resolves the dataset name, folder and options once
(`samora_pl.config.plans`), and the data layer builds from this spec alone, so `data_modules` depends on no
configuration code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class LabelledDataSpec:
    """A registered dataset `name` at `root` with its constructor's keyword arguments `options`."""

    name: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def with_options(self, **changes: Any) -> LabelledDataSpec:
        """The same dataset with some options replaced (e.g. evaluation reading a run's saved split)."""
        return replace(self, options={**self.options, **changes})

    def kwargs(self) -> dict[str, Any]:
        return {"root": self.root, **self.options}
