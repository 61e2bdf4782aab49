"""Shared LightningDataModules of samora_pl (a top-level package installed beside `samora_pl`).

`build_datamodule(name, **kwargs)` builds a labelled dataset by name; every one of them follows the
interface of `data_modules.base.SegmentationDataModule`.
"""

from __future__ import annotations

import importlib

from samora_pl.errors import SamoraError

from .base import SegmentationDataModule, Volume

# name -> "module:Class"; imported lazily so a dataset's optional readers load only when used.
_REGISTRY: dict[str, str] = {
    "demo": "data_modules.demo:DemoDataModule",
    "synapse": "data_modules.synapse:SynapseDataModule",
}


def register_datamodule(name: str, target: str) -> None:
    """Register `"package.module:ClassName"` under `name` (used by la, promise12, generic as they land)."""
    _REGISTRY[name] = target


def known_datamodules() -> list[str]:
    return sorted(_REGISTRY)


def datamodule_class(name: str) -> type[SegmentationDataModule]:
    if name not in _REGISTRY:
        raise SamoraError(f"unknown dataset {name!r}: known datasets are {', '.join(known_datamodules())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_datamodule(name: str, **kwargs) -> SegmentationDataModule:
    """Build the data module registered as `name` with the given constructor keyword arguments."""
    return datamodule_class(name)(**kwargs)


__all__ = [
    "SegmentationDataModule",
    "Volume",
    "build_datamodule",
    "datamodule_class",
    "known_datamodules",
    "register_datamodule",
]
