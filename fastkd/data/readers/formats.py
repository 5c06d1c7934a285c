"""One reader per data kind (criteo, avazu, libfm, csv, parquet): files -> :class:`RawTable` chunks.

The kinds and their malformed-row rules are described in :mod:`fastkd.data.readers`, whose
:func:`~fastkd.data.readers.iter_table` dispatches here through ``_READERS``.
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .criteo import CRITEO_CATEGORICAL, CRITEO_NUMERIC, _read_criteo
from .report import EXPECTED
from .raw import _Chunk, _finish_chunk, _open_text, _select, _text_chunks

__all__ = ["CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "AVAZU_COLUMNS", "FRAPPE_FIELDS", "IPINYOU_FIELDS"]

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


#: Non-empty lines at the start of a libFM source whose majority entry count fixes its width.
LIBFM_WIDTH_SAMPLE = 1000


def _libfm_width(paths, sample: int = LIBFM_WIDTH_SAMPLE) -> Optional[int]:
    """Entries per line of a libFM source: the most common count among the first ``sample``
    non-empty lines (across its files, in order) whose label and entries parse; a tie goes to the
    count seen first. One odd line (a short first line, say) cannot fix the width of the others.

    Returns None for a source with no non-empty line; raises ``ValueError`` naming the file when
    none of the lines looked at parses (most likely another kind read as libfm).
    """
    widths: Counter = Counter()
    seen = 0
    first_bad = None
    for path in paths:
        with _open_text(path) as fh:
            for line_no, raw in enumerate(fh, 1):
                line = raw.rstrip("\r\n")
                if not line:
                    continue
                seen += 1
                parsed = _libfm_line(line)
                if isinstance(parsed, str):
                    reason = parsed
                elif not _is_float(parsed[0]):
                    reason = f"unparsable label {parsed[0][:40]!r}"
                else:
                    widths[len(parsed[1])] += 1
                    reason = None
                if reason is not None and first_bad is None:
                    first_bad = (path, line_no, reason)
                if seen >= sample:
                    break
        if seen >= sample:
            break
    if widths:
        return widths.most_common(1)[0][0]
    if seen:
        path, line_no, reason = first_bad
        raise ValueError(f"{', '.join(paths)}: none of the first {seen} non-empty lines is a libfm row "
                         f"('label idx:val idx:val ...'; {path}:{line_no}: {reason}); is the kind in the spec "
                         f"right (criteo, avazu, csv, ...)?")
    return None


def _read_libfm(paths, chunk_rows, strict, label, numeric, columns, units):
    if numeric:
        raise ValueError("numeric= does not apply to kind 'libfm' (tokens are feature indices)")
    if columns is not None and len(set(columns)) != len(columns):
        raise ValueError(f"columns has duplicates: {list(columns)}")
    # The schema (columns=) or the majority of the source's first lines fixes the width, the same
    # on every shard and whatever chunk_rows is.
    width = len(columns) if columns is not None else _libfm_width(paths)
    if width is None:  # no non-empty line in any file: no rows
        return
    names = list(columns) if columns is not None else [f"f{i}" for i in range(width)]
    for path in paths:
        with _open_text(path) as fh:
            for nos, lines in _text_chunks(fh, chunk_rows, units):
                ch = _Chunk(path, units)
                ch.n_read = len(lines)
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
                yield _finish_chunk(ch, names, [False] * width, strict)


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
            try:
                header = next(csv.reader([first.rstrip("\r\n")], delimiter=delim))
            except csv.Error as e:
                raise ValueError(f"{path}:1: {_csv_reason(e)}") from None
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
                    if sum(1 for _ in _csv_rows(reader, chunk_rows)) < chunk_rows:
                        break
                    continue
                ch = _Chunk(path, units)
                got = 0
                for row in _csv_rows(reader, chunk_rows):
                    got += 1
                    line_no = reader.line_num + start_line
                    if isinstance(row, csv.Error):
                        ch.n_read += 1
                        ch.bad.append((line_no, _csv_reason(row)))
                        continue
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
        raise ValueError(f"{', '.join(paths)}: no data rows (the file is empty); expected "
                         f"{EXPECTED['avazu' if avazu else 'csv']}")


def _csv_rows(reader, n: int) -> Iterator:
    """Up to ``n`` rows of a ``csv.reader``; a row it refuses comes as its ``csv.Error`` (the reader
    goes on at the next line)."""
    for _ in range(n):
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield e


def _csv_reason(e: csv.Error) -> str:
    if "new-line character" in str(e):  # csv's own hint (universal-newline mode) is the wrong advice here
        return "'\\r' inside an unquoted field (quote the field; lines end at '\\n' or '\\r\\n')"
    return f"csv: {e}"


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


def _checked(path, batches, pa):
    """``batches`` (a Parquet file's record batches) whose decoding errors (corrupt pages, bad
    compression) name the file."""
    try:
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: corrupt Parquet data ({e})") from None


def _read_parquet(paths, chunk_rows, strict, label, numeric, columns, units):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or fastkd[data])") from e
    numeric = list(numeric)
    out_names: Optional[List[str]] = None
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
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
            for batch in _checked(path, pf.iter_batches(batch_size=chunk_rows, columns=cols), pa):
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
                for part, batch in enumerate(_checked(path, pf.iter_batches(batch_size=chunk_rows, row_groups=[g],
                                                                            columns=cols), pa)):
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
