"""The SimCLR teacher (models/teachers/simclr.py): ResNet widths, torchvision key names, projection head."""

from types import SimpleNamespace

import timm
import torch

from samora_pl.losses.nt_xent import nt_xent
from samora_pl.models.teachers.simclr import build_resnet
from samora_pl.stages.cpt.simclr import SimclrCpt


def test_simclr_head_and_embedding(tiny_simclr):
    model = tiny_simclr().eval()
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.head if isinstance(m, torch.nn.BatchNorm1d)]
    relus = [m for m in model.head if isinstance(m, torch.nn.ReLU)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert len(norms) == 3 and len(relus) == 2
    assert isinstance(model.head[-1], torch.nn.BatchNorm1d)  # no ReLU on the output
    grey = torch.rand(3, 1, 48, 48)
    out = model.embed(grey)
    assert out.shape == (3, 16)
    assert torch.allclose(out, model.embed(grey.repeat(1, 3, 1, 1)))  # grey is repeated to 3 channels


def test_the_last_batchnorm_has_a_scale_but_no_trained_shift(tiny_simclr):
    """SimCLRv2's output BatchNorm has no beta (TensorFlow center=False): its bias stays 0 through CPT."""
    teacher = tiny_simclr().train()
    last = teacher.head[-1]
    assert last.weight.requires_grad and not last.bias.requires_grad and not last.bias.any()
    assert "7.bias" in teacher.head.state_dict()  # kept as a key: converted files and old teacher.pt load
    module = SimclrCpt(teacher, lr=0.1)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)  # what the schedule reads
    optimizer = module.configure_optimizers()["optimizer"]
    assert all(p is not last.bias for group in optimizer.param_groups for p in group["params"])
    weight = last.weight.detach().clone()
    z1, z2 = teacher(torch.rand(8, 1, 32, 32)).chunk(2)
    nt_xent(z1, z2, 0.1, gather=False).backward()
    optimizer.step()
    assert last.bias.grad is None and not last.bias.any()
    assert not torch.equal(last.weight.detach(), weight)  # the scale trains


def test_resnet_width_multiplies_every_channel():
    one, two = build_resnet(18, 1.0), build_resnet(18, 2.0)
    assert one.num_features == 512 and two.num_features == 1024
    assert two.conv1.out_channels == 2 * one.conv1.out_channels
    sk = build_resnet(18, 0.25, selective_kernel=True)
    assert any("paths" in name for name, _ in sk.named_parameters())


def test_resnet50_uses_torchvision_key_names():
    keys = set(build_resnet(50, 1.0).state_dict())
    reference = {k for k in timm.create_model("resnet50", pretrained=False).state_dict() if not k.startswith("fc.")}
    assert keys == reference
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.2.bn3.running_var", "layer1.0.downsample.0.weight"} <= keys
