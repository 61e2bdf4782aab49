"""One source for the allowed values of each option: the config, the schema's comments and the modules that
act on an option agree, so a value cannot be accepted by one and refused by another."""

import re
from pathlib import Path

import pytest

from samora_pl.config import choices, schema
from samora_pl.config.compose import compose
from samora_pl.config.validate import CHOICES
from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import build_fusion
from samora_pl.models.sam.build import VARIANTS


def test_every_variant_the_config_accepts_has_sizes():
    from samora_pl.models.sam2.build import HIERA_VARIANTS

    assert set(VARIANTS) == set(choices.VARIANTS["sam"])
    assert set(HIERA_VARIANTS) == set(choices.VARIANTS["sam2"]) and set(choices.VARIANTS) == set(choices.FAMILIES)


@pytest.mark.parametrize("name", [name for name in choices.FUSIONS if name != "lorahub"])  # lorahub: the stage's
def test_every_model_fusion_the_config_accepts_is_built(name):
    assert build_fusion(name, choices.LEVELS, dim=16, num_heads=2) is not None


@pytest.mark.parametrize("name", choices.FUSIONS)
def test_the_config_accepts_every_fusion(name):
    assert compose("finetune", [f"model.fusion={name}"]).model.fusion == name


def test_an_unknown_fusion_is_refused_naming_every_allowed_one():
    with pytest.raises(SamoraError) as err:
        compose("finetune", ["model.fusion=concat"])
    assert all(name in str(err.value) for name in choices.FUSIONS)


def test_the_schema_comments_name_existing_choices():
    named = re.findall(r"choices\.([A-Z_]+)", Path(schema.__file__).read_text())
    assert named and all(hasattr(choices, name) for name in named)
    assert set(map(id, CHOICES.values())) >= {id(getattr(choices, n)) for n in named if n not in ("LEVELS", "TEACHERS")}
