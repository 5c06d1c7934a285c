"""Data for fastkd: readers for CTR files, feature encoding, synthetic data.

Pipeline: ``iter_table`` / ``read_table`` (file -> :class:`RawTable` of string tokens, with a
:class:`ReadReport`) -> :class:`FeatureEncoder` (tokens -> per-field ids) -> :class:`CTRData`
(model-ready int64 ids + float32 labels). :func:`load` does all of it in one call (the read's
report on ``CTRData.read_report``, a :class:`MalformedRowsWarning` for skipped rows),
:func:`cached_split` does it once into a memory-mapped cache on disk (large data), and
:func:`make_synthetic` draws data from a known hidden click model.

Example:
    >>> from fastkd.data import load, make_synthetic
    >>> data = make_synthetic(20_000, seed=0)
    >>> train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)
    >>> len(train), len(valid), len(test)
    (16000, 2000, 2000)
"""
from .encoded_cache import cached_split, open_cache
from .encoder import FeatureEncoder
from .loading import load
from .readers import (AVAZU_COLUMNS, CRITEO_CATEGORICAL, CRITEO_NUMERIC, DEFAULT_MAX_BAD_ROWS, FRAPPE_FIELDS,
                      IPINYOU_FIELDS, KINDS, MalformedRowsWarning, RawTable, ReadReport, bucketize_numeric, iter_table,
                      parse_spec, read_table)
from .synthetic import default_cardinalities, make_synthetic
from .table import CTRData

__all__ = [
    "CTRData", "RawTable", "ReadReport", "MalformedRowsWarning", "DEFAULT_MAX_BAD_ROWS", "FeatureEncoder",
    "iter_table", "read_table", "load", "cached_split", "open_cache", "make_synthetic",
    "parse_spec", "bucketize_numeric", "default_cardinalities",
    "KINDS", "CRITEO_NUMERIC", "CRITEO_CATEGORICAL", "AVAZU_COLUMNS", "FRAPPE_FIELDS", "IPINYOU_FIELDS",
]
