"""Public SimCLRv2 weights load: a state dict written here in the layout of SimCLRv2-Pytorch's convert.py
(`{"resnet": {"net.0.0.weight", ...}, "head": {"layers.0.weight", ...}}`) becomes exactly the teacher's keys and
shapes, and the loaded teacher computes what SimCLRv2's TensorFlow ResNet computes with those weights (a
functional forward over the file's own keys is the oracle)."""

import json

import pytest
import torch
import torch.nn.functional as F

from samora_pl.cli import main
from samora_pl.errors import SamoraError
from samora_pl.models.teachers.files import load_simclr_checkpoint
from samora_pl.models.teachers.simclr import SimclrTeacher

LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
WIDTH = 0.25  # stage widths 16, 32, 64, 128: a tiny R50 in the real layout


def write_layout(depth: int, selective_kernel: bool, proj_dim: int = 16, seed: int = 0, width: float = WIDTH) -> dict:
    """Random weights under the conversion's key names and shapes (BatchNorm statistics included), at channel
    multiplier `width` (2: the layout of r50_2x_sk1.pth)."""
    g = torch.Generator().manual_seed(seed)
    resnet = {}

    def conv(name, cin, cout, k):
        resnet[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name, c, into=resnet):
        into[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        into[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
        into[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=g)
        into[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        into[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    stem = int(64 * width)
    if selective_kernel:
        conv("net.0.0", 3, stem // 2, 3), bn("net.0.1.0", stem // 2)
        conv("net.0.2", stem // 2, stem // 2, 3), bn("net.0.3.0", stem // 2)
        conv("net.0.4", stem // 2, stem, 3), bn("net.0.5.0", stem)
    else:
        conv("net.0.0", 3, stem, 7), bn("net.0.1.0", stem)
    cin = stem
    for stage, (blocks, base) in enumerate(zip(LAYERS[depth], (64, 128, 256, 512)), start=1):
        mid = int(base * width)
        for j in range(blocks):
            p = f"net.{stage}.blocks.{j}."
            if j == 0:
                conv(p + ("projection.shortcut.2" if selective_kernel else "projection.shortcut"), cin, 4 * mid, 1)
                bn(p + "projection.bn.0", 4 * mid)
            conv(p + "net.0", cin, mid, 1), bn(p + "net.1.0", mid)
            if selective_kernel:
                attn = max(int(mid * 0.0625), 32)
                conv(p + "net.2.main_conv.0", mid, 2 * mid, 3), bn(p + "net.2.main_conv.1.0", 2 * mid)
                conv(p + "net.2.mixing_conv.0", mid, attn, 1), bn(p + "net.2.mixing_conv.1.0", attn)
                conv(p + "net.2.mixing_conv.2", attn, 2 * mid, 1)
                conv(p + "net.3", mid, 4 * mid, 1), bn(p + "net.4.0", 4 * mid)
            else:
                conv(p + "net.2", mid, mid, 3), bn(p + "net.3.0", mid)
                conv(p + "net.4", mid, 4 * mid, 1), bn(p + "net.5.0", 4 * mid)
            cin = 4 * mid
    resnet["fc.weight"], resnet["fc.bias"] = torch.randn(1000, cin, generator=g), torch.zeros(1000)
    head = {}
    for i, (fan_in, out) in enumerate(((cin, cin), (cin, cin), (cin, proj_dim))):
        head[f"layers.{3 * i}.weight"] = torch.randn(out, fan_in, generator=g) / fan_in**0.5
        bn(f"layers.{3 * i + 1}", out, into=head)
    return {"resnet": resnet, "head": head}


def reference(data: dict, images: torch.Tensor) -> torch.Tensor:
    """SimCLRv2's ResNet (TensorFlow semantics) and projection head, in eval mode, on the file's own keys."""
    sd, head = data["resnet"], data["head"]
    selective = any(".main_conv." in k for k in sd)

    def bn(x, name, tree=sd):
        s = tree
        return F.batch_norm(
            x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"], s[f"{name}.bias"]
        )

    def conv(x, name, stride=1):
        w = sd[f"{name}.weight"]
        return F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2)

    x = images
    if selective:
        x = F.relu(bn(conv(x, "net.0.0", 2), "net.0.1.0"))
        x = F.relu(bn(conv(x, "net.0.2"), "net.0.3.0"))
        x = F.relu(bn(conv(x, "net.0.4"), "net.0.5.0"))
    else:
        x = F.relu(bn(conv(x, "net.0.0", 2), "net.0.1.0"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(1, 5):
        j = 0
        while f"net.{stage}.blocks.{j}.net.0.weight" in sd:
            p, stride = f"net.{stage}.blocks.{j}.", (2 if stage > 1 and j == 0 else 1)
            if j == 0 and selective:  # TF: average pool of size = stride, then the 1x1 projection
                short = bn(
                    conv(F.avg_pool2d(x, stride) if stride > 1 else x, p + "projection.shortcut.2"),
                    p + "projection.bn.0",
                )
            elif j == 0:
                short = bn(conv(x, p + "projection.shortcut", stride), p + "projection.bn.0")
            else:
                short = x
            h = F.relu(bn(conv(x, p + "net.0"), p + "net.1.0"))
            if selective:
                both = F.relu(bn(conv(h, p + "net.2.main_conv.0", stride), p + "net.2.main_conv.1.0"))
                paths = torch.stack(both.chunk(2, dim=1))
                g = paths.sum(0).mean((2, 3), keepdim=True)
                g = conv(
                    F.relu(bn(conv(g, p + "net.2.mixing_conv.0"), p + "net.2.mixing_conv.1.0")),
                    p + "net.2.mixing_conv.2",
                )
                h = (paths * torch.softmax(torch.stack(g.chunk(2, dim=1)), dim=0)).sum(0)
                h = bn(conv(h, p + "net.3"), p + "net.4.0")
            else:
                h = F.relu(bn(conv(h, p + "net.2", stride), p + "net.3.0"))
                h = bn(conv(h, p + "net.4"), p + "net.5.0")
            x = F.relu(h + short)
            j += 1
    z = x.mean((2, 3))
    for i in range(3):
        z = bn(F.linear(z, head[f"layers.{3 * i}.weight"]), f"layers.{3 * i + 1}", tree=head)
        z = F.relu(z) if i < 2 else z
    return z


@pytest.mark.parametrize("depth, selective_kernel", [(50, True), (50, False), (101, True)])
def test_conversion_layout_gives_the_teachers_keys_shapes_and_outputs(tmp_path, depth, selective_kernel):
    from samora_pl.models.teachers.simclrv2_keys import convert

    data = write_layout(depth, selective_kernel)
    model = SimclrTeacher(depth=depth, width=WIDTH, selective_kernel=selective_kernel, proj_dim=16, normalize="none")
    backbone, head = convert(data["resnet"], data["head"])
    expected = model.backbone.state_dict()
    assert sorted(backbone) == sorted(expected)  # the exact key list ...
    assert all(backbone[k].shape == expected[k].shape for k in expected)  # ... and shapes
    assert sorted(head) == sorted(model.head.state_dict())

    path = tmp_path / f"r{depth}_sk{int(selective_kernel)}.pth"
    torch.save(data, path)
    report = load_simclr_checkpoint(model, path)
    assert report["head"] == "loaded" and report["backbone_tensors"] == len(expected)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), reference(data, images), atol=1e-4, rtol=1e-4)


def test_a_file_of_another_layout_is_one_clear_error_and_cpt_writes_nothing(tmp_path, capsys, config):
    other = tmp_path / "other.pth"
    torch.save({"encoder": {"stem.conv.weight": torch.zeros(8, 3, 3, 3), "stages.0.weight": torch.zeros(8)}}, other)
    model = SimclrTeacher(depth=50, width=WIDTH, selective_kernel=True, proj_dim=16)
    with pytest.raises(SamoraError, match=r"none of the layouts .*SimCLRv2-Pytorch's convert.py .*net\.0\.0\.weight"):
        load_simclr_checkpoint(model, other)
    cfg = config(tmp_path)  # the tiny CPT settings of the stage tests
    args = [f"{k}={v}" for k, v in (("runs_dir", cfg.runs_dir), ("run", "t"), ("data.dir", cfg.data.dir))]
    sources = f"cpt.sources=[{{path: '{tmp_path / 'pool'}', format: npz}}]"
    assert main(["cpt", *args, sources, "cpt.teacher=simclr", f"cpt.simclr.checkpoint={other}"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "none of the layouts" in err
    assert not (tmp_path / "runs").exists()


def test_simclrv2_weights_see_unnormalised_inputs_from_cpt_to_distillation(tmp_path, config):
    """SimCLRv2 was trained on [0, 1] images: cpt.simclr.normalize=auto (the default) gives the teacher of a
    converted file no mean / std, teacher.pt and the CPT manifest record it, and the teacher distillation
    loads computes SimCLRv2's own function of the [0, 1] slice."""
    from samora_pl.config.plans import build_plan
    from samora_pl.models.teachers.files import load_teacher
    from tests.stage_runs import run_stage as run

    data = write_layout(50, True)
    path = tmp_path / "r50_1x_sk1.pth"
    torch.save(data, path)
    arch = ["cpt.simclr.depth=50", f"cpt.simclr.width={WIDTH}", "cpt.simclr.selective_kernel=true"]
    start = [*arch, f"cpt.simclr.checkpoint={path}", "cpt.teacher=simclr", "cpt.simclr.max_epochs=0"]
    cfg = config(tmp_path, *start)
    assert cfg.cpt.simclr.normalize == "auto"
    assert run(cfg)["simclr"]["normalize"] == "none"
    manifest = json.loads((build_plan(cfg).teacher_file("simclr").parent / "manifest.json").read_text())
    assert manifest["metrics"]["normalize"] == "none"
    teacher = load_teacher(build_plan(cfg).teacher_file("simclr"), kind="simclr")  # as distillation loads it
    assert teacher.arch["normalize"] == "none" and teacher.teacher_meta["normalize"] == "none"
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher.embed(grey), reference(data, grey.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)

    with pytest.raises(SamoraError, match=r"cpt.simclr.normalize=imagenet, but .*SimCLRv2 weights .*auto"):
        run(config(tmp_path, *start, "cpt.simclr.normalize=imagenet", "overwrite=true"))
