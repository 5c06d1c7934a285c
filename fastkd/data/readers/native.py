"""criteo files straight to hashed ids in native code: :func:`iter_criteo_hashed`.

The hashing encoder's fast path for ``criteo`` sources. Blocks of whole lines are read from the
file (gzip decompressed on a read-ahead thread, which releases the GIL), and the extension's
``encode_tsv`` (``csrc/encode_text.cpp``) splits, checks and hashes them on ``num_threads``
threads. It gives the ids :class:`~fastkd.data.FeatureEncoder` gives the criteo reader's tokens,
bit for bit: every line it cannot decide with certainty (non-ASCII bytes, a stray ``\\r``, a wrong
column count, an unusual label or number) goes through the Python reader's own parsing rule
(:func:`~fastkd.data.readers.criteo.criteo_chunk`), which keeps it with its exact ids or reports it
as malformed with its line number, as the Python path does.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .criteo import criteo_chunk, criteo_fields
from .raw import _open_text, _Units, open_checked_gzip
from .report import _MAX_BAD, ReadReport

__all__ = ["iter_criteo_hashed", "native_available"]

BLOCK_BYTES = 32 << 20


def native_available() -> bool:
    """True when the extension with ``encode_tsv`` is built (else the Python reader is used)."""
    try:
        return hasattr(_lib(), "encode_tsv")
    except ImportError:
        return False


def _lib():
    from fastkd import _hashing
    return _hashing


def _blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """Whole-line blocks of the file's bytes, read ahead on a thread (gzip inflates there)."""
    _open_text(path).close()  # the reader's checks: readable, gzip intact at the start, no old-Mac line ends
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    q: "queue.Queue" = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            with (open_checked_gzip(path) if gz else open(path, "rb", buffering=0)) as fh:
                carry = b""  # the unfinished line at the end of the previous block
                while not stop.is_set():
                    buf = bytearray(block_bytes + len(carry))
                    buf[:len(carry)] = carry
                    got = fh.readinto(memoryview(buf)[len(carry):])  # one copy, into the block itself
                    end = len(carry) + (got or 0)
                    if not got:
                        if carry:
                            q.put(memoryview(buf)[:end])
                        break
                    cut = buf.rfind(b"\n", 0, end)
                    if cut < 0:
                        carry = bytes(buf[:end])
                        continue
                    carry = bytes(buf[cut + 1:end])
                    q.put(memoryview(buf)[:cut + 1])
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise ValueError(f"{path}: cannot read: {item}") from item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # let the producer see the stop flag past a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


def iter_criteo_hashed(paths: Sequence[str], encoder, columns: Optional[Sequence[str]] = None,
                       num_threads: Optional[int] = None,
                       block_bytes: int = BLOCK_BYTES) -> Iterator[Tuple[np.ndarray, np.ndarray, ReadReport]]:
    """``(ids int64 [n, F], labels float32 [n], report)`` per block of the criteo ``paths``, hashed
    by the fitted ``encoder`` (``kind="hash"``); the rows, ids and report (malformed rows skipped,
    with their line numbers) are those of ``encoder.transform(iter_table("criteo:...", columns=...))``.
    """
    if encoder.kind != "hash":
        raise ValueError("the native criteo path hashes: it needs a FeatureEncoder(kind='hash')")
    names, sel, is_num = criteo_fields((), columns)
    if encoder.field_names != names:
        raise ValueError(f"the encoder was fitted on fields {encoder.field_names}, the read selects {names}")
    lib = _lib()
    threads = num_threads or min(os.cpu_count() or 1, 8)
    F = len(names)
    spec = dict(n_cols=40, label_col=0, cols=[1 + i for i in sel], numeric=[int(x) for x in is_num],
                seeds=[encoder.seed + f for f in range(F)], num_buckets=list(encoder.field_sizes))
    for path in paths:
        line0 = 0  # lines before this block in the file
        for block in _blocks(path, block_bytes):
            buf = np.frombuffer(block, dtype=np.uint8)
            # a well-formed line has at least 41 bytes (40 one-byte columns, 39 tabs, '\n'): size
            # the output for that (pages never written are never resident) and count only if a
            # block of short, malformed lines needs more
            for cap in (len(block) // 41 + 1, None):
                cap = cap or bytes(block).count(b"\n") + 1
                ids = np.empty((cap, F), dtype=np.int64)
                labels = np.empty(cap, dtype=np.float32)
                try:
                    r = lib.encode_tsv(buf.ctypes.data, len(block), ids=ids.ctypes.data, labels=labels.ctypes.data,
                                       capacity=cap, num_threads=threads, **spec)
                    break
                except ValueError as exc:
                    if "capacity" not in str(exc):
                        raise
            n = r["rows"]
            ids, labels = ids[:n], labels[:n]
            bad: List[Tuple[int, str]] = []
            if r["fallback"]:
                keep = np.ones(n, dtype=bool)
                for row, line, a, b in zip(r["fallback"], r["fb_line"], r["fb_start"], r["fb_end"]):
                    no = line0 + line + 1
                    text = bytes(block[a:b]).decode("utf-8-sig" if no == 1 else "utf-8", errors="replace").rstrip("\r\n")
                    t = criteo_chunk(path, _Units(None), [no], [text], columns, strict=False)
                    if len(t.labels):
                        ids[row] = encoder.transform(t).ids[0]
                        labels[row] = t.labels[0]
                    else:
                        keep[row] = False
                        bad.append(t.report.first_bad[0][1:])
                if not keep.all():
                    ids, labels = ids[keep], labels[keep]
            line0 += r["lines"]
            report = ReadReport(rows_read=n, rows_ok=len(labels), malformed=len(bad),
                                first_bad=[(path, no, why) for no, why in bad[:_MAX_BAD]], files=[path])
            yield ids, labels, report
