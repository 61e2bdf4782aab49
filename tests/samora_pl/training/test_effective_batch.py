import pytest

from samora_pl.config.compose import compose
from samora_pl.errors import SamoraError
from samora_pl.training.effective_batch import accumulation, known_world_size
from tests.stage_runs import planned

SAMED = ["data.name=synapse", "profile=samed", "model.checkpoint=none"]
HSAM = ["data.name=synapse", "profile=hsam", "model.checkpoint=none"]


@pytest.mark.parametrize("devices, world", [(1, 1), (2, 2), ([0, 1], 2), ("auto", None), (-1, None)])
def test_world_size_is_known_only_for_a_count_or_a_list(devices, world):
    assert known_world_size(devices, 1) == world


def test_unset_means_no_accumulation():
    assert accumulation(None, 12, 1) == 1 and accumulation(None, 12, None) == 1


@pytest.mark.parametrize("overrides, devices, steps", [(SAMED, 1, 2), (SAMED, 2, 1), (HSAM, 1, 2), (HSAM, 2, 1)])
def test_both_baselines_reach_their_global_batch_on_one_or_two_devices(overrides, devices, steps):
    plan = planned("finetune", overrides + [f"trainer.devices={devices}"])
    assert plan.trainer.accumulate_grad_batches == steps
    assert plan.data_settings.batch_size * devices * steps == plan.data_settings.effective_batch_size


def test_a_batch_that_does_not_divide_is_refused_naming_the_keys():
    with pytest.raises(SamoraError) as err:
        compose("finetune", SAMED + ["trainer.devices=4"])  # 12 x 4 = 48 does not divide 24
    for word in ("data.effective_batch_size", "data.batch_size", "trainer.devices", "data.batch_size=6"):
        assert word in str(err.value)


def test_an_unknown_device_count_is_refused():
    with pytest.raises(SamoraError, match="trainer.devices"):
        compose("finetune", SAMED + ["trainer.devices=auto"])


def test_evaluation_does_not_need_the_training_batch_to_divide():
    assert compose("evaluate", SAMED + ["trainer.devices=auto"]).data.effective_batch_size == 24
