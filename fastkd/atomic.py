"""Writes a crash cannot leave half done: into a temporary file beside the target, flushed and
synced, then renamed over it. Every artifact fastkd writes (checkpoints, caches' manifests, run
records, reports) goes through here."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], object]) -> None:
    """``write(binary file object)``, then rename onto ``path``: the old file or the new one
    survives a crash, never part of one. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: Union[str, Path], obj, **dumps_kw) -> None:
    atomic_write_text(path, json.dumps(obj, **dumps_kw))
