"""One reader per data kind (criteo, avazu, libfm, csv, parquet): files -> :class:`RawTable` chunks.

The kinds and their malformed-row rules are described in :mod:`fastkd.data.readers`, whose
:func:`~fastkd.data.readers.iter_table` dispatches here through ``_READERS``.
"""
from __future__ import annotations

import csv
import re
from functools import lru_cache
from itertools import islice
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .raw import RawTable, _Chunk, _finish_chunk, _open_text, _select, _text_chunks, parse_spec

__all__ = ["CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "AVAZU_COLUMNS", "FRAPPE_FIELDS", "IPINYOU_FIELDS"]

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
_DEFAULT_LABEL = {"avazu": "click", "csv": "label", "parquet": "label"}


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
