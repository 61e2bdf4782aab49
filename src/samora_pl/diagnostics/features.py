"""Features a probe reads, computed without gradients in batches on one device.

Teachers see the slices resized to their own input size, as in distillation. SimCLR: the pooled backbone
(`pooled`, the usual linear-probe feature) and the projection head's output (`embed`, the image level's
distillation target). MAE: every patch token (no masking; `tokens` [n, h, w, D], the patch level's target)
and their mean (`pooled`). SAM's encoder (with or without an expert) sees them at its own size: the neck
output per position (`neck` [n, h, w, 256]) and mean-pooled (`pooled`, the image level's student feature),
and the last block's tokens (`tokens` [n, h, w, C], the patch level's student feature).
"""

import torch

from samora_pl.stages.distill.module import resize_to


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int, device) -> dict[str, torch.Tensor]:
    parts: dict[str, list] = {}
    for start in range(0, images.shape[0], batch_size):
        for key, value in fn(images[start : start + batch_size].to(device)).items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def teacher_features(teacher, images: torch.Tensor, batch_size: int = 16, device="cpu") -> dict[str, torch.Tensor]:
    teacher = teacher.to(device).eval()
    size = int(teacher.img_size)

    def simclr(x):
        pooled = teacher.features(resize_to(x, size))
        return {"pooled": pooled, "embed": teacher.head(pooled)}

    def mae(x):
        tokens, _, grid = teacher.encode_visible(resize_to(x, size), 0.0)  # all patches, row-major
        tokens = tokens.reshape(tokens.shape[0], int(grid[0]), int(grid[1]), -1)
        return {"pooled": tokens.mean((1, 2)), "tokens": tokens}

    return _batched(simclr if teacher.kind == "simclr" else mae, images, batch_size, device)


def encoder_features(model, images: torch.Tensor, batch_size: int = 16, device="cpu") -> dict[str, torch.Tensor]:
    encoder = model.encoder.to(device).eval()
    size = int(encoder.img_size)

    def run(x):
        neck, tokens = encoder(resize_to(x, size), return_tokens=True)
        neck = neck.permute(0, 2, 3, 1)
        return {"pooled": neck.mean((1, 2)), "neck": neck, "tokens": tokens}

    return _batched(run, images, batch_size, device)
