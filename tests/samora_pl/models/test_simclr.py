"""The SimCLR teacher (models/simclr.py): ResNet widths, torchvision key names, projection head."""

import timm
import torch

from samora_pl.models.simclr import build_resnet


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
