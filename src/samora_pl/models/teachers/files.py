"""Teacher weights on disk: public starting checkpoints in, `teacher.pt` hand-off files out and back.

Public checkpoints (paths in config, never downloaded), read with `torch.load(weights_only=True)` or
safetensors:

- SimCLRv2 as SimCLRv2-Pytorch's convert.py writes it from the TensorFlow release (`{"resnet": {"net.0.0.weight",
  ...}, "head": {"layers.0.weight", ...}}`, e.g. r50_2x_sk1.pth), mapped by `simclrv2_keys`; or
- SimCLRv2 ResNet converted to PyTorch, in torchvision / timm ResNet key names (`conv1.weight`,
  `bn1.*`, `layer1.0.conv1.weight`, ..., `layerN.0.downsample.{0,1}.*`; with selective kernels, timm's
  SK-ResNet names). The state dict may sit at the top level or under `state_dict`, `model`, `resnet` or
  `backbone`; prefixes `module.`, `model.`, `teacher.`, `backbone.`, `encoder.`, `resnet.` are stripped
  (so this package's own Lightning `last.ckpt` works too, when it loads with weights_only). A projection
  head may come as `head.*` keys (or a top-level `head` dict) in this package's layout
  (`0.weight` Linear, `1.*` BN, `3.weight`, `4.*`, `6.weight`, `7.*`); a classifier `fc.*` is ignored.
  No head -> a freshly initialised head (reported).
- MAE: the official `mae_pretrain_vit_*.pth` (`{"model": encoder}` in timm's ViT names) or
  `mae_pretrain_vit_*_full.pth` (plus `decoder_*` and `mask_token`). No decoder -> fresh decoder
  (reported). Position tables of another grid are resampled (encoder) or recomputed (decoder, fixed).

Anything else that does not fit (missing or unexpected keys, other shapes) is a SamoraError naming the
keys and shapes. `teacher.pt` is `{"samora_teacher": 1, "kind", "arch", "state_dict", "meta"}`.
"""

import argparse
import pickle
import zipfile
from pathlib import Path

import torch

from samora_pl.errors import SamoraError
from samora_pl.models.teachers.factory import Teacher, build_teacher
from samora_pl.models.teachers.grey_input import NORMALIZE, NORMALIZE_AUTO
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.models.teachers.simclr import SimclrTeacher
from samora_pl.models.teachers.simclrv2_keys import convert as convert_simclrv2
from samora_pl.models.teachers.simclrv2_keys import is_simclrv2_pytorch
from samora_pl.records.atomic import atomic_torch_save

FORMAT_VERSION = 1
PREFIXES = ("module.", "model.", "teacher.", "backbone.", "encoder.", "resnet.")
MAX_LISTED = 12


def read_checkpoint(path, what: str = "checkpoint") -> dict:
    """A weights file as a dict (torch.load weights_only=True, or safetensors); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SamoraError(f"{what} {path} does not exist; fix the path in the config.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        ImportError,
        KeyError,
    ) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise SamoraError(
            f"Cannot read {what} {path}: {type(err).__name__}: {reason}. "
            "The file is truncated or not a PyTorch weights file; copy it again."
        ) from err
    if not isinstance(data, dict):
        raise SamoraError(f"{what} {path} holds a {type(data).__name__}, not a dict of weights.")
    return data


def _tensors(tree: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tree.items() if isinstance(v, torch.Tensor)}


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")


def _compare(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    return missing, unexpected, shapes


def _mismatch_error(path, model_desc: str, fix: str, missing, unexpected, shapes) -> SamoraError:
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listing(shapes)}")
    return SamoraError(f"{path} does not fit the {model_desc}: " + "; ".join(parts) + f". {fix}")


# ------------------------------------------------------------------------------------------------ SimCLR


SIMCLR_LAYOUTS = (
    "SimCLRv2-Pytorch's convert.py output ({'resnet': {'net.0.0.weight', 'net.1.blocks.0.net.0.weight', ...}, "
    "'head': {'layers.0.weight', ...}}) or torchvision / timm ResNet keys (conv1.weight, layer1.0.conv1.weight, "
    "...; a head as head.0.weight, ...)"
)


def _split_simclr(data: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if is_simclrv2_pytorch(data):
        head = data["head"] if isinstance(data.get("head"), dict) else {}
        return convert_simclrv2(_tensors(data["resnet"]), _tensors(head))
    head = _tensors(data["head"]) if isinstance(data.get("head"), dict) else {}
    body = data
    for key in ("resnet", "backbone", "state_dict", "model"):
        if isinstance(data.get(key), dict):
            body = data[key]
            break
    body = _strip(_tensors(body))
    backbone = {}
    for key, value in body.items():
        if key.startswith("head."):
            head[key[len("head.") :]] = value
        else:
            backbone[key] = value
    return backbone, head


def simclr_normalize(requested: str, checkpoint=None) -> str:
    """`cpt.simclr.normalize` resolved against the starting weights: "imagenet" or "none".

    SimCLRv2 was trained on [0, 1] images without mean / std (SimCLRv2-Pytorch's verify.py feeds
    `ToTensor()` output to the converted weights), torchvision / timm ImageNet ResNets on ImageNet
    statistics. "auto": none for a SimCLRv2-layout file and for a teacher without weights (from scratch),
    the value a `teacher.pt` records, imagenet for other ResNet files. "imagenet" with a SimCLRv2 file is
    refused: every input would be shifted away from what those weights were trained on."""
    if requested != NORMALIZE_AUTO and requested not in NORMALIZE:
        raise SamoraError(
            f"Config key 'cpt.simclr.normalize' is {requested!r}; allowed: {NORMALIZE_AUTO}, {', '.join(NORMALIZE)}."
        )
    if not checkpoint:
        return "none" if requested == NORMALIZE_AUTO else requested
    data = read_checkpoint(checkpoint, "SimCLR checkpoint")
    if is_simclrv2_pytorch(data):
        if requested == "imagenet":
            raise SamoraError(
                f"cpt.simclr.normalize=imagenet, but {checkpoint} holds SimCLRv2 weights (SimCLRv2-Pytorch's "
                "convert.py layout), which were trained on [0, 1] images without ImageNet mean / std. Set "
                "cpt.simclr.normalize=auto (or none)."
            )
        return "none"
    if requested != NORMALIZE_AUTO:
        return requested
    recorded = data.get("arch", {}).get("normalize") if data.get("samora_teacher") else None
    return recorded if recorded in NORMALIZE else "imagenet"


def load_simclr_checkpoint(model: SimclrTeacher, path) -> dict:
    """Load public SimCLRv2 (converted) ResNet weights, and a head if the file has one; a report dict."""
    backbone, head = _split_simclr(read_checkpoint(path, "SimCLR checkpoint"))
    ignored = sorted(k for k in backbone if k.startswith("fc."))
    backbone = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
    arch = model.arch
    desc = (
        f"SimCLR teacher (ResNet-{arch['depth']}, width {arch['width']:g}, selective_kernel={arch['selective_kernel']})"
    )
    fix = "Set cpt.simclr.depth / width / selective_kernel to the checkpoint's architecture (r50_2x_sk1: 50, 2, true)."
    expected = model.backbone.state_dict()
    if not set(backbone) & set(expected):
        shown = _listing(sorted(backbone)) or "no tensors"
        raise SamoraError(
            f"SimCLR checkpoint {path} is in none of the layouts the teacher reads (keys: {shown}). Expected "
            f"{SIMCLR_LAYOUTS}. Give a file in one of them as cpt.simclr.checkpoint."
        )
    problems = _compare(backbone, expected)
    if any(problems):
        raise _mismatch_error(path, desc, fix, *problems)
    head_state = "initialised"
    if head:
        head_problems = _compare(head, model.head.state_dict())
        if any(head_problems):
            raise _mismatch_error(
                path,
                desc + " projection head",
                "Set cpt.simclr.proj_dim / proj_hidden_dim to the checkpoint's head, or remove the head from the file.",
                *head_problems,
            )
        model.head.load_state_dict(head, strict=False)
        head_state = "loaded"
    model.backbone.load_state_dict(backbone, strict=False)
    return {"checkpoint": str(path), "backbone_tensors": len(backbone), "head": head_state, "ignored": ignored}


# --------------------------------------------------------------------------------------------------- MAE


def load_mae_checkpoint(model: MaeTeacher, path) -> dict:
    """Load an official MAE checkpoint (encoder, and the decoder of `*_full.pth`); a report dict."""
    data = read_checkpoint(path, "MAE checkpoint")
    body = data.get("model") if isinstance(data.get("model"), dict) else data.get("state_dict", data)
    if not isinstance(body, dict):
        raise SamoraError(f"MAE checkpoint {path} has no weights dict under 'model'.")
    state = {}
    for key, value in _tensors(body).items():
        for prefix in ("module.", "teacher."):
            key = key[len(prefix) :] if key.startswith(prefix) else key
        state[key] = value
    ignored = sorted(k for k in state if k.startswith(("head.", "fc_norm.")))
    state = {k: v for k, v in state.items() if k not in ignored}
    expected = model.state_dict()
    decoder_names = ("decoder_", "mask_token")
    notes = []
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        table = state["pos_embed"]
        if table.dim() == 3 and table.shape[-1] == expected["pos_embed"].shape[-1]:
            from timm.layers import resample_abs_pos_embed

            side = int(round((table.shape[1] - 1) ** 0.5))
            state["pos_embed"] = resample_abs_pos_embed(
                table, new_size=list(model.grid), old_size=[side, side], num_prefix_tokens=1
            )
            notes.append(f"pos_embed resampled from {side}x{side} to {model.grid[0]}x{model.grid[1]}")
    decoder_pos = state.get("decoder_pos_embed")
    if decoder_pos is not None:
        wanted = expected["decoder_pos_embed"].shape
        if decoder_pos.shape != wanted and decoder_pos.shape[-1] == wanted[-1]:
            state.pop("decoder_pos_embed")  # fixed sin-cos: the model's own table for its grid is the same function
            notes.append("decoder_pos_embed recomputed for this grid")
    has_decoder = any(k.startswith(decoder_names) for k in state)
    if not has_decoder:
        expected = {k: v for k, v in expected.items() if not k.startswith(decoder_names)}
    missing, unexpected, shapes = _compare(state, expected)
    missing = [k for k in missing if k != "decoder_pos_embed"]
    if missing or unexpected or shapes:
        arch = model.arch
        desc = (
            f"MAE teacher ({arch['variant']}: width {arch['embed_dim']}, depth {arch['depth']}, "
            f"patch {arch['patch_size']}, decoder {arch['decoder_dim']} x {arch['decoder_depth']})"
        )
        fix = (
            "Set cpt.mae.variant (and embed_dim / depth / num_heads / patch_size, decoder_dim / decoder_depth / "
            "decoder_heads) to the checkpoint's architecture; official files are mae_pretrain_vit_{base,large,huge}"
            "[_full].pth."
        )
        raise _mismatch_error(path, desc, fix, missing, unexpected, shapes)
    model.load_state_dict(state, strict=False)
    return {
        "checkpoint": str(path),
        "tensors": len(state),
        "decoder": "loaded" if has_decoder else "initialised",
        "ignored": ignored,
        "notes": notes,
    }


def load_public_checkpoint(model: Teacher, path) -> dict:
    if isinstance(model, SimclrTeacher):
        return load_simclr_checkpoint(model, path)
    return load_mae_checkpoint(model, path)


# ----------------------------------------------------------------------------------------- teacher.pt


def save_teacher(model: Teacher, path, meta: dict | None = None) -> Path:
    """Write the hand-off file atomically: kind, architecture, weights (CPU) and metadata."""
    payload = {
        "samora_teacher": FORMAT_VERSION,
        "kind": model.kind,
        "arch": dict(model.arch),
        "state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    path = Path(path)
    atomic_torch_save(path, payload)
    return path


def load_teacher(path, kind: str | None = None, device="cpu") -> Teacher:
    """A trained teacher from `teacher.pt`, in eval mode with frozen parameters.

    `kind` ("simclr" / "mae") is checked when given. SimCLR: `embed(images) -> [B, proj_dim]`. MAE:
    `encode_visible(images, mask_ratio) -> (tokens [B, N_vis, D], ids_keep [B, N_vis], grid)`,
    attributes `patch_size`, `img_size`, `embed_dim`."""
    data = read_checkpoint(path, "teacher file")
    if data.get("samora_teacher") != FORMAT_VERSION or "state_dict" not in data or "arch" not in data:
        raise SamoraError(
            f"{path} is not a samora_pl teacher file (no 'samora_teacher' header). Give the "
            "runs/<RUN>/cpt/<teacher>/teacher.pt written by `samora cpt`; public checkpoints go in "
            "cpt.simclr.checkpoint / cpt.mae.checkpoint."
        )
    found = data.get("kind")
    if kind is not None and found != kind:
        raise SamoraError(
            f"{path} holds a {found} teacher, but a {kind} teacher is needed here; "
            f"give runs/<RUN>/cpt/{kind}/teacher.pt."
        )
    try:
        model = build_teacher(found, dict(data["arch"]))
    except TypeError as err:
        raise SamoraError(f"{path}: its architecture record {data['arch']} does not fit this version ({err}).") from err
    state = data["state_dict"]
    problems = _compare(state, model.state_dict())
    if any(problems):
        raise _mismatch_error(
            path, f"{found} teacher it describes", "The file is damaged; re-run `samora cpt`.", *problems
        )
    model.load_state_dict(state, strict=True)
    model.teacher_meta = dict(data.get("meta", {}))
    model.eval().requires_grad_(False)
    return model.to(device)
