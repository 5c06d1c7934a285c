"""The on-disk encoded dataset: a source read, encoded and split once, then memory-mapped.

:func:`cached_split` is :func:`~fastkd.data.load` followed by :meth:`CTRData.split
<fastkd.data.CTRData.split>`, with the result kept on disk: the first call streams the source
(``iter_table`` chunks, encoded one at a time; never the whole raw source in memory), writes every
row's ids and label, and lays the rows out in split order; later calls with the same files and
settings open the cache instead. The parts it returns are :class:`CTRData` whose arrays are
memory-mapped, read-only-to-disk views of ``ids.npy`` / ``labels.npy`` (copy-on-write mappings:
pages come from the file and the kernel can drop them, so they do not count as the process's
anonymous memory), and equal those of the in-memory path bit for bit.

A cache folder (``<cache_dir>/<source stem>-<key>``; ``key`` hashes the input files' paths,
sizes and modification times, the settings and :data:`CACHE_VERSION`) holds:

* ``ids.npy`` int64 ``[N, F]`` and ``labels.npy`` float32 ``[N]``: every kept row, in split order
  (part 0's rows, then part 1's, ...; within a part in ``CTRData.split``'s permutation order);
* ``encoder.json``: the fitted :class:`~fastkd.data.FeatureEncoder`'s state (raw value -> id);
* ``manifest.json``, written last: format and version, the key's inputs, rows per part, field
  names and sizes, the read report, and each file's byte count and xxh3-128 checksum.

It is built in ``<folder>.tmp-<pid>`` and renamed into place when complete: an interrupted or
failed build (a full disk, Ctrl-C, ``kill -9``) leaves no folder a later call would open. A folder
whose manifest is missing, truncated, of another version or key, or whose files do not match their
byte counts or checksums is rebuilt with a warning, never half-used.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import atomic_write_json
from .encoder import FeatureEncoder
from .loading import _Checked, _collective, _fit_chunk_rows, _process_group, encoded_blocks
from .readers import DEFAULT_MAX_BAD_ROWS, ReadReport, iter_table, parse_spec
from .readers.report import check_max_bad_rows
from .table import CTRData

__all__ = ["cached_split", "open_cache", "CACHE_VERSION"]

CACHE_FORMAT = "fastkd.encoded_data"
#: Bumped whenever the cache's layout or the meaning of its ids changes (old caches are rebuilt).
#: 2: the manifest's read report in ``ReadReport.to_dict`` form.
CACHE_VERSION = 2
MANIFEST = "manifest.json"
_FILES = ("ids.npy", "labels.npy", "encoder.json")
# rows gathered per block when the encoded rows are laid out in split order
_GATHER_ROWS = 1 << 18


def cached_split(spec: str, cache_dir: Union[str, Path], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 split_seed: int = 0, *, kind: str = "vocab", min_count: int = 1, num_buckets=None,
                 seed: int = 0, label: Optional[str] = None, numeric: Sequence[str] = (),
                 columns: Optional[Sequence[str]] = None, chunk_rows: int = 200_000,
                 max_bad_rows: Union[int, float] = DEFAULT_MAX_BAD_ROWS, verify: bool = True,
                 progress: Optional[bool] = None) -> Tuple[Tuple[CTRData, ...], FeatureEncoder, Path]:
    """``load(spec, ...).split(fractions, split_seed)`` through an on-disk, memory-mapped cache.

    Args:
        spec: ``KIND:PATH[,PATH2,...]`` as for :func:`~fastkd.data.load` (files only: generated
            ``synthetic``/``segmented`` data needs no cache).
        cache_dir: folder holding the caches (created if needed); one subfolder per source+settings.
        fractions, split_seed: the split, as :meth:`CTRData.split`.
        kind, min_count, num_buckets, seed, label, numeric, columns, chunk_rows, max_bad_rows:
            as :func:`~fastkd.data.load` (the vocabulary, when not hashing, is fitted on the whole
            source, as ``load`` does).
        verify: recompute the files' checksums when opening an existing cache (one sequential read
            of the files); ``False`` checks their sizes only.
        progress: rows/s on stderr while building (default: when stderr is a terminal).

    Returns:
        ``(parts, encoder, folder)``: one :class:`CTRData` per fraction, memory-mapped, with the
        whole read's :attr:`~CTRData.read_report` on the first part; the encoder; the cache folder.

    Raises:
        ValueError / FileNotFoundError: as :func:`~fastkd.data.load` (bad spec, no rows, too many
            malformed rows).
        OSError: the cache cannot be written (e.g. the disk is full; nothing is left behind).

    Example:
        >>> import os, tempfile
        >>> from fastkd.data.criteo_like import write_criteo_like
        >>> d = tempfile.mkdtemp()
        >>> path = write_criteo_like(os.path.join(d, "day.txt"), 1000, max_values=50, progress=False)
        >>> (train, valid, test), enc, folder = cached_split(
        ...     f"criteo:{path}", os.path.join(d, "cache"), kind="hash", num_buckets=1000)
        >>> len(train), len(valid), len(test), train.num_fields
        (800, 100, 100, 39)
        >>> (train2, _, _), _, _ = cached_split(  # the same file and settings: opened, not rebuilt
        ...     f"criteo:{path}", os.path.join(d, "cache"), kind="hash", num_buckets=1000)
        >>> bool((train2.ids == train.ids).all())
        True
    """
    kind_, paths = parse_spec(spec)
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    settings = dict(kind=kind, min_count=min_count, num_buckets=num_buckets, seed=seed, label=label,
                    numeric=sorted(numeric), columns=None if columns is None else list(columns),
                    max_bad_rows=check_max_bad_rows(max_bad_rows), fractions=fr, split_seed=int(split_seed))
    key_doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": kind_,
               "inputs": [_file_stamp(p) for p in paths], "settings": settings}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{Path(paths[0]).name.split('.')[0]}-{key}"
    world, rank = _process_group()
    if world > 1:
        # rank 0 builds (or checks) the cache while the others wait; then every rank maps it, so no
        # rank encodes the source twice and none holds the rows in its own memory
        if rank == 0:
            _collective(lambda: _open_or_build(spec, folder, key, key_doc, settings, chunk_rows, verify, progress),
                        "building the encoded cache")
        else:
            _collective(lambda: None, "waiting for rank 0's encoded cache")
        parts, encoder = open_cache(folder, verify=False, key=key)
        return parts, encoder, folder
    parts, encoder = _open_or_build(spec, folder, key, key_doc, settings, chunk_rows, verify, progress)
    return parts, encoder, folder


def _open_or_build(spec, folder: Path, key: str, key_doc: dict, settings: dict, chunk_rows: int, verify: bool,
                   progress: Optional[bool]):
    if folder.exists():
        try:
            return open_cache(folder, verify=verify, key=key)
        except (ValueError, OSError) as exc:
            warnings.warn(f"encoded cache {folder} cannot be used ({exc}); rebuilding it", stacklevel=3)
    _build(spec, folder, key, key_doc, settings, chunk_rows, progress)
    return open_cache(folder, verify=False, key=key)


def open_cache(folder: Union[str, Path], *, verify: bool = True,
               key: Optional[str] = None) -> Tuple[Tuple[CTRData, ...], FeatureEncoder]:
    """The parts and encoder of a complete cache folder written by :func:`cached_split`.

    Args:
        folder: the cache folder (:func:`cached_split` returns it).
        verify: recompute the files' checksums (else sizes only).
        key: the key the folder must carry (None: any).

    Returns:
        ``(parts, encoder)`` as :func:`cached_split` gives them.

    Raises :class:`~fastkd.train.manifest.CorruptArtifactError` (a ``ValueError``) naming the file
    when the manifest or a data file is missing, truncated or fails its checksum, and
    :class:`~fastkd.train.manifest.ArtifactMismatchError` when the folder holds another format,
    version or key.

    Example:
        >>> import os, tempfile
        >>> from fastkd.data.criteo_like import write_criteo_like
        >>> d = tempfile.mkdtemp()
        >>> path = write_criteo_like(os.path.join(d, "day.txt"), 200, max_values=20, progress=False)
        >>> _, _, folder = cached_split(f"criteo:{path}", d, kind="hash", num_buckets=100)
        >>> (train, valid, test), enc = open_cache(folder)
        >>> len(train) + len(valid) + len(test), enc.kind
        (200, 'hash')
    """
    from ..train.manifest import ArtifactMismatchError, CorruptArtifactError, file_checksum, read_json_object

    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise CorruptArtifactError(mpath, "truncated", "no manifest: the cache was never completed")
    meta = read_json_object(mpath)
    for field, expected in (("format", CACHE_FORMAT), ("version", CACHE_VERSION)) + (
            (("key", key),) if key is not None else ()):
        if meta.get(field) != expected:
            raise ArtifactMismatchError(mpath, field, expected, meta.get(field))
    try:
        rows, names, sizes = int(meta["rows"]), list(meta["field_names"]), list(meta["field_sizes"])
        part_rows, files = [int(r) for r in meta["part_rows"]], dict(meta["files"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptArtifactError(mpath, "corrupt", f"manifest entry missing or malformed ({exc!r})") from None
    for name in _FILES:
        path, entry = folder / name, files.get(name)
        if entry is None or not path.exists():
            raise CorruptArtifactError(path, "truncated", "missing from the cache folder")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptArtifactError(path, "truncated" if size < entry["bytes"] else "corrupt",
                                       f"{size} bytes, the manifest says {entry['bytes']}")
        if verify and file_checksum(path) != entry["checksum"]:
            raise CorruptArtifactError(path, "corrupt", "checksum differs from the manifest's")
    # copy-on-write mappings: writable for torch.from_numpy, backed by the file until written
    ids = np.load(folder / "ids.npy", mmap_mode="c")
    labels = np.load(folder / "labels.npy", mmap_mode="c")
    if ids.shape != (rows, len(names)) or labels.shape != (rows,) or sum(part_rows) != rows:
        raise CorruptArtifactError(folder / "ids.npy", "corrupt",
                                   f"shapes {ids.shape}/{labels.shape} do not match the manifest's {rows} rows")
    encoder = FeatureEncoder.from_state_dict(read_json_object(folder / "encoder.json"))
    parts, start = [], 0
    for n in part_rows:
        parts.append(CTRData(ids[start:start + n], labels[start:start + n], names, sizes))
        start += n
    if meta.get("read_report"):
        parts[0].read_report = ReadReport.from_dict(meta["read_report"])
    return tuple(parts), encoder


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def _file_stamp(path: str) -> Dict[str, object]:
    st = os.stat(path)  # FileNotFoundError names the path
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _clear_stale(folder: Path) -> None:
    """Remove ``folder`` (a cache being replaced) and temporary folders of builds whose process
    is gone (an interrupted build never becomes a cache, and its space comes back here)."""
    for tmp in folder.parent.glob(folder.name + ".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    if folder.exists():
        trash = folder.with_name(folder.name + f".old-{os.getpid()}")
        os.replace(folder, trash)  # one rename: no reader sees a half-deleted cache
        shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(spec: str, folder: Path, key: str, key_doc: dict, settings: dict, chunk_rows: int,
           progress: Optional[bool]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write(spec, tmp, settings, chunk_rows, progress)
        meta.update(format=CACHE_FORMAT, version=CACHE_VERSION, key=key, key_inputs=key_doc)
        atomic_write_json(tmp / MANIFEST, meta, indent=1)
        _clear_stale(folder)
        os.replace(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, f"no space left on the device while writing the encoded cache in {folder.parent} "
                                     "(a build needs about 16 bytes per field per row: the rows, then their "
                                     "split-ordered copy); nothing was kept") from exc
        raise


def _write(spec: str, tmp: Path, settings: dict, chunk_rows: int, progress: Optional[bool]) -> dict:
    """Encode the source into ``tmp``; returns the manifest's data entries."""
    from tqdm.auto import tqdm

    from ..train.manifest import file_checksum

    def bar(desc: str, total=None, enabled=progress):  # rows, rows/s and ETA; None: when stderr is a terminal
        return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=None if enabled is None else not enabled)

    read = dict(chunk_rows=chunk_rows, label=settings["label"], numeric=settings["numeric"],
                columns=settings["columns"])
    max_bad = settings["max_bad_rows"]
    encoder = FeatureEncoder(settings["kind"], min_count=settings["min_count"],
                             num_buckets=settings["num_buckets"], seed=settings["seed"])
    first = _Checked(iter_table(spec, **{**read, "chunk_rows": _fit_chunk_rows(None, settings["kind"], chunk_rows)}),
                     spec, max_bad)
    def counted(chunks, b):
        for t in chunks:
            b.update(len(t.labels))
            yield t

    with bar("encoder fit", enabled=progress if settings["kind"] == "vocab" else False) as fit_bar:
        encoder.fit(counted(first, fit_bar))
    total = first.report.rows_ok if settings["kind"] == "vocab" else None
    first.close()

    # pass 1: rows in source order, appended block by block; at the end of the source, the
    # errors load() gives (no rows, no well-formed row, too many malformed), then its warning
    blocks = _Checked(encoded_blocks(spec, encoder, read), spec, max_bad)
    n, F = 0, len(encoder.field_names)
    with open(tmp / "rows.bin", "wb") as f_ids, open(tmp / "labels.bin", "wb") as f_lab, \
            bar("encoding", total) as enc_bar:
        for b in blocks:
            if not len(b.labels):  # a block of malformed lines only (e.g. a cut-off last line)
                continue
            f_ids.write(memoryview(np.ascontiguousarray(b.ids, dtype=np.int64)).cast("B"))
            f_lab.write(memoryview(np.ascontiguousarray(b.labels, dtype=np.float32)).cast("B"))
            n += len(b.labels)
            enc_bar.update(len(b.labels))
    blocks.warn()

    # pass 2: the rows in split order (CTRData.split's rule), into the .npy files
    src_ids = np.memmap(tmp / "rows.bin", dtype=np.int64, mode="r", shape=(n, F)) if n else np.empty((0, F), np.int64)
    src_lab = np.memmap(tmp / "labels.bin", dtype=np.float32, mode="r", shape=(n,)) if n else np.empty(0, np.float32)
    perm = np.random.default_rng(settings["split_seed"]).permutation(n)
    part_rows, start = [], 0
    for f in settings["fractions"][:-1]:
        part_rows.append(int(f * n))
        start += part_rows[-1]
    part_rows.append(n - start)
    ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int64, shape=(n, F))
    labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.float32, shape=(n,))
    with bar("laying out the split", n) as lay_bar:
        for a in range(0, n, _GATHER_ROWS):
            idx = perm[a:a + _GATHER_ROWS]
            # a sorted read of the source file, written back in permutation order
            order = np.argsort(idx, kind="stable")
            ids[a:a + idx.size][order] = src_ids[idx[order]]
            labels[a:a + idx.size][order] = src_lab[idx[order]]
            lay_bar.update(idx.size)
    ids.flush()
    labels.flush()
    del ids, labels, src_ids, src_lab, perm
    (tmp / "rows.bin").unlink()
    (tmp / "labels.bin").unlink()
    with open(tmp / "encoder.json", "w") as fh:
        json.dump(encoder.state_dict(), fh)
    files = {name: {"bytes": (tmp / name).stat().st_size, "checksum": file_checksum(tmp / name)} for name in _FILES}
    return {"rows": n, "part_rows": part_rows, "field_names": encoder.field_names,
            "field_sizes": encoder.field_sizes, "read_report": blocks.report.to_dict(), "files": files}
