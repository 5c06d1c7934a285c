"""Criteo-shaped files of any size for scale tests: :func:`write_criteo_like`.

The real Criteo Kaggle file (45M rows) is not here, so the scale benchmark writes its own: lines
``label<TAB>I1..I13<TAB>C1..C26`` exactly as the ``criteo`` reader expects, integer fields drawn
heavy-tailed (some empty), categorical fields as 8-digit hex tokens with power-law popularity
(at most ``max_values`` distinct values per field, so embedding tables stay small), and a label
that a model can learn: ``P(click) = σ(b + Σ_f w_f[v_f] + u[v_0]·u[v_1] + 0.3·log1p(I1))`` over a
few fields, with ``b`` set for a ~25 % click rate.

Run as a command::

    python -m fastkd.data.criteo_like --rows 1000000 --out runs/criteo_1m.txt.gz

The file is written under a temporary name and renamed when complete (an interrupted run leaves
nothing a reader would take for data); progress with rows/s goes to stderr.
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..atomic import atomic_write

__all__ = ["write_criteo_like"]

N_INT, N_CAT = 13, 26
# categorical fields that carry signal (first-order), and the pair with an interaction
_SIGNAL_FIELDS = (0, 1, 2, 5, 8, 13)
_PAIR = (0, 1)


class _Model:
    """The hidden click model and the token tables, drawn once from ``seed``."""

    def __init__(self, seed: int, max_values: int) -> None:
        rng = np.random.default_rng(seed)
        self.cards = np.minimum(max_values, np.geomspace(max_values, 4, N_CAT).astype(int))
        # hex token per (field, value): distinct within a field
        self.tokens = [np.array([f"{t:08x}" for t in rng.choice(2**32, c, replace=False)]) for c in self.cards]
        self.weights = {f: rng.normal(0, 0.6, self.cards[f]) for f in _SIGNAL_FIELDS}
        self.u = [rng.normal(0, 0.5, self.cards[f]) for f in _PAIR]
        self.bias = -2.6

    def sample(self, rng: np.random.Generator, n: int):
        # value v of a field with c values: popularity ∝ 1/(v+1), by inverse-CDF on a Zipf-like table
        cats = np.empty((n, N_CAT), dtype=np.int64)
        for f, c in enumerate(self.cards):
            p = 1.0 / np.arange(1, c + 1)
            cats[:, f] = np.searchsorted(np.cumsum(p / p.sum()), rng.random(n), side="right").clip(max=c - 1)
        ints = np.floor(rng.lognormal(1.0, 1.6, (n, N_INT))).astype(np.int64)
        missing = rng.random((n, N_INT)) < 0.15
        logit = self.bias + 0.3 * np.log1p(ints[:, 0]) * ~missing[:, 0]
        for f, w in self.weights.items():
            logit += w[cats[:, f]]
        logit += self.u[0][cats[:, _PAIR[0]]] * self.u[1][cats[:, _PAIR[1]]]
        labels = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        return labels, ints, missing, cats


def _lines(model: _Model, labels, ints, missing, cats) -> str:
    int_cols = [np.where(missing[:, j], "", ints[:, j].astype(str)) for j in range(N_INT)]
    cat_cols = [model.tokens[f][cats[:, f]] for f in range(N_CAT)]
    cols = [np.where(labels, "1", "0")] + int_cols + cat_cols
    return "".join("\t".join(row) + "\n" for row in zip(*cols))


def write_criteo_like(path: Union[str, Path], rows: int, *, seed: int = 0, max_values: int = 10_000,
                      chunk_rows: int = 100_000, progress: Optional[bool] = None) -> Path:
    """Write ``rows`` Criteo-shaped lines to ``path`` (gzip when it ends in ``.gz``).

    Args:
        path: output file; written under a temporary name, renamed when complete.
        rows: number of lines (>= 1).
        seed: the hidden model's and the rows' seed (same arguments, same bytes).
        max_values: distinct values per categorical field at most (>= 4).
        chunk_rows: lines generated per step (memory is bounded by it, not by ``rows``).
        progress: rows/s and ETA on stderr (default: when stderr is a terminal).

    Example::

        >>> import tempfile, os
        >>> from fastkd.data import load
        >>> p = os.path.join(tempfile.mkdtemp(), "c.txt.gz")
        >>> _ = write_criteo_like(p, 500, max_values=50)
        >>> data = load(f"criteo:{p}")
        >>> len(data), data.num_fields
        (500, 39)
    """
    if int(rows) < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if int(max_values) < 4:
        raise ValueError(f"max_values must be >= 4, got {max_values}")
    path = Path(path)
    show = sys.stderr.isatty() if progress is None else progress
    model = _Model(seed, int(max_values))
    rng = np.random.default_rng([seed, 1])
    t0 = time.perf_counter()

    def write(fh) -> None:
        out = gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) if path.suffix == ".gz" else fh
        done = 0
        while done < rows:
            n = min(chunk_rows, rows - done)
            out.write(_lines(model, *model.sample(rng, n)).encode())
            done += n
            if show:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                print(f"\r{path.name}: {done:,}/{rows:,} rows, {rate:,.0f} rows/s, ETA {(rows - done) / rate:,.0f} s",
                      end="", file=sys.stderr, flush=True)
        if out is not fh:
            out.close()
        if show:
            print(file=sys.stderr)

    atomic_write(path, write)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastkd.data.criteo_like", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", required=True, help="output file (.gz: gzip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-values", type=int, default=10_000, help="distinct values per categorical field at most")
    args = p.parse_args(argv)
    try:
        write_criteo_like(args.out, args.rows, seed=args.seed, max_values=args.max_values, progress=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
