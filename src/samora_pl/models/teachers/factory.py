"""The two CPT teachers by kind: SimCLRv2 (image level, `simclr.py`) and MAE (patch level, `mae.py`)."""

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.models.teachers.simclr import SimclrTeacher

# a CPT teacher: either kind
Teacher = SimclrTeacher | MaeTeacher


def build_teacher(kind: str | None, arch: dict) -> Teacher:
    """A teacher from its kind and the `arch` dict it records (teacher.pt metadata; a file may lack its kind)."""
    if kind == "simclr":
        return SimclrTeacher(**arch)
    if kind == "mae":
        return MaeTeacher(**arch)
    raise SamoraError(f"Unknown teacher kind {kind!r}; expected simclr or mae.")
