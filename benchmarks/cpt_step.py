"""Images per second of one CPT training step of each teacher (forward, loss, backward, AdamW step).

  simclr_r50_contiguous     SimCLR ResNet-50 (1x) + 3-layer head, NT-Xent, NCHW tensors
  simclr_r50_channels_last  the same in NHWC (channels_last) memory layout
  mae_vit_b                 MAE ViT-B/16 encoder (25% visible) + 512 x 8 decoder, norm-pix loss

Images are counted as they go through the network (a SimCLR pair is two images). Reps are interleaved
round-robin across the variants, so a change in machine load hits each alike; medians are printed.
The last line is the channels_last / contiguous throughput ratio for the ResNet.

    python benchmarks/cpt_step.py [--img-size 224] [--batch 4] [--reps 3] [--device cpu|cuda] [--amp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from samora_pl.losses.nt_xent import nt_xent  # noqa: E402
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.models.teachers.simclr import SimclrTeacher  # noqa: E402


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def simclr_step(channels_last: bool, batch: int, size: int, device, amp: bool = False):
    model = SimclrTeacher(depth=50, width=1.0).to(device).use_channels_last(channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    views = torch.rand(2 * batch, 1, size, size, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            z1, z2 = model(views).chunk(2)
            loss = nt_xent(z1, z2, 0.1)
        loss.backward()
        optimizer.step()

    return step, 2 * batch


def mae_step(batch: int, size: int, device, amp: bool = False):
    model = MaeTeacher("vit_base_patch16_224", img_size=size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    images = torch.rand(batch, 1, size, size, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, _, _ = model(images)
        loss.backward()
        optimizer.step()

    return step, batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4, help="SimCLR pairs / MAE images per step")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU runs at realistic batch sizes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    variants = {
        "simclr_r50_contiguous": simclr_step(False, args.batch, args.img_size, device, args.amp),
        "simclr_r50_channels_last": simclr_step(True, args.batch, args.img_size, device, args.amp),
        "mae_vit_b": mae_step(args.batch, args.img_size, device, args.amp),
    }
    for step, _ in variants.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, (step, _) in variants.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)

    print(
        f"device: {device.type} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else f"device: {torch.cuda.get_device_name(device)}"
    )
    print(f"img_size: {args.img_size}")
    print(f"batch: {args.batch}")
    print(f"amp_bf16: {args.amp}")
    rates = {}
    for name, (_, images) in variants.items():
        seconds = statistics.median(times[name])
        rates[name] = images / seconds
        print(f"{name}_step_s: {seconds:.4f}")
        print(f"{name}_images_per_s: {rates[name]:.2f}")
    print(f"channels_last_vs_contiguous: {rates['simclr_r50_channels_last'] / rates['simclr_r50_contiguous']:.3f}")


if __name__ == "__main__":
    main()
