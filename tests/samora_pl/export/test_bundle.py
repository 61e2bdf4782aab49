"""`samora bundle`: a tiny fine-tune exported as a MONAI bundle, run by MONAI's own bundle runner in a process that
cannot import samora_pl, gives exactly the label maps `samora predict` writes (tolerance: none, every voxel
equal; geometry within 1e-5) on the demo's test volumes, for SAMora (HL-Attn over three experts), SAMed and
H-SAM; bad inputs are one message."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_modules.io.volume_io import Geometry, read_image, write_image
from data_modules.labelled.demo import ensure_demo
from data_modules.labelled.synapse import SYNAPSE_CLASS_NAMES
from samora_pl.cli import main
from samora_pl.config.choices import LEVELS
from samora_pl.config.compose import compose, load_saved
from samora_pl.config.plans import build_plan
from samora_pl.config.specs import ExpertLayout
from samora_pl.models.factory import build_segmenter
from samora_pl.stages.finetune.evaluate import load_finetuned
from samora_pl.stages.finetune.run import FINAL
from tests.data_modules.volume_writers import GEOMETRY, finetune_overrides

LAUNCHER = Path(__file__).with_name("monai_only.py")
OTHER = Geometry(
    spacing=(2.0, 1.25, 0.9), origin=(5.0, -3.0, 100.0), direction=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
)
# the spec's required fields (MONAI bundle specification, metadata.json)
REQUIRED = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "optional_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
MODES = {
    "samora": ("samora-hl_attn-f1", ("mode=samora",)),
    "samed": ("samed-lora-f1", ()),
    "hsam": ("samed-lora-hsam-f1", ("model.decoder=hsam",)),
    "sam2": ("sam2-samed", ("model.family=sam2", "model.variant=tiny", "finetune.tag=sam2-samed")),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo dataset at test size, and its test volumes as NIfTI in HU (the windowing undone) with a rotated
    frame, plus a non-square volume of another size and frame, so axes and geometry are checked."""
    root = tmp_path_factory.mktemp("bundle")
    data = ensure_demo(root / "data", n_train=2, n_test=2, size=32, min_slices=8, max_slices=8, n_unlabeled=0)
    inputs = root / "nifti"
    for path in sorted((data / "test_vol_h5").glob("*.h5")):
        with h5py.File(path) as f:
            hu = f["image"][()] * 400.0 - 125.0
        write_image(inputs / f"{path.name.split('.')[0]}.nii.gz", hu.astype(np.float32), GEOMETRY)
    odd = np.random.default_rng(0).uniform(-300.0, 400.0, (5, 40, 36)).astype(np.float32)
    write_image(inputs / "odd.nii.gz", odd, OTHER)
    return root, data, inputs


def write_experts(root: Path, overrides: list) -> list:
    """Three distilled-looking experts (B != 0) for mode=samora, made with the run's model settings."""
    model = build_segmenter(
        build_plan(compose("finetune", [*overrides, "mode=samora"])).segmenter, ExpertLayout(LEVELS, "hl_attn"), 8
    )
    with torch.no_grad():
        for name, param in model.lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    paths = []
    for level in LEVELS:
        model.save_expert(level, root / f"{level}.safetensors")
        paths.append(f"finetune.experts.{level}={root / f'{level}.safetensors'}")
    return paths


def finetune(root: Path, data: Path, name: str) -> tuple:
    """A finished tiny fine-tune of `name` (MODES) in run `t` under `root`; (its overrides, its tag)."""
    if name == "sam2":
        pytest.importorskip("sam2")
    tag, extra = MODES[name]
    base = [*finetune_overrides(root, "synapse", data), "finetune.evaluate=false"]
    if name == "samora":
        base = [item for item in base if item != "mode=samed"]
        extra = (*extra, *write_experts(root, base))
    if not (root / "runs" / "t" / "finetune" / tag / FINAL).is_file():
        assert main(["finetune", *base, *extra]) == 0
    return [f"runs_dir={root / 'runs'}", "run=t", f"finetune.tag={tag}"], tag


def run_bundle(bundle: Path, inputs: Path, out: Path, env: dict) -> str:
    """`python -m monai.bundle run` on the bundle, in a process where samora_pl cannot be imported."""
    command = [
        sys.executable,
        "-I",
        str(LAUNCHER),
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(out),
    ]
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "refused imports: samora_pl,data_modules" in log and "blocked modules loaded: 0 []" in log, log[-2000:]
    return log


def assert_same_labels(predicted: Path, bundled: Path, names: list) -> dict:
    counts = {}
    for name in names:
        want, want_geometry = read_image(predicted / f"{name}_pred.nii.gz")
        got, got_geometry = read_image(bundled / f"{name}_pred.nii.gz")
        assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
        assert np.array_equal(got, want), f"{name}: {(got != want).sum()} of {got.size} voxels differ"
        for field in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(getattr(got_geometry, field), getattr(want_geometry, field), atol=1e-5)
        counts[name] = np.bincount(got.ravel(), minlength=9).tolist()
    return counts


def test_bundle_files_metadata_and_model(demo, tmp_path):
    root, data, _ = demo
    run, tag = finetune(root, data, "samed")
    out = tmp_path / "bundle"
    assert main(["bundle", *run, f"out={out}"]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "LICENSE",
        "configs/inference.json",
        "configs/metadata.json",
        "docs/README.md",
        "models/model.ts",
        "scripts/__init__.py",
        "scripts/slices.py",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".bundle.")]  # no staging folder left
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert set(REQUIRED) <= set(meta)
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [64, 64] and fmt["inputs"]["image"]["num_channels"] == 1
    pred = fmt["outputs"]["pred"]
    assert pred["format"] == "labels" and pred["spatial_shape"] == [64, 64]
    assert pred["channel_def"] == {"0": "background", **{str(i): n for i, n in enumerate(SYNAPSE_CLASS_NAMES, 1)}}
    assert meta["samora"]["intensity"] == "ct_window" and meta["samora"]["tag"] == tag
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert {"preprocessing", "inferer", "postprocessing", "network_def", "run"} <= set(config)
    assert "samora_pl" not in (out / "scripts" / "slices.py").read_text().split('"""')[2]  # code, not docstring
    assert "monaibundle" in (out / "docs" / "README.md").read_text()
    assert "Apache License" in (out / "LICENSE").read_text()

    extra = {"metadata.json": ""}
    torch.jit.load(str(out / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == meta


@pytest.mark.parametrize("name", list(MODES))
def test_the_torchscript_model_is_the_fine_tuned_model(demo, tmp_path, name):
    """model.ts alone: its traced network gives the run's logits, and its labels are their argmax at 64 px."""
    root, data, _ = demo
    run, tag = finetune(root, data, name)
    out = tmp_path / "bundle"
    assert main(["bundle", *run, f"out={out}"]) == 0
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["samora"]["family"] == ("sam2" if name == "sam2" else "sam")
    assert meta["samora"]["decoder"] == ("hsam" if name == "hsam" else "sam")
    scripted = torch.jit.load(str(out / "models" / "model.ts"))
    folder = root / "runs" / "t" / "finetune" / tag
    model = load_finetuned(build_plan(load_saved(folder / "config.yaml")), folder / FINAL).eval()
    slices = torch.rand(11, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(slices)
        torch.testing.assert_close(scripted.network(slices), logits, rtol=1e-5, atol=1e-5)
        want = torch.nn.functional.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)
        labels = scripted(slices)
    assert labels.dtype == torch.uint8 and labels.shape == (11, 64, 64)
    assert torch.equal(labels, want.softmax(1).argmax(1).to(torch.uint8))


def test_the_launcher_blocks_samora_pl(subprocess_env, tmp_path):
    plain = subprocess.run(
        [sys.executable, "-c", "import samora_pl, data_modules"], env=subprocess_env, capture_output=True, text=True
    )
    assert plain.returncode == 0, plain.stderr  # importable here ...
    probe = subprocess.run(
        [sys.executable, "-I", str(LAUNCHER), "--probe"], env=subprocess_env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr  # ... refused under the launcher
    assert "refused imports: samora_pl,data_modules" in probe.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODES))
def test_bundle_run_by_monai_equals_samora_predict(demo, tmp_path, subprocess_env, name):
    root, data, inputs = demo
    run, _ = finetune(root, data, name)
    bundle = tmp_path / "bundle"
    assert main(["bundle", *run, f"out={bundle}"]) == 0
    assert main(["predict", *run, f"predict.input={inputs}", f"predict.output={tmp_path / 'predict'}"]) == 0
    run_bundle(bundle, inputs, tmp_path / "monai", subprocess_env)
    names = sorted(p.name.split(".")[0] for p in inputs.glob("*.nii.gz"))
    assert sorted(p.name for p in (tmp_path / "monai").iterdir()) == [f"{n}_pred.nii.gz" for n in names]
    counts = assert_same_labels(tmp_path / "predict", tmp_path / "monai", names)
    print(name, counts)


def test_bad_inputs_are_one_clear_error(demo, tmp_path, capsys):
    root, data, _ = demo
    run, _ = finetune(root, data, "samed")
    taken = tmp_path / "taken"
    taken.mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        ([f"runs_dir={tmp_path / 'none'}", "run=t", f"out={tmp_path / 'b1'}"], "No finished fine-tuning"),
        ([*run[:2], "finetune.tag=nope", f"out={tmp_path / 'b2'}"], "No fine-tuned model at"),
        ([*run, f"out={taken}"], "already exists"),
        ([*run, f"out={tmp_path / 'file'}"], "already exists"),
        ([*run, "out="], "out= is empty"),
    ]
    for args, words in cases:
        assert main(["bundle", *args]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists() and not list(taken.iterdir())


@pytest.mark.parametrize("resize", ["direct", "two_step"])
def test_the_bundle_script_repeats_predicts_steps(resize):
    """scripts/slices.py against samora's own functions: every intensity rule (int16 MR, float CT) and both resize
    protocols, through SliceInferer on a MetaTensor against predict_volume with the same network."""
    from monai.data import MetaTensor

    from data_modules.io.readers import intensity
    from data_modules.labelled.volumes import volume_stats
    from samora_pl.evaluation import predict_volume
    from samora_pl.export import bundle_script

    rng = np.random.default_rng(3)
    mr = rng.integers(0, 900, (4, 30, 22)).astype(np.int16)
    ct = rng.uniform(-400.0, 500.0, (3, 18, 26)).astype(np.float32)
    for raw, rule in ((mr, "mr_percentile"), (ct, "ct_window"), (ct, "none"), (np.full_like(mr, 7), "mr_percentile")):
        want = intensity(raw, rule, volume_stats(raw, rule))
        assert np.array_equal(bundle_script.intensity(raw.transpose(2, 1, 0), rule), want.transpose(2, 1, 0))

    weights = torch.randn(3, 1, 3, 3, generator=torch.Generator().manual_seed(0))

    def logits(batch):  # any fixed network: three classes at a quarter of the size
        return torch.nn.functional.conv2d(batch, weights, padding=1)[..., ::4, ::4]

    from samora_pl.export.torchscript import SliceLabeller

    class Net(torch.nn.Module):
        def forward(self, x):
            return logits(x)

    volume = intensity(mr, "mr_percentile", volume_stats(mr, "mr_percentile"))
    want = predict_volume(logits, volume, 48, batch_size=3, resize=resize, two_step_size=40)
    inferer = bundle_script.SliceInferer(48, resize=resize, two_step_size=40)
    image = MetaTensor(torch.from_numpy(volume.transpose(2, 1, 0).copy())[None, None], affine=torch.eye(4) * 2)
    got = inferer(image, SliceLabeller(Net(), 48, 3))
    assert isinstance(got, MetaTensor) and got.dtype == torch.uint8 and torch.equal(got.affine, image.affine)
    assert np.array_equal(got[0, 0].numpy().transpose(2, 1, 0), want)


def test_make_bundle_passes_run_and_out(repo_root):
    stamp = "no-venv-stamp"  # as tests/test_smoke_paper.py: the venv stamp is never rebuilt here
    argv = ["make", "-n", "--no-print-directory", "-f", str(repo_root / "Makefile"), "-o", stamp, f"STAMP={stamp}"]
    shown = subprocess.run([*argv, "bundle", "RUN=r1", "OUT=/x/b"], capture_output=True, text=True, cwd=repo_root)
    assert shown.returncode == 0, shown.stderr
    words = shown.stdout.split()
    assert words[1] == "bundle" and "run=r1" in words and words[-1] == "out=/x/b", shown.stdout
    shown = subprocess.run([*argv, "bundle", "RUN=r1"], capture_output=True, text=True, cwd=repo_root)
    assert not [w for w in shown.stdout.split() if w.startswith("out=")], shown.stdout
