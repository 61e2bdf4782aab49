"""Forward+backward time of the SAMora encoder against a SAMed single-LoRA encoder (same run, CPU/GPU).

Stage-2 setting: encoder weights and experts frozen, only the fusion modules train (SAMora); for SAMed
the single LoRA expert's A/B train. Measured (median of --reps after --warmup):

  samora_fused       3 experts + HL-Attn, base and experts in one batched attention per block
  samora_naive       the same model through the four-call reference (original Attention module x4)
  samed_fast         one expert, fusion single:samed (SAMed's computation on the same fast kernels)
  samed_reference    one expert via segment-anything's own Attention with a hook on qkv (SAMed's way)

Reps are interleaved round-robin across the variants (fair under changing machine load).
FLOPs of one forward+backward step are counted with torch.utils.flop_counter.FlopCounterMode on the
fused SAMora path and on samed_fast (same attention formulation, so the ratio is implementation
neutral). The last line is ratio_vs_flops = (time samora_fused / time samed_fast) / FLOP ratio.

    python benchmarks/encoder_step.py [--img-size 224] [--variant vit_b] [--batch 1] [--reps 5] [--hl-width 384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from _timing import median_times  # noqa: E402

from samora_pl.models.adapters.fusion import build_fusion  # noqa: E402
from samora_pl.models.adapters.lora import MultiExpertLoRA  # noqa: E402
from samora_pl.models.sam.build import build_image_encoder, get_variant  # noqa: E402
from samora_pl.models.sam.encoder import SAMoraEncoder  # noqa: E402


def make(variant, img_size, experts, fusion, image_encoder, hl_width=None):
    v = get_variant(variant)
    lora = MultiExpertLoRA(experts, depth=v.depth, dim=v.embed_dim, rank=4)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fusions = [
        build_fusion(fusion, lora.names, v.embed_dim, num_heads=v.num_heads, hl_width=hl_width) for _ in range(v.depth)
    ]
    enc = SAMoraEncoder(image_encoder, lora, fusions)
    for p in enc.parameters():
        p.requires_grad_(False)
    trainable = (
        enc.fusion.parameters()
        if len(experts) > 1
        else (p for n, p in lora.named_parameters() if "lora_A" in n or "lora_B" in n)
    )
    for p in trainable:
        p.requires_grad_(True)
    return enc


def step(enc, x, naive=False):
    enc.zero_grad(set_to_none=True)
    out = enc(x, naive=naive)
    out.float().square().mean().backward()


def _sdpa_cpu_fwd(q, k, v, *args, out_shape=None, **kwargs):
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * d + 2 * b * h * sq * k[-2] * v[-1]


def _sdpa_cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    b, h, sq, d = q
    sk, dv = k[-2], v[-1]
    return 2 * b * h * sq * sk * (2 * dv + 2 * d)  # dV, dP, dQ, dK


# torch's FlopCounterMode has no formula for the CPU flash-attention kernels (used by HL-Attn's
# unmasked MultiheadAttention); without these its matmuls would silently count as zero.
_CPU_SDPA = {}
for _name, _f in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_fwd),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_bwd),
):
    if hasattr(torch.ops.aten, _name):
        _CPU_SDPA[getattr(torch.ops.aten, _name)] = _f


def flops(fn):
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow reference paths")
    ap.add_argument(
        "--hl-width",
        type=int,
        default=None,
        help="HL-Attn width (model.hl_width; default: the encoder's, as the authors)",
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    image_encoder = build_image_encoder(args.variant, args.img_size)
    samora = make(args.variant, args.img_size, ("image", "patch", "pixel"), "hl_attn", image_encoder, args.hl_width).to(
        dev
    )
    samed = make(args.variant, args.img_size, ("samed",), "single:samed", image_encoder).to(dev)
    x = torch.rand(args.batch, 1, args.img_size, args.img_size, device=dev)

    print(f"device: {dev}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"variant: {args.variant}")
    print(f"img_size: {args.img_size}")
    print(f"batch: {args.batch}")
    print(f"hl_width: {args.hl_width or 'encoder width'}")
    fns = {"samed_fast": lambda: step(samed, x), "samora_fused": lambda: step(samora, x)}
    if not args.skip_naive:
        fns["samed_reference"] = lambda: step(samed, x, naive=True)
        fns["samora_naive"] = lambda: step(samora, x, naive=True)
    t = median_times(fns, args.warmup, args.reps)
    for k, val in t.items():
        print(f"{k}_s: {val:.4f}")
    f_samora = flops(lambda: step(samora, x))
    f_samed = flops(lambda: step(samed, x))
    print(f"samora_gflops: {f_samora / 1e9:.2f}")
    print(f"samed_gflops: {f_samed / 1e9:.2f}")
    time_ratio = t["samora_fused"] / t["samed_fast"]
    flop_ratio = f_samora / f_samed
    print(f"time_ratio_samora_vs_samed: {time_ratio:.3f}")
    if "samed_reference" in t:
        print(f"time_ratio_samora_vs_samed_reference: {t['samora_fused'] / t['samed_reference']:.3f}")
        print(f"speedup_fused_vs_naive: {t['samora_naive'] / t['samora_fused']:.3f}")
    print(f"flop_ratio: {flop_ratio:.3f}")
    print(f"ratio_vs_flops: {time_ratio / flop_ratio:.3f}")


if __name__ == "__main__":
    main()
