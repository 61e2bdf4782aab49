import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from samora_pl.cli import main
from samora_pl.config.choices import HL_ORDERS
from samora_pl.config.compose import compose, diff_keys, experiments_dir, load_saved
from samora_pl.errors import SamoraError
from tests.stage_runs import planned


def test_demo_uses_tiny_profile_and_overrides_win():
    cfg = compose("finetune", ["data.fraction=0.1", "mode=samed", "trainer.max_epochs=3"])
    assert cfg.profile == "tiny" and cfg.model.variant == "tiny"
    assert cfg.data.fraction == 0.1 and cfg.mode == "samed" and cfg.trainer.max_epochs == 3
    assert cfg.data.dir == "data/demo"


def test_paper_profile_for_real_data():
    cfg = compose("finetune", ["data.name=synapse", "model.checkpoint=none"])
    assert cfg.profile == "paper" and cfg.model.variant == "vit_b" and cfg.model.img_size == 224
    assert cfg.data.batch_size == 32 and cfg.trainer.max_epochs == 20
    assert cfg.optim.lr == 0.005 and cfg.optim.weight_decay == 0.1
    assert (cfg.loss.ce_weight, cfg.loss.dice_weight) == (0.2, 0.8)


def test_hl_attn_init_is_a_profile_setting():
    """PROFILE=paper runs HL-Attn as the authors' code (x + base + LN(high)); the tiny profile keeps the
    mean-of-experts start; each is one line of its profile and an override wins."""
    paper = compose("finetune", ["data.name=synapse", "model.checkpoint=none"])
    assert paper.profile == "paper" and paper.model.hl_init == "paper"
    assert compose("finetune", []).model.hl_init == "residual_mean"  # demo data: tiny profile
    assert compose("finetune", ["profile=paper", "model.checkpoint=none"]).model.hl_init == "paper"
    chosen = compose("finetune", ["data.name=synapse", "model.checkpoint=none", "model.hl_init=residual_mean"])
    assert chosen.model.hl_init == "residual_mean"
    for profile, init in (("paper", "paper"), ("tiny", "residual_mean")):
        lines = (experiments_dir() / "model" / f"{profile}.yaml").read_text().splitlines()
        assert [line.split("#")[0].strip() for line in lines if "hl_init" in line] == [f"hl_init: {init}"]


def test_hsam_and_samed_profiles_are_the_published_recipes():
    for profile in ("hsam", "samed"):  # GPU scale: SAM's public weights or an explicit none
        with pytest.raises(SamoraError, match="sam_vit_b_01ec64.pth"):
            compose("finetune", ["data.name=synapse", f"profile={profile}"])
    hsam = compose("finetune", ["data.name=synapse", "profile=hsam", "model.checkpoint=none"])
    assert (hsam.model.variant, hsam.model.img_size, hsam.model.decoder, hsam.model.lora_rank) == (
        "vit_b",
        512,
        "hsam",
        5,
    )
    assert hsam.mode == "samed" and hsam.trainer.max_epochs == 300 and hsam.trainer.stop_epoch is None
    assert (hsam.data.batch_size, hsam.data.effective_batch_size, hsam.data.train_size) == (8, 16, None)
    assert (hsam.optim.lr, hsam.optim.warmup_steps, hsam.optim.poly_power, hsam.optim.poly_horizon) == (
        0.0025,
        250,
        0.9,
        "total",
    )
    assert (hsam.loss.ce_weight, hsam.loss.dice_weight) == (0.1, 0.9)
    assert (hsam.eval.resize, hsam.eval.two_step_size) == ("two_step", 224)
    assert hsam.model.hsam_cmattn == "released" and hsam.model.hsam_inference == "mean"
    samed = compose("finetune", ["data.name=synapse", "profile=samed", "model.checkpoint=none"])
    assert (samed.model.variant, samed.model.img_size, samed.model.decoder, samed.model.lora_rank) == (
        "vit_b",
        512,
        "sam",
        4,
    )
    assert samed.mode == "samed" and (samed.trainer.max_epochs, samed.trainer.stop_epoch) == (200, 160)
    assert (samed.data.batch_size, samed.data.effective_batch_size, samed.data.train_size) == (12, 24, 224)
    assert (samed.optim.lr, samed.optim.warmup_steps, samed.optim.poly_horizon) == (0.005, 250, "total")
    assert (samed.loss.ce_weight, samed.loss.dice_weight) == (0.2, 0.8)
    assert (samed.eval.resize, samed.eval.two_step_size) == ("two_step", 224)
    assert (
        compose("finetune", ["data.name=synapse", "profile=hsam", "mode=samora", "model.checkpoint=none"]).mode
        == "samora"
    )


def test_stage2_warms_up_over_the_authors_25_iterations_and_tiny_over_one_epoch():
    paper = compose("finetune", ["data.name=synapse", "model.checkpoint=none"])
    assert paper.optim.warmup_steps == 25
    tiny = compose("finetune")
    assert tiny.optim.warmup_steps is None and tiny.optim.warmup_epochs == 1.0
    assert (tiny.data.effective_batch_size, tiny.data.train_size, tiny.trainer.stop_epoch) == (None, None, None)


def test_pos_embed_resize_defaults_to_bilinear():
    assert compose("finetune").model.pos_embed_resize == "bilinear"


def test_config_is_read_only():
    cfg = compose("finetune")
    with pytest.raises(ReadonlyConfigError):
        cfg.data.fraction = 0.5


@pytest.mark.parametrize(
    "override, words",
    [
        (["data.nope=1"], ["data.nope", "fraction"]),
        (["nope=1"], ["nope"]),
        (["data.fraction=0"], ["data.fraction", "(0, 1]"]),
        (["data.fraction=1.5"], ["data.fraction", "(0, 1]"]),
        (["model.fusion=concat"], ["model.fusion", "hl_attn", "mole"]),
        (["model.lac_weights=[0.5,0.5]"], ["model.lac_weights", "image, patch, pixel", "summing to 1"]),
        (["model.lac_weights=[0.6,0.6]", "finetune.levels=[image,pixel]"], ["model.lac_weights", "image, pixel"]),
        (["model.hl_order=a-b-c"], ["model.hl_order", "pixel-patch-image"]),
        (["trainer.max_epochs=ten"], ["trainer.max_epochs"]),
        (["mode=full"], ["mode", "samed"]),
        (["model.img_size=100"], ["model.img_size", "16"]),
        (["data.name=kits"], ["kits", "synapse"]),
        (["profile=huge"], ["huge", "tiny"]),
        (["fraction"], ["key=value"]),
        (["run=../elsewhere"], ["run"]),
        (["data.fraction_by=list"], ["data.fraction_list"]),
        (["data.fraction_by=list", "data.fraction_list=l.txt", "data.subset_seed=1"], ["data.subset_seed", "list"]),
        (["data.subset_seed=-1"], ["data.subset_seed", ">= 0"]),
        (["data.intensity=zscore"], ["data.intensity", "auto", "mr_percentile"]),
        (["trainer.devices=0"], ["trainer.devices", "-1 or auto", "[0,1]"]),
        (["trainer.devices=-2"], ["trainer.devices"]),
        (["trainer.devices=two"], ["trainer.devices"]),
        (["trainer.devices=[0,0]"], ["trainer.devices", "distinct"]),
        (["trainer.devices=[]"], ["trainer.devices"]),
        (["trainer.num_nodes=0"], ["trainer.num_nodes", "positive"]),
        (["trainer.accelerator=tpu2"], ["trainer.accelerator", "cpu", "gpu"]),
        (["model.decoder=unet"], ["model.decoder", "sam", "hsam"]),
        (["model.decoder=hsam", "model.hsam_cmattn_heads=5"], ["model.hsam_cmattn_heads", "N = 64"]),
        (["model.hsam_cmattn=on"], ["model.hsam_cmattn", "released", "working"]),
        (["model.pos_embed_resize=nearest"], ["model.pos_embed_resize", "bilinear", "bicubic"]),
        (["optim.warmup_steps=-1"], ["optim.warmup_steps"]),
        (["trainer.stop_epoch=0"], ["trainer.stop_epoch", "[1, trainer.max_epochs=100]"]),
        (["trainer.max_epochs=5", "trainer.stop_epoch=6"], ["trainer.stop_epoch", "trainer.stop_epoch=null"]),
        (["data.train_size=0"], ["data.train_size", "positive"]),
        (["data.effective_batch_size=0"], ["data.effective_batch_size", "positive"]),
        (["data.effective_batch_size=6"], ["data.effective_batch_size=6", "data.batch_size=4", "data.batch_size=3"]),
    ],
)
def test_bad_config_names_the_key(override, words):
    with pytest.raises(SamoraError) as err:
        compose("finetune", override)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("devices", ["1", "2", "-1", "auto", "[0,1]"])
def test_device_counts_lightning_takes_are_accepted(devices):
    assert compose("finetune", [f"trainer.devices={devices}"]).trainer.devices is not None


def test_zero_devices_is_one_message_before_lightning_starts(capsys):
    assert main(["finetune", "trainer.devices=0"]) == 1
    err = capsys.readouterr().err
    assert "trainer.devices" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_stage():
    with pytest.raises(SamoraError, match="Unknown stage"):
        compose("pretrain")


def test_six_orders():
    assert len(HL_ORDERS) == 6 and "pixel-patch-image" in HL_ORDERS


def test_values_are_not_evaluated():
    cfg = compose("finetune", ["run=__import__('os')"])
    assert cfg.run == "__import__('os')"


def test_diff_keys():
    a = OmegaConf.create({"x": 1, "y": {"z": 2}})
    b = OmegaConf.create({"x": 1, "y": {"z": 3}, "w": 0})
    assert diff_keys(a, b) == ["w", "y.z"]


@pytest.mark.parametrize(
    "override, words",
    [
        (["finetune.levels=[image,organ]"], ["finetune.levels", "organ", "image, patch, pixel"]),
        (["finetune.levels=[image,image]"], ["finetune.levels", "distinct"]),
        (["finetune.levels=[]"], ["finetune.levels"]),
        (["finetune.levels=[image,patch]", "model.fusion=single:pixel"], ["single:pixel", "leaves out"]),
        (["finetune.levels=[patch]"], ["hl_attn", "single:patch"]),
    ],
)
def test_bad_levels_are_one_clear_error(override, words):
    with pytest.raises(SamoraError) as err:
        compose("finetune", override)
    for word in words:
        assert word in str(err.value)


def test_levels_are_canonical_and_ignored_by_samed():
    assert planned("finetune", ["finetune.levels=[patch,image]", "model.fusion=sum"]).levels == ("image", "patch")
    assert planned("finetune").levels == ("image", "patch", "pixel")
    compose("finetune", ["finetune.levels=[patch]", "mode=samed"])  # SAMed has no experts to choose


def test_every_gpu_scale_profile_requires_public_weights():
    profiles = sorted(p.stem for p in experiments_dir().joinpath("model").glob("*.yaml"))
    assert "paper" in profiles
    for profile in profiles:
        cfg = compose("distill", [f"profile={profile}", "model.checkpoint=none"])
        assert cfg.requires_checkpoints is (profile != "tiny"), profile


@pytest.mark.parametrize(
    "stage, extra, words",
    [
        ("finetune", [], ["model.checkpoint", "sam_vit_b_01ec64.pth", "model.checkpoint=none"]),
        ("distill", ["model.variant=vit_l"], ["model.checkpoint", "sam_vit_l_0b3195.pth"]),
        ("finetune", ["model.variant=vit_h", "mode=samed"], ["model.checkpoint", "sam_vit_h_4b8939.pth"]),
        ("cpt", [], ["cpt.simclr.checkpoint", "r50_2x_sk1", "cpt.simclr.from_scratch=true"]),
        ("cpt", ["cpt.simclr.from_scratch=true"], ["cpt.mae.checkpoint", "mae_pretrain_vit_large.pth"]),
        ("cpt", ["cpt.teacher=mae", "cpt.mae.checkpoint=/w/mae.pth"], None),
        ("finetune", ["model.checkpoint=none"], None),
        ("finetune", ["profile=tiny"], None),
    ],
)
def test_paper_profile_without_public_weights_stops(stage, extra, words):
    overrides = ["data.name=synapse", *extra]
    if words is None:
        compose(stage, overrides)
        return
    with pytest.raises(SamoraError) as err:
        compose(stage, overrides)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_paper_run_without_sam_checkpoint_exits_before_writing_anything(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["finetune", "data.name=synapse", f"data.dir={tmp_path / 'data'}", f"runs_dir={runs}"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "model.checkpoint" in err and "sam_vit_b_01ec64.pth" in err
    assert not runs.exists() and not (tmp_path / "data").exists()


def test_hsam_decoder_on_sam2_is_refused_with_the_reason():
    with pytest.raises(SamoraError) as err:
        compose("finetune", ["model.family=sam2", "model.decoder=hsam"])
    assert "model.decoder" in str(err.value) and "conv_s0" in str(err.value)


def test_a_saved_config_holding_a_list_is_one_clear_error(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("- 1\n- 2\n")
    with pytest.raises(SamoraError, match="holds a list, not a mapping"):
        load_saved(saved)
