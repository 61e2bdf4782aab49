"""Stage-2 step time and activation memory of H-SAMora (H-SAM's two-stage decoder) against SAMora (SAM's
decoder), both with the three experts and HL-Attn, at each image size, as ratios (CPU or GPU).

One step = forward of a batch, H-SAM's two-stage loss or SAMora's loss, backward, with stage 2's trainable
set (fusion + decoder; encoder and experts frozen). Memory is the bytes of the tensors autograd keeps for
the backward pass (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once): deterministic,
and comparable within one process, unlike the peak resident memory on CPU. Times are medians of
interleaved repetitions after a warm-up; the FLOP ratio of one step (torch's FlopCounterMode, with
encoder_step.py's formulas for the CPU attention kernels) is the load-independent cost figure.

    python benchmarks/decoder_step.py [--variant vit_b] [--sizes 224 512] [--batch 1] [--reps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from _flops import count_flops  # noqa: E402
from _timing import median_times  # noqa: E402

from samora_pl.losses.hsam import HSAMLoss  # noqa: E402
from samora_pl.losses.segmentation import SegmentationLoss  # noqa: E402
from samora_pl.models.segmenter import SAMoraSegmenter  # noqa: E402


def build(variant: str, img_size: int, decoder: str, classes: int) -> SAMoraSegmenter:
    torch.manual_seed(0)
    model = SAMoraSegmenter(
        variant=variant, img_size=img_size, num_classes=classes, fusion="hl_attn", decoder=decoder, trainable="samora"
    )
    return model.train()


def step_fn(model: SAMoraSegmenter, images: torch.Tensor, label: torch.Tensor):
    low = label[:, ::4, ::4]
    if model.hsam_decoder is not None:
        loss_fn = HSAMLoss(0.1, 0.9)

        def loss():
            stages = model.forward_stages(images)
            return loss_fn(stages.stage1, stages.stage2, low, label, epoch=0).total
    else:
        seg = SegmentationLoss(0.2, 0.8)

        def loss():
            return seg(model(images), low)

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()

    return step, loss


def saved_bytes(loss) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss()
    del out
    return sum(seen.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--classes", type=int, default=8, help="foreground classes (Synapse: 8)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"variant: {args.variant}")
    print(f"batch: {args.batch}")
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch, 1, size, size, generator=g).to(dev)
        label = torch.randint(0, args.classes + 1, (args.batch, size, size), generator=g).to(dev)
        steps, memory, gflops = {}, {}, {}
        for name, decoder in (("samora", "sam"), ("hsamora", "hsam")):
            model = build(args.variant, size, decoder, args.classes).to(dev)
            steps[name], loss = step_fn(model, images, label)
            memory[name] = saved_bytes(loss) / 2**20
            gflops[name] = count_flops(steps[name]) / 1e9
        times = median_times(steps, args.warmup, args.reps)
        for name in steps:
            print(f"{name}_{size}_step_s: {times[name]:.4f}")
            print(f"{name}_{size}_saved_mib: {memory[name]:.1f}")
            print(f"{name}_{size}_gflops: {gflops[name]:.2f}")
        print(f"time_ratio_{size} (hsamora / samora): {times['hsamora'] / times['samora']:.3f}")
        print(f"memory_ratio_{size} (hsamora / samora): {memory['hsamora'] / memory['samora']:.3f}")
        print(f"flop_ratio_{size} (hsamora / samora): {gflops['hsamora'] / gflops['samora']:.3f}")


if __name__ == "__main__":
    main()
