"""Raw rows -> ids at serving time: :class:`RawRowEncoder`, the fitted
:class:`~fastkd.data.FeatureEncoder` plus the per-field rules the readers apply before it
(numeric bucketing, Avazu's hour), saved as one JSON file (``encoder.json``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..atomic import atomic_write_json
from ..data.encoder import FeatureEncoder
from ..data.readers import RawTable, bucketize_numeric
from ..data.readers.formats import CRITEO_NUMERIC, _avazu_hour

__all__ = ["RawRowEncoder", "ENCODER_FILE", "field_rules"]

ENCODER_FILE = "encoder.json"
_FORMAT, _FORMAT_VERSION = "fastkd.raw_row_encoder", 1
#: what a field's raw value goes through before the vocabulary or hash: ``token`` (the value as a
#: string), ``numeric`` (:func:`~fastkd.data.readers.bucketize_numeric`), ``avazu_hour``
#: (``YYMMDDHH`` -> ``HH``)
RULES = ("token", "numeric", "avazu_hour")


def field_rules(kind: str, field_names: Sequence[str], numeric: Sequence[str] = ()) -> List[str]:
    """The rule of each field for data read as ``kind`` (the ``KIND`` of a ``KIND:PATH`` spec),
    as the readers apply it: Criteo's ``I1..I13`` and the ``numeric`` columns are bucketised,
    Avazu's ``hour`` keeps its hour of day (unless listed as numeric), everything else is a token."""
    kind = kind.lower()
    num = set(CRITEO_NUMERIC) if kind == "criteo" else set(numeric)
    return ["numeric" if n in num else "avazu_hour" if kind == "avazu" and n == "hour" else "token"
            for n in field_names]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "") or (isinstance(v, float) and math.isnan(v))


class RawRowEncoder:
    """Raw field values -> the ids the model was trained on, exactly as ``fastkd distill`` encoded
    its data files.

    Per field, by its rule (:data:`RULES`):

    * ``token``: ``None``, ``""`` and NaN are missing (id 0); any other value is ``str(value)``
      (so give values as the data file spells them: ``"3"`` and ``3`` are the same token,
      ``3.0`` is not);
    * ``numeric``: ``float(value)`` bucketised as the readers do (missing as above; an
      unparsable or infinite value is an error);
    * ``avazu_hour``: ``YYMMDDHH`` -> ``HH`` (anything else is an error);

    then the fitted :class:`~fastkd.data.FeatureEncoder` (vocabulary: unseen values get the
    out-of-vocabulary id 1; or hashing).

    Args:
        encoder: the fitted encoder of the training data.
        rules: one rule per field (default: ``token`` for every field); see :func:`field_rules`.

    Example:
        >>> from fastkd.data.readers import RawTable
        >>> table = RawTable([1, 0], [["a", "b"], ["x", None]], ["site", "app"], [False, False])
        >>> enc = RawRowEncoder(FeatureEncoder().fit(table))
        >>> enc.encode([{"site": "b", "app": "x"}, {"site": "zzz"}]).tolist()
        [[3, 2], [1, 0]]
    """

    def __init__(self, encoder: FeatureEncoder, rules: Optional[Sequence[str]] = None) -> None:
        if not isinstance(encoder, FeatureEncoder) or not encoder.fitted:
            raise TypeError("RawRowEncoder needs a fitted fastkd.data.FeatureEncoder")
        names = encoder.field_names
        rules = ["token"] * len(names) if rules is None else list(rules)
        if len(rules) != len(names):
            raise ValueError(f"{len(rules)} rules for {len(names)} fields")
        bad = [r for r in rules if r not in RULES]
        if bad:
            raise ValueError(f"unknown field rule {bad[0]!r}; expected one of {RULES}")
        self.encoder = encoder
        self.rules = rules

    @property
    def field_names(self) -> List[str]:
        return self.encoder.field_names

    @property
    def field_sizes(self) -> List[int]:
        return self.encoder.field_sizes

    # ------------------------------------------------------------------ encoding
    def _column(self, f: int, values: Sequence[Any]) -> np.ndarray:
        rule, name = self.rules[f], self.field_names[f]
        if rule == "numeric":
            x = np.empty(len(values), dtype=np.float64)
            for i, v in enumerate(values):
                try:
                    x[i] = math.nan if _missing(v) else float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"row {i}, field {name!r}: non-numeric value {str(v)[:40]!r}") from None
                if math.isinf(x[i]):
                    raise ValueError(f"row {i}, field {name!r}: non-finite value {v!r}")
            return bucketize_numeric(x)
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            out[i] = None if _missing(v) else v if isinstance(v, str) else str(v)
        if rule == "avazu_hour":  # the reader's own rule, so served rows encode as the file's did
            out, bad = _avazu_hour(out)
            if bad:
                i = min(bad)
                raise ValueError(f"row {i}, field {name!r}: {bad[i]}")
        return out

    def encode(self, rows: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]) -> np.ndarray:
        """Ids ``[N, F]`` int64 of raw rows, in the field order of :attr:`field_names`.

        Args:
            rows: a list of ``{field: value}`` dicts (a field left out is missing), or one
                ``{field: sequence of N values}`` of columns (every field present). A name that
                is not a field is an error (a typo would otherwise encode as missing).
        """
        names = self.field_names
        if isinstance(rows, Mapping):
            unknown = [k for k in rows if k not in names]
            absent = [n for n in names if n not in rows]
            if unknown or absent:
                raise ValueError(f"columns {unknown or absent} are not the fields {names}"
                                 if unknown else f"columns {absent} missing (fields: {names})")
            scalar = [k for k in names if isinstance(rows[k], (str, bytes)) or not hasattr(rows[k], "__len__")]
            if scalar:
                # one row given as a dict of values would read each string as a column of characters
                raise ValueError(f"a dict of columns needs a sequence of values per field; {scalar[:3]} hold a "
                                 "single value: pass one row as [{field: value, ...}]")
            cols = [list(rows[n]) for n in names]
            n = len(cols[0]) if cols else 0
            if any(len(c) != n for c in cols):
                raise ValueError(f"columns differ in length: {[len(c) for c in cols]}")
        else:
            rows = list(rows)
            for i, r in enumerate(rows):
                if not isinstance(r, Mapping):
                    raise TypeError(f"row {i} is a {type(r).__name__}, expected a {{field: value}} mapping")
                unknown = [k for k in r if k not in names]
                if unknown:
                    raise ValueError(f"row {i}: {unknown} are not fields ({names})")
            n = len(rows)
            cols = [[r.get(name) for r in rows] for name in names]
        table = RawTable(np.zeros(n, np.float32), [self._column(f, c) for f, c in enumerate(cols)], list(names),
                         [r == "numeric" for r in self.rules])
        return self.encoder.transform(table).ids

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable: the encoder's :meth:`~fastkd.data.FeatureEncoder.state_dict` and the rules."""
        return {"format": _FORMAT, "format_version": _FORMAT_VERSION, "rules": list(self.rules),
                "encoder": self.encoder.state_dict()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "RawRowEncoder":
        if state.get("format") != _FORMAT or state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"not a fastkd raw-row encoder state (format {state.get('format')!r}, version "
                             f"{state.get('format_version')!r}; expected {_FORMAT!r}, {_FORMAT_VERSION})")
        try:
            return cls(FeatureEncoder.from_state_dict(state["encoder"]), state["rules"])
        except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or partial state: name what is wrong
            raise ValueError(f"raw-row encoder state is incomplete or malformed ({type(e).__name__}: {e})") from None

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`state_dict` as JSON (atomically)."""
        atomic_write_json(path, self.state_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RawRowEncoder":
        """Read a file written by :meth:`save`; a file that is not one names itself in the error."""
        path = Path(path)
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return cls.from_state_dict(state)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a readable raw-row encoder: {type(e).__name__}: {e}") from None
