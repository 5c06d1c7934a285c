"""What choosing the student's dropout on the monitor rows would give, read from a dev run that
trained both values as rows (the default row and a ``student_dropout=P`` ablation row).

A run with ``--student-dropout A/B`` keeps, for the plain DNN and for every student, the value
whose best stopping value on the monitor rows is better; the chosen model equals the row trained
at that value alone (``tests/test_student_dropout_choice.py``). So the choice can be read off the
two rows' recorded ``monitor`` values without training anything again. Per dataset: AUC of the
plain DNN and the default (gated) student at each value and chosen, the per-seed gain of the
chosen student over the chosen plain DNN (mean ± std), and how often each value was chosen.

Usage: ``python bench/accuracy/dropout_choice.py runs/accuracy/dev14 [--variant student_dropout=0.1]``
(a run made with ``EXTRA="--student-dropout 0.3" ABLATIONS="student_dropout=0.1"``: rows that chose
their dropout themselves are refused)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fastkd.experiment.candidates import choose

MODELS = {"plain": "dnn", "student": "dnn (gate)"}


def _rows(records, model, variant):
    return {r["seed"]: r for r in records if r["model"] == model and r["variant"] == variant}


def _ms(x) -> str:
    x = np.asarray(x, float)
    return f"{x.mean():+.4f} ± {x.std(ddof=1) if len(x) > 1 else 0:.4f}"


def dataset_table(records, variant: str, early_stop: str = "auc"):
    """Per model: {seed: (auc at default, auc at variant, chosen auc, chosen is variant, logloss chosen)}."""
    out = {}
    for key, model in MODELS.items():
        base, alt = _rows(records, model, ""), _rows(records, model, variant)
        per = {}
        for s in sorted(set(base) & set(alt)):
            a, b = base[s], alt[s]
            if a.get("monitor") is None or b.get("monitor") is None:
                raise SystemExit(f"seed {s} {model}: no 'monitor' in the records (a run before it was recorded)")
            if a.get("dropout_candidates") or b.get("dropout_candidates"):
                raise SystemExit(f"seed {s} {model}: a row already chose its dropout; run the fixed values as rows "
                                 "(EXTRA='--student-dropout 0.3' ABLATIONS='student_dropout=0.1')")
            # the runner's own rule, candidates in the order of --student-dropout 0.1/0.3
            pick_alt = choose(early_stop, [{"best_monitor": b["monitor"]}, {"best_monitor": a["monitor"]}]) == 0
            c = b if pick_alt else a
            per[s] = (a["auc"], b["auc"], c["auc"], pick_alt, c["logloss"])
        out[key] = per
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--variant", default="student_dropout=0.1")
    p.add_argument("--early-stop", default="auc", help="the run's stopping rule (its direction decides)")
    args = p.parse_args(argv)
    print(f"| dataset | seeds | plain: default / {args.variant} / chosen | student: default / {args.variant} / chosen "
          "| chosen student − chosen plain | default student − default plain | chosen student − default student "
          f"| {args.variant} chosen (plain, student) | mean ensemble | gain kept: chosen / default "
          "| logloss chosen: student / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for res in sorted(args.folder.glob("*/results.json")):
        recs = json.loads(res.read_text())
        t = dataset_table(recs, args.variant, args.early_stop)
        seeds = sorted(set(t["plain"]) & set(t["student"]))
        if not seeds:
            continue
        P = np.array([t["plain"][s][:3] for s in seeds])
        S = np.array([t["student"][s][:3] for s in seeds])
        cnt = (sum(t["plain"][s][3] for s in seeds), sum(t["student"][s][3] for s in seeds))
        fmt = lambda M: " / ".join(f"{v:.4f}" for v in M.mean(0))  # noqa: E731
        ens = np.mean([r["auc"] for r in recs if r["model"] == "ensemble (mean)" and r["variant"] == ""
                       and r["seed"] in seeds])
        kept = [(S[:, j].mean() - P[:, j].mean()) / (ens - P[:, j].mean()) for j in (2, 0)]
        ll = [np.mean([t[k][s][4] for s in seeds]) for k in ("student", "plain")]
        print(f"| {res.parent.name} | {len(seeds)} | {fmt(P)} | {fmt(S)} | {_ms(S[:, 2] - P[:, 2])} "
              f"| {_ms(S[:, 0] - P[:, 0])} | {_ms(S[:, 2] - S[:, 0])} | {cnt[0]}/{len(seeds)}, {cnt[1]}/{len(seeds)} "
              f"| {ens:.4f} | {kept[0]:.0%} / {kept[1]:.0%} | {ll[0]:.4f} / {ll[1]:.4f} |")


if __name__ == "__main__":
    main()
