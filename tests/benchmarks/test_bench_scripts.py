"""Every benchmark in `benchmarks/` runs end to end at a tiny size and prints its figures.

`make bench` is not part of CI (it takes minutes and its goals are about speed); this keeps the scripts from
rotting unnoticed. Nothing here checks a time: tiny sizes say nothing about speed. The equality checks
the benchmarks assert themselves (evaluation against medpy, worker results against inline) do run.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

TINY_RUNS = {
    "encoder_step.py": (
        ["--variant", "tiny", "--img-size", "64", "--warmup", "0", "--reps", "1", "--hl-width", "32"],
        [
            "samora_fused_s",
            "samora_naive_s",
            "speedup_fused_vs_naive",
            "fused_vs_naive_of_flop_ceiling",
            "ratio_vs_flops",
        ],
    ),
    "sam2_encoder_step.py": (
        ["--variant", "tiny", "--img-size", "64", "--warmup", "0", "--reps", "1"],
        ["samora_s", "single_lora_s", "time_ratio", "flop_ratio", "ratio_vs_flops"],
    ),
    "cpt_step.py": (
        ["--img-size", "32", "--batch", "2", "--reps", "1", "--warmup", "0"],
        ["simclr_r50_channels_last_images_per_s", "mae_vit_b_images_per_s", "channels_last_vs_contiguous"],
    ),
    "data_loader.py": (
        ["--slices", "8", "--size", "64", "--img-size", "32", "--workers", "1", "--batch-size", "4", "--epochs", "1"],
        ["samora_slices_per_s", "scipy_reference_slices_per_s", "ratio_cached", "ratio"],
    ),
    "evaluation.py": (
        ["--depth", "6", "--size", "48", "--cases", "2", "--repeats", "1"],
        ["identical_to_medpy", "workers_identical", "workers_speedup", "ratio"],
    ),
    "decoder_step.py": (
        ["--variant", "tiny", "--sizes", "64", "--reps", "1", "--warmup", "0"],
        [
            "time_ratio_64 (hsamora / samora)",
            "memory_ratio_64 (hsamora / samora)",
            "flop_ratio_64 (hsamora / samora)",
            "hsamora_64_saved_mib",
        ],
    ),
    "grad_checkpoint.py": (
        ["--variant", "tiny", "--img-size", "64", "--reps", "1", "--hl-width", "32"],
        ["memory_ratio (goal >= 2)", "time_ratio (goal <= 1.4)"],
    ),
}


def figures(stdout: str) -> dict:
    """`name: value` lines -> {name: value}."""
    pairs = (line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
    return {name.strip(): value.strip() for name, value in pairs}


def test_every_benchmark_is_covered():
    # perf_summary reads TensorBoard runs; _*.py are helpers the benchmarks import
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")} - {"perf_summary.py"}
    assert scripts == set(TINY_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY_RUNS))
def test_benchmark_runs_at_a_tiny_size(script, subprocess_env):
    args, expected = TINY_RUNS[script]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = figures(done.stdout)
    missing = [name for name in expected if name not in printed]
    assert not missing, f"{script} did not print {missing}:\n{done.stdout}"
    for name, value in printed.items():
        if name.startswith(("identical", "workers_identical")):
            assert value == "True", f"{script}: {name} = {value}"
