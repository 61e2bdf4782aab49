"""Shared LightningDataModules of samora_pl (a top-level package installed beside `samora_pl`).

`build_datamodule(spec)` builds a labelled dataset from a `LabelledDataSpec` (what the stages' plans pass);
`build_datamodule(name, **kwargs)` is the same by name, for tests and notebooks. Every dataset follows the
interface of `data_modules.labelled.base.SegmentationDataModule`. Subpackages: `labelled` (the fine-tuning
datasets), `pool` (the unlabeled CPT / distillation pool), `io` (file readers), `prepare` (raw downloads to
the layouts read here). Nothing here imports `samora_pl.config`.
"""

from __future__ import annotations

import importlib
import inspect

from data_modules.labelled.base import SegmentationDataModule, Volume
from data_modules.labelled.spec import LabelledDataSpec
from samora_pl.errors import SamoraError

# name -> "module:Class"; imported lazily so a dataset's optional readers load only when used.
_REGISTRY: dict[str, str] = {
    "demo": "data_modules.labelled.demo:DemoDataModule",
    "synapse": "data_modules.labelled.synapse:SynapseDataModule",
    "la": "data_modules.labelled.la:LADataModule",
    "promise12": "data_modules.labelled.promise12:Promise12DataModule",
    "generic": "data_modules.labelled.generic:GenericDataModule",
}


def register_datamodule(name: str, target: str) -> None:
    """Register `"package.module:ClassName"` under `name`."""
    _REGISTRY[name] = target


def known_datamodules() -> list[str]:
    return sorted(_REGISTRY)


def datamodule_class(name: str) -> type[SegmentationDataModule]:
    if name not in _REGISTRY:
        raise SamoraError(f"unknown dataset {name!r}: known datasets are {', '.join(known_datamodules())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def datamodule_options(name: str) -> set[str]:
    """The keyword arguments the data module `name` accepts (its constructor's and those it passes on)."""
    options: set[str] = set()
    for klass in datamodule_class(name).__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        options |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options - {"self"}


def build_datamodule(spec: LabelledDataSpec | str, **kwargs) -> SegmentationDataModule:
    """Build the data module of `spec` (or registered as the name `spec`, with constructor keyword arguments);
    an option the dataset does not have is a SamoraError naming it (and its config key, data.<option>)."""
    if isinstance(spec, LabelledDataSpec):
        name, kwargs = spec.name, {**spec.kwargs(), **kwargs}
    else:
        name = spec
    unknown = sorted(set(kwargs) - datamodule_options(name))
    if unknown:
        raise SamoraError(
            f"dataset {name!r} has no option {', '.join(unknown)} (config key "
            f"{', '.join('data.' + key for key in unknown)}): leave it unset for this dataset"
        )
    return datamodule_class(name)(**kwargs)


__all__ = [
    "LabelledDataSpec",
    "SegmentationDataModule",
    "Volume",
    "build_datamodule",
    "datamodule_class",
    "datamodule_options",
    "known_datamodules",
    "register_datamodule",
]
