"""The criteo reader: ``label<TAB>I1..I13<TAB>C1..C26`` lines -> :class:`RawTable` chunks.

One parsing rule (:func:`criteo_chunk`) serves the Python reader and the lines the native hasher
(:mod:`fastkd.data.readers.native`) leaves to Python, so both paths keep and reject the same rows.
"""
from __future__ import annotations

from typing import List, Tuple

from .raw import _Chunk, _finish_chunk, _open_text, _select, _text_chunks

__all__ = ["CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "criteo_fields", "criteo_chunk"]

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]


def criteo_fields(numeric, columns) -> Tuple[List[str], List[int], List[bool]]:
    """``(names, selected column indices among I1..I13 C1..C26, numeric flags)`` of a criteo read."""
    if numeric:
        raise ValueError("numeric= does not apply to kind 'criteo' (I1..I13 are always numeric)")
    names_all = CRITEO_NUMERIC + CRITEO_CATEGORICAL
    sel = _select(names_all, columns, "criteo")
    return [names_all[i] for i in sel], sel, [i < 13 for i in sel]


def criteo_chunk(path: str, units, nos, lines: List[str], columns, strict: bool):
    """The :class:`RawTable` of criteo ``lines`` (their 1-based numbers ``nos``): the one parsing
    rule, used by the reader and by the native encoder for the lines it leaves to Python."""
    names, sel, is_num = criteo_fields((), columns)
    all_sel = columns is None
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
    return _finish_chunk(ch, names, is_num, strict)


def _read_criteo(paths, chunk_rows, strict, label, numeric, columns, units):
    criteo_fields(numeric, columns)  # argument errors before any file is opened
    for path in paths:
        with _open_text(path) as fh:
            for nos, lines in _text_chunks(fh, chunk_rows, units):
                yield criteo_chunk(path, units, nos, lines, columns, strict)
