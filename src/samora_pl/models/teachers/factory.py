"""The two CPT teachers by kind: SimCLRv2 (image level, `simclr.py`) and MAE (patch level, `mae.py`)."""

import torch.nn as nn

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.models.teachers.simclr import SimclrTeacher


def build_teacher(kind: str, arch: dict) -> nn.Module:
    """A teacher from its kind and the `arch` dict it records (teacher.pt metadata)."""
    if kind == "simclr":
        return SimclrTeacher(**arch)
    if kind == "mae":
        return MaeTeacher(**arch)
    raise SamoraError(f"Unknown teacher kind {kind!r}; expected simclr or mae.")
