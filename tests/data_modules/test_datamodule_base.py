"""Labelled-fraction selection (slice / case / list), split files, argument checks, Lightning wiring."""

import json

import lightning as L
import pytest
import torch

from data_modules.labelled.base import subset_policy
from data_modules.labelled.synapse import SynapseDataModule
from samora_pl.errors import SamoraError


@pytest.fixture
def root(make_synapse):
    # 6 cases x 10 slices = 60 training slices
    cases = tuple(f"case{c:04d}" for c in (5, 6, 7, 9, 10, 21))
    return make_synapse(train_cases=cases, slices_per_case=10, size=32, test_cases=("case0001",), depth=4)


def dm_for(root, **kw):
    kw.setdefault("img_size", 16)
    kw.setdefault("batch_size", 4)
    return SynapseDataModule(root=root, **kw)


def test_fraction_by_slice_is_seeded(root):
    a = dm_for(root, fraction=0.1, seed=1).selected_train_names()
    b = dm_for(root, fraction=0.1, seed=1).selected_train_names()
    c = dm_for(root, fraction=0.1, seed=2).selected_train_names()
    assert a == b and a != c
    assert len(a) == 6  # round(0.1 * 60)
    all_names = dm_for(root).train_names()
    assert a == [n for n in all_names if n in set(a)]  # list order kept
    assert dm_for(root, fraction=1.0).selected_train_names() == all_names
    assert len(dm_for(root, fraction=0.001).selected_train_names()) == 1  # at least one


def test_fraction_by_case(root):
    dm = dm_for(root, fraction=0.34, fraction_by="case", seed=3)
    names = dm.selected_train_names()
    cases = {dm.case_of(n) for n in names}
    assert len(cases) == 2  # round(0.34 * 6)
    assert len(names) == 20  # every slice of the chosen cases
    other = dm_for(root, fraction=0.34, fraction_by="case", seed=4).selected_train_names()
    assert other != names


@pytest.mark.parametrize("fraction_by", ["slice", "case"])
def test_subset_seed_fixes_the_subset_for_every_run_seed(root, tmp_path, fraction_by):
    """H-SAM's fixed lists: with data.subset_seed the run seed varies the training only, not the labels."""
    kw = dict(fraction=0.34, fraction_by=fraction_by)
    fixed = [dm_for(root, seed=s, subset_seed=7, **kw).selected_train_names() for s in (0, 1, 2)]
    assert fixed[0] == fixed[1] == fixed[2] == dm_for(root, seed=7, **kw).selected_train_names()
    redrawn = [dm_for(root, seed=s, **kw).selected_train_names() for s in (0, 1, 2)]
    assert len({tuple(r) for r in redrawn}) > 1  # the default: redrawn for each run seed
    dm = dm_for(root, seed=1, subset_seed=7, split_dir=tmp_path / "s", **kw)
    dm.write_split()
    info = json.loads((tmp_path / "s" / "fraction.json").read_text())
    assert info["subset_seed"] == 7 and "the same for every seed" in info["subset_policy"]
    assert subset_policy(fraction_by, fraction=0.1) == f"redrawn by {fraction_by} for each run seed"
    assert subset_policy(fraction_by, subset_seed=3, fraction=1.0) == "every training slice (nothing drawn)"
    assert subset_policy("list", "lists/hsam_10.txt") == "fixed list hsam_10.txt (the same for every seed)"


def test_fraction_by_list(root, tmp_path):
    names = dm_for(root).train_names()
    lst = tmp_path / "few.txt"
    lst.write_text(f"# chosen slices\n{names[3]}\n\n{names[7]}.npz\n{names[3]}\n")
    dm = dm_for(root, fraction_by="list", fraction_list=lst)
    assert dm.selected_train_names() == [names[3], names[7]]
    lst.write_text(f"{names[0]}\ncase0099_slice000\n")
    with pytest.raises(SamoraError, match=r"few.txt.*case0099_slice000"):
        dm_for(root, fraction_by="list", fraction_list=lst).selected_train_names()
    with pytest.raises(SamoraError, match="does not exist"):
        dm_for(root, fraction_by="list", fraction_list=tmp_path / "nope.txt").selected_train_names()


def test_split_written(root, tmp_path):
    split = tmp_path / "run" / "splits"
    dm = dm_for(root, fraction=0.25, seed=5, split_dir=split)
    dm.setup("fit")
    written = (split / "train_selected.txt").read_text().split()
    assert written == dm.selected_train_names() == dm.train_set.names
    info = json.loads((split / "fraction.json").read_text())
    assert info["fraction"] == 0.25 and info["fraction_by"] == "slice" and info["seed"] == 5
    assert info["num_selected"] == 15 and info["num_train_slices"] == 60
    assert not list(split.glob("*.tmp"))


@pytest.mark.parametrize("fraction", [0, 0.0, 1.5, -0.1, float("nan"), "abc"])
def test_bad_fraction(root, fraction):
    with pytest.raises(SamoraError, match="fraction"):
        dm_for(root, fraction=fraction)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(fraction_by="cases"), "fraction_by"),
        (dict(fraction_by="list"), "fraction_list"),
        (dict(fraction_list="x.txt"), "fraction_by"),
        (dict(img_size=30), "img_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_slices=-1), "val_slices"),
    ],
)
def test_bad_arguments(root, kw, words):
    with pytest.raises(SamoraError, match=words):
        dm_for(root, **kw)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 9, 3, padding=1)
        self.seen_val = 0

    def training_step(self, batch, _):
        logits = torch.nn.functional.interpolate(self.conv(batch["image"]), size=batch["low_res_label"].shape[-2:])
        assert batch["low_res_label"].dtype == torch.int64  # uint8 from the loader, int64 after the transfer
        return torch.nn.functional.cross_entropy(logits, batch["low_res_label"])

    def validation_step(self, batch, _):
        self.seen_val += len(batch["name"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("val_slices", [0, 3])
def test_lightning_fit(root, tmp_path, val_slices):
    dm = dm_for(root, fraction=0.2, val_slices=val_slices, split_dir=tmp_path / "splits")
    model = _Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen_val == 2 * val_slices  # sanity check + one validation epoch
    assert (tmp_path / "splits" / "train_selected.txt").is_file()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cached_training_slices_give_the_same_batches(root, num_workers):
    """cache=True only changes where the slices come from: same seed, same augmented batches."""

    def batches(cache):
        dm = dm_for(root, fraction=0.2, num_workers=num_workers, cache=cache)
        dm.setup("fit")
        torch.manual_seed(3)
        return list(dm.train_dataloader()), dm.train_set

    plain, _ = batches(False)
    cached, dataset = batches(True)
    assert len(dataset.images) == 12 and len(plain) == len(cached) == 3
    for a, b in zip(plain, cached):
        assert a["name"] == b["name"]
        for key in ("image", "label", "low_res_label"):
            assert torch.equal(a[key], b[key])


def test_cache_reads_each_slice_once(root, monkeypatch):
    dm = dm_for(root, fraction=0.2, cache=True)
    calls = []
    reader = dm.slice_reader()
    monkeypatch.setattr(dm, "slice_reader", lambda: lambda name: calls.append(name) or reader(name))
    dm.setup("fit")
    for _ in range(2):
        list(dm.train_dataloader())
    selected = dm.selected_train_names()
    assert sorted(c for c in calls if c in selected) == sorted(selected)  # the others: the monitoring set


@pytest.mark.slow
@pytest.mark.parametrize("fraction, count", [(0.2, 12), (0.25, 15)])
def test_ddp_ranks_share_the_selected_slices(root, tmp_path, fraction, count, repo_root, subprocess_env):
    """Under Lightning's DDP each epoch gives every selected slice to a rank: disjoint shards when the count
    divides evenly; otherwise Lightning's DistributedSampler repeats (world - 1) slices at most so that every
    rank runs the same number of steps (uneven steps would hang the gradient all-reduce)."""
    import math
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tests.data_modules.ddp_record_slices", str(root), str(tmp_path), str(fraction)],
        cwd=repo_root,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    selected = (tmp_path / "splits" / "train_selected.txt").read_text().split()
    assert len(selected) == count
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == math.ceil(count / 2)  # the same number of steps
        assert set(ranks[0]) | set(ranks[1]) == set(selected)  # nothing lost
        assert len(ranks[0]) + len(ranks[1]) - count == count % 2  # repeats: only the padding


def test_train_size_sizes_training_and_monitoring_slices_alike(root):
    dm = dm_for(root, img_size=32, train_size=16, augment=False, val_slices=2)
    dm.setup("fit")
    assert dm.train_set.transform.train_size == 16 and dm.val_set.transform.train_size == 16
    assert dm.train_set[0]["image"].shape == (1, 32, 32)
    assert dm_for(root).transform(augment=True).train_size is None  # off unless asked for
    with pytest.raises(SamoraError, match="train_size"):
        dm_for(root, train_size=0)
