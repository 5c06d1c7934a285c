"""The teacher cache: frozen teachers' outputs for every training row, computed once.

Pre-train students read their soft labels (and hidden vectors) from here by row index, so a
student epoch never runs a teacher. In memory, or memory-mapped ``.npy`` files written under
temporary names with a metadata file written last (an interrupted build is never used); built in
parallel under ``torch.distributed``. Split out of :mod:`fastkd.train`, which re-exports it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from .data import CTRData
from .train import predict

__all__ = ["TeacherCache"]


class TeacherCache:
    """Frozen teachers' outputs for every sample of a dataset, computed once.

    Row ``i`` holds the M teachers' logits (and, when requested, their hidden vectors) for sample
    ``i`` of the dataset it was built on, so a pre-train student epoch reads them by index and
    never runs a teacher. With ``path`` the arrays live in memory-mapped ``.npy`` files (for data
    larger than RAM); they are written under temporary names and renamed only when complete, so
    an interrupted build never leaves a cache that a later run would trust.

    Under torch.distributed, :meth:`build` is a collective: each rank runs the teachers on its
    contiguous block of rows only. In memory the blocks are gathered so every rank holds the whole
    cache; with ``path`` each rank writes its own part files and rank 0 writes the metadata that
    lists them once every part is complete, and :meth:`load` presents the parts as one cache.

    Shape:
        - ``logits``: [N, M] float32
        - ``hidden``: [N, M, d] float32, or None
    """

    META = "cache.json"

    def __init__(self, logits, hidden=None) -> None:
        self.logits = torch.as_tensor(np.asarray(logits))
        self.hidden = None if hidden is None else torch.as_tensor(np.asarray(hidden))
        if self.logits.dim() != 2:
            raise ValueError(f"logits must be [N, M], got {list(self.logits.shape)}")
        if self.hidden is not None and tuple(self.hidden.shape[:2]) != tuple(self.logits.shape):
            raise ValueError("hidden must be [N, M, d] with the logits' N and M")

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def num_teachers(self) -> int:
        return self.logits.shape[1]

    def gather(self, index: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = None if self.hidden is None else self.hidden[index]
        return self.logits[index], h

    @classmethod
    def build(cls, teachers: Sequence[nn.Module], data: Union[CTRData, torch.Tensor], *,
              hidden: bool = False, batch_size: int = 16384, path: Optional[Union[str, Path]] = None,
              progress: bool = False, shard: Optional[bool] = None) -> "TeacherCache":
        """Run each teacher once over ``data`` (eval mode, no grad) and store its outputs.

        ``shard`` (default: whether a process group of more than one rank exists) splits the
        work across ranks; every rank must then call ``build`` with the same arguments, and
        ``path``, if given, must be a folder every rank sees. ``shard=False`` builds the whole
        cache in this process alone.
        """
        ids = torch.from_numpy(data.ids) if isinstance(data, CTRData) else data
        n, m = ids.shape[0], len(teachers)
        if m == 0:
            raise ValueError("teachers is empty")
        # Teachers of different hidden widths are zero-padded to the widest: exact for the hidden
        # gate and for hint losses, whose per-teacher weights meet the padding only as zeros.
        d = max(int(getattr(t, "hidden_dim", 0)) for t in teachers) if hidden else 0
        if hidden and d < 1:
            raise ValueError("hidden vectors requested but the teachers declare no hidden_dim")
        if (_dist.get_world_size() > 1) if shard is None else shard:
            return cls._build_sharded(teachers, ids, hidden, d, batch_size, path, progress)
        if path is not None:
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            # a metadata file left by an earlier build must not vouch for arrays about to change
            (path / cls.META).unlink(missing_ok=True)
            tmp_l, tmp_h = path / "logits.npy.tmp", path / "hidden.npy.tmp"
            logits = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(n, m))
            hid = np.lib.format.open_memmap(tmp_h, mode="w+", dtype=np.float32, shape=(n, m, d)) if hidden else None
        else:
            logits = np.empty((n, m), dtype=np.float32)
            hid = np.empty((n, m, d), dtype=np.float32) if hidden else None
        _fill_teacher_outputs(teachers, ids, logits, hid, batch_size, progress)
        if path is None:
            return cls(logits, hid)
        logits.flush()
        del logits
        os.replace(tmp_l, path / "logits.npy")
        if hidden:
            hid.flush()
            del hid
            os.replace(tmp_h, path / "hidden.npy")
        elif (path / "hidden.npy").exists():
            os.unlink(path / "hidden.npy")
        # the metadata file is written last: its presence marks a complete cache
        _write_json(path / cls.META, {"rows": n, "teachers": m, "hidden_dim": d if hidden else None})
        return cls.load(path)

    @classmethod
    def from_arrays(cls, logits: np.ndarray, hidden: Optional[np.ndarray] = None, *,
                    path: Optional[Union[str, Path]] = None) -> "TeacherCache":
        """A cache of outputs computed elsewhere (e.g. out-of-fold logits of cross-fitted teachers).

        With ``path`` the arrays are written as :meth:`build` writes them (temporary names, renamed
        when complete, metadata last) and opened memory-mapped.
        """
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        hidden = None if hidden is None else np.ascontiguousarray(hidden, dtype=np.float32)
        if path is None:
            return cls(logits, hidden)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / cls.META).unlink(missing_ok=True)
        for name, arr in (("logits", logits), ("hidden", hidden)):
            if arr is None:
                (path / f"{name}.npy").unlink(missing_ok=True)
                continue
            tmp = path / f"{name}.npy.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path / f"{name}.npy")
        _write_json(path / cls.META, {"rows": int(logits.shape[0]), "teachers": int(logits.shape[1]),
                                      "hidden_dim": None if hidden is None else int(hidden.shape[2])})
        return cls.load(path)

    @classmethod
    def _build_sharded(cls, teachers, ids: torch.Tensor, hidden: bool, d: int, batch_size: int,
                       path: Optional[Union[str, Path]], progress: bool) -> "TeacherCache":
        n, m = ids.shape[0], len(teachers)
        rank, world = _dist.get_rank(), _dist.get_world_size()
        a, b = _dist.shard_bounds(n)
        progress = progress and rank == 0
        if path is None:
            logits = np.empty((b - a, m), dtype=np.float32)
            hid = np.empty((b - a, m, d), dtype=np.float32) if hidden else None
            _fill_teacher_outputs(teachers, ids[a:b], logits, hid, batch_size, progress)
            full_h = None if hid is None else _dist.gather_rows(torch.from_numpy(hid), n)
            return cls(_dist.gather_rows(torch.from_numpy(logits), n), full_h)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            (path / cls.META).unlink(missing_ok=True)
        _dist.barrier()
        stem = f"part{rank:05d}-of-{world:05d}"
        names = {"logits": f"{stem}.logits.npy", "hidden": f"{stem}.hidden.npy" if hidden else None}
        # this part's own marker goes first and comes back last: present means complete
        (path / f"{stem}.json").unlink(missing_ok=True)
        tmp_l = path / (names["logits"] + ".tmp")
        logits = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.float32, shape=(b - a, m))
        hid = None
        if hidden:
            tmp_h = path / (names["hidden"] + ".tmp")
            hid = np.lib.format.open_memmap(tmp_h, mode="w+", dtype=np.float32, shape=(b - a, m, d))
        _fill_teacher_outputs(teachers, ids[a:b], logits, hid, batch_size, progress)
        logits.flush()
        del logits
        os.replace(tmp_l, path / names["logits"])
        if hidden:
            hid.flush()
            del hid
            os.replace(tmp_h, path / names["hidden"])
        _write_json(path / f"{stem}.json", {"start": a, "stop": b, "teachers": m,
                                            "hidden_dim": d if hidden else None, **names})
        # a rank that died before its marker makes this barrier fail, so no metadata is written
        _dist.barrier()
        if rank == 0:
            parts = []
            for r in range(world):
                part = json.loads((path / f"part{r:05d}-of-{world:05d}.json").read_text())
                if (part["start"], part["stop"]) != _dist.shard_bounds(n, r, world) or part["teachers"] != m:
                    raise RuntimeError(f"{path}: part {r} of {world} does not match this build: {part}")
                parts.append(part)
            _write_json(path / cls.META, {"rows": n, "teachers": m, "hidden_dim": d if hidden else None,
                                          "parts": parts})
        _dist.barrier()
        return cls.load(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TeacherCache":
        """Open a cache written by :meth:`build` (memory-mapped, read-only); a cache written in
        parts by several ranks reads as one."""
        path = Path(path)
        if not (path / cls.META).exists():
            raise FileNotFoundError(f"{path} holds no complete teacher cache (no {cls.META})")
        meta = json.loads((path / cls.META).read_text())
        if "parts" in meta:
            return cls._load_parts(path, meta)
        logits = np.load(path / "logits.npy", mmap_mode="r")
        hidden = np.load(path / "hidden.npy", mmap_mode="r") if meta["hidden_dim"] else None
        if logits.shape != (meta["rows"], meta["teachers"]):
            raise ValueError(f"{path}: logits.npy has shape {logits.shape}, metadata says {meta}")
        # torch.as_tensor cannot wrap a read-only memmap without a copy; index through numpy
        cache = cls.__new__(cls)
        cache.logits = _MemmapRows(logits)
        cache.hidden = None if hidden is None else _MemmapRows(hidden)
        return cache

    @classmethod
    def _load_parts(cls, path: Path, meta: dict) -> "TeacherCache":
        parts = meta["parts"]
        starts = [p["start"] for p in parts]
        logits = [np.load(path / p["logits"], mmap_mode="r") for p in parts]
        for p, arr in zip(parts, logits):
            if arr.shape != (p["stop"] - p["start"], meta["teachers"]):
                raise ValueError(f"{path}: {p['logits']} has shape {arr.shape}, metadata says {p}")
        if parts[-1]["stop"] != meta["rows"]:
            raise ValueError(f"{path}: parts cover {parts[-1]['stop']} rows, metadata says {meta['rows']}")
        cache = cls.__new__(cls)
        cache.logits = _PartRows(logits, starts)
        cache.hidden = None
        if meta["hidden_dim"]:
            cache.hidden = _PartRows([np.load(path / p["hidden"], mmap_mode="r") for p in parts], starts)
        return cache


def _fill_teacher_outputs(teachers, ids: torch.Tensor, logits: np.ndarray, hid: Optional[np.ndarray],
                          batch_size: int, progress: bool) -> None:
    """Write the teachers' logits [N, M] (and hidden vectors [N, M, d], zero-padded) in place."""
    from tqdm.auto import tqdm

    hidden = hid is not None
    for j, t in enumerate(tqdm(teachers, desc="teacher cache", disable=not progress, leave=False)):
        out = predict(t, ids, batch_size, return_hidden=hidden)
        if hidden:
            logits[:, j] = out[0].float().numpy()
            h = out[1].float().numpy()
            hid[:, j, : h.shape[1]] = h
            hid[:, j, h.shape[1]:] = 0.0
        else:
            logits[:, j] = out.float().numpy()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


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
