r"""Streaming readers: files -> :class:`RawTable` chunks of raw string tokens.

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
    it is 1 in all one-hot CTR data). Every line must have ``len(columns)`` entries if ``columns`` is
    given, else as many as most of the source's first 1,000 non-empty lines whose label and entries
    parse (:data:`~fastkd.data.readers.formats.LIBFM_WIDTH_SAMPLE`; a tie goes to the count seen
    first); other lines are malformed. If none of those lines parses, the read stops with a
    ``ValueError`` naming the file (another kind read as libfm).
``csv``
    Generic delimited text with a header row. The delimiter is ``,`` unless the header contains a
    tab and no comma (then tab). The label column is named by ``label=`` (default ``"label"``);
    every other column (or those in ``columns=``) is a categorical field unless named in ``numeric=``.
``parquet``
    Like ``csv``, read with pyarrow in record batches. Line numbers in reports are 1-based row numbers.

Text files may be gzip-compressed (detected by the magic bytes, whatever the extension); text is
decoded as UTF-8 (a leading BOM is dropped, undecodable bytes become U+FFFD). Empty lines are ignored.

Line ends: a line ends at ``\n``; a ``\r`` right before it is dropped, so CRLF (Windows) files read
exactly like LF files. Any other ``\r`` is data, never a line end, so it cannot shift the line
numbers of later rows: in ``libfm`` it separates entries like other whitespace, in ``criteo`` it stays
in its field's token, in ``csv``/``avazu`` it stays in a quoted field and makes its row malformed in an
unquoted one. A file whose first 64 KiB hold ``\r`` but no ``\n`` (old Mac line ends) raises
``ValueError``.

Malformed rows (wrong field count, label not one of 0/1/-1, non-numeric value in a numeric field, bad
avazu ``hour``, a row the csv module refuses) are skipped and counted in :class:`ReadReport` (with the
first five as ``(file, line, reason)``), or raise ``ValueError("FILE:LINE: reason")`` with
``strict=True``. :func:`~fastkd.data.load` goes further: it puts the whole read's report on the
returned data (``CTRData.read_report``), warns (:class:`MalformedRowsWarning`) when rows were
skipped, and raises ``ValueError`` when more than ``max_bad_rows`` (default
:data:`DEFAULT_MAX_BAD_ROWS`, 1 % of the rows read) were, when every row was malformed (the wrong
kind), or when there was no data row at all.

Layout: the entry points are here; :mod:`fastkd.data.readers.formats` holds one reader per kind and
:mod:`fastkd.data.readers.raw` the chunks (:class:`RawTable`, :class:`ReadReport`) and parsing helpers.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Tuple

from .formats import (_DEFAULT_LABEL, _READERS, AVAZU_COLUMNS, CRITEO_CATEGORICAL, CRITEO_NUMERIC, FRAPPE_FIELDS,
                      IPINYOU_FIELDS)
from .raw import KINDS, RawTable, _Units, bucketize_numeric, parse_spec
from .report import DEFAULT_MAX_BAD_ROWS, EXPECTED, MalformedRowsWarning, ReadReport

__all__ = [
    "ReadReport", "RawTable", "MalformedRowsWarning", "DEFAULT_MAX_BAD_ROWS", "iter_table", "read_table",
    "parse_spec", "bucketize_numeric", "KINDS", "CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "AVAZU_COLUMNS", "FRAPPE_FIELDS", "IPINYOU_FIELDS",
]


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

    Malformed rows are in the returned table's :attr:`~RawTable.report` only: no warning and no
    ``max_bad_rows`` limit here (:func:`~fastkd.data.load` adds both).

    Args: as :func:`iter_table`.

    Example:
        >>> t = read_table("libfm:frappe.validation.libfm.gz,frappe.test.libfm.gz")  # doctest: +SKIP
        >>> print(t.report)                                                            # doctest: +SKIP
        frappe.validation.libfm.gz+frappe.test.libfm.gz: 86582 rows, 0 malformed
    """
    parts = list(iter_table(spec, chunk_rows=chunk_rows, strict=strict, label=label, numeric=numeric,
                            columns=columns))
    if not parts:
        kind, paths = parse_spec(spec)
        raise ValueError(f"{', '.join(paths)}: no data rows (the file is empty or holds only a header); "
                         f"expected {EXPECTED[kind]}")
    return RawTable.concat(parts)
