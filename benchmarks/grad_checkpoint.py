"""Peak activation memory and step time of one stage-2 training step with and without activation checkpointing.

Each setting runs in its own process so that peak-memory readings do not mix: CPU peak resident memory
(`ru_maxrss`) after building the model and one no-grad forward is the baseline, and the rise during a
forward+backward step is the activation memory; on CUDA, `torch.cuda.max_memory_allocated` is used the same
way. Goal (issue #6): at least 2x less activation memory for at most 1.4x the step time.

    python benchmarks/grad_checkpoint.py [--img-size 512] [--variant vit_b] [--batch 1] [--device cpu]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def measure(args) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from samora_pl.models.segmenter import SAMoraSegmenter

    device = torch.device(args.device)
    model = SAMoraSegmenter(
        variant=args.variant,
        img_size=args.img_size,
        num_classes=8,
        fusion="hl_attn",
        hl_width=args.hl_width,
        grad_checkpoint=args.checkpointing,
        trainable="samora",
    ).to(device)
    images = torch.rand(args.batch, 1, args.img_size, args.img_size, device=device)
    with torch.no_grad():
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        model(images).float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"activation_mib": (peak - base) / 2**20, "step_s": sorted(times)[len(times) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--img-size", type=int, default=512)
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--hl-width", type=int, default=192, help="HL-Attn inner width (full 768 adds 71M weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {}
    for checkpointing in (False, True):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--img-size",
            str(args.img_size),
            "--variant",
            args.variant,
            "--batch",
            str(args.batch),
            "--reps",
            str(args.reps),
            "--hl-width",
            str(args.hl_width),
            "--device",
            args.device,
        ] + (["--checkpointing"] if checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[checkpointing] = json.loads(out)
    plain, ckpt = results[False], results[True]
    tag = f"{args.variant}_{args.img_size}_b{args.batch}_{args.device}"
    print(f"activation_mib_plain_{tag}: {plain['activation_mib']:.0f}")
    print(f"activation_mib_checkpointed_{tag}: {ckpt['activation_mib']:.0f}")
    print(f"step_s_plain_{tag}: {plain['step_s']:.2f}")
    print(f"step_s_checkpointed_{tag}: {ckpt['step_s']:.2f}")
    print(f"memory_ratio (goal >= 2): {plain['activation_mib'] / max(ckpt['activation_mib'], 1e-9):.2f}")
    print(f"time_ratio (goal <= 1.4): {ckpt['step_s'] / plain['step_s']:.2f}")


if __name__ == "__main__":
    main()
