"""Raw string tokens -> per-field integer ids (:class:`FeatureEncoder`)."""
from __future__ import annotations

from collections import Counter
from itertools import repeat
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .readers import RawTable
from .table import CTRData

__all__ = ["FeatureEncoder"]

MISSING_ID = 0
OOV_ID = 1


def _hash_column(values: Sequence[Optional[str]], num_buckets: int, seed: int) -> np.ndarray:
    """Hash one column of tokens to ids in ``[0, num_buckets)``.

    Contract (the native ``fastkd.hashing.hash_strings(values, num_buckets, seed)`` must match it
    bit for bit): ``None`` or ``""`` -> 0; any other string ``v`` ->
    ``1 + xxhash.xxh3_64_intdigest(v.encode("utf-8"), seed) % (num_buckets - 1)``.

    Args:
        values: sequence / object array of ``str`` or ``None``.
        num_buckets: total ids including the missing id 0; >= 2.
        seed: 64-bit unsigned xxh3 seed.

    Returns:
        int64 array ``[len(values)]``.
    """
    from fastkd import hashing  # natively, or in its pure-Python twin when the extension is not built

    # the reserved-0 contract above is FeatureHasher's bucket0 mode: one bucket rule for both
    return hashing._hash_field(values, num_buckets, seed)


class FeatureEncoder:
    """Per-field vocabulary or hashing encoder from :class:`RawTable` tokens to :class:`CTRData` ids.

    Id layout:

    * ``kind="vocab"``: id 0 = missing (``None`` or ``""``), id 1 = out-of-vocabulary (unseen at
      fit time, or seen fewer than ``min_count`` times), ids ``2..`` = known values sorted by
      descending count, ties by value string (deterministic, independent of row order and chunking).
      ``field_sizes[f] = 2 + number of known values``.
    * ``kind="hash"``: id 0 = missing; a present value ``v`` of field ``f`` gets
      ``1 + xxh3_64(utf8(v), seed=seed + f) % (num_buckets[f] - 1)``
      (``xxhash.xxh3_64_intdigest``). ``field_sizes = num_buckets``. No vocabulary is stored.

    Fitting is streaming: :meth:`fit` accepts one table or an iterable of chunks (e.g.
    :func:`~fastkd.data.iter_table`) and gives the same result either way.

    Args:
        kind: ``"vocab"`` or ``"hash"``.
        min_count: vocab only; values seen fewer times map to OOV.
        num_buckets: hash only (required); one int for all fields or one per field (each >= 2).
        seed: hash only; field ``f`` uses xxh3 seed ``seed + f``.

    Example:
        >>> enc = FeatureEncoder("vocab", min_count=2).fit(iter_table("criteo:train.txt.gz"))  # doctest: +SKIP
        >>> data = enc.transform(read_table("criteo:test.txt.gz"))                             # doctest: +SKIP
        >>> json.dump(enc.state_dict(), open("encoder.json", "w"))                             # doctest: +SKIP
    """

    _STATE_VERSION = 1

    def __init__(self, kind: str = "vocab", min_count: int = 1,
                 num_buckets: Union[None, int, Sequence[int]] = None, seed: int = 0):
        if kind not in ("vocab", "hash"):
            raise ValueError(f"kind must be 'vocab' or 'hash', got {kind!r}")
        if not isinstance(min_count, (int, np.integer)) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if kind == "hash":
            if num_buckets is None:
                raise ValueError("kind='hash' needs num_buckets (an int, or one int per field)")
            nb = [num_buckets] if isinstance(num_buckets, (int, np.integer)) else list(num_buckets)
            if not nb or any(not isinstance(b, (int, np.integer)) or b < 2 for b in nb):
                raise ValueError(f"num_buckets must be int(s) >= 2, got {num_buckets!r}")
        elif num_buckets is not None:
            raise ValueError("num_buckets is only used with kind='hash'")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.kind = kind
        self.min_count = int(min_count)
        self.num_buckets = (int(num_buckets) if isinstance(num_buckets, (int, np.integer))
                            else None if num_buckets is None else [int(b) for b in num_buckets])
        self.seed = int(seed)
        self._field_names: Optional[List[str]] = None
        self._vocabs: Optional[List[Dict[str, int]]] = None  # value -> id (vocab kind)
        self._lookups: Optional[List[Dict[Optional[str], int]]] = None  # vocab plus missing tokens -> 0
        self._sizes: Optional[List[int]] = None

    # ------------------------------------------------------------------ properties
    @property
    def fitted(self) -> bool:
        return self._field_names is not None

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("FeatureEncoder is not fitted: call fit() or load_state_dict() first")

    @property
    def field_names(self) -> List[str]:
        self._check_fitted()
        return list(self._field_names)

    @property
    def field_sizes(self) -> List[int]:
        self._check_fitted()
        return list(self._sizes)

    def __repr__(self) -> str:
        state = f"fields={len(self._field_names)}, sizes={self._sizes}" if self.fitted else "unfitted"
        return f"FeatureEncoder(kind={self.kind!r}, {state})"

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def _tables(tables) -> Iterable[RawTable]:
        if isinstance(tables, RawTable):
            return [tables]
        if isinstance(tables, (str, bytes)) or not hasattr(tables, "__iter__"):
            raise TypeError(f"expected a RawTable or an iterable of RawTables, got {type(tables).__name__}")
        return tables

    def _hash_sizes(self, n_fields: int) -> List[int]:
        if isinstance(self.num_buckets, int):
            return [self.num_buckets] * n_fields
        if len(self.num_buckets) != n_fields:
            raise ValueError(f"num_buckets has {len(self.num_buckets)} entries but the data has {n_fields} fields")
        return list(self.num_buckets)

    def fit(self, tables: Union[RawTable, Iterable[RawTable]]) -> "FeatureEncoder":
        """Learn field names and (vocab) per-field vocabularies; re-fitting starts from scratch.

        Args:
            tables: a :class:`RawTable` or an iterable of chunks with identical fields.

        Returns:
            ``self``.
        """
        names, counts = self._count(tables)
        if names is None:
            raise ValueError("fit() got no tables")
        return self._fit_counts(names, counts)

    def _count(self, tables) -> Tuple[Optional[List[str]], List[Counter]]:
        """Field names and (vocab) per-field value counts of ``tables``; ``(None, [])`` if empty.

        Counts of disjoint parts of a source add up to the counts of the whole, which is what a
        sharded fit (:func:`fastkd.data.load` under torch.distributed) relies on.
        """
        names: Optional[List[str]] = None
        counts: List[Counter] = []
        for i, t in enumerate(self._tables(tables)):
            if not isinstance(t, RawTable):
                raise TypeError(f"item {i} is a {type(t).__name__}, expected RawTable")
            if names is None:
                names = list(t.field_names)
                counts = [Counter() for _ in names]
            elif t.field_names != names:
                raise ValueError(f"chunk {i} has fields {t.field_names}, expected {names}")
            if self.kind == "hash":
                if isinstance(tables, RawTable) or not hasattr(tables, "__next__"):
                    continue
                break  # an iterator of chunks: the names are all hashing needs
            for f, col in enumerate(t.columns):
                counts[f].update(col)
        return names, counts

    def _fit_counts(self, names: List[str], counts: List[Counter]) -> "FeatureEncoder":
        if self.kind == "hash":
            self._sizes = self._hash_sizes(len(names))
            self._vocabs = self._lookups = None
        else:
            vocabs = []
            for f, c in enumerate(counts):
                c.pop(None, None)
                c.pop("", None)
                bad = [k for k in c if not isinstance(k, str)]
                if bad:
                    raise TypeError(f"field {names[f]!r} has non-string values such as {bad[0]!r}; "
                                    "RawTable tokens must be str or None")
                known = sorted((k for k, n in c.items() if n >= self.min_count), key=lambda k: (-c[k], k))
                vocabs.append({k: i + 2 for i, k in enumerate(known)})
            self._set_vocabs(vocabs)
        self._field_names = list(names)
        return self

    def _set_vocabs(self, vocabs: List[Dict[str, int]]) -> None:
        self._vocabs = vocabs
        self._lookups = [{None: MISSING_ID, "": MISSING_ID, **v} for v in vocabs]
        self._sizes = [2 + len(v) for v in vocabs]

    # ------------------------------------------------------------------ transform
    def _transform_one(self, t: RawTable) -> CTRData:
        if t.field_names != self._field_names:
            raise ValueError(f"table fields {t.field_names} differ from the fitted fields {self._field_names}")
        n = len(t)
        ids = np.empty((n, len(self._field_names)), dtype=np.int64)
        for f, col in enumerate(t.columns):
            if self.kind == "hash":
                ids[:, f] = _hash_column(col, self._sizes[f], self.seed + f)
            else:
                # map() with a default keeps the per-value loop in C; missing tokens are keys too.
                ids[:, f] = np.fromiter(map(self._lookups[f].get, col, repeat(OOV_ID)), dtype=np.int64, count=n)
        return CTRData(ids, t.labels, list(self._field_names), list(self._sizes))

    def transform(self, tables: Union[RawTable, Iterable[RawTable]]) -> CTRData:
        """Encode a table (or the concatenation of an iterable of chunks).

        Args:
            tables: :class:`RawTable` or iterable of them, with the fitted field names.

        Returns:
            :class:`CTRData` with ``field_sizes`` of this encoder.

        Shape:
            ``ids``: ``[N, F]`` int64; ``labels``: ``[N]`` float32.
        """
        self._check_fitted()
        parts = [self._transform_one(t) for t in self._tables(tables)]
        if not parts:
            raise ValueError("transform() got no tables")
        return parts[0] if len(parts) == 1 else CTRData.concat(parts)

    def fit_transform(self, table: RawTable) -> CTRData:
        """``fit(table)`` then ``transform(table)`` (one in-memory table; for streams use both separately)."""
        if not isinstance(table, RawTable):
            raise TypeError("fit_transform takes one RawTable; for chunk streams call fit() then transform()")
        return self.fit(table).transform(table)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: settings, field names, sizes and (vocab) the known values in id order."""
        self._check_fitted()
        return {
            "version": self._STATE_VERSION,
            "kind": self.kind,
            "min_count": self.min_count,
            "num_buckets": self.num_buckets,
            "seed": self.seed,
            "field_names": list(self._field_names),
            "field_sizes": list(self._sizes),
            # vocab[f][i] has id i + 2
            "vocabs": None if self._vocabs is None else [list(v) for v in self._vocabs],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> "FeatureEncoder":
        """Restore from :meth:`state_dict` output (settings included). Returns ``self``."""
        if state.get("version") != self._STATE_VERSION:
            raise ValueError(f"unsupported FeatureEncoder state version {state.get('version')!r}")
        fresh = FeatureEncoder(state["kind"], state["min_count"], state["num_buckets"], state["seed"])
        self.__dict__.update(fresh.__dict__)
        self._field_names = list(state["field_names"])
        if self.kind == "vocab":
            self._set_vocabs([{k: i + 2 for i, k in enumerate(v)} for v in state["vocabs"]])
        else:
            self._sizes = self._hash_sizes(len(self._field_names))
        if list(state["field_sizes"]) != self._sizes:
            raise ValueError("inconsistent state: field_sizes do not match the vocabularies / num_buckets")
        return self

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "FeatureEncoder":
        """New encoder restored from :meth:`state_dict` output."""
        return cls().load_state_dict(state)
