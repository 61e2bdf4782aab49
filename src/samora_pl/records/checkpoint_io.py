"""Lightning checkpoints written atomically, and read back only when whole.

`AtomicCheckpointIO` (every stage's Trainer uses it, see `build_trainer`) writes `last.ckpt` through
`atomic.atomic_path`: a temporary file beside it, fsynced, then renamed over it. A full disk or a kill in
the middle of a save leaves the previous `last.ckpt` as it was and no temporary file. Lightning's
strategies call `save_checkpoint` on global rank zero only, so under DDP one process writes.

`resumable(path, stage)` is what a stage resumes from: `path` when it is a whole checkpoint, else None
after one warning naming the file (a `last.ckpt` truncated by an older version or by a disk error), so
the stage starts afresh instead of dying in PyTorch's zip reader. No earlier checkpoint is kept to fall
back on: that would double the disk a run needs, and atomic writes no longer leave a broken one.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from samora_pl.records.atomic import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear whole or not at all.

    The checkpoint is serialised in memory (as Lightning does) and written into the temporary file with a
    plain write, so a full disk is an OSError naming `last.ckpt` (torch.save into a file raises a RuntimeError
    from its zip writer instead, and Lightning's own save stages the file in the system temporary folder)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_path(Path(path)) as tmp:
            self.write(tmp, buffer.getbuffer())

    @staticmethod
    def write(path: Path, data) -> None:
        with open(path, "wb") as out:
            out.write(data)


def unreadable_reason(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (None when it is whole).

    torch.save writes a zip archive whose central directory comes last and whose entries carry CRC-32s,
    so a truncated or damaged file fails here without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return str(err) or type(err).__name__
    return f"entry {bad} is damaged" if bad else None


def resumable(path: Path, stage: str) -> Path | None:
    """`path` if it exists and is a whole checkpoint; None (with one warning) if it is unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    reason = unreadable_reason(path)
    if reason is None:
        return path
    log.warning("%s: checkpoint %s is unreadable (%s); starting the stage afresh.", stage, path, reason)
    return None
