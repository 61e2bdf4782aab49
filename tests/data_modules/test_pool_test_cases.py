"""No test image before the final evaluation: the default CPT pool of every dataset, in its real layout,
leaves out the cases fine-tuning evaluates, and the monitoring slices never come from them."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from data_modules import build_datamodule
from data_modules.io.volume_io import write_image
from data_modules.pool.unlabeled import build_pool, held_out_cases, pool_sources
from samora_pl.cli import main
from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from tests.data_modules.volume_writers import GEOMETRY, write_generic, write_la, write_promise12, write_synapse_tree

WRITERS = {
    "synapse": write_synapse_tree,
    "la": write_la,
    "promise12": write_promise12,  # the common split: Case12, Case13, ... for test
    "generic": write_generic,  # no imagesTs: the seeded split by case
    "generic_nnunet": lambda root: write_generic(root, train=("a_1", "a_2", "a_3"), test=("t_1", "t_2"), nnunet=True),
}


def cfg_for(name: str, root: Path, *extra):
    """The CPT pool of dataset `name` at `root`, as `samora cpt` plans it."""
    return build_plan(
        compose("cpt", [f"data.name={name.split('_')[0]}", f"data.dir={root}", "profile=tiny", *extra])
    ).pool


def cases_of_pool(pool) -> set:
    return set(pool.summary()["cases"])


@pytest.mark.parametrize("name", list(WRITERS))
def test_default_pool_and_monitoring_slices_leave_out_the_test_cases(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    data = build_datamodule(name.split("_")[0], root=root, img_size=32, fraction=0.5, val_slices=4)
    test = set(data.test_cases())
    assert test
    cfg = cfg_for(name, root)
    held = held_out_cases(cfg)
    assert set(held.cases) == test and not held.included
    pool = build_pool(pool_sources(cfg), held_out=held)
    summary = pool.summary()
    assert not set(summary["cases"]) & test  # no test case read ...
    assert {data.case_of(n) for n in data.train_names()} <= set(summary["cases"])  # ... every training case is
    assert summary["excluded_cases"] == list(held.cases) and summary["include_test_cases"] is False
    assert not any(part in test for v in pool.volumes for part in Path(v.path).parts + (Path(v.path).stem,))

    data.setup("fit")  # the monitoring set: training slices only
    assert len(data.val_set) == 4 and not {data.case_of(n) for n in data.val_set.names} & test

    opted = cfg_for(name, root, "cpt.include_test_cases=true")
    transductive = build_pool(pool_sources(opted), held_out=held_out_cases(opted)).summary()
    assert test <= set(transductive["cases"])
    assert transductive["include_test_cases"] is True and transductive["excluded_cases"] == []


def test_an_explicit_source_inside_the_dataset_folder_leaves_them_out_too(tmp_path, synapse_root):
    cfg = cfg_for("synapse", synapse_root, f"cpt.sources=[{{path: '{synapse_root / 'test_vol_h5'}', format: h5}}]")
    with pytest.raises(Exception, match="pool is empty"):  # its only files are test volumes
        build_pool(pool_sources(cfg), held_out=held_out_cases(cfg))
    outside = write_synapse_tree(tmp_path / "other", test_cases=("case0003",), seed=1)  # none of synapse_root
    elsewhere = cfg_for("synapse", synapse_root, f"cpt.sources=[{{path: '{outside}', format: synapse}}]")
    pool = build_pool(pool_sources(elsewhere), held_out=held_out_cases(elsewhere))
    assert "case0003" in cases_of_pool(pool) and pool.summary()["included_test_cases"] == []


def _source(cfg_root, path, fmt="auto", *extra):
    return cfg_for("synapse", cfg_root, f"cpt.sources=[{{path: '{path}', format: {fmt}}}]", *extra)


def test_a_test_patient_under_another_name_or_folder_is_refused_or_opted_in(tmp_path, synapse_root):
    """The raw release's img0001.nii.gz is case0001; so is a copy of case0001.npy.h5 outside data.dir."""
    raw = tmp_path / "RawData" / "img"
    raw.mkdir(parents=True)
    for case in ("img0001", "img0003", "img00011"):  # a test patient, another patient, a near name
        write_image(raw / f"{case}.nii.gz", np.random.default_rng(0).random((4, 8, 8), np.float32), GEOMETRY)
    copy = tmp_path / "backup"
    copy.mkdir()
    shutil.copy(synapse_root / "test_vol_h5" / "case0002.npy.h5", copy / "case0002.npy.h5")
    for where, fmt, path, case in ((raw, "nifti", raw / "img0001.nii.gz", "case0001"), (copy, "h5", None, None)):
        cfg = _source(synapse_root, where, fmt)
        with pytest.raises(SamoraError) as err:
            build_pool(pool_sources(cfg), held_out=held_out_cases(cfg))
        message = str(err.value)
        shown = path or copy / "case0002.npy.h5"
        assert str(shown.resolve()) in message and f"test case {case or 'case0002'}" in message
        assert "cpt.include_test_cases=true" in message and "img0003" not in message and "img00011" not in message
        opted = _source(synapse_root, where, fmt, "cpt.include_test_cases=true")
        summary = build_pool(pool_sources(opted), held_out=held_out_cases(opted)).summary()
        assert summary["included_test_cases"] == [case or "case0002"] and summary["include_test_cases"] is True
    inside = synapse_root / "RawData"  # the raw release inside the dataset's folder: left out, not refused
    shutil.copytree(raw, inside / "img")
    cfg = _source(synapse_root, inside, "nifti")
    summary = build_pool(pool_sources(cfg), held_out=held_out_cases(cfg)).summary()
    assert summary["cases"] == ["img00011", "img0003"] and summary["excluded_cases"] == ["case0001", "case0002"]


@pytest.mark.parametrize("name", ["la", "promise12", "generic_nnunet"])
def test_a_copy_of_a_test_case_outside_the_dataset_is_refused(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    test = build_datamodule(name.split("_")[0], root=root).test_cases()[0]
    files = [p.relative_to(root) for p in sorted(root.rglob("*")) if p.is_file()]
    original = root / next(p for p in files if test in str(p) and "label" not in str(p))
    copy = tmp_path / "copy" / original.relative_to(root)
    copy.parent.mkdir(parents=True)
    for sibling in original.parent.glob(original.name.split(".")[0] + ".*"):  # .mhd with its .raw
        shutil.copy(sibling, copy.parent / sibling.name)
    cfg = cfg_for(name, root, f"cpt.sources=[{{path: '{tmp_path / 'copy'}', format: auto}}]")
    with pytest.raises(SamoraError, match=f"test case {test}"):
        build_pool(pool_sources(cfg), held_out=held_out_cases(cfg))


def test_run_seed_does_not_move_the_seeded_split_the_pool_leaves_out(tmp_path):
    root = write_la(tmp_path / "la", lists=False)
    first, other = (held_out_cases(cfg_for("la", root, f"seed={s}")).cases for s in (0, 5))
    assert first == other and first == tuple(build_datamodule("la", root=root, seed=9).test_cases())


def test_include_test_cases_without_a_test_split_is_refused_and_writes_nothing(tmp_path, capsys):
    root = write_generic(tmp_path / "one", train=("only_case",))  # one case: no split by case possible
    runs = tmp_path / "runs"
    args = [f"data.dir={root}", "data.name=generic", "profile=tiny", f"runs_dir={runs}", "cpt.include_test_cases=true"]
    assert main(["cpt", *args]) == 1
    err = capsys.readouterr().err
    assert "cpt.include_test_cases=true" in err and "no test split" in err and err.count("error:") == 1
    assert not runs.exists()
    assert held_out_cases(cfg_for("generic", root)).cases == ()  # by default: nothing to leave out, a warning


def test_a_renamed_byte_copy_of_a_test_volume_is_found_by_its_content(tmp_path, synapse_root):
    copy = tmp_path / "renamed"
    copy.mkdir()
    shutil.copy(synapse_root / "test_vol_h5" / "case0002.npy.h5", copy / "scan_b.h5")
    shutil.copy(synapse_root / "test_vol_h5" / "case0001.npy.h5", copy / "scan_a.h5")
    (copy / "scan_a.h5").write_bytes((copy / "scan_a.h5").read_bytes()[:-1] + b"\x01")  # same size, other bytes
    cfg = _source(synapse_root, copy, "h5")
    with pytest.raises(SamoraError, match="scan_b.h5: test case case0002") as err:
        build_pool(pool_sources(cfg), held_out=held_out_cases(cfg))
    assert "scan_a" not in str(err.value)
