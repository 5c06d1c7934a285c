"""Encoding rate of a Criteo-shaped file: fastkd's native hashing path against polars, same run.

Both read the same tab-separated file from the page cache and turn its 39 feature columns into
per-field bucket ids:

* fastkd: ``fastkd.data.readers.native.iter_criteo_hashed`` (read, split, check every line, the
  Criteo numeric rule, xxh3 per field, exact modulo) into int64 ``[N, 39]`` blocks;
* polars: ``pl.read_csv`` (every column as a string) then ``pl.col(c).hash(seed=f) % buckets``
  for the 39 columns, materialised (no numeric rule: polars does strictly less work).

Rounds alternate between the two; the median of ``--rounds`` is reported as rows/s with the
ratio. Threads: ``--threads`` for both (``POLARS_MAX_THREADS`` is set before polars is imported).

    python bench/encode_rate.py runs/criteo_1m.txt [--threads 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a Criteo-shaped file (python -m fastkd.data.criteo_like --out ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--buckets", type=int, default=1_000_003)
    args = ap.parse_args(argv)
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)
    from fastkd.data import FeatureEncoder, iter_table
    from fastkd.data.readers.native import iter_criteo_hashed, native_available

    if not native_available():
        print("the native extension is not built", file=sys.stderr)
        return 2
    enc = FeatureEncoder("hash", num_buckets=args.buckets).fit(iter_table(f"criteo:{args.path}", chunk_rows=1000))

    def fastkd_round() -> int:
        return sum(len(lab) for _, lab, _ in iter_criteo_hashed([args.path], enc, num_threads=args.threads))

    try:
        import polars as pl
    except ImportError:
        pl = None

    def polars_round() -> int:
        names = ["label"] + [f"c{i}" for i in range(39)]
        df = pl.read_csv(args.path, separator="\t", has_header=False, new_columns=names,
                         schema_overrides={n: pl.Utf8 for n in names}, quote_char=None)
        out = df.select([(pl.col(f"c{i}").hash(seed=i) % args.buckets).alias(f"c{i}") for i in range(39)])
        return out.height

    times = {"fastkd": [], "polars": []}
    rows = 0
    for _ in range(args.rounds):
        for name, fn in (("fastkd", fastkd_round), ("polars", polars_round)):
            if fn is polars_round and pl is None:
                continue
            t0 = time.perf_counter()
            rows = fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: rows / statistics.median(v) for k, v in times.items() if v}
    print(f"{args.path}: {rows:,} rows, {args.threads} threads, median of {args.rounds}")
    for k, r in rate.items():
        print(f"  {k:7s} {r:12,.0f} rows/s")
    if "polars" in rate:
        print(f"  fastkd / polars: {rate['fastkd'] / rate['polars']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
