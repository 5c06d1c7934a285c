"""What a read saw, and whether it can be trusted: :class:`ReadReport` (row counts, the first
malformed rows), :func:`check_report` (``max_bad_rows``, empty data, the wrong kind) and
:class:`MalformedRowsWarning`."""
from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

__all__ = ["ReadReport", "MalformedRowsWarning", "DEFAULT_MAX_BAD_ROWS", "EXPECTED", "check_report",
           "check_max_bad_rows"]

_MAX_BAD = 5
#: What a row of each kind must look like (named by the empty-data and wrong-kind errors).
EXPECTED = {
    "criteo": "criteo rows: 'label<TAB>I1..I13<TAB>C1..C26', 40 tab-separated fields, no header",
    "avazu": "avazu rows: 24 comma-separated columns (id, click, hour, ...), header optional",
    "libfm": "libfm rows: 'label idx:val idx:val ...', the same number of entries on every line",
    "csv": "csv rows: delimited text with a header row naming the label column",
    "parquet": "parquet rows: a label column and feature columns",
}
#: :func:`~fastkd.data.load`'s default ``max_bad_rows``: up to 1 % of the rows read may be malformed
#: (skipped, counted, warned about); more stops the load with a ``ValueError``.
DEFAULT_MAX_BAD_ROWS = 0.01


class MalformedRowsWarning(UserWarning):
    """Malformed rows were skipped while reading (count, first line numbers and reasons in the message)."""


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

    def bad_lines(self) -> str:
        """The first malformed rows as ``"file:line: reason; ..."`` (empty if none)."""
        return "; ".join(f"{os.path.basename(f)}:{line}: {reason}" for f, line, reason in self.first_bad)

    def to_dict(self) -> dict:
        """JSON-ready form (``results.json`` of ``fastkd distill``)."""
        return {"files": list(self.files), "rows_read": self.rows_read, "rows_ok": self.rows_ok,
                "malformed": self.malformed,
                "first_bad": [{"file": f, "line": line, "reason": r} for f, line, r in self.first_bad]}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadReport":
        """The report :meth:`to_dict` wrote."""
        return cls(rows_read=int(d["rows_read"]), rows_ok=int(d["rows_ok"]), malformed=int(d["malformed"]),
                   first_bad=[(b["file"], int(b["line"]), b["reason"]) for b in d["first_bad"]],
                   files=list(d["files"]))


def check_max_bad_rows(max_bad_rows, what: str = "max_bad_rows") -> Union[int, float]:
    """``max_bad_rows`` checked: an int count ``>= 0`` or a float fraction of the rows read in ``[0, 1]``."""
    if isinstance(max_bad_rows, bool) or not isinstance(max_bad_rows, numbers.Real):
        raise ValueError(f"{what} must be a row count (int >= 0) or a fraction of the rows read (float in "
                         f"[0, 1]), got {max_bad_rows!r}")
    if isinstance(max_bad_rows, numbers.Integral):
        if max_bad_rows < 0:
            raise ValueError(f"{what} must be a row count >= 0 or a fraction in [0, 1], got {max_bad_rows!r}")
        return int(max_bad_rows)
    if not 0.0 <= max_bad_rows <= 1.0:  # False for NaN too
        raise ValueError(f"{what} as a float is a fraction of the rows read and must lie in [0, 1], got "
                         f"{max_bad_rows!r} (give a row count as an int)")
    return float(max_bad_rows)


def _limit_text(max_bad_rows: Union[int, float], allowed: int) -> str:
    if isinstance(max_bad_rows, float):
        return f"{max_bad_rows:g} ({max_bad_rows:.2%} of the rows read: {allowed} rows)"
    return f"{max_bad_rows} rows"


def check_report(report: ReadReport, kind: str, paths: Sequence[str], max_bad_rows: Union[int, float],
                 warn: bool = True, stacklevel: int = 2) -> None:
    """Errors for a read that cannot be trusted, a :class:`MalformedRowsWarning` for one that can.

    Raises ``ValueError`` naming the files when no data row was read (empty or header-only), when
    every row was malformed (most likely the wrong kind), or when more rows than ``max_bad_rows``
    (a count, or a fraction of ``report.rows_read``) were malformed; otherwise, with ``warn``,
    warns if any was (``stacklevel`` as :func:`warnings.warn`'s, counted from this function).
    """
    files = ", ".join(paths)
    if report.rows_read == 0:
        raise ValueError(f"{files}: no data rows (the file is empty or holds only a header); expected "
                         f"{EXPECTED[kind]}")
    first = f"; first: {report.bad_lines()}" if report.first_bad else ""
    if report.rows_ok == 0:
        one = f" (line {report.first_bad[0][1]}: {report.first_bad[0][2]})" if report.first_bad else ""
        raise ValueError(f"{files}: none of the {report.rows_read} rows read as {kind!r} is well formed{one}. "
                         f"Expected {EXPECTED[kind]}; is the kind in the spec right?")
    if report.malformed == 0:
        return
    allowed = max_bad_rows if isinstance(max_bad_rows, int) else math.floor(max_bad_rows * report.rows_read)
    if report.malformed > allowed:
        raise ValueError(f"{files}: {report.malformed} malformed rows of {report.rows_read} read "
                         f"({report.malformed / report.rows_read:.2%}), above the limit max_bad_rows="
                         f"{_limit_text(max_bad_rows, allowed)}{first}. Fix the data, or raise the limit "
                         "(load(max_bad_rows=...), fastkd distill --max-bad-rows)")
    if warn:
        warnings.warn(f"{files}: skipped {report.malformed} malformed row{'s' if report.malformed > 1 else ''} "
                      f"of {report.rows_read} read "
                      f"(limit max_bad_rows={_limit_text(max_bad_rows, allowed)}){first}", MalformedRowsWarning,
                      stacklevel=stacklevel)
