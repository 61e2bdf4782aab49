import pytest
from omegaconf import OmegaConf

from samora_pl.errors import SamoraError
from samora_pl.runs import StageRecord, atomic_save, atomic_write_text, read_manifest, sha256, verify_input


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


def test_manifest_records_outputs_and_verify_detects_truncation(tmp_path):
    cfg = OmegaConf.create({"stage": "distill", "run": "r"})
    out = tmp_path / "expert.safetensors"
    out.write_bytes(b"x" * 100)
    record = StageRecord(cfg, tmp_path)
    record.add_output(out)
    record.metrics["loss"] = 0.5
    record.write()
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "complete" and manifest["outputs"]["expert.safetensors"]["sha256"] == sha256(out)
    assert manifest["config"]["run"] == "r" and "torch" in manifest["versions"]
    assert verify_input(out, tmp_path)["sha256"] == sha256(out)
    out.write_bytes(b"x" * 50)
    with pytest.raises(SamoraError, match="checksum"):
        verify_input(out, tmp_path)


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SamoraError, match="overwrite=true"):
        read_manifest(tmp_path)
