"""Raw chunks of a data source: :class:`RawTable`, and the parsing helpers
the format readers (:mod:`fastkd.data.readers.formats`) share. :mod:`fastkd.data.readers` re-exports the
public names.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .report import _MAX_BAD, ReadReport

__all__ = ["RawTable", "parse_spec", "bucketize_numeric", "KINDS"]

KINDS = ("criteo", "avazu", "libfm", "csv", "parquet")


@dataclass
class RawTable:
    """Rows of raw string tokens, before encoding.

    Attributes:
        labels: float32 ``[N]`` in {0, 1}.
        columns: ``F`` object arrays ``[N]``; each entry is a non-empty ``str`` token or ``None`` (missing).
            Numeric fields hold their bucket tokens already (see :func:`bucketize_numeric`).
        field_names: ``F`` names.
        numeric: ``F`` flags, True where the field was numeric (bucketised).
        report: :class:`ReadReport` for the rows of this table.
        chunk: where :func:`iter_table` read it: ``(unit, part)``, ordered as the chunks of the
            whole source (a unit is a block of ``chunk_rows`` lines, or a parquet row group read
            by a shard). Sharded reads use it to put the ranks' chunks back in source order.
    """

    labels: np.ndarray
    columns: List[np.ndarray]
    field_names: List[str]
    numeric: List[bool]
    report: ReadReport = field(default_factory=ReadReport)
    chunk: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32)
        n = self.labels.shape[0]
        if len(self.columns) != len(self.field_names) or len(self.numeric) != len(self.field_names):
            raise ValueError(f"RawTable has {len(self.columns)} columns, {len(self.field_names)} field_names "
                             f"and {len(self.numeric)} numeric flags; they must match")
        cols = []
        for name, c in zip(self.field_names, self.columns):
            c = np.asarray(c, dtype=object)
            if c.shape != (n,):
                raise ValueError(f"column {name!r} has shape {c.shape}, expected ({n},)")
            cols.append(c)
        self.columns = cols

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(parts: Sequence["RawTable"]) -> "RawTable":
        """Row-wise concatenation of tables with the same fields; reports are merged."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one RawTable")
        first = parts[0]
        report = first.report
        for i, p in enumerate(parts[1:], 1):
            if p.field_names != first.field_names:
                raise ValueError(f"table {i} has fields {p.field_names}, expected {first.field_names}")
            report = report.merge(p.report)
        cols = [np.concatenate([p.columns[f] for p in parts]) for f in range(len(first.field_names))]
        return RawTable(np.concatenate([p.labels for p in parts]), cols, list(first.field_names),
                        list(first.numeric), report)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> Tuple[str, List[str]]:
    """Split ``KIND:PATH[,PATH2,...]`` into ``(kind, paths)`` and check that the files exist.

    Raises:
        ValueError: malformed spec or unknown kind.
        FileNotFoundError: a path does not exist.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"spec must look like 'KIND:PATH[,PATH2,...]' with KIND in {KINDS}, got {spec!r}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} in spec {spec!r}; expected one of {KINDS}")
    paths = [p.strip() for p in rest.split(",")]
    if not rest.strip() or any(not p for p in paths):
        raise ValueError(f"spec {spec!r} has an empty path; expected 'KIND:PATH[,PATH2,...]'")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p!r} (from spec {spec!r})")
    return kind, paths


_SNIFF_BYTES = 1 << 16


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class _CheckedGzipRaw(io.RawIOBase):
    """The decompressed bytes of a gzip file, read through one ``readinto`` whose failures name
    the file: a stream that ends early (a file cut off mid-copy) says "truncated", a bad CRC or
    corrupt deflate data "corrupt", as ``ValueError``. Any part of the file can fail, not only the
    start the readers check before parsing."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = path
        self._gz = gzip.GzipFile(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            return self._gz.readinto(b)
        except _GZIP_ERRORS as e:
            what = "truncated (the compressed stream ends early)" if isinstance(e, EOFError) else "corrupt"
            raise ValueError(f"{self.name}: gzip data is {what}: {e}") from None

    def close(self) -> None:
        self._gz.close()
        super().close()


def open_checked_gzip(path: str) -> io.BufferedReader:
    """A gzip file opened for reading whose every read (``read``, ``read1``, ``readinto``,
    ``readline``, iteration) names the file when the data is truncated or corrupt."""
    return io.BufferedReader(_CheckedGzipRaw(path))


def _open_text(path: str) -> io.TextIOBase:
    r"""Text of a (possibly gzip-compressed) file whose lines end at ``\n`` alone.

    ``newline="\n"``: a line ends at ``\n`` only and nothing is translated, so a ``\r\n`` line
    keeps its ``\r`` (the readers strip it) and a lone ``\r`` stays inside its line as data instead
    of starting a new one (which would shift every later line number). A file whose start holds
    ``\r`` but no ``\n`` (old Mac line ends) is refused.
    """
    with open(path, "rb") as fh:
        magic = fh.read(2)
    gz = magic == b"\x1f\x8b"
    with (open_checked_gzip(path) if gz else open(path, "rb")) as fh:
        try:
            head = fh.read(_SNIFF_BYTES)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read: {e}") from None
    if b"\r" in head and b"\n" not in head:
        raise ValueError(f"{path}: lines end in a lone '\\r' (old Mac line ends); only '\\n' and '\\r\\n' "
                         "end a line: convert the file (e.g. tr '\\r' '\\n')")
    if gz:
        return io.TextIOWrapper(open_checked_gzip(path), encoding="utf-8-sig", errors="replace", newline="\n")
    return open(path, "r", encoding="utf-8-sig", errors="replace", newline="\n")


def bucketize_numeric(values: np.ndarray) -> np.ndarray:
    """Numeric values -> categorical bucket tokens (the Criteo-challenge winners' rule).

    ``v = int(x)`` (truncation); token ``str(floor(log(v)**2))`` if ``v > 2`` else ``"SP" + str(v)``.
    The ``SP`` prefix keeps small raw values (including 0 and negatives, each its own token) apart
    from bucket numbers: without it ``v = 1`` and ``v = 3`` (bucket ``floor(log(3)**2) = 1``) would
    collide. NaN stays missing (``None``).

    Args:
        values: float array ``[N]``; NaN = missing. Must not contain infinities.

    Returns:
        object array ``[N]`` of ``str`` / ``None``.

    Example:
        >>> list(bucketize_numeric(np.array([float("nan"), -3, 0, 2, 3, 100])))
        [None, 'SP-3', 'SP0', 'SP2', '1', '21']
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape[0], None, dtype=object)
    present = np.flatnonzero(~np.isnan(values))
    if present.size == 0:
        return out
    v = np.trunc(values[present])
    big = v > 2
    # Few distinct tokens per column, so build the strings once per distinct value.
    for mask, code, fmt in ((big, lambda x: np.floor(np.log(x) ** 2), lambda c: str(int(c))),
                            (~big, lambda x: x, lambda c: "SP" + str(int(c)))):
        if mask.any():
            uniq, inv = np.unique(code(v[mask]), return_inverse=True)
            out[present[mask]] = np.array([fmt(u) for u in uniq], dtype=object)[inv]
    return out


def _parse_floats(raw: Sequence, what: str) -> Tuple[np.ndarray, Dict[int, str]]:
    """Python-``float`` parse of string tokens; empty/None -> NaN. Returns (values, {row: reason})."""
    try:
        return np.array([float(s) if s else math.nan for s in raw], dtype=np.float64), {}
    except (ValueError, TypeError):
        pass
    out = np.full(len(raw), math.nan)
    bad = {}
    for i, s in enumerate(raw):
        if not s:
            continue
        try:
            out[i] = float(s)
        except (ValueError, TypeError):
            bad[i] = f"{what}: non-numeric value {str(s)[:40]!r}"
    return out, bad


class _Chunk:
    """Rows of one chunk of one file, collected before validation of labels and numeric fields."""

    def __init__(self, path: str, units: "_Units", part: int = 0):
        self.path = path
        self.chunk = (units.current, part)  # the unit just taken
        self.lines: List[int] = []
        self.labels: list = []
        self.rows: list = []          # text kinds: list of per-row feature lists
        self.columns: Optional[list] = None  # parquet: per-field raw arrays
        self.bad: List[Tuple[int, str]] = []
        self.n_read = 0


def _finish_chunk(ch: _Chunk, field_names: List[str], numeric: List[bool], strict: bool,
                  post: Optional[Dict[int, Callable[[np.ndarray], Tuple[np.ndarray, Dict[int, str]]]]] = None
                  ) -> RawTable:
    """Validate labels/numeric fields of a chunk, drop malformed rows, build the RawTable."""
    n = len(ch.lines)
    n_fields = len(field_names)
    if ch.columns is not None:
        cols = ch.columns
    elif n:
        mat = np.empty((n, n_fields), dtype=object)
        mat[:] = ch.rows
        cols = [mat[:, f] for f in range(n_fields)]
    else:
        cols = [np.empty(0, dtype=object) for _ in range(n_fields)]
    row_bad: Dict[int, str] = {}

    lab_raw = ch.labels
    if isinstance(lab_raw, np.ndarray) and lab_raw.dtype.kind == "f":
        lab = lab_raw
    else:
        lab, bad = _parse_floats(lab_raw, "label")
        for i in bad:
            row_bad.setdefault(i, f"unparsable label {str(lab_raw[i])[:40]!r}")
    bad_lab = np.flatnonzero(~((lab == 1) | (lab == 0) | (lab == -1)))
    for i in bad_lab:
        row_bad.setdefault(int(i), f"label {str(lab_raw[i])[:40]!r} is not 0/1 or -1/1")

    values: List[Optional[np.ndarray]] = [None] * n_fields
    for f in range(n_fields):
        if numeric[f]:
            c = cols[f]
            if isinstance(c, np.ndarray) and c.dtype.kind == "f":
                vals, bad = c, {}
            else:
                vals, bad = _parse_floats(c, f"field {field_names[f]!r}")
            for i, r in bad.items():
                row_bad.setdefault(i, r)
            for i in np.flatnonzero(np.isinf(vals)):
                row_bad.setdefault(int(i), f"field {field_names[f]!r}: non-finite value {str(c[i])!r}")
            values[f] = vals
        elif post and f in post:
            cols[f], bad = post[f](cols[f])
            for i, r in bad.items():
                row_bad.setdefault(i, r)

    bad_all = sorted([(ch.lines[i], r) for i, r in row_bad.items()] + ch.bad)
    if strict and bad_all:
        line, reason = bad_all[0]
        raise ValueError(f"{ch.path}:{line}: {reason}")
    keep = np.ones(n, dtype=bool)
    if row_bad:
        keep[np.fromiter(row_bad.keys(), dtype=np.int64, count=len(row_bad))] = False
    out_cols = []
    for f in range(n_fields):
        if numeric[f]:
            out_cols.append(bucketize_numeric(values[f][keep]))
        else:
            c = np.asarray(cols[f], dtype=object)[keep]
            c[c == ""] = None
            out_cols.append(c)
    labels = (lab[keep] == 1).astype(np.float32)
    report = ReadReport(rows_read=ch.n_read, rows_ok=int(keep.sum()), malformed=len(bad_all),
                        first_bad=[(ch.path, l, r) for l, r in bad_all[:_MAX_BAD]], files=[ch.path])
    return RawTable(labels, out_cols, list(field_names), list(numeric), report, ch.chunk)


def _select(names: Sequence[str], columns: Optional[Sequence[str]], what: str) -> List[int]:
    """Indices of ``columns`` within ``names`` (all of ``names`` if columns is None)."""
    if columns is None:
        return list(range(len(names)))
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns has duplicates: {columns}")
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"columns {missing} not found among the {what} fields {list(names)}")
    return [list(names).index(c) for c in columns]


class _Units:
    """Numbers the units (blocks of ``chunk_rows`` lines, parquet row groups) of one source, across
    its files, and says which ones this shard reads: unit ``i`` belongs to rank ``i % world``."""

    def __init__(self, shard: Optional[Tuple[int, int]]):
        self.rank, self.world = shard if shard is not None else (0, 1)
        self.next = 0
        self.current = -1

    def take(self) -> bool:
        self.current = self.next
        self.next += 1
        return self.current % self.world == self.rank


def _text_chunks(fh, chunk_rows: int, units: _Units) -> Iterator[Tuple[Sequence[int], List[str]]]:
    """Chunks of ``chunk_rows`` physical lines as (1-based line numbers, lines without EOL); empty lines dropped.

    Blocks of other shards are read past (line boundaries must be found) but not split or parsed.
    """
    start = 1
    while True:
        block = list(islice(fh, chunk_rows))
        if not block:
            return
        if not units.take():
            start += len(block)
            continue
        lines = [s.rstrip("\r\n") for s in block]
        if "" in lines:
            nos = [start + i for i, s in enumerate(lines) if s]
            lines = [s for s in lines if s]
        else:
            nos = range(start, start + len(lines))
        start += len(block)
        yield nos, lines
