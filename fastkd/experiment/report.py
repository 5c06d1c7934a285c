"""Reporting an experiment: mean ± std tables, per-segment AUC, ``report.md``, ``results.json``, plots."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import distributed as _dist
from ..atomic import atomic_write_text
from .runner import ExperimentResult
from .spec import ExperimentSpec

__all__ = ["summarize", "table", "segment_table", "serving_table", "read_summary", "write_report", "command_line", "RESULT_FILES",
           "PARTIAL_MARK", "REPORT_TITLE"]

# what a run writes into its folder (besides checkpoints/): a fresh run removes an earlier run's first
RESULT_FILES = ("report.md", "results.json", "results.partial.json", "auc.png", "gate_weights.png")
# every report's first line starts with the title (a partial one adds the mark after it)
REPORT_TITLE = "# fastkd distillation report"
PARTIAL_MARK = "PARTIAL"


def _fmt(values: List[float]) -> str:
    a = np.asarray(values, dtype=float)
    if len(a) == 1:
        return f"{a[0]:.4f}"
    return f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


def _signal(r: dict) -> str:
    """The distillation column: the ensemble signal a student learned from."""
    if r["role"] == "teacher" or r["distill"] in ("none", "single"):
        return r["distill"]
    return r.get("gate") or r["distill"]


def summarize(records: List[dict]) -> List[dict]:
    """One row per (model, role, signal, variant): metrics and costs over seeds, in first-seen order."""
    rows: Dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["role"], _signal(r), r.get("variant", ""))
        row = rows.setdefault(key, {"model": r["model"], "role": r["role"], "distill": _signal(r),
                                    "variant": r.get("variant", ""), "auc": [], "logloss": [],
                                    "params": r.get("params"), "infer": [], "train_rate": [], "epochs": [],
                                    "epoch_seconds": [], "teacher_seconds": [], "segments": []})
        row["auc"].append(r["auc"])
        row["logloss"].append(r["logloss"])
        for src, dst in (("infer_samples_per_s", "infer"), ("train_samples_per_s", "train_rate"),
                         ("epochs", "epochs"), ("epoch_seconds", "epoch_seconds"),
                         ("teacher_seconds", "teacher_seconds"), ("segment_auc", "segments")):
            if r.get(src):
                row[dst].append(r[src])
    return list(rows.values())


def table(records: List[dict]) -> str:
    """Markdown table: test AUC and logloss as mean ± sample std over seeds, sizes and costs."""
    lines = ["| model | role | distill | variant | test AUC | test logloss | params | infer samples/s | epochs "
             "| epoch s | teacher s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summarize(records):
        infer = f"{np.median(row['infer']):,.0f}" if row["infer"] else "–"
        params = f"{row['params']:,}" if row["params"] else "–"
        ep = f"{np.mean(row['epochs']):.1f}" if row["epochs"] else "–"
        eps = f"{np.median(row['epoch_seconds']):.2f}" if row["epoch_seconds"] else "–"
        ts = f"{np.mean(row['teacher_seconds']):.0f}" if row["teacher_seconds"] else "–"
        lines.append(f"| {row['model']} | {row['role']} | {row['distill']} | {row['variant'] or '–'} | "
                     f"{_fmt(row['auc'])} | {_fmt(row['logloss'])} | {params} | {infer} | {ep} | {eps} | {ts} |")
    return "\n".join(lines)


def segment_table(records: List[dict]) -> str:
    """Markdown table of test AUC per segment (mean over seeds), for records that carry it."""
    rows = [r for r in summarize(records) if r["segments"]]
    if not rows:
        return ""
    segs = sorted({s for r in rows for d in r["segments"] for s in d}, key=lambda s: int(s))
    lines = ["| model | distill | variant | " + " | ".join(f"segment {s}" for s in segs) + " |",
             "|---|---|---|" + "---|" * len(segs)]
    for r in rows:
        cells = []
        for s in segs:
            vals = [d[s] for d in r["segments"] if s in d]
            cells.append(f"{np.mean(vals):.4f}" if vals else "–")
        lines.append(f"| {r['model']} | {r['distill']} | {r['variant'] or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def serving_table(records: List[dict]) -> str:
    """The serving section of ``report.md`` from the record that carries ``"serving"``
    (:func:`fastkd.serving.serving_benchmark`: the default student of the first seed against the
    teacher ensemble); empty when no record does (``--no-serving``, one teacher)."""
    rec = next((r for r in records if r.get("serving")), None)
    if rec is None:
        return ""
    sv = rec["serving"]
    rows = sv["rows"]
    ens = next((r["model"] for r in rows if r["role"] == "ensemble"), "the teacher ensemble")
    lines = [f"Serving cost: seed {rec['seed']}'s default student `{rec['model']}` against the {ens}, "
             f"whose output is the mean of the teachers' logits (one forward pass each); on CPU with {sv['threads']} thread{'s' if sv['threads'] != 1 else ''}, eval mode, no "
             f"gradients; each call is one batch of test rows, each cell timed for about {sv['budget_s']:g} s "
             f"(`calls`: how many; p99 of few calls is close to their maximum). PyTorch: eager; onnxruntime: the "
             "student exported as `fastkd export` writes it. samples/s = batch × calls / their time:", "",
             "| model | runtime | params | batch | p50 ms | p99 ms | samples/s | calls |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runtime = {"pytorch": "PyTorch", "onnxruntime": "onnxruntime"}.get(r["runtime"], r["runtime"])
        lines.append(f"| {r['model']} | {runtime} | {r['params']:,} | {r['batch']} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['samples_per_s']:,.0f} | {r['calls']} |")
    lines.append("")
    torch_rows = {(r["role"], r["batch"]): r for r in rows if r["runtime"] == "pytorch"}
    big = max((b for _, b in torch_rows), default=None)
    if ("student", big) in torch_rows and ("ensemble", big) in torch_rows:
        st, en = torch_rows[("student", big)], torch_rows[("ensemble", big)]
        lines += [f"In PyTorch at batch {big} the student serves {st['samples_per_s'] / en['samples_per_s']:.1f}× "
                  f"the ensemble's samples/s with {st['params'] / en['params']:.0%} of its parameters.", ""]
    chk = sv.get("onnx_check")
    if chk:
        auc = (f"; test AUC {chk['auc_exported']:.4f} (ONNX) vs {chk['auc_pytorch']:.4f} (PyTorch)"
               if "auc_exported" in chk else "")
        lines += [f"ONNX check (exported with {chk['exporter']}, opset {chk['opset']}; onnxruntime "
                  f"{chk['onnxruntime']}) on all {chk['rows']:,} test rows: max |ONNX logit − PyTorch logit| = "
                  f"{chk['max_abs_diff']:.2e} ({'within' if chk['within_tolerance'] else 'ABOVE'} the 1e-5 "
                  f"tolerance){auc}.", ""]
    elif sv.get("onnx_skipped"):
        lines += [f"onnxruntime rows and the ONNX check skipped: {sv['onnx_skipped']}.", ""]
    return "\n".join(lines)


def read_summary(read_reports: Dict[str, dict]) -> str:
    """One line on what reading the data saw, from ``{split: ReadReport.to_dict()}``: rows read and
    kept, malformed rows skipped and the first of them (file:line: reason)."""
    parts = []
    for split, r in read_reports.items():
        name = "+".join(Path(f).name for f in r["files"]) or "<no files>"
        text = (f"{split} `{name}`: {r['rows_read']:,} rows read, {r['rows_ok']:,} kept, "
                f"{r['malformed']:,} malformed skipped")
        if r["first_bad"]:
            text += " (first: " + "; ".join(f"{Path(b['file']).name}:{b['line']}: {b['reason']}"
                                           for b in r["first_bad"]) + ")"
        parts.append(text)
    return "; ".join(parts)


def _versions() -> str:
    import numpy
    return (f"fastkd {__import__('fastkd').__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}, torch threads {torch.get_num_threads()}")


def dropout_table(records: List[dict]) -> str:
    """Markdown table of the student-dropout choices (rows trained with several candidates): per
    model and variant, how many seeds chose each value ("" when no row had candidates)."""
    counts: Dict[tuple, Dict[float, int]] = {}
    for r in records:
        if r.get("dropout_candidates"):
            c = counts.setdefault((r["model"], r.get("variant", "")), {x["dropout"]: 0 for x in r["dropout_candidates"]})
            c[r["student_dropout"]] = c.get(r["student_dropout"], 0) + 1
    if not counts:
        return ""
    lines = ["| model | variant | seeds choosing each dropout |", "|---|---|---|"]
    for (model, variant), c in counts.items():
        lines.append(f"| {model} | {variant or '–'} | " + ", ".join(f"{p:g}: {k}" for p, k in c.items()) + " |")
    return "\n".join(lines)


def reuse_note(records: List[dict]) -> str:
    """One sentence on gated students that are the mean student reused (their stacked gate was
    not kept, so their targets equalled averaging's): per row, in how many seeds ("" if none)."""
    counts: Dict[str, List[int]] = {}
    for r in records:
        if r["role"] == "student" and r["distill"] == "gate":
            label = r["model"] + (f" [{r['variant']}]" if r.get("variant") else "")
            c = counts.setdefault(label, [0, 0])
            c[0] += "student_from" in r
            c[1] += 1
    used = [f"`{label}` in {k} of {n} seeds" for label, (k, n) in counts.items() if k]
    if not used:
        return ""
    return ("Gated students whose stacked gate was not kept have exactly the mean student's targets, so they are "
            "the mean student, trained once and reused (identical to training them again; their `epoch s` is "
            "the mean student's): " + ", ".join(used) + ".")


def _settings(spec: ExperimentSpec) -> str:
    cfg = spec.config
    gate = spec.gate if spec.gate == "mean" else f"{spec.gate} ({spec.gate_fit or 'default fit'})"
    lines = [
        f"Teachers: {', '.join(spec.teachers)}; student: {spec.student}; mode: {spec.mode}; gate: {gate}; "
        f"ensemble: {spec.ensemble}; T = {spec.temperature}; hard_weight = {spec.hard_weight}; "
        f"kd_weight = {spec.kd_weight}; teacher folds: {spec.teacher_folds}; augmentation: {spec.augment} "
        f"rows per row (swap probability {spec.augment_swap}); seeds: {list(spec.seeds)}", "",
        f"Training (every row unless its variant says otherwise): Adam lr {cfg.lr}, batch {cfg.batch_size}, "
        f"at most {cfg.max_epochs} epochs, early stopping on validation {cfg.early_stop} with patience "
        f"{cfg.patience}, learning rate /10 on each epoch without improvement, "
        + (f"the mean of the weights of the best {cfg.monitor_window}-epoch monitor window restored (students and "
           "plain DNN; teachers: their best epoch). " if cfg.average_window else "best epoch restored. ")
        + (f"Students' and the plain DNN's gradients clipped to a total norm of {cfg.grad_clip_norm:g} before each "
           "step (teachers: none). " if cfg.grad_clip_norm is not None else "")
        + (f"Student network output layer initialised {spec.student_head_init}. "
           if spec.student_head_init not in (None, "torch") else "")
        + (f"Distilled students add the hint loss with weight {spec.hint_weight:g}. " if spec.hint_weight else "")
        + ("Distilled students start from the embedding tables of the teacher with the best monitor AUC. "
           if spec.student_embed_init == "teacher" else "")
        + (f"Merged validation: students and the plain DNN train on the training split plus the validation "
           f"rows after its first {cfg.monitor_fraction:.0%}, and stop on the {cfg.early_stop} of that held-out "
           f"first {cfg.monitor_fraction:.0%}. " if cfg.merge_validation else "")
        + ("Teachers train on the training split only and stop on the whole validation split (the rows whose "
           "teacher predictions become soft labels stay unseen by the teachers). " if spec.teacher_folds == 1 else
           f"Teachers are cross-fitted in {spec.teacher_folds} folds on the students' training rows (each fold "
           "model stops on its held-out fold): every training row's soft label comes from a fold model that never "
           "saw it, other rows' from the fold models' mean; the monitor rows stay unseen by every teacher. ")
        + f"Model settings: {spec.model_kwargs or 'defaults'}."
        + ("" if spec.student_dropout is None else
           f" Student network (students and plain DNN) dropout: {spec.student_dropout}." if not isinstance(
               spec.student_dropout, tuple) else
           " Student network (students and plain DNN) dropout: each model is trained once with each of "
           f"{', '.join(f'{p:g}' for p in spec.student_dropout)} and the one with the best stopping value on the "
           "monitor rows is kept (its time is every candidate's)."),
    ]
    return "\n".join(lines)


def write_report(out: Path, result: ExperimentResult, *, command: str, data_desc: str, spec: ExperimentSpec,
                 wall_seconds: float, notes: str = "", read_reports: Optional[Dict[str, dict]] = None,
                 partial: bool = False) -> Path:
    """Write ``report.md``, ``results.json`` and the PNG plots into ``out``; returns the report path.

    ``read_reports``: ``{split: ReadReport.to_dict()}`` of the data files read (``fastkd distill``);
    ``report.md`` gets a "Rows read" line (:func:`read_summary`) and every record of
    ``results.json`` (a list of records) a ``"read_report"`` key holding them.

    ``partial=True`` (a run not finished yet): ``report.md`` alone, of the records so far, its
    first line marked :data:`PARTIAL_MARK`; no ``results.json`` and no plots.

    Under torch.distributed only rank 0 writes; the other ranks just get the path back.
    """
    out = Path(out)
    if not _dist.is_main_process():
        return out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    records = result.records
    if read_reports:
        records = [{**r, "read_report": read_reports} for r in records]
    if partial:
        title = (f"{REPORT_TITLE} ({PARTIAL_MARK}: {len(records)} rows so far; the run is still "
                 "running or was interrupted, `--resume` finishes it; records in results.partial.json)")
        plots = []
    else:
        title = REPORT_TITLE
        _write_text(out / "results.json", json.dumps(records, indent=1))
        plots = _plots(out, records, result.gate_alphas)
    lines = [
        title, "",
        f"Command: `{command}`", "",
        f"Data: {data_desc}", "",
        *([f"Rows read: {read_summary(read_reports)}", ""] if read_reports else []),
        f"Versions: {_versions()}", "",
        f"Wall time{' so far' if partial else ''}: {wall_seconds:.0f} s", "",
        _settings(spec), "",
        "Mean ± sample std over seeds of test metrics; `epoch s` is the median wall time of one training "
        "epoch, `teacher s` the teachers' training time the row depends on:", "",
        table(records), "",
    ]
    seg = segment_table(records)
    if seg:
        lines += [f"Test AUC per segment (field `{spec.segment_field}`), mean over seeds:", "", seg, ""]
    drop = dropout_table(records)
    if drop:
        lines += ["Student dropout chosen on the monitor rows:", "", drop, ""]
    reused = reuse_note(records)
    if reused:
        lines += [reused, ""]
    serving = serving_table(records)
    if serving:
        lines += ["## Serving", "", serving]
    if notes:
        lines += [notes, ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
    path = out / "report.md"
    _write_text(path, "\n".join(lines) + "\n")
    return path


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _plots(out: Path, records: List[dict], alphas: Dict[str, List[np.ndarray]]) -> List[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: `pip install fastkd[report]`
        return []
    paths = []
    rows = summarize(records)
    names = [r["model"] + (f" <{r['distill']}>" if r["role"] != "teacher" and r["distill"] not in ("none",) else "")
             + (f"\n[{r['variant']}]" if r["variant"] else "") for r in rows]
    means = [np.mean(r["auc"]) for r in rows]
    stds = [np.std(r["auc"], ddof=1) if len(r["auc"]) > 1 else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    colors = {"teacher": "#8888cc", "ensemble": "#aaaaaa", "student": "#cc7744"}
    ax.bar(range(len(rows)), means, yerr=stds, color=[colors.get(r["role"], "#777") for r in rows], capsize=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
    ax.set_ylabel("test AUC")
    ax.set_title("Test AUC per model (mean ± std over seeds)")
    fig.tight_layout()
    p = out / "auc.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    if alphas:
        teachers = []
        for r in records:
            if r["role"] == "teacher" and not r.get("variant") and r["model"] not in teachers:
                teachers.append(r["model"])
        fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 3.5), squeeze=False)
        for ax, (label, per_seed) in zip(axes[0], alphas.items()):
            a = np.concatenate(per_seed)
            for j in range(a.shape[1]):
                ax.hist(a[:, j], bins=50, range=(0, 1), alpha=0.55,
                        label=teachers[j] if j < len(teachers) else f"teacher {j}")
            ax.set_xlabel("gate weight α (per test sample)")
            ax.set_ylabel("samples")
            ax.set_title(f"gate {label}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "gate_weights.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def command_line() -> str:
    return " ".join(["fastkd"] + [a if " " not in a else repr(a) for a in sys.argv[1:]])
