"""Atomic file writes: every file the framework writes appears complete or not at all.

One primitive, `atomic_path`: a temporary file beside the target (same folder, so the final `os.replace` is
a rename on one file system), given mode 0o644 (mkstemp makes 0o600; results and data are meant to be
shared), written by the caller, flushed to disk and renamed onto the target. A failure leaves the old file
as it was and no temporary behind. The variants below cover text, bytes, JSON and `torch.save`.
"""

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced and renamed onto `path`, else removed.

    `suffix` is the temporary's ending, for writers that choose the format by it (e.g. ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, FILE_MODE)  # before the writer: one that links in another file keeps that file's mode
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno and err.filename in (None, str(tmp)):
            # name the file the user knows (a write error names none, or the vanished temporary one)
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Run `writer(tmp_path)` and move the result onto `path` only if it finished."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, written as given (no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """`json.dumps(obj, **dumps_kwargs)` plus a final newline."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_save(path, lambda tmp: torch.save(obj, tmp))
