"""FLOPs of one call, counted by torch's FlopCounterMode, with the CPU attention kernels it misses.

torch's counter has no formula for the CPU flash-attention kernels that ``scaled_dot_product_attention``
dispatches to on CPU (the encoders' batched attention, HL-Attn's ``nn.MultiheadAttention``): without the
mapping below their matmuls count as zero, which understates most the model that attends most (SAMora's
four streams and two cross-attentions against one stream) and so inflates ``ratio_vs_flops``.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_fwd(q, k, v, *args, out_shape=None, **kwargs):
    b, h, sq, d = q
    return 2 * b * h * sq * k[-2] * d + 2 * b * h * sq * k[-2] * v[-1]  # Q K^T, P V


def _sdpa_cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    b, h, sq, d = q
    sk, dv = k[-2], v[-1]
    return 2 * b * h * sq * sk * (2 * dv + 2 * d)  # dV, dP, dQ, dK


CPU_SDPA = {}
for _name, _f in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_fwd),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_bwd),
):
    if hasattr(torch.ops.aten, _name):
        CPU_SDPA[getattr(torch.ops.aten, _name)] = _f


def count_flops(fn) -> int:
    """Total FLOPs of ``fn()`` (forward and whatever backward it runs)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        fn()
    return int(counter.get_total_flops())
