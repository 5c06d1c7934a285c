"""The teacher cache: frozen teachers' outputs for every training row, computed once.

Pre-train students read their soft labels (and hidden vectors) from here by row index, so a
student epoch never runs a teacher. In memory, or memory-mapped ``.npy`` files written under
temporary names with a metadata file written last (an interrupted build is never used); built in
parallel under ``torch.distributed``.

On disk the metadata file ``cache.json`` is the cache's manifest (:mod:`fastkd.train.manifest`):
format version, rows, teachers, hidden width, the fingerprint of the rows' ids, the teachers'
shapes and weight digest, and each ``.npy`` file's size and checksum. Building always writes a
fresh cache (whatever the folder held, complete or damaged, is replaced and never read); loading
checks the manifest and the files and raises an error naming the file instead of returning a
cache that is partly wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import distributed as _dist
from ..data import CTRData
from ..data.rows import as_tensor_rows
from .evaluation import predict
from .manifest import CorruptArtifactError, check_fields, data_fingerprint, models_manifest
from .teacher_cache_disk import (CACHE_FORMAT, META, _file_entries, _ids_fingerprint, _manifest, _MemmapRows, _open_array,
                                 _PartRows, _read_manifest, _write_json)

__all__ = ["TeacherCache", "CACHE_FORMAT"]



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

    A folder that fails its checks (missing, truncated or corrupt files, a ``cache.json`` from
    another build) is rebuilt by :meth:`build` and :meth:`from_arrays`, which never read what was
    there, and is an error for :meth:`load`, which never rebuilds:
    :class:`~fastkd.train.manifest.CorruptArtifactError` ("truncated"/"corrupt") or
    :class:`~fastkd.train.manifest.ArtifactMismatchError`, naming the file.

    Shape:
        - ``logits``: [N, M] float32
        - ``hidden``: [N, M, d] float32, or None
    """

    META = META  # the manifest file's name (teacher_cache_disk.META)

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

        With ``path``, the cache is always rebuilt: a cache already there (complete, from other
        rows or teachers, truncated or corrupt) is overwritten without being read, and its
        ``cache.json`` is removed first, so an interrupted build leaves no cache to trust.
        """
        ids = as_tensor_rows(data.ids) if isinstance(data, CTRData) else data
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
        meta = _manifest(n, m, d if hidden else None, data_fingerprint(ids), models_manifest(teachers),
                         files=_file_entries(path, ["logits.npy"] + (["hidden.npy"] if hidden else [])))
        _write_json(path / cls.META, meta)
        return cls._open(path, meta, verify=False)

    @classmethod
    def from_arrays(cls, logits: np.ndarray, hidden: Optional[np.ndarray] = None, *,
                    path: Optional[Union[str, Path]] = None, data=None,
                    teachers: Optional[Sequence[nn.Module]] = None) -> "TeacherCache":
        """A cache of outputs computed elsewhere (e.g. out-of-fold logits of cross-fitted teachers).

        With ``path`` the arrays are written as :meth:`build` writes them (temporary names, renamed
        when complete, metadata last; whatever ``path`` held is replaced, never read) and opened
        memory-mapped. ``data`` (a :class:`CTRData`, ids ``[N, F]`` or a list of row blocks) and
        ``teachers`` are recorded in the manifest, for :meth:`load` to check; without them those
        fields are null.
        """
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        hidden = None if hidden is None else np.ascontiguousarray(hidden, dtype=np.float32)
        if path is None:
            return cls(logits, hidden)
        fp = None if data is None else _ids_fingerprint(data)
        if fp is not None and fp["rows"] != logits.shape[0]:
            raise ValueError(f"data has {fp['rows']} rows but logits has {logits.shape[0]}")
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
        meta = _manifest(int(logits.shape[0]), int(logits.shape[1]), None if hidden is None else int(hidden.shape[2]),
                         fp, None if teachers is None else models_manifest(teachers),
                         files=_file_entries(path, ["logits.npy"] + ([] if hidden is None else ["hidden.npy"])))
        _write_json(path / cls.META, meta)
        return cls._open(path, meta, verify=False)

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
                                            "hidden_dim": d if hidden else None, **names,
                                            "files": _file_entries(path, [v for v in names.values() if v])})
        # a rank that died before its marker makes this barrier fail, so no metadata is written
        _dist.barrier()
        if rank == 0:
            parts = []
            for r in range(world):
                part = json.loads((path / f"part{r:05d}-of-{world:05d}.json").read_text())
                if (part["start"], part["stop"]) != _dist.shard_bounds(n, r, world) or part["teachers"] != m:
                    raise RuntimeError(f"{path}: part {r} of {world} does not match this build: {part}")
                parts.append(part)
            _write_json(path / cls.META, _manifest(n, m, d if hidden else None, data_fingerprint(ids),
                                                   models_manifest(teachers), parts=parts))
        _dist.barrier()
        return cls._open(path, _read_manifest(path), verify=False)

    @classmethod
    def load(cls, path: Union[str, Path], *, data=None, teachers: Optional[Sequence[nn.Module]] = None,
             verify: bool = True) -> "TeacherCache":
        """Open a cache written by :meth:`build` or :meth:`from_arrays` (memory-mapped, read-only);
        a cache written in parts by several ranks reads as one.

        Loading never rebuilds. It raises, naming the file:

        * ``FileNotFoundError``: no ``cache.json`` (no complete cache: the build never finished);
        * :class:`~fastkd.train.manifest.CorruptArtifactError`: ``cache.json`` is not valid JSON
          or lacks a field, or a ``.npy`` file is missing, shorter than its manifest says
          ("truncated"), or of another size, dtype, shape or checksum ("corrupt");
        * :class:`~fastkd.train.manifest.ArtifactMismatchError`: the cache was written by an older
          fastkd (no ``format_version``), or for other rows than ``data`` (a :class:`CTRData` or
          ids ``[N, F]``, when given) or other ``teachers`` (when given): the field, both values.

        ``verify=False`` skips the checksums (one read of every file), not the size checks.
        """
        path = Path(path)
        meta = _read_manifest(path)
        expected = {}
        if data is not None:
            expected["data"] = _ids_fingerprint(data)
        if teachers is not None:
            expected["models"] = models_manifest(teachers)
        check_fields(path / cls.META, expected, meta, keys=list(expected),
                     hint="a cache built for other rows or teachers: rebuild it with TeacherCache.build")
        return cls._open(path, meta, verify)

    @classmethod
    def _open(cls, path: Path, meta: dict, verify: bool) -> "TeacherCache":
        """The cache ``meta`` (a checked manifest) describes, after checking its files."""
        rows, m, d = meta["rows"], meta["teachers"], meta["hidden_dim"]
        cache = cls.__new__(cls)
        if "parts" in meta:
            parts = meta["parts"]
            starts, stop = [], 0
            for p in parts:
                if p["start"] != stop or p["stop"] < p["start"]:
                    raise CorruptArtifactError(path / cls.META, "corrupt", f"its parts do not tile the rows: {p}")
                starts.append(p["start"])
                stop = p["stop"]
            if stop != rows:
                raise CorruptArtifactError(path / cls.META, "corrupt", f"its parts cover {stop} rows, it says {rows}")
            logits = [_open_array(path, p["logits"], p["files"], (p["stop"] - p["start"], m), verify) for p in parts]
            # torch.as_tensor cannot wrap a read-only memmap without a copy; index through numpy
            cache.logits = _PartRows(logits, starts)
            cache.hidden = None
            if d:
                cache.hidden = _PartRows([_open_array(path, p["hidden"], p["files"], (p["stop"] - p["start"], m, d),
                                                      verify) for p in parts], starts)
            return cache
        cache.logits = _MemmapRows(_open_array(path, "logits.npy", meta["files"], (rows, m), verify))
        cache.hidden = None if not d else _MemmapRows(
            _open_array(path, "hidden.npy", meta["files"], (rows, m, d), verify))
        return cache


def _fill_teacher_outputs(teachers, ids: torch.Tensor, logits: np.ndarray, hid: Optional[np.ndarray],
                          batch_size: int, progress: bool) -> None:
    """Write the teachers' logits [N, M] (and hidden vectors [N, M, d], zero-padded) in place."""
    from tqdm.auto import tqdm

    hidden = hid is not None
    n = ids.shape[0]
    # whole batches per block, so each row is scored in the batch a single pass would put it in;
    # one block's rows and outputs in memory at a time (large data: the rows and the cache itself
    # may be files, and a slice of memory-mapped Rows is a copy)
    block = 4 * batch_size
    for j, t in enumerate(tqdm(teachers, desc="teacher cache", disable=not progress, leave=False)):
        for a in range(0, n, block):
            b = min(a + block, n)
            out = predict(t, ids[a:b], batch_size, return_hidden=hidden)
            if hidden:
                logits[a:b, j] = out[0].float().numpy()
                h = out[1].float().numpy()
                hid[a:b, j, : h.shape[1]] = h
                hid[a:b, j, h.shape[1]:] = 0.0
            else:
                logits[a:b, j] = out.float().numpy()
