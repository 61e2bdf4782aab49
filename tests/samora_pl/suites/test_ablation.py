import csv
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from samora_pl.config.compose import compose, experiments_dir
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.stages.cpt import run as cpt
from samora_pl.stages.distill import run as distill
from samora_pl.stages.finetune import run as finetune
from samora_pl.suites import ablation
from samora_pl.suites.upstream import OUTPUT

SHIPPED = tuple(sorted(p.stem for p in (experiments_dir() / "ablations").glob("*.yaml")))


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    copy = tmp_path / "experiments"
    shutil.copytree(experiments_dir(), copy)
    (copy / "ablations" / "pair.yaml").write_text(
        "description: two variants\nreference: a\nvariants:\n  a: [mode=samed]\n  b: [mode=samed, loss.ce_weight=0.5]\n"
    )
    (copy / "ablations" / "share.yaml").write_text(
        "description: two rank-8 variants and a plain one\nreference: c\nvariants:\n  a: [model.lora_rank=8]\n"
        "  b: [model.lora_rank=8, model.fusion=sum]\n  c: [model.fusion=lac]\n"
    )
    monkeypatch.setenv("SAMORA_EXPERIMENTS", str(copy))
    return copy


def _fake_finetune(calls, fail_on=None, seen=None):
    """Stands in for a fine-tune: records the tag (and the config in `seen`), writes metrics.json
    (per-class Dice), finishes the manifest."""

    def fake_run(plan):
        from samora_pl.records.atomic import atomic_write_text
        from samora_pl.records.manifest import StageRecord, save_config

        cfg = OmegaConf.create(plan.config)  # the resolved settings the plan was built from
        if cfg.finetune.tag == fail_on:
            raise KeyboardInterrupt("killed")
        calls.append(cfg.finetune.tag)
        if seen is not None:
            seen[cfg.finetune.tag] = cfg
        folder = plan.folder
        save_config(plan.config, folder)
        dice = (0.5 if cfg.loss.ce_weight == 0.5 else 0.25) + 0.1 * cfg.seed
        per_class = {
            "liver": {"class_id": 1, "dice": dice, "hd95": 2.0},
            "spleen": {"class_id": 2, "dice": 0.0, "hd95": 0.0},
        }
        atomic_write_text(folder / "metrics.json", json.dumps({"mean_dice": dice, "per_class": per_class}))
        record = StageRecord(plan.stage, plan.config, folder)
        record.metrics.update(mean_dice=dice, mean_hd95=3.0 + cfg.seed)
        record.write()
        return dict(record.metrics)

    return fake_run


@pytest.mark.slow
def test_runs_variants_writes_table_and_reuses_finished(tmp_path, experiments, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    rows = ablation.run_ablation("pair", overrides)
    assert calls == ["pair-a-s0", "pair-b-s0"] and [r["mean_dice"] for r in rows] == [0.25, 0.5]
    assert rows[0]["mean_dice_std"] is None  # one seed has no spread to report
    folder = tmp_path / "runs" / "r" / "ablations" / "pair"
    table = (folder / "table.md").read_text()
    assert "| a |" in table and "50.00" in table and "| 25.00 | - |" in table
    assert (folder / "table.csv").exists()
    assert "Labelled subset: every training slice (nothing drawn)." in table  # data.fraction=1
    ablation.run_ablation("pair", overrides)  # a resumed ablation redoes nothing that finished
    assert calls == ["pair-a-s0", "pair-b-s0"]


@pytest.mark.slow
def test_seeds_give_per_seed_tags_spread_and_per_class(tmp_path, experiments, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    rows = ablation.run_ablation("pair", overrides, seeds=3)
    assert calls == [f"pair-{v}-s{s}" for v in "ab" for s in range(3)]
    a = rows[0]
    assert a["seeds"] == 3 and a["mean_dice"] == pytest.approx(0.35) and a["mean_dice_std"] == pytest.approx(0.1)
    assert a["mean_hd95"] == pytest.approx(4.0) and a["mean_hd95_std"] == pytest.approx(1.0)
    assert a["per_class"] == {"liver": pytest.approx(0.35), "spleen": 0.0}
    folder = tmp_path / "runs" / "r" / "ablations" / "pair"
    with open(folder / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert float(table[1]["mean_dice_std"]) == pytest.approx(0.1)
    assert float(table[1]["dice_liver"]) == pytest.approx(0.6)
    assert "± std" in (folder / "table.md").read_text() and "liver" in (folder / "table.md").read_text()
    # the fake gives b - a = +0.25 at every seed: a sure difference, a zero-width interval, no t-test
    assert float(table[1]["delta_vs_ref"]) == pytest.approx(0.25) and table[1]["reference"] == "a"
    assert float(table[1]["delta_ci95_low"]) == pytest.approx(0.25) == float(table[1]["delta_ci95_high"])
    assert table[1]["p_value"] == "" and float(table[0]["delta_vs_ref"]) == 0.0


def test_comparison_columns_equal_a_hand_computation(tmp_path):
    """Three seeds, written to table.csv, against the Student-t formulas done by hand: for n = 3 the t
    quantile t(0.975, 2) = 4.302652729911275 and the two-sided p-value of t with 2 degrees of freedom is
    1 - |t| / sqrt(t^2 + 2) (the closed-form t_2 distribution)."""
    ref = {0: 0.80, 1: 0.82, 2: 0.78}
    var = {0: 0.75, 1: 0.80, 2: 0.74}
    runs = {
        name: [{"mean_dice": d, "mean_hd95": 1.0, "per_class": {}, "seed": s} for s, d in dice.items()]
        for name, dice in (("hl_attn", ref), ("other", var))
    }
    rows = [{"variant": n, "overrides": "", **ablation.summarise_seeds(r)} for n, r in runs.items()]
    ablation.compare_to_reference(rows, "hl_attn")
    ablation.write_table(rows, tmp_path, "hand check")
    with open(tmp_path / "table.csv") as handle:
        table = {row["variant"]: row for row in csv.DictReader(handle)}
    diffs = [var[s] - ref[s] for s in range(3)]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3**0.5
    t = mean / (sd / 3**0.5)
    other = table["other"]
    assert float(other["delta_vs_ref"]) == pytest.approx(mean, abs=1e-12)
    assert float(other["delta_ci95_low"]) == pytest.approx(mean - half, abs=1e-9)
    assert float(other["delta_ci95_high"]) == pytest.approx(mean + half, abs=1e-9)
    assert float(other["p_value"]) == pytest.approx(1 - abs(t) / (t * t + 2) ** 0.5, abs=1e-9)
    dice = list(var.values())
    m = sum(dice) / 3
    s = (sum((d - m) ** 2 for d in dice) / 2) ** 0.5
    assert float(other["mean_dice_ci95_low"]) == pytest.approx(m - 4.302652729911275 * s / 3**0.5, abs=1e-9)
    assert float(table["hl_attn"]["delta_vs_ref"]) == 0.0 and table["hl_attn"]["p_value"] == ""
    text = (tmp_path / "table.md").read_text()
    assert "ttest_rel" in text and "`hl_attn`" in text and f"{100 * mean:+.2f}" in text
    assert f"[{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]" in text


def test_one_seed_leaves_the_comparison_empty():
    rows = [
        {"variant": n, "overrides": "", **ablation.summarise_seeds([{"mean_dice": d, "per_class": {}, "seed": 0}])}
        for n, d in (("hl_attn", 0.5), ("b", 0.4))
    ]
    ablation.compare_to_reference(rows, "hl_attn")
    assert all(rows[1][k] is None for k in ablation.COMPARISON) and rows[1]["mean_dice_ci95_low"] is None


def test_reference_must_name_a_variant(experiments):
    (experiments / "ablations" / "noref.yaml").write_text("description: x\nvariants:\n  a: []\n  b: []\n")
    with pytest.raises(SamoraError, match="'reference' is None.*one of a, b"):
        ablation.load_ablation("noref")
    (experiments / "ablations" / "badref.yaml").write_text("description: x\nreference: c\nvariants:\n  a: []\n")
    with pytest.raises(SamoraError, match="'reference' is 'c'"):
        ablation.load_ablation("badref")
    assert ablation.load_ablation("fusion")["reference"] == "hl_attn"


@pytest.mark.slow
def test_killed_ablation_resumes_and_more_seeds_run_only_new_ones(tmp_path, experiments, monkeypatch):
    calls = []
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls, fail_on="pair-b-s0"))
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation("pair", overrides, seeds=1)
    assert calls == ["pair-a-s0"]
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    ablation.run_ablation("pair", overrides, seeds=2)
    assert calls == ["pair-a-s0", "pair-a-s1", "pair-b-s0", "pair-b-s1"]


def test_plot_and_tensorboard_text(tmp_path, experiments, monkeypatch):
    monkeypatch.setattr(finetune, "run", _fake_finetune([]))
    ablation.run_ablation("pair", [f"runs_dir={tmp_path / 'runs'}", "run=r"], seeds=2)
    png = tmp_path / "runs" / "r" / "ablations" / "pair" / "table.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "runs" / "r" / "tb" / "ablations" / "pair").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags().get("tensors", [])
    assert "ablation/pair/text_summary" in tags
    text = acc.Tensors("ablation/pair/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| a |" in text


def test_cli_seeds_token(monkeypatch):
    from samora_pl import cli

    seen = {}
    monkeypatch.setattr(
        ablation, "run_ablation", lambda name, overrides, seeds=1: seen.update(n=name, o=overrides, s=seeds)
    )
    cli.run_command("ablation", ["pair", "seeds=3", "run=r"])
    assert seen == {"n": "pair", "o": ["run=r"], "s": 3}
    with pytest.raises(SamoraError, match="seeds"):
        cli.run_command("ablation", ["pair", "seeds=x"])


def test_unknown_ablation_lists_known(experiments):
    with pytest.raises(SamoraError, match="mechanism"):
        ablation.load_ablation("nope")


@pytest.mark.slow
def test_shipped_ablations_compose():
    assert {"mechanism", "fusion", "diagnosis", "headline"} <= set(SHIPPED)
    for name in SHIPPED:
        for extra in ablation.load_ablation(name)["variants"].values():
            compose("finetune", extra or [])  # every variant's keys and values are valid (one schema for all stages)


def test_fusion_ablation_has_both_hl_attn_inits_and_each_builds():
    """The fusion ablation runs HL-Attn at the profile's init (its reference) and at each init explicitly;
    each variant composes on both profiles and builds a model whose blocks use that init."""
    from samora_pl.config.choices import LEVELS
    from samora_pl.config.specs import ExpertLayout
    from samora_pl.models.factory import build_segmenter

    spec = ablation.load_ablation("fusion")
    assert spec["reference"] == "hl_attn"
    inits = {"hl_attn_paper": "paper", "hl_attn_residual_mean": "residual_mean"}
    assert set(inits) <= set(spec["variants"])
    for variant, init in inits.items():
        for profile in ([], ["data.name=synapse", "model.checkpoint=none"]):
            cfg = compose("finetune", profile + spec["variants"][variant])
            assert cfg.model.fusion == "hl_attn" and cfg.model.hl_init == init
            assert build_plan(cfg).fusion_label == f"hl_attn (hl_init={init})"
        model = build_segmenter(
            build_plan(compose("finetune", spec["variants"][variant])).segmenter, ExpertLayout(LEVELS, "hl_attn"), 8
        )
        assert {f.init for f in model.fusion} == {init}
    assert compose("finetune", spec["variants"]["hl_attn"]).model.hl_init == "residual_mean"  # tiny profile's


def _fake_stage(stage, calls, fail_on=None):
    """Stands in for `samora cpt` / `samora distill` of one teacher or level: records (stage, sub, folder,
    config), saves the config, writes an output naming the settings that matter here, finishes the manifest."""

    def fake_run(plan):
        from samora_pl.records.atomic import atomic_write_text
        from samora_pl.records.manifest import StageRecord, save_config

        cfg = OmegaConf.create(plan.config)  # the resolved settings the plan was built from
        sub = cfg.cpt.teacher if stage == "cpt" else cfg.distill.level
        if (stage, sub) == fail_on:
            raise KeyboardInterrupt("killed")
        folder = plan.folders.stage(stage, sub)
        calls.append((stage, sub, folder, cfg))
        save_config(plan.config, folder)  # as the real stages do: what a later reuse is checked against
        content = {"rank": cfg.model.lora_rank, "teacher": cfg.distill.teacher, "epochs": cfg.cpt.mae.max_epochs}
        atomic_write_text(folder / OUTPUT[stage], json.dumps(content))
        record = StageRecord(plan.stage, plan.config, folder)
        record.add_output(folder / OUTPUT[stage])
        record.write()
        return {sub: {}}

    return fake_run


@pytest.fixture
def stages(monkeypatch):
    """Fake cpt, distill and finetune runs; returns their call lists and the fine-tunes' configs by tag."""
    made = {"upstream": [], "finetune": [], "seen": {}}

    def install(fail_stage=None, fail_tag=None):
        monkeypatch.setattr(cpt, "run", _fake_stage("cpt", made["upstream"], fail_stage))
        monkeypatch.setattr(distill, "run", _fake_stage("distill", made["upstream"], fail_stage))
        monkeypatch.setattr(finetune, "run", _fake_finetune(made["finetune"], fail_tag, made["seen"]))

    install()
    made["install"] = install
    return made


def _made(stages, root):
    """(stage, sub, folder relative to the run) of every upstream stage run so far."""
    return [(stage, sub, str(folder.relative_to(root))) for stage, sub, folder, _ in stages["upstream"]]


def _expert(cfg, level, run_folder):
    """The expert file a fine-tune config reads for `level` (given path, else the run's own)."""
    given = cfg.finetune.experts[level]
    return Path(given) if given else run_folder / "distill" / level / "expert.safetensors"


@pytest.mark.slow
def test_variants_sharing_experts_distil_once(tmp_path, experiments, stages):
    root = tmp_path / "runs" / "r"
    ablation.run_ablation("share", [f"runs_dir={tmp_path / 'runs'}", "run=r"], seeds=2)
    made = _made(stages, root)
    # the rank-8 experts once (under upstream/, from the run's own teachers); the plain ones in the run
    assert [m[:2] for m in made] == [
        ("cpt", "simclr"),
        ("distill", "image"),
        ("cpt", "mae"),
        ("distill", "patch"),
        ("distill", "pixel"),
        ("distill", "image"),
        ("distill", "patch"),
        ("distill", "pixel"),
    ]
    assert made[0][2] == "cpt/simclr" and made[1][2].startswith("upstream/") and made[5][2] == "distill/image"
    assert stages["upstream"][1][3].distill.teacher == str(root / "cpt" / "simclr" / "teacher.pt")
    seen = stages["seen"]
    assert stages["finetune"] == [f"share-{v}-s{s}" for v in "abc" for s in range(2)]
    for level in ("image", "patch", "pixel"):
        shared = {str(_expert(seen[f"share-{v}-s{s}"], level, root)) for v in "ab" for s in range(2)}
        assert len(shared) == 1 and "/upstream/" in shared.pop()  # both variants, both seeds: one expert
        assert seen["share-c-s0"].finetune.experts[level] is None  # plain: the run's own, config as before


@pytest.mark.slow
def test_fusion_table_states_each_fusion_and_hl_init(tmp_path, experiments, stages):
    ablation.run_ablation("fusion", [f"runs_dir={tmp_path / 'runs'}", "run=r"])
    folder = tmp_path / "runs" / "r" / "ablations" / "fusion"
    table = (folder / "table.md").read_text()
    for label in ("hl_attn (hl_init=paper)", "hl_attn (hl_init=residual_mean)", "| mole |", "| lorahub |"):
        assert label in table
    with open(folder / "table.csv") as handle:
        fusion = {row["variant"]: row["fusion"] for row in csv.DictReader(handle)}
    assert fusion["hl_attn"] == fusion["hl_attn_residual_mean"] == "hl_attn (hl_init=residual_mean)"
    assert fusion["hl_attn_paper"] == "hl_attn (hl_init=paper)" and fusion["sum"] == "sum"


@pytest.mark.slow
def test_rank_variants_distil_once_per_rank_and_finetune_with_them(tmp_path, experiments, stages):
    root = tmp_path / "runs" / "r"
    ablation.run_ablation("rank", [f"runs_dir={tmp_path / 'runs'}", "run=r"])
    made = _made(stages, root)
    assert sorted(m[:2] for m in made if m[0] == "cpt") == [("cpt", "mae"), ("cpt", "simclr")]  # ranks share teachers
    experts = [m for m in made if m[0] == "distill"]
    assert len(experts) == 15 and len({m[2] for m in experts}) == 15  # 5 ranks x 3 levels, each once
    for rank in (1, 2, 4, 8, 16):
        cfg = stages["seen"][f"rank-r{rank}-s0"]
        assert cfg.model.lora_rank == rank
        for level in ("image", "patch", "pixel"):
            path = _expert(cfg, level, root)
            assert json.loads(path.read_text())["rank"] == rank  # made by a distillation at that rank
            assert ("/upstream/" in str(path)) == (rank != 4)  # rank 4 is the run's own (the default)


@pytest.mark.slow
def test_the_runs_own_stage1_made_with_other_settings_is_refused(tmp_path, experiments, stages):
    """A finished expert or teacher in the run's own folders is reused only if its saved settings agree."""
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    ablation.run_ablation("share", overrides)
    # seed 1 is new, so its fine-tunes look for their experts and teachers
    with pytest.raises(SamoraError, match="distill.noise_sigma"):
        ablation.run_ablation("share", overrides + ["distill.noise_sigma=0.3"], seeds=2)
    with pytest.raises(SamoraError, match="cpt.simclr.temperature"):
        ablation.run_ablation("share", overrides + ["cpt.simclr.temperature=0.5"], seeds=2)


@pytest.mark.slow
def test_a_finished_finetune_made_with_other_settings_is_refused(tmp_path, experiments, stages):
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    ablation.run_ablation("pair", overrides)
    ablation.run_ablation("pair", overrides + ["data.cache=true"])  # the same slices: reused
    assert stages["finetune"] == ["pair-a-s0", "pair-b-s0"]
    with pytest.raises(SamoraError, match="optim.lr"):
        ablation.run_ablation("pair", overrides + ["optim.lr=0.1"])
    ablation.run_ablation("pair", overrides + ["optim.lr=0.1", "overwrite=true"])
    assert stages["finetune"] == ["pair-a-s0", "pair-b-s0"] * 2


@pytest.mark.slow
def test_killed_ablation_resumes_without_redoing_upstream_or_finetunes(tmp_path, experiments, stages):
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    stages["install"](fail_stage=("distill", "patch"))
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation("share", overrides)
    stages["install"](fail_tag="share-b-s0")
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation("share", overrides)
    assert stages["finetune"] == ["share-a-s0"]
    stages["install"]()
    ablation.run_ablation("share", overrides, seeds=2)
    made = _made(stages, tmp_path / "runs" / "r")
    assert len(made) == 8 and len(set(made)) == 8  # every teacher and expert made exactly once
    assert stages["finetune"] == ["share-a-s0", "share-a-s1", "share-b-s0", "share-b-s1", "share-c-s0", "share-c-s1"]
    ablation.run_ablation("share", overrides, seeds=2)  # all finished: nothing runs again
    assert len(stages["upstream"]) == 8 and len(stages["finetune"]) == 6


@pytest.mark.slow
def test_cpt_ablation_distils_from_untrained_teachers_and_shares_pixel(tmp_path, experiments, stages):
    root = tmp_path / "runs" / "r"
    ablation.run_ablation("cpt", [f"runs_dir={tmp_path / 'runs'}", "run=r"])
    made = {(m[0], m[1], m[2].startswith("upstream/")): m for m in _made(stages, root)}
    assert len(made) == 9 and ("distill", "pixel", True) not in made  # no teacher, so one pixel expert
    teachers = [c[3] for c in stages["upstream"] if c[0] == "cpt" and "upstream" in str(c[2])]
    assert [(c.cpt.teacher, c.cpt.simclr.max_epochs, c.cpt.mae.max_epochs) for c in teachers] == [
        ("simclr", 0, 0),
        ("mae", 0, 0),
    ]
    without = stages["seen"]["cpt-without-s0"]
    for level, kind in (("image", "simclr"), ("patch", "mae")):
        expert = Path(without.finetune.experts[level])
        distilled = next(c[3] for c in stages["upstream"] if c[2] == expert.parent)
        teacher = distilled.distill.teacher  # the untrained teacher made under upstream/
        assert teacher.endswith(f"/cpt/{kind}/teacher.pt") and "/upstream/" in teacher
    assert without.finetune.experts.pixel is None and stages["seen"]["cpt-with-s0"].finetune.experts.image is None


@pytest.mark.slow
def test_level_variants_make_only_the_experts_they_fuse(tmp_path, experiments, stages):
    root = tmp_path / "runs" / "r"
    ablation.run_ablation("level", [f"runs_dir={tmp_path / 'runs'}", "run=r"])
    assert _made(stages, root) == [
        ("cpt", "simclr", "cpt/simclr"),
        ("distill", "image", "distill/image"),
        ("cpt", "mae", "cpt/mae"),
        ("distill", "patch", "distill/patch"),
        ("distill", "pixel", "distill/pixel"),
    ]
    pair = stages["seen"]["level-image+patch-s0"]
    assert list(pair.finetune.levels) == ["image", "patch"] and pair.model.fusion == "hl_attn"


@pytest.mark.slow
def test_real_rank_ablation_on_the_pixel_expert(tmp_path, experiments, monkeypatch, quick):
    """Real distillation and fine-tuning (tiny sizes, seconds): a rank-2 pixel expert is distilled under
    upstream/, the rank-4 one in the run, each fine-tune loads its own, and a second pass makes nothing."""
    (experiments / "ablations" / "pix.yaml").write_text(
        "description: pixel rank\nreference: r4\nvariants:\n"
        '  r2: ["finetune.levels=[pixel]", model.fusion=single:pixel, model.lora_rank=2]\n'
        '  r4: ["finetune.levels=[pixel]", model.fusion=single:pixel]\n'
    )
    overrides = quick(
        "run=r",
        "trainer.check_val_every_n_epoch=5",
        "distill.max_epochs=1",
        "distill.batch_size=4",
        "distill.pixel_width=16",
        "data.num_workers=0",
        f"cpt.index_cache={tmp_path / 'index.json'}",
    )
    rows = ablation.run_ablation("pix", overrides)
    assert [r["variant"] for r in rows] == ["r2", "r4"] and all(r["mean_dice"] is not None for r in rows)
    root = tmp_path / "runs" / "r"
    inputs = {
        v: json.loads((root / "finetune" / f"pix-{v}-s0" / "manifest.json").read_text())["inputs"] for v in ("r2", "r4")
    }
    assert set(inputs["r2"]) == {"expert_pixel"} and "/upstream/" in inputs["r2"]["expert_pixel"]["path"]
    assert inputs["r4"]["expert_pixel"]["path"] == str(root / "distill" / "pixel" / "expert.safetensors")
    assert not (root / "cpt").exists()  # the pixel expert has no teacher: no CPT was run

    def refuse(cfg):
        raise AssertionError("a finished stage ran again")

    for stage in (cpt, distill, finetune):
        monkeypatch.setattr(stage, "run", refuse)
    assert ablation.run_ablation("pix", overrides) == rows


def test_decoder_ablation_covers_the_four_methods_and_both_class_attentions():
    from samora_pl.config.compose import compose
    from samora_pl.config.plans import finetune_tag as tag_of
    from samora_pl.suites.ablation import load_ablation

    spec = load_ablation("decoder")
    seen = set()
    for extra in spec["variants"].values():
        cfg = compose("finetune", extra)
        seen.add((cfg.mode, cfg.model.decoder, cfg.model.hsam_cmattn if cfg.model.decoder == "hsam" else None))
        assert tag_of(cfg)
    assert {("samed", "sam", None), ("samora", "sam", None)} <= seen
    for mode in ("samed", "samora"):
        assert {(mode, "hsam", "released"), (mode, "hsam", "working")} <= seen


def test_the_table_says_how_the_labelled_subset_was_chosen(tmp_path, experiments, monkeypatch):
    """Seeds vary the labelled slices too unless the subset is fixed: every table says which."""
    monkeypatch.setattr(finetune, "run", _fake_finetune([]))
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r", "data.subset_seed=3", "data.fraction=0.1"]
    rows = ablation.run_ablation("pair", overrides, seeds=2)
    policy = "drawn once by slice (data.subset_seed=3; the same for every seed)"
    assert [r["subset"] for r in rows] == [policy, policy]
    folder = tmp_path / "runs" / "r" / "ablations" / "pair"
    assert f"Labelled subset: {policy}." in (folder / "table.md").read_text()
    assert [r["subset"] for r in csv.DictReader((folder / "table.csv").open())] == [policy, policy]
    mixed = [dict(rows[0]), {**rows[1], "subset": "redrawn by slice for each run seed"}]
    table = ablation.markdown_table(mixed, "mixed")
    assert "| labelled subset |" in table and "Labelled subset:" not in table
    assert f"| {policy} |" in table and "| redrawn by slice for each run seed |" in table
