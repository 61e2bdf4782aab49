"""When stages draw their TensorBoard pictures: on the epochs their drawing hook actually runs."""

import pytest

from samora_pl.config.compose import compose, experiments_dir
from samora_pl.training.image_cadence import ImageCadence, picture_epochs, validation_epochs

PROFILES = sorted(p.stem for p in (experiments_dir() / "model").glob("*.yaml"))


def test_validation_every_n_epochs_still_gets_pictures():
    """Validation every 20 epochs runs at 19, 39, ...; `epoch % 20 == 0` would never draw there."""
    hooks = validation_epochs(100, 20)
    assert hooks == [19, 39, 59, 79, 99]
    assert picture_epochs(hooks, 20) == hooks
    assert picture_epochs(range(24), 6) == [0, 6, 12, 18]
    assert picture_epochs(validation_epochs(12, 3), 5) == [2, 8]  # the first validation, then >= 5 epochs later


def test_one_picture_per_epoch_however_often_the_hook_runs():
    cadence = ImageCadence(1)
    assert [cadence.due(epoch) for epoch in (0, 0, 1, 1, 3)] == [True, False, True, False, True]


def _hook_epochs(stage: str, profile: str) -> dict:
    """{stage part: (epochs its drawing hook runs in, image_log_every_n_epochs)} of a shipped profile."""
    # GPU-scale profiles refuse to compose without public weights; this checks only their epoch settings
    opt_out = ["model.checkpoint=none", "cpt.simclr.from_scratch=true", "cpt.mae.from_scratch=true"]
    cfg = compose(stage, [f"profile={profile}", *opt_out])
    every = cfg.trainer.image_log_every_n_epochs
    if stage == "cpt":  # pictures of the first training batch of an epoch
        return {kind: (range(cfg.cpt[kind].max_epochs), every) for kind in ("simclr", "mae")}
    if stage == "distill":
        return {"distill": (range(cfg.distill.max_epochs), every)}
    trainer = cfg.trainer  # validation pictures
    return {"finetune": (validation_epochs(trainer.max_epochs, trainer.check_val_every_n_epoch), every)}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage", ["cpt", "distill", "finetune"])
def test_every_shipped_profile_draws_pictures_in_every_stage(stage, profile):
    for part, (hooks, every) in _hook_epochs(stage, profile).items():
        assert list(hooks), f"{profile}: the {part} picture hook never runs"
        drawn = picture_epochs(hooks, every)
        assert drawn and set(drawn) <= set(hooks), f"{profile}: {part} draws no picture"
