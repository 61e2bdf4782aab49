import pytest

from samora_pl.errors import SamoraError
from samora_pl.records.manifest import StageRecord, read_manifest, sha256, verify_input


def test_manifest_records_outputs_and_verify_detects_truncation(tmp_path):
    out = tmp_path / "expert.safetensors"
    out.write_bytes(b"x" * 100)
    record = StageRecord("distill", {"stage": "distill", "run": "r"}, tmp_path)
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
