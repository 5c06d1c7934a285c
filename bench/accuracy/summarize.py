"""Tabulate the accuracy suite across datasets: one row per student setting, one column per dataset.

Each cell is the student's AUC gain over the plain DNN trained with the same rows and stopping
rule (its own plain row when the setting changes the plain DNN too), mean ± std over seeds of the
per-seed differences, and the share of the ensemble's gain over that plain DNN it keeps; a second
table gives the logloss differences (negative: better than the plain DNN).

A headline table comes first: per dataset, the teacher ensemble, the plain DNN, the default
student and the mean student (mean ± std of test AUC over seeds), the share of the ensemble's gain
over the plain DNN the default student keeps (ratio of the means), and the default student's
logloss against the plain DNN's.

Usage: ``python bench/accuracy/summarize.py docs/results [--markdown OUT.md] [--readme README.md]``
(``--readme`` rewrites the block between ``<!-- results:begin -->`` and ``<!-- results:end -->``).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np

ORDER = ["frappe", "frappe_log", "synthetic", "segmented", "criteo", "avazu"]



def _kept(share: float) -> str:
    """The share of the ensemble's gain kept; "–" where the ensemble is not above the plain DNN
    (no gain to keep)."""
    return "–" if not np.isfinite(share) else f"{share:.0%}"

def _records(folder: Path) -> List[dict]:
    for name in ("results.json", "results.partial.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return []


def _by_seed(records, pred) -> Dict[int, dict]:
    return {r["seed"]: r for r in records if pred(r)}


def _teacher_variant(variant: str) -> str:
    """The variant label of the teacher set a student row used."""
    for part in variant.split(", "):
        if part.startswith("teacher_folds="):
            return part
    return ""


def dataset_rows(records: List[dict]) -> Dict[str, dict]:
    """{setting label: {"dauc": [...], "dll": [...], "gain": [...], "auc": [...], "ll": [...]}}."""
    plain = defaultdict(dict)
    ens = defaultdict(dict)
    for r in records:
        if r["role"] == "student" and r["distill"] == "none":
            plain[r.get("variant", "")][r["seed"]] = r
        if r["role"] == "ensemble" and r["distill"] == "mean":
            ens[r.get("variant", "")][r["seed"]] = r
    out: Dict[str, dict] = {}
    for r in records:
        if r["role"] != "student" or r["distill"] == "none":
            continue
        v = r.get("variant", "")
        label = (r.get("gate") or r["distill"]) + (f" [{v}]" if v else "")
        p = plain[v] if v in plain else plain[""]
        e = ens[_teacher_variant(v)] if _teacher_variant(v) in ens else ens[""]
        s = r["seed"]
        if s not in p or s not in e:
            continue
        row = out.setdefault(label, defaultdict(list))
        row["auc"].append(r["auc"])
        row["ll"].append(r["logloss"])
        row["dauc"].append(r["auc"] - p[s]["auc"])
        row["dll"].append(r["logloss"] - p[s]["logloss"])
        row["gain"].append(e[s]["auc"] - p[s]["auc"])
    return out


def _cell(vals, scale=1.0, digits=4) -> str:
    a = np.asarray(vals, dtype=float) * scale
    if len(a) == 0:
        return "–"
    sd = f" ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else ""
    return f"{a.mean():+.{digits}f}{sd}"


def _ms(vals, digits=4) -> str:
    a = np.asarray(vals, dtype=float)
    if len(a) == 0:
        return "–"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"


def headline(names: List[str], records: Dict[str, List[dict]]) -> List[str]:
    """The cross-dataset table of the default protocol (rows without a variant)."""
    lines = ["| dataset | seeds | teacher ensemble (mean) | plain DNN | **default student** (gate) | mean student "
             "| gain kept | logloss: default / plain | teacher s / student epoch s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = [r for r in records[n] if not r.get("variant")]
        pick = {
            "ens": [r for r in rs if r["role"] == "ensemble" and r["distill"] == "mean"],
            "plain": [r for r in rs if r["role"] == "student" and r["distill"] == "none"],
            "gate": [r for r in rs if r["role"] == "student" and r["distill"] == "gate"],
            "mean": [r for r in rs if r["role"] == "student" and r["distill"] == "mean"],
        }
        if not all(pick.values()):
            continue
        auc = {k: [r["auc"] for r in v] for k, v in pick.items()}
        ll = {k: [r["logloss"] for r in v] for k, v in pick.items()}
        gain = np.mean(auc["ens"]) - np.mean(auc["plain"])
        kept = (np.mean(auc["gate"]) - np.mean(auc["plain"])) / gain if gain > 1e-4 else float("nan")
        teacher_s = np.mean([r.get("teacher_seconds", float("nan")) for r in pick["ens"]])
        epoch_s = np.mean([r.get("epoch_seconds", float("nan")) for r in pick["gate"]])
        lines.append(f"| {n} | {len(pick['gate'])} | {_ms(auc['ens'])} | {_ms(auc['plain'])} | "
                     f"**{_ms(auc['gate'])}** | {_ms(auc['mean'])} | {_kept(kept)} | "
                     f"{np.mean(ll['gate']):.4f} / {np.mean(ll['plain']):.4f} | {teacher_s:.0f} / {epoch_s:.2f} |")
    return lines


def gate_fits(names: List[str], records: Dict[str, List[dict]]) -> List[str]:
    """Did each stacked gate beat averaging on its held-out rows? (kept fits / fits, mean z)."""
    lines = ["| dataset | gate (variant) | kept / fitted | paired z on the monitor rows (mean, min..max) |",
             "|---|---|---|---|"]
    for n in names:
        groups: Dict[str, List[dict]] = defaultdict(list)
        for r in records[n]:
            g = r.get("gate_fit_summary")
            if r["role"] == "student" and g and "kept" in g:
                groups[f"{r.get('gate')}" + (f" ({r['variant']})" if r.get("variant") else "")].append(g)
        for label, gs in groups.items():
            z = np.array([g["z"] for g in gs], dtype=float)
            lines.append(f"| {n} | {label} | {sum(g['kept'] for g in gs)} / {len(gs)} | "
                         f"{z.mean():.1f} ({z.min():.1f}..{z.max():.1f}) |")
    return lines if len(lines) > 2 else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--readme", type=Path, default=None)
    args = p.parse_args()
    names = [n for n in ORDER if (args.folder / n).is_dir()] + sorted(
        d.name for d in args.folder.iterdir() if d.is_dir() and d.name not in ORDER)
    records = {n: _records(args.folder / n) for n in names}
    names = [n for n in names if records[n]]
    tables = {n: dataset_rows(records[n]) for n in names}
    labels: List[str] = []
    for t in tables.values():
        for label in t:
            if label not in labels:
                labels.append(label)
    head = headline(names, records)
    lines = ["Test AUC, mean ± std over seeds; gain kept = (default − plain) / (ensemble − plain) of the means "
             "(–: the ensemble is not above the plain DNN)", ""]
    lines += head
    lines += ["", "AUC gain over the plain DNN (same rows, same stopping rule), mean ± std over seeds of the "
              "per-seed differences; in brackets the share of the teacher ensemble's gain kept (ratio of the means)", "",
              "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        cells = []
        for n in names:
            row = tables[n].get(label)
            if not row:
                cells.append("–")
                continue
            # ratio of means: per-seed ratios explode when one seed's ensemble gain is near 0
            gain = float(np.mean(row["gain"]))
            kept = float(np.mean(row["dauc"])) / gain if gain > 1e-4 else float("nan")
            cells.append(f"{_cell(row['dauc'])} ({_kept(kept)}, n={len(row['dauc'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Logloss difference to the plain DNN (negative: lower than the plain DNN's)", "",
              "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        cells = [_cell(tables[n][label]["dll"]) if label in tables[n] else "–" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fits = gate_fits(names, records)
    if fits:
        lines += ["", "Stacked gates: kept only when they beat averaging on the monitor rows by more than 2 "
                  "paired standard errors (otherwise they are plain averaging)", ""] + fits
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        header = ["# Accuracy across datasets", "",
                  f"Made by `bash bench/accuracy/run_suite.sh {'dev' if 'dev' in args.folder.name else 'test'}` "
                  "(which ends with `python bench/accuracy/summarize.py`); each dataset's report, with its own "
                  "command, data description and ablation rows, is in `<dataset>/report.md` beside this file. "
                  "How the defaults were chosen: `docs/accuracy.md`.", ""]
        _atomic_write(args.markdown, "\n".join(header + [text]) + "\n")
    if args.readme:
        readme = args.readme.read_text()
        a, b = "<!-- results:begin -->", "<!-- results:end -->"
        if a not in readme or b not in readme:
            raise SystemExit(f"{args.readme}: no {a} ... {b} block to rewrite")
        pre, rest = readme.split(a, 1)
        post = rest.split(b, 1)[1]
        _atomic_write(args.readme, pre + a + "\n" + "\n".join(head) + "\n" + b + post)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
