"""Forward+backward time of SAMora on SAM 2's Hiera against a single-LoRA Hiera (same run, CPU/GPU).

Stage-2 setting on the image encoder only: Hiera weights and experts frozen; SAMora (3 experts +
HL-Attn in every block) trains its fusion modules, the single-LoRA baseline (one expert, fusion
single:samed, SAMed's computation on the same kernels) trains its A/B. Reps are interleaved
round-robin (fair under changing machine load); the median is reported. FLOPs of one step are counted
with torch.utils.flop_counter.FlopCounterMode on both, CPU attention kernels included (``_flops.py``).
Last line: ratio_vs_flops = wall-time ratio / FLOP ratio (goal <= 1.1: SAMora costs no more than its
extra arithmetic); ratio_vs_flops_cpu_time is the same from process CPU time, the figure to compare on a
loaded host with --threads 1.

    python benchmarks/sam2_encoder_step.py [--variant b+] [--img-size 512] [--batch 1] [--reps 3] [--hl-width N]
        [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from _flops import count_flops  # noqa: E402
from _timing import median_wall_and_cpu_times  # noqa: E402

from samora_pl.models.sam2.segmenter import SAM2Segmenter  # noqa: E402

GOAL_RATIO_VS_FLOPS = 1.1


def make(variant, img_size, experts, fusion, hl_width, device):
    torch.manual_seed(0)  # the same random Hiera weights for both models
    model = SAM2Segmenter(
        variant=variant, img_size=img_size, num_classes=1, experts=experts, fusion=fusion, hl_width=hl_width
    )
    with torch.no_grad():
        for n, p in model.lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.set_trainable("samora" if len(experts) > 1 else "samed")
    return model.encoder.to(device)


def step(enc, x):
    enc.zero_grad(set_to_none=True)
    enc(x).float().square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="b+")
    ap.add_argument("--img-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hl-width", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samora = make(args.variant, args.img_size, ("image", "patch", "pixel"), "hl_attn", args.hl_width, device)
    single = make(args.variant, args.img_size, ("samed",), "single:samed", None, device)
    x = torch.rand(args.batch, 1, args.img_size, args.img_size, device=device)
    flop_samora, flop_single = count_flops(lambda: step(samora, x)), count_flops(lambda: step(single, x))
    fns = {"samora": lambda: step(samora, x), "single": lambda: step(single, x)}
    times, cpu = median_wall_and_cpu_times(fns, args.warmup, args.reps)
    time_ratio, flop_ratio = times["samora"] / times["single"], flop_samora / flop_single
    print(f"device: {device}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"variant: hiera_{args.variant} img_size {args.img_size} batch {args.batch}")
    print(f"samora_s: {times['samora']:.4f}")
    print(f"single_lora_s: {times['single']:.4f}")
    print(f"samora_gflop: {flop_samora / 1e9:.2f}")
    print(f"single_lora_gflop: {flop_single / 1e9:.2f}")
    print(f"samora_cpu_s: {cpu['samora']:.4f}")
    print(f"single_lora_cpu_s: {cpu['single']:.4f}")
    print(f"time_ratio: {time_ratio:.3f}")
    print(f"flop_ratio: {flop_ratio:.3f}")
    print(f"ratio_vs_flops_cpu_time: {cpu['samora'] / cpu['single'] / flop_ratio:.3f}")
    print(f"ratio_vs_flops: {time_ratio / flop_ratio:.3f} (goal <= {GOAL_RATIO_VS_FLOPS})")


if __name__ == "__main__":
    main()
