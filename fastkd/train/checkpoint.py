"""Checkpoint files: writes that a crash cannot truncate, and reads that check what they resume.

A checkpoint is one ``torch.save`` file of the loop's state dict plus a ``"manifest"`` entry
(:mod:`fastkd.train.manifest`): format version, data fingerprint, config, model shapes and a
checksum of the state. :func:`load_checkpoint` raises
:class:`~fastkd.train.manifest.CorruptArtifactError` for a file that is truncated or corrupt and
:class:`~fastkd.train.manifest.ArtifactMismatchError` for one written by another run; both name
the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..atomic import atomic_write
from .manifest import FORMAT_VERSION, ArtifactMismatchError, CorruptArtifactError, check_fields, state_digest

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "fastkd.checkpoint"
_ZIP_HEAD = b"PK\x03\x04"   # a zip's first local file header (torch.save's format)
_ZIP_END = b"PK\x05\x06"    # the end-of-central-directory record, a zip's last 22 bytes


def atomic_save(obj, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash mid-write
    leaves the previous checkpoint intact, never a truncated one."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _checksum(state: Dict[str, Any], manifest: Dict[str, Any]) -> str:
    return state_digest({"manifest": {k: v for k, v in manifest.items() if k != "checksum"}, "state": state})


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path], manifest: Dict[str, Any]) -> None:
    """:func:`atomic_save` of ``state`` with ``manifest`` (plus format, version and checksum) under
    the key ``"manifest"``; the file still opens with ``torch.load`` and its other keys are
    ``state``'s."""
    if "manifest" in state:
        raise ValueError("a checkpoint state may not have a 'manifest' key")
    manifest = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **manifest}
    manifest["checksum"] = _checksum(state, manifest)
    atomic_save({**state, "manifest": manifest}, path)


def _unreadable(path: Path, exc: BaseException) -> CorruptArtifactError:
    """Why ``torch.load`` could not read ``path``: cut short, or damaged."""
    size = path.stat().st_size
    if size == 0:
        return CorruptArtifactError(path, "truncated", "the file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(max(0, size - 22))
        tail = fh.read(22)
    if head != _ZIP_HEAD:
        return CorruptArtifactError(path, "corrupt", f"not a checkpoint (it does not start as a torch.save "
                                                     f"file; {size} bytes): {exc}")
    if not tail.startswith(_ZIP_END):
        return CorruptArtifactError(path, "truncated", f"the file ends after {size} bytes, before its "
                                                       "zip directory (cut short by a copy, a full disk or "
                                                       "a write outside atomic_save?)")
    return CorruptArtifactError(path, "corrupt", f"torch.load failed: {type(exc).__name__}: {exc}")


def load_checkpoint(path: Union[str, Path], expected: Dict[str, Any]) -> Dict[str, Any]:
    """The state saved by :func:`save_checkpoint` at ``path``, after checking it.

    Order of checks: the file reads whole (else ``CorruptArtifactError``, "truncated" or
    "corrupt"); it carries a manifest of this format version (else ``ArtifactMismatchError`` on
    ``format_version``); its checksum matches its contents (else "corrupt"); then every field of
    ``expected`` (data, config, shapes, ...) equals the file's, in ``expected``'s order (else
    ``ArtifactMismatchError`` naming the first field that differs, with both values).
    """
    path = Path(path)
    try:
        obj = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zip reader errors, OSError 22, unpickling errors
        raise _unreadable(path, exc) from exc
    hint = "written by another run; resume=False or another checkpoint folder starts afresh"
    if not isinstance(obj, dict) or not isinstance(obj.get("manifest"), dict):
        raise ArtifactMismatchError(path, "format_version", FORMAT_VERSION, None,
                                    "no manifest: written by an older fastkd or another tool; resume=False "
                                    "or another checkpoint folder starts afresh")
    manifest = obj.pop("manifest")
    check_fields(path, {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION}, manifest,
                 keys=("format", "format_version"), hint=hint)
    if manifest.get("checksum") != _checksum(obj, manifest):
        raise CorruptArtifactError(path, "corrupt", "its contents do not match the checksum in its manifest")
    check_fields(path, expected, manifest, keys=list(expected), hint=hint)
    return obj
