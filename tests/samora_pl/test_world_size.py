"""The process count comes from Lightning (Trainer / Fabric `world_size`), never from the config text.

`trainer.devices=-1` or `auto` on an 8-GPU node is 8 processes; counting the config's `devices` read them as
one. CUDA is faked (Lightning's device count) so that GPU settings build here; nothing is launched."""

import lightning.fabric.accelerators.cuda as fabric_cuda
import lightning.pytorch.accelerators.cuda as pytorch_cuda
import pytest

from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.stages.cpt import run as cpt
from samora_pl.training.trainer import build_fabric

GPUS = 4  # the faked machine's GPU count

# (accelerator, devices, num_nodes, processes): `devices=-1` / `auto` are every GPU of the node
SETTINGS = [
    ("gpu", -1, 1, GPUS),
    ("gpu", "auto", 1, GPUS),
    ("gpu", [0, 1], 1, 2),
    ("gpu", -1, 2, 2 * GPUS),
    ("cpu", 3, 1, 3),
    ("cpu", 2, 2, 4),
    ("cpu", 1, 2, 2),
    ("cpu", "auto", 1, 1),
]


@pytest.fixture
def fake_gpus(monkeypatch):
    for module in (fabric_cuda, pytorch_cuda):
        monkeypatch.setattr(module, "num_cuda_devices", lambda: GPUS)


def _trainer_overrides(accelerator, devices, num_nodes):
    listed = "[" + ",".join(map(str, devices)) + "]" if isinstance(devices, list) else devices
    return [f"trainer.accelerator={accelerator}", f"trainer.devices={listed}", f"trainer.num_nodes={num_nodes}"]


@pytest.mark.parametrize("accelerator,devices,num_nodes,processes", SETTINGS)
def test_mae_lr_scales_with_the_trainers_world_size(
    tmp_path, config, fake_gpus, monkeypatch, accelerator, devices, num_nodes, processes
):
    """MAE's lr = base_lr x batch x processes / 256, with the Trainer's count (0 epochs: nothing launches)."""
    sizes = []
    original = cpt.build_trainer

    def recording(*args, **kwargs):
        trainer = original(*args, **kwargs)
        sizes.append(trainer.world_size)
        return trainer

    monkeypatch.setattr(cpt, "build_trainer", recording)
    cfg = config(
        tmp_path, "cpt.teacher=mae", "cpt.mae.max_epochs=0", *_trainer_overrides(accelerator, devices, num_nodes)
    )
    lr = cpt.run(build_plan(cfg))["mae"]["lr"]
    assert sizes == [processes]
    assert lr == pytest.approx(cfg.cpt.mae.base_lr * cfg.cpt.mae.batch_size * processes / 256)


@pytest.mark.parametrize("accelerator,devices,num_nodes,processes", SETTINGS)
def test_evaluation_starts_the_real_number_of_processes(
    tmp_path, fake_gpus, accelerator, devices, num_nodes, processes
):
    """`samora evaluate` launches ranks (and shards the cases) when its Fabric counts more than one."""
    cfg = compose("evaluate", [f"runs_dir={tmp_path}", *_trainer_overrides(accelerator, devices, num_nodes)])
    assert build_fabric(build_plan(cfg).trainer).world_size == processes
