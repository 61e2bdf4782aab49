"""Atomic writes: complete or absent, never a temporary left behind, the same file mode for every variant."""

import json
import os
import stat

import pytest
import torch

from samora_pl.records.atomic import (
    atomic_save,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def test_atomic_write_leaves_no_temp_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "expert.bin"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_save(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["expert.bin"]


def test_every_variant_writes_mode_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)  # mkstemp alone would leave 0o600
    try:
        atomic_write_text(tmp_path / "a.txt", "é\n")
        atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
        atomic_write_json(tmp_path / "c.json", {"k": [1, 2]}, indent=2)
        atomic_torch_save(tmp_path / "d.pt", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.txt", "b.bin", "c.json", "d.pt"], 0o644
    )
    assert (tmp_path / "a.txt").read_bytes() == "é\n".encode()
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "c.json").read_text().endswith("\n")
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.ones(2))


def test_a_writer_that_links_another_file_keeps_that_files_mode(tmp_path):
    source = tmp_path / "raw.bin"
    source.write_bytes(b"raw")
    source.chmod(0o444)

    def link(tmp):
        tmp.unlink()
        os.link(source, tmp)

    atomic_save(tmp_path / "out" / "linked.bin", link)
    assert stat.S_IMODE(source.stat().st_mode) == 0o444
    assert (tmp_path / "out" / "linked.bin").read_bytes() == b"raw"
