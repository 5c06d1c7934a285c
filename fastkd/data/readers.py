"""Streaming readers: files -> :class:`RawTable` chunks of raw string tokens.

A data source is named by a *spec* ``KIND:PATH[,PATH2,...]``; the paths are read in order and
concatenated (so ``libfm:frappe.validation.libfm.gz,frappe.test.libfm.gz`` is one table). Paths
containing a comma are not supported.

Kinds
-----
``criteo``
    Kaggle DAC TSV, no header: ``label, I1..I13, C1..C26`` (40 fields). ``I*`` are numeric and are
    bucketised (see :func:`bucketize_numeric`); empty values are missing.
``avazu``
    Kaggle Avazu CSV (24 columns). A header is optional per file: a file whose first row contains
    the label column (``click``) has a header, otherwise :data:`AVAZU_COLUMNS` is used. ``id`` is
    dropped. ``hour`` (``YYMMDDHH``) is kept as the categorical hour of day ``HH``; the date part is
    dropped because a model trained on some days must generalise to others.
``libfm``
    ``label idx:val idx:val ...`` (Frappe, iPinYou). Labels 1/0 or 1/-1 (-1 -> 0). The field of an
    entry is its *position* in the line and the raw token is the ``idx`` string (``val`` is ignored;
    it is 1 in all one-hot CTR data). Every line must have as many entries as the first line whose
    label and entries parse (or ``len(columns)`` if given); other lines are malformed.
``csv``
    Generic delimited text with a header row. The delimiter is ``,`` unless the header contains a
    tab and no comma (then tab). The label column is named by ``label=`` (default ``"label"``);
    every other column (or those in ``columns=``) is a categorical field unless named in ``numeric=``.
``parquet``
    Like ``csv``, read with pyarrow in record batches. Line numbers in reports are 1-based row numbers.

Text files may be gzip-compressed (detected by the magic bytes, whatever the extension); text is
decoded as UTF-8 (a leading BOM is dropped, undecodable bytes become U+FFFD). Empty lines are ignored.

Malformed rows (wrong field count, label not one of 0/1/-1, non-numeric value in a numeric field, bad
avazu ``hour``) are skipped and counted in :class:`ReadReport` (with the first five as
``(file, line, reason)``), or raise ``ValueError("FILE:LINE: reason")`` with ``strict=True``.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ReadReport", "RawTable", "iter_table", "read_table", "parse_spec", "bucketize_numeric",
    "KINDS", "CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "AVAZU_COLUMNS", "FRAPPE_FIELDS", "IPINYOU_FIELDS",
]

KINDS = ("criteo", "avazu", "libfm", "csv", "parquet")
CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]
#: Field names of the Frappe libFM files, in entry order (pass as ``columns=``).
FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
                 "country", "city"]
#: Field names of the iPinYou (FNN demo) libFM files, in entry order (pass as ``columns=``).
IPINYOU_FIELDS = ["weekday", "hour", "useragent", "IP", "region", "city", "adexchange", "domain", "slotid",
                  "slotwidth", "slotheight", "slotvisibility", "slotformat", "creative", "advertiser",
                  "slotprice"]

_MAX_BAD = 5
_DEFAULT_LABEL = {"avazu": "click", "csv": "label", "parquet": "label"}


# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------
@dataclass
class ReadReport:
    """What a read saw: row counts and the first malformed rows.

    Attributes:
        rows_read: data rows seen (header and empty lines excluded).
        rows_ok: rows kept.
        malformed: rows skipped as malformed (``rows_read - rows_ok``).
        first_bad: up to five ``(file, 1-based line number, reason)`` in file/line order.
        files: the files the rows came from.
    """

    rows_read: int = 0
    rows_ok: int = 0
    malformed: int = 0
    first_bad: List[Tuple[str, int, str]] = field(default_factory=list)
    files: List[str] = field(default_factory=list)

    def merge(self, other: "ReadReport") -> "ReadReport":
        """Report covering ``self`` followed by ``other``."""
        files = list(self.files) + [f for f in other.files if f not in self.files]
        return ReadReport(self.rows_read + other.rows_read, self.rows_ok + other.rows_ok,
                          self.malformed + other.malformed, (self.first_bad + other.first_bad)[:_MAX_BAD], files)

    def __str__(self) -> str:
        name = "+".join(os.path.basename(f) for f in self.files) or "<no files>"
        s = f"{name}: {self.rows_ok} rows, {self.malformed} malformed"
        if self.first_bad:
            f, line, reason = self.first_bad[0]
            s += f" (first: {os.path.basename(f)}:{line}: {reason})"
        return s


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


def _open_text(path: str) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    # newline="" keeps '\r' so the csv module sees raw line ends (it requires this).
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, "r", encoding="utf-8-sig", errors="replace", newline="")


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


# ----------------------------------------------------------------------------------------------
# Kind readers: each yields RawTables, one per chunk per file
# ----------------------------------------------------------------------------------------------
def _read_criteo(paths, chunk_rows, strict, label, numeric, columns, units):
    if numeric:
        raise ValueError("numeric= does not apply to kind 'criteo' (I1..I13 are always numeric)")
    names_all = CRITEO_NUMERIC + CRITEO_CATEGORICAL
    sel = _select(names_all, columns, "criteo")
    names = [names_all[i] for i in sel]
    is_num = [i < 13 for i in sel]
    all_sel = columns is None
    for path in paths:
        with _open_text(path) as fh:
            for nos, lines in _text_chunks(fh, chunk_rows, units):
                ch = _Chunk(path, units)
                ch.n_read = len(lines)
                for line_no, s in zip(nos, lines):
                    parts = s.split("\t")
                    if len(parts) != 40:
                        ch.bad.append((line_no, f"expected 40 tab-separated fields, got {len(parts)}"))
                        continue
                    ch.lines.append(line_no)
                    ch.labels.append(parts[0])
                    ch.rows.append(parts[1:] if all_sel else [parts[1 + i] for i in sel])
                yield _finish_chunk(ch, names, is_num, strict)


_LIBFM_VAL = re.compile(r":\S*")  # the ":val" part of an entry


@lru_cache(maxsize=32)
def _libfm_line_re(width: int):
    # colon-free label, then exactly `width` entries with a non-empty colon-free idx
    return re.compile(r"[ \t]*[^\s:]+(?:[ \t]+[^\s:]+:\S*){%d}[ \t]*" % width)


def _libfm_fast(lines: List[str], width: Optional[int]) -> Optional[np.ndarray]:
    """Whole-chunk parse when every line is well formed (the common case), else None.

    Returns an object array ``[n, 1 + width]`` (label token, idx tokens). C-level regex/str
    operations on the joined chunk are several times faster than a per-entry Python loop; any
    irregular line sends the chunk to the per-line parser, which gives the exact diagnostics.
    """
    if width is None or not lines or not all(map(_libfm_line_re(width).fullmatch, lines)):
        return None
    flat = _LIBFM_VAL.sub("", "\n".join(lines)).split()
    return np.array(flat, dtype=object).reshape(len(lines), width + 1)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _libfm_line(s: str):
    """One libFM line -> (label token, idx tokens), or a reason string if an entry is malformed."""
    parts = s.split()
    ents = parts[1:]
    if not ents:
        return "no idx:val entries"
    toks = [e.partition(":") for e in ents]
    for k, t in enumerate(toks):
        if not (t[1] and t[0]):
            return f"entry {k + 1} {ents[k][:40]!r} is not idx:val"
    return parts[0], [t[0] for t in toks]


def _libfm_width(lines: Iterable[str]) -> Optional[int]:
    """Entries on the first of ``lines`` whose label and entries parse (None: no such line).
    That line fixes the number of fields of a libFM source."""
    for s in lines:
        parsed = _libfm_line(s)
        if not isinstance(parsed, str) and _is_float(parsed[0]):
            return len(parsed[1])
    return None


def _libfm_first_width(paths) -> Optional[int]:
    """:func:`_libfm_width` of the whole source, read from its start."""
    for path in paths:
        with _open_text(path) as fh:
            width = _libfm_width(fh)
        if width is not None:
            return width
    return None


def _read_libfm(paths, chunk_rows, strict, label, numeric, columns, units):
    if numeric:
        raise ValueError("numeric= does not apply to kind 'libfm' (tokens are feature indices)")
    width = len(columns) if columns is not None else None
    if columns is not None and len(set(columns)) != len(columns):
        raise ValueError(f"columns has duplicates: {list(columns)}")
    names = list(columns) if columns is not None else None
    if width is None and units.world > 1:
        # A shard must not guess the field count from its own blocks (they may all be malformed,
        # or start elsewhere in a file of mixed widths): take it from the source's first good line,
        # as an unsharded read does.
        width = _libfm_first_width(paths)
        if width is not None:
            names = [f"f{i}" for i in range(width)]
    pending: List[RawTable] = []
    for path in paths:
        with _open_text(path) as fh:
            for nos, lines in _text_chunks(fh, chunk_rows, units):
                ch = _Chunk(path, units)
                ch.n_read = len(lines)
                if width is None:
                    width = _libfm_width(lines)
                    if width is not None:
                        names = [f"f{i}" for i in range(width)]
                rows = _libfm_fast(lines, width)
                if rows is not None:
                    ch.lines = nos
                    ch.labels = rows[:, 0]
                    ch.columns = [rows[:, 1 + f] for f in range(width)]
                else:
                    for line_no, s in zip(nos, lines):
                        parsed = _libfm_line(s)
                        if isinstance(parsed, str):
                            ch.bad.append((line_no, parsed))
                        elif not _is_float(parsed[0]):
                            # checked before the width so the reason does not depend on chunking
                            ch.bad.append((line_no, f"unparsable label {parsed[0][:40]!r}"))
                        elif len(parsed[1]) != width:
                            ch.bad.append((line_no, f"expected {width} idx:val entries, got {len(parsed[1])}"))
                        else:
                            ch.lines.append(line_no)
                            ch.labels.append(parsed[0])
                            ch.rows.append(parsed[1])
                if names is None:
                    # No good line yet: the field count is unknown, so keep only the report.
                    pending.append(_finish_chunk(ch, [], [], strict))
                    continue
                for p in pending:
                    yield RawTable(p.labels, [np.empty(0, dtype=object)] * width, names, [False] * width, p.report,
                                   p.chunk)
                pending = []
                yield _finish_chunk(ch, names, [False] * width, strict)
    for p in pending:  # the whole input had no good line
        yield p


def _sniff_delimiter(first_line: str) -> str:
    return "\t" if ("\t" in first_line and "," not in first_line) else ","


def _read_delimited(paths, chunk_rows, strict, label, numeric, columns, units, avazu: bool):
    """Generic header-based CSV; with ``avazu=True`` the header is optional and id/hour are special."""
    numeric = list(numeric)
    out_names: Optional[List[str]] = None
    for path in paths:
        with _open_text(path) as fh:
            first = fh.readline()
            if not first:
                continue
            if not avazu and not first.strip():
                raise ValueError(f"{path}:1: empty header line")
            delim = "," if avazu else _sniff_delimiter(first)
            header = next(csv.reader([first.rstrip("\r\n")], delimiter=delim))
            has_header = (label in header) if avazu else True
            if avazu and not has_header:
                file_cols = list(AVAZU_COLUMNS)
            else:
                file_cols = [h.strip() for h in header]
            if len(set(file_cols)) != len(file_cols):
                raise ValueError(f"{path}:1: duplicate column names in header {file_cols}")
            if label not in file_cols:
                raise ValueError(f"{path}: label column {label!r} not found in columns {file_cols}; "
                                 f"pass label=NAME")
            if out_names is None:
                candidates = [c for c in file_cols if c != label and not (avazu and c == "id")]
                out_names = [candidates[i] for i in _select(candidates, columns, "available")]
                bad_num = [c for c in numeric if c not in out_names]
                if bad_num:
                    raise ValueError(f"numeric columns {bad_num} are not feature columns {out_names}")
                is_num = [c in numeric for c in out_names]
                post = {}
                if avazu and "hour" in out_names and "hour" not in numeric:
                    post[out_names.index("hour")] = _avazu_hour
            missing = [c for c in out_names if c not in file_cols]
            if missing:
                raise ValueError(f"{path}: columns {missing} missing (file has {file_cols})")
            lab_i = file_cols.index(label)
            feat_i = [file_cols.index(c) for c in out_names]
            width = len(file_cols)

            # Re-feed the first line as data when it is not a header.
            lines = fh if has_header else _prepend(first, fh)
            start_line = 1 if has_header else 0
            reader = csv.reader(lines, delimiter=delim)
            while True:
                if not units.take():
                    # another shard's block: csv must still tokenise it (quoted fields may hold
                    # newlines), but its rows are neither kept nor converted
                    if sum(1 for _ in islice(reader, chunk_rows)) < chunk_rows:
                        break
                    continue
                ch = _Chunk(path, units)
                got = 0
                for row in islice(reader, chunk_rows):
                    got += 1
                    line_no = reader.line_num + start_line
                    if not row or (len(row) == 1 and not row[0]):
                        continue
                    ch.n_read += 1
                    if len(row) != width:
                        ch.bad.append((line_no, f"expected {width} fields, got {len(row)}"))
                        continue
                    ch.lines.append(line_no)
                    ch.labels.append(row[lab_i])
                    ch.rows.append([row[i] for i in feat_i])
                if ch.n_read:
                    yield _finish_chunk(ch, out_names, is_num, strict, post)
                if got < chunk_rows:
                    break
    if out_names is None:
        raise ValueError(f"no data: every file in {paths} is empty")


def _prepend(first: str, rest) -> Iterator[str]:
    yield first
    yield from rest


def _avazu_hour(col: np.ndarray) -> Tuple[np.ndarray, Dict[int, str]]:
    out = np.empty(len(col), dtype=object)
    bad = {}
    for i, h in enumerate(col):
        if not h:
            out[i] = None
        elif len(h) == 8 and h.isdigit():
            out[i] = h[6:]
        else:
            bad[i] = f"hour {h[:40]!r} is not YYMMDDHH"
    return out, bad


def _read_parquet(paths, chunk_rows, strict, label, numeric, columns, units):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or fastkd[data])") from e
    numeric = list(numeric)
    out_names: Optional[List[str]] = None
    for path in paths:
        pf = pq.ParquetFile(path)
        file_cols = list(pf.schema_arrow.names)
        if label not in file_cols:
            raise ValueError(f"{path}: label column {label!r} not found in columns {file_cols}; pass label=NAME")
        if out_names is None:
            candidates = [c for c in file_cols if c != label]
            out_names = [candidates[i] for i in _select(candidates, columns, "available")]
            bad_num = [c for c in numeric if c not in out_names]
            if bad_num:
                raise ValueError(f"numeric columns {bad_num} are not feature columns {out_names}")
            is_num = [c in numeric for c in out_names]
        missing = [c for c in out_names if c not in file_cols]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing (file has {file_cols})")
        def chunk(batch, offset, part):
            n = batch.num_rows
            ch = _Chunk(path, units, part)
            ch.n_read = n
            ch.lines = list(range(offset + 1, offset + n + 1))
            ch.labels = _arrow_numeric(batch.column(0), pa)
            ch.columns = [(_arrow_numeric(batch.column(j + 1), pa) if is_num[j] else _arrow_strings(batch.column(j + 1), pa))
                          for j in range(len(out_names))]
            return _finish_chunk(ch, out_names, is_num, strict)

        cols = [label] + out_names
        if units.world == 1:
            offset = 0
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
                units.take()
                yield chunk(batch, offset, 0)
                offset += batch.num_rows
            continue
        # Sharded: whole row groups per rank, so other shards' groups are never read or decoded.
        offset = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if units.take():
                part_offset = offset
                for part, batch in enumerate(pf.iter_batches(batch_size=chunk_rows, row_groups=[g], columns=cols)):
                    yield chunk(batch, part_offset, part)
                    part_offset += batch.num_rows
            offset += rows
    if out_names is None:  # pragma: no cover - parse_spec guarantees at least one path
        raise ValueError("no parquet files given")


def _arrow_numeric(arr, pa):
    """Arrow column -> float64 array (nulls NaN), or a list of strings to parse if it is text."""
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return np.array(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
    return [None if v is None else str(v) for v in arr.to_pylist()]


def _arrow_strings(arr, pa):
    """Arrow column -> object array of str / None (NaN floats are missing)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_floating(t):
        vals = arr.to_numpy(zero_copy_only=False)
        out = np.array([None if (v != v) else str(v) for v in vals.tolist()], dtype=object)
        return out
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)
    return np.array([None if v is None else str(v) for v in arr.to_pylist()], dtype=object)


_READERS = {
    "criteo": _read_criteo,
    "libfm": _read_libfm,
    "csv": lambda *a: _read_delimited(*a, avazu=False),
    "avazu": lambda *a: _read_delimited(*a, avazu=True),
    "parquet": _read_parquet,
}


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def iter_table(spec: str, chunk_rows: int = 200_000, strict: bool = False, label: Optional[str] = None,
               numeric: Iterable[str] = (), columns: Optional[Sequence[str]] = None,
               shard: Optional[Tuple[int, int]] = None) -> Iterator[RawTable]:
    """Stream a data source as :class:`RawTable` chunks of at most ``chunk_rows`` input lines.

    Only one chunk is held in memory at a time; a chunk never spans two files. See the module
    docstring for the kinds and the malformed-row rules.

    Args:
        spec: ``KIND:PATH[,PATH2,...]``, KIND in ``criteo, avazu, libfm, csv, parquet``.
        chunk_rows: lines (parquet: rows) per chunk.
        strict: raise ``ValueError("FILE:LINE: reason")`` on the first malformed row instead of skipping.
        label: label column for ``csv``/``parquet`` (default ``"label"``) and ``avazu`` (default
            ``"click"``); not used by ``criteo``/``libfm`` (label is the first token).
        numeric: names of numeric columns (``csv``, ``parquet``, ``avazu``), bucketised with
            :func:`bucketize_numeric`. Criteo's I1..I13 are always numeric.
        columns: ``criteo``/``avazu``/``csv``/``parquet``: the feature columns to keep, in this order
            (default: all but label, and ``id`` for avazu). ``libfm``: names of the positional fields
            (their number then fixes the expected entries per line; default ``f0, f1, ...``), e.g.
            :data:`FRAPPE_FIELDS`.
        shard: ``(rank, world_size)``: read only this rank's share. The source is cut into units
            (blocks of ``chunk_rows`` lines; parquet row groups) and unit ``i`` goes to rank
            ``i % world_size``, so the shards of all ranks, ordered by :attr:`RawTable.chunk`, are
            exactly the unsharded chunks. Text formats still scan other ranks' blocks for line
            ends but do not parse them; parquet skips their row groups entirely.

    Yields:
        :class:`RawTable` per chunk, each with its own :class:`ReadReport` and
        :attr:`~RawTable.chunk` position.

    Raises:
        ValueError: bad spec, unknown kind, bad argument, missing label column, or (``strict``) a malformed row.
        FileNotFoundError: a path does not exist.

    Example:
        >>> enc = FeatureEncoder().fit(iter_table("criteo:train.txt.gz", chunk_rows=100_000))  # doctest: +SKIP
        >>> for chunk in iter_table("criteo:train.txt.gz", chunk_rows=100_000):              # doctest: +SKIP
        ...     print(chunk.report)
    """
    kind, paths = parse_spec(spec)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if isinstance(numeric, str):
        raise ValueError(f"numeric must be a list of column names, got the string {numeric!r}")
    numeric = list(numeric)
    if columns is not None:
        if isinstance(columns, str):
            raise ValueError(f"columns must be a list of names, got the string {columns!r}")
        columns = list(columns)
    if label is None:
        label = _DEFAULT_LABEL.get(kind, "label")
    if shard is not None:
        try:
            rank, world = (int(v) for v in shard)
        except (TypeError, ValueError):
            raise ValueError(f"shard must be (rank, world_size), got {shard!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
        shard = (rank, world)
    return _READERS[kind](paths, chunk_rows, strict, label, numeric, columns, _Units(shard))


def read_table(spec: str, strict: bool = False, label: Optional[str] = None, numeric: Iterable[str] = (),
               columns: Optional[Sequence[str]] = None, chunk_rows: int = 200_000) -> RawTable:
    """Whole data source as one :class:`RawTable` (the concatenation of :func:`iter_table` chunks).

    Args: as :func:`iter_table`.

    Example:
        >>> t = read_table("libfm:frappe.validation.libfm.gz,frappe.test.libfm.gz")  # doctest: +SKIP
        >>> print(t.report)                                                            # doctest: +SKIP
        frappe.validation.libfm.gz+frappe.test.libfm.gz: 86582 rows, 0 malformed
    """
    parts = list(iter_table(spec, chunk_rows=chunk_rows, strict=strict, label=label, numeric=numeric,
                            columns=columns))
    if not parts:
        raise ValueError(f"no rows in {spec!r}")
    return RawTable.concat(parts)
