"""Experiments: teachers, plain baseline and distilled students, over seeds, with a report.

Every row of a table is trained with the same :class:`~fastkd.train.TrainConfig` (same budget,
same early-stopping rule on the same validation data), except rows that are themselves ablations
of the stopping rule. Results are one record per model and seed (``results.json``) and a
Markdown report with mean ± std over seeds (``report.md``), plus PNG plots.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import distributed as _dist
from .data import CTRData
from .models import build_model
from .train import Distiller, TrainConfig, predict, scores, train_model

__all__ = ["ExperimentSpec", "ExperimentResult", "run_experiment", "write_report", "ABLATIONS"]

ABLATIONS = ("hint", "cotrain", "kd-stop", "kd-stop-merge", "merge", "partition")


@dataclass
class ExperimentSpec:
    """What to train. Model keyword arguments go to :func:`fastkd.models.build_model`."""

    teachers: Sequence[str] = ("deepfm", "dcn", "xdeepfm")
    student: str = "dnn"
    mode: str = "pretrain"
    gate: str = "logit"
    ensemble: str = "logit"
    temperature: float = 1.0
    hard_weight: float = 1.0
    kd_weight: float = 1.0
    seeds: Sequence[int] = (0,)
    ablations: Sequence[str] = ()
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    config: TrainConfig = field(default_factory=TrainConfig)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _infer_rate(model: torch.nn.Module, data: CTRData, batch_size: int) -> float:
    ids = torch.from_numpy(data.ids)
    predict(model, ids[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    predict(model, ids, batch_size)
    return len(data) / (time.perf_counter() - t0)


class _Run:
    """State of one experiment: data, spec, output records and logging."""

    def __init__(self, train, valid, test, spec: ExperimentSpec, log, partial: Optional[Path]) -> None:
        self.train, self.valid, self.test = train, valid, test
        self.spec = spec
        self.log = log
        self.partial = partial if _dist.is_main_process() else None  # rank 0 alone writes
        self.records: List[dict] = []
        self.gate_alphas: Dict[str, np.ndarray] = {}

    def build(self, name: str, seed: int):
        torch.manual_seed(seed)
        return build_model(name, self.train.field_sizes, **self.spec.model_kwargs)

    def record(self, model_name, role, distill, seed, logits, model=None, *, variant="", summary=None,
               seconds=0.0):
        rec = {"model": model_name, "role": role, "distill": distill, "variant": variant, "seed": seed,
               **scores(self.test.labels, logits)}
        if model is not None:
            rec["params"] = _params(model)
            rec["infer_samples_per_s"] = _infer_rate(model, self.test, self.spec.config.eval_batch_size)
        if summary is not None:
            st = summary.get("student", summary)
            rec["epochs"] = st["epochs"]
            rec["best_epoch"] = st["best_epoch"]
            rates = [h["samples_per_s"] for h in st["history"]]
            rec["train_samples_per_s"] = float(np.median(rates)) if rates else None
        rec["seconds"] = round(seconds, 2)
        self.records.append(rec)
        if self.partial is not None:  # a long run keeps what it has finished if it is stopped
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.partial.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.records, indent=1))
            tmp.replace(self.partial)
        label = f"{model_name}" + (f" [{variant}]" if variant else "")
        self.log(f"  seed {seed}  {label:38s} AUC {rec['auc']:.4f}  logloss {rec['logloss']:.4f}  ({seconds:.0f}s)")
        return rec

    # ------------------------------------------------------------------------------------------
    def teachers(self, seed: int, names: Sequence[str], train: Optional[Sequence[CTRData]] = None,
                 variant: str = ""):
        tcfg = self.spec.config.for_teachers()
        out = []
        for i, name in enumerate(names):
            model = self.build(name, seed * 100 + i + 1)
            t0 = time.perf_counter()
            part = self.train if train is None else train[i]
            summ = train_model(model, part, self.valid, dataclasses.replace(tcfg, seed=seed * 100 + i + 1),
                               desc=f"teacher {name}")
            test_logits = predict(model, self.test)
            if not variant:
                self.record(name, "teacher", "none", seed, test_logits, model, summary=summ,
                            seconds=time.perf_counter() - t0)
            out.append((model, scores(self.valid.labels, predict(model, self.valid))["auc"], test_logits))
        return out

    def student(self, seed: int, teachers, distill: str, *, variant: str = "", mode: Optional[str] = None,
                config: Optional[TrainConfig] = None, **loss_kw):
        spec = self.spec
        gate = {"single": "mean", "mean": "mean", "gate": spec.gate}[distill]
        kw = dict(temperature=spec.temperature, hard_weight=spec.hard_weight, kd_weight=spec.kd_weight,
                  ensemble=spec.ensemble)
        kw.update(loss_kw)
        cfg = dataclasses.replace(config or spec.config, seed=seed)
        student = self.build(spec.student, seed * 100)
        mode = mode or spec.mode
        kd = Distiller([t for t in teachers], student, mode=mode, gate=gate, config=cfg,
                       teachers_trained=(mode == "pretrain"), **kw)
        t0 = time.perf_counter()
        summ = kd.fit(self.train, self.valid)
        rec = self.record(f"{spec.student} ({distill})", "student", distill, seed, kd.predict(self.test), student,
                          variant=variant, summary=summ, seconds=time.perf_counter() - t0)
        if distill == "gate" and not variant and spec.gate in ("logit", "hidden"):
            self.gate_alphas[f"seed{seed}"] = kd.gate_weights(self.test).numpy()
        return rec

    def plain(self, seed: int, config: Optional[TrainConfig] = None, variant: str = ""):
        model = self.build(self.spec.student, seed * 100)
        t0 = time.perf_counter()
        summ = train_model(model, self.train, self.valid, dataclasses.replace(config or self.spec.config, seed=seed),
                           desc="plain student")
        return self.record(self.spec.student, "student", "none", seed, predict(model, self.test), model,
                           variant=variant, summary=summ, seconds=time.perf_counter() - t0)


@dataclass
class ExperimentResult:
    """One record per model and seed, and the gated students' test-set gate weights per seed."""

    records: List[dict]
    gate_alphas: Dict[str, np.ndarray] = field(default_factory=dict)


def run_experiment(train: CTRData, valid: CTRData, test: CTRData, spec: ExperimentSpec,
                   log=print, partial: Optional[Path] = None) -> ExperimentResult:
    """Train every row of the table for every seed.

    With ``partial``, the records finished so far are rewritten to that JSON file after each one.
    """
    for a in spec.ablations:
        if a not in ABLATIONS:
            raise ValueError(f"unknown ablation {a!r}; choose from {ABLATIONS}")
    run = _Run(train, valid, test, spec, log, partial)
    cfg = spec.config
    for seed in spec.seeds:
        log(f"seed {seed}: teachers {', '.join(spec.teachers)}")
        trained = run.teachers(seed, spec.teachers)
        teachers = [m for m, _, _ in trained]
        ens = torch.stack([z for _, _, z in trained], 1).mean(1)
        run.record("ensemble (mean)", "ensemble", "mean", seed, ens)
        run.plain(seed)
        best = max(range(len(trained)), key=lambda i: trained[i][1])
        run.student(seed, [teachers[best]], "single", variant="")
        run.records[-1]["teacher"] = spec.teachers[best]
        if len(teachers) > 1:
            run.student(seed, teachers, "mean")
            run.student(seed, teachers, "gate")
        abl = set(spec.ablations)
        if "hint" in abl:
            run.student(seed, teachers, "gate", variant="hint instead of soft label", kd_weight=0.0, hint_weight=1.0)
        if "cotrain" in abl:
            fresh = [run.build(n, seed * 100 + i + 1) for i, n in enumerate(spec.teachers)]
            run.student(seed, fresh, "gate", variant="co-train", mode="cotrain")
        if "kd-stop" in abl:
            c = dataclasses.replace(cfg, early_stop="kd", patience=None, merge_validation=False)
            run.student(seed, teachers, "gate", variant="stop on kd loss", config=c)
        if "kd-stop-merge" in abl:
            c = dataclasses.replace(cfg, early_stop="kd", patience=None, merge_validation=True)
            run.student(seed, teachers, "gate", variant="stop on kd loss, merged valid", config=c)
        if "merge" in abl:
            # the plain DNN and the gated student under the other merge_validation setting:
            # separates what the extra validation rows give from what distillation gives
            c = dataclasses.replace(cfg, merge_validation=not cfg.merge_validation)
            variant = (f"merged valid, {cfg.early_stop} on held-out slice" if c.merge_validation
                       else f"not merged, {cfg.early_stop} on whole valid split")
            run.plain(seed, config=c, variant=variant)
            run.student(seed, teachers, "gate", variant=variant, config=c)
        if "partition" in abl:
            m = len(spec.teachers)
            rng = np.random.default_rng(seed)
            parts = np.array_split(rng.permutation(len(train)), m)
            arch = spec.teachers[0]
            dt = run.teachers(seed, [arch] * m, [train.subset(np.sort(p)) for p in parts], variant="D")
            run.student(seed, [t for t, _, _ in dt], "gate", variant=f"D: {m}x {arch} on data partitions")
            run.records[-1]["teacher_valid_auc"] = [a for _, a, _ in dt]
    return ExperimentResult(run.records, run.gate_alphas)


def _fmt(values: List[float]) -> str:
    a = np.asarray(values, dtype=float)
    if len(a) == 1:
        return f"{a[0]:.4f}"
    return f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


def summarize(records: List[dict]) -> List[dict]:
    """One row per (model, role, distill, variant): mean ± std over seeds."""
    rows: Dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["role"], r["distill"], r.get("variant", ""))
        row = rows.setdefault(key, {"model": r["model"], "role": r["role"], "distill": r["distill"],
                                    "variant": r.get("variant", ""), "auc": [], "logloss": [], "params": r.get("params"),
                                    "infer": [], "train_rate": [], "epochs": []})
        row["auc"].append(r["auc"])
        row["logloss"].append(r["logloss"])
        if r.get("infer_samples_per_s"):
            row["infer"].append(r["infer_samples_per_s"])
        if r.get("train_samples_per_s"):
            row["train_rate"].append(r["train_samples_per_s"])
        if r.get("epochs"):
            row["epochs"].append(r["epochs"])
    return list(rows.values())


def table(records: List[dict]) -> str:
    lines = ["| model | role | distill | variant | test AUC | test logloss | params | infer samples/s | epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summarize(records):
        infer = f"{np.median(row['infer']):,.0f}" if row["infer"] else "–"
        params = f"{row['params']:,}" if row["params"] else "–"
        ep = f"{np.mean(row['epochs']):.1f}" if row["epochs"] else "–"
        lines.append(f"| {row['model']} | {row['role']} | {row['distill']} | {row['variant'] or '–'} | "
                     f"{_fmt(row['auc'])} | {_fmt(row['logloss'])} | {params} | {infer} | {ep} |")
    return "\n".join(lines)


def _versions() -> str:
    import numpy
    return (f"fastkd {__import__('fastkd').__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}, torch threads {torch.get_num_threads()}")


def write_report(out: Path, result: ExperimentResult, *, command: str, data_desc: str, spec: ExperimentSpec,
                 wall_seconds: float, notes: str = "") -> Path:
    """Write ``report.md``, ``results.json`` and the PNG plots into ``out``; returns the report path.

    Under torch.distributed only rank 0 writes; the other ranks just get the path back.
    """
    out = Path(out)
    if not _dist.is_main_process():
        return out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    records = result.records
    (out / "results.json").write_text(json.dumps(records, indent=1))
    plots = _plots(out, records, result.gate_alphas)
    cfg = spec.config
    lines = [
        "# fastkd distillation report", "",
        f"Command: `{command}`", "",
        f"Data: {data_desc}", "",
        f"Versions: {_versions()}", "",
        f"Wall time: {wall_seconds:.0f} s", "",
        f"Teachers: {', '.join(spec.teachers)}; student: {spec.student}; mode: {spec.mode}; gate: {spec.gate}; "
        f"ensemble: {spec.ensemble}; T = {spec.temperature}; hard_weight = {spec.hard_weight}; "
        f"kd_weight = {spec.kd_weight}; seeds: {list(spec.seeds)}", "",
        f"Training (every row unless its variant says otherwise): Adam lr {cfg.lr}, batch {cfg.batch_size}, "
        f"at most {cfg.max_epochs} epochs, early stopping on validation {cfg.early_stop} with patience "
        f"{cfg.patience}, learning rate /10 on each epoch without improvement, best epoch restored. "
        + (f"Merged validation: students and the plain DNN train on the training split plus the validation "
           f"rows after its first {cfg.monitor_fraction:.0%}, and stop on the {cfg.early_stop} of that held-out "
           f"first {cfg.monitor_fraction:.0%}; teachers train on the training split only and stop on the whole "
           f"validation split (the rows whose teacher predictions become soft labels stay unseen by the teachers). "
           if cfg.merge_validation else "")
        + f"Model settings: {spec.model_kwargs or 'defaults'}.", "",
        "Mean ± sample std over seeds of test metrics:", "",
        table(records), "",
    ]
    if notes:
        lines += [notes, ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.name})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plots(out: Path, records: List[dict], alphas: Dict[str, np.ndarray]) -> List[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: `pip install fastkd[report]`
        return []
    paths = []
    rows = summarize(records)
    names = [r["model"] + (f"\n[{r['variant']}]" if r["variant"] else "") for r in rows]
    means = [np.mean(r["auc"]) for r in rows]
    stds = [np.std(r["auc"], ddof=1) if len(r["auc"]) > 1 else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
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
        a = np.concatenate(list(alphas.values()))
        teachers = sorted({r["model"] for r in records if r["role"] == "teacher"},
                          key=lambda n: [r["model"] for r in records].index(n))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for j in range(a.shape[1]):
            label = teachers[j] if j < len(teachers) else f"teacher {j}"
            ax.hist(a[:, j], bins=50, range=(0, 1), alpha=0.55, label=label)
        ax.set_xlabel("gate weight α (per test sample)")
        ax.set_ylabel("samples")
        ax.set_title("Teacher-gate weight distribution per teacher")
        ax.legend()
        fig.tight_layout()
        p = out / "gate_weights.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def command_line() -> str:
    return " ".join(["fastkd"] + [a if " " not in a else repr(a) for a in sys.argv[1:]])
