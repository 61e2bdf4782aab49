"""Fixtures for the data-module tests: tiny Synapse trees in the exact TransUNet layout (volume_writers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data_modules.volume_writers import write_synapse_tree


@pytest.fixture
def synapse_root(tmp_path) -> Path:
    return write_synapse_tree(tmp_path / "synapse")


@pytest.fixture
def make_synapse(tmp_path):
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_synapse_tree(tmp_path / f"synapse{next(counter)}", **kwargs)

    return make
