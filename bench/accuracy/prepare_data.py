"""Derived datasets for the accuracy suite, written outside git (default ``runs/data/``).

The real samples in ``../shared/data`` are research-only and stay there; this writes only what
the suite cannot read directly:

* ``frappe_log.csv.gz``: Frappe's raw usage log (96,203 rows, ``frappe_raw_log.csv.gz``) as a CTR
  table: the 10 context/user/item columns as categorical fields, label 1 when the app's usage
  count ``cnt`` is above the log's median (8), i.e. "heavy use" (positive rate 0.49). A second
  real dataset with user and item ids, unlike the libFM Frappe in its label.

Usage: ``python bench/accuracy/prepare_data.py [--shared ../shared/data] [--out runs/data]``
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path

MEDIAN_CNT = 8  # median of cnt over the 96,203 rows (cnt > 8: 48.7 % of rows)


def frappe_log(shared: Path, out: Path) -> Path:
    from fastkd.atomic import atomic_write

    src = shared / "frappe" / "frappe_raw_log.csv.gz"
    dst = out / "frappe_log.csv.gz"

    def write(fh) -> None:
        # mtime=0: the same bytes on every run (two suites may write the file at once)
        with gzip.open(src, "rt", encoding="utf-8") as fin, \
                io.TextIOWrapper(gzip.GzipFile(fileobj=fh, mode="wb", mtime=0), encoding="utf-8", newline="") as fout:
            reader = csv.reader(fin, delimiter="\t")
            header = next(reader)
            cnt = header.index("cnt")
            writer = csv.writer(fout)
            writer.writerow(["label"] + [h for i, h in enumerate(header) if i != cnt])
            for row in reader:
                label = int(int(row[cnt]) > MEDIAN_CNT)
                writer.writerow([label] + [v for i, v in enumerate(row) if i != cnt])

    # a temporary file of its own, then renamed: complete or absent, never half-written, and two
    # suites started together no longer rename each other's temporary file away
    atomic_write(dst, write)
    return dst


def main() -> None:
    here = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=here.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=here / "runs" / "data")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(frappe_log(args.shared, args.out))


if __name__ == "__main__":
    main()
