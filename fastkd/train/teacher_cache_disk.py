"""The teacher cache on disk: ``cache.json`` (its manifest), the checked opening of its ``.npy``
files, and the row views the :class:`~fastkd.train.teacher_cache.TeacherCache` reads through."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..data import CTRData
from .manifest import (FORMAT_VERSION, ArtifactMismatchError, CorruptArtifactError, check_fields,
                       data_fingerprint, file_checksum, read_json_object)

CACHE_FORMAT = "fastkd.teacher_cache"
META = "cache.json"  # the manifest, written last: a folder without it holds no complete cache


def _manifest(rows: int, teachers: int, hidden_dim: Optional[int], data: Optional[dict], models: Optional[dict],
              *, files: Optional[dict] = None, parts: Optional[list] = None) -> dict:
    """A cache's ``cache.json``: its manifest (see :mod:`fastkd.train.manifest`)."""
    meta = {"format": CACHE_FORMAT, "format_version": FORMAT_VERSION, "rows": rows, "teachers": teachers,
            "hidden_dim": hidden_dim, "data": data, "models": models}
    if parts is not None:
        meta["parts"] = parts
    else:
        meta["files"] = files
    return meta


def _ids_fingerprint(data) -> dict:
    """The manifest's ``data``: the fingerprint of the rows' ids (the cache depends on nothing else)."""
    if isinstance(data, CTRData):
        data = data.ids
    return data_fingerprint(data)


def _file_entries(path: Path, names: List[str]) -> dict:
    """``{name: {"bytes", "checksum"}}`` of files just written."""
    return {name: {"bytes": (path / name).stat().st_size, "checksum": file_checksum(path / name)} for name in names}


_REQUIRED = ("rows", "teachers", "hidden_dim", "data", "models")


def _read_manifest(path: Path) -> dict:
    """``path/cache.json``, parsed and checked for form: CorruptArtifactError when it is not
    valid JSON ("truncated" when it ends mid-document) or lacks a field, ArtifactMismatchError
    when it is of another format or version."""
    meta_path = path / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} holds no complete teacher cache (no {META})")
    meta = read_json_object(meta_path)
    if "format_version" not in meta and all(k in meta for k in ("rows", "teachers", "hidden_dim")):
        raise ArtifactMismatchError(meta_path, "format_version", FORMAT_VERSION, None,
                                    "written by an older fastkd, without checksums: rebuild it with TeacherCache.build")
    missing = [k for k in ("format", "format_version") + _REQUIRED if k not in meta]
    if missing:
        raise CorruptArtifactError(meta_path, "corrupt", f"incomplete: it lacks {', '.join(map(repr, missing))}")
    check_fields(meta_path, {"format": CACHE_FORMAT, "format_version": FORMAT_VERSION}, meta,
                 keys=("format", "format_version"), hint="rebuild it with TeacherCache.build")

    def bad(what: str):
        return CorruptArtifactError(meta_path, "corrupt", what)

    def count(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not (count(meta["rows"], 0) and count(meta["teachers"], 1) and (meta["hidden_dim"] is None
                                                                          or count(meta["hidden_dim"], 1))):
        raise bad(f"rows, teachers or hidden_dim is not a valid count: "
                  f"{ {k: meta[k] for k in ('rows', 'teachers', 'hidden_dim')} }")
    arrays = ["logits"] + (["hidden"] if meta["hidden_dim"] else [])
    if "parts" in meta:
        if not isinstance(meta["parts"], list) or not meta["parts"]:
            raise bad("its 'parts' is not a non-empty list")
        for p in meta["parts"]:
            keys = ("start", "stop", "files") + tuple(arrays)
            if not isinstance(p, dict) or any(k not in p for k in keys):
                raise bad(f"incomplete part entry {p!r} (needs {', '.join(keys)})")
            if not (count(p["start"], 0) and count(p["stop"], 0)):
                raise bad(f"part bounds are not row counts: {p!r}")
            _check_files(meta_path, p["files"], [p[a] for a in arrays])
    else:
        if "files" not in meta:
            raise bad("incomplete: it lacks 'files'")
        _check_files(meta_path, meta["files"], [f"{a}.npy" for a in arrays])
    return meta


def _check_files(meta_path: Path, files, names: List[str]) -> None:
    if not isinstance(files, dict):
        raise CorruptArtifactError(meta_path, "corrupt", f"its 'files' is not an object: {files!r}")
    for name in names:
        e = files.get(name)
        if not (isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("checksum"), str)):
            raise CorruptArtifactError(meta_path, "corrupt", f"incomplete: no size and checksum for {name!r}")


def _open_array(path: Path, name: str, files: dict, shape: tuple, verify: bool) -> np.ndarray:
    """``path/name`` memory-mapped, after checking its size, dtype, shape (and checksum) against
    the manifest's entry ``files[name]``."""
    f, entry = path / name, files[name]
    if not f.exists():
        raise CorruptArtifactError(f, "corrupt", f"missing: {META} lists it")
    size = f.stat().st_size
    if size < entry["bytes"]:
        raise CorruptArtifactError(f, "truncated", f"{size} bytes, {META} says {entry['bytes']}")
    if size > entry["bytes"]:
        raise CorruptArtifactError(f, "corrupt", f"{size} bytes, {META} says {entry['bytes']}")
    try:
        arr = np.load(f, mmap_mode="r")
    except Exception as exc:  # a damaged .npy header
        raise CorruptArtifactError(f, "corrupt", f"not a readable .npy file ({type(exc).__name__}: {exc})") from None
    if arr.dtype != np.float32 or arr.shape != tuple(shape):
        raise CorruptArtifactError(f, "corrupt", f"holds {arr.dtype} {list(arr.shape)}, "
                                                 f"{META} says float32 {list(shape)}")
    if verify and file_checksum(f) != entry["checksum"]:
        raise CorruptArtifactError(f, "corrupt", f"its bytes do not match the checksum in {META}")
    return arr


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


class _PartRows:
    """Row access to consecutive read-only memory-mapped blocks as if they were one array."""

    def __init__(self, parts: List[np.ndarray], starts: List[int]) -> None:
        self.parts = parts
        self.starts = np.asarray(starts, dtype=np.int64)
        self.shape = torch.Size((sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:]))

    def __getitem__(self, index) -> torch.Tensor:
        idx = index.numpy() if isinstance(index, torch.Tensor) else index
        idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape + tuple(self.shape[1:]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][idx[sel] - self.starts[p]]
        return torch.from_numpy(out)

    def dim(self) -> int:
        return len(self.shape)


class _MemmapRows:
    """Row access to a read-only memory-mapped array, returning tensors."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.shape = torch.Size(arr.shape)

    def __getitem__(self, index) -> torch.Tensor:
        idx = index.numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(np.ascontiguousarray(self.arr[idx]))

    def dim(self) -> int:
        return len(self.shape)
