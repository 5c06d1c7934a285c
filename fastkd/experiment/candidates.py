"""Student-dropout candidates (``ExperimentSpec.student_dropout=(0.1, 0.3)``): one training per
value, and the model with the best stopping value on the monitor rows is kept.

The rule is the early-stopping rule itself (``TrainConfig.early_stop`` and its direction): each
candidate is stopped at its best (smoothed) monitored value and the best of those wins; ties go
to the first candidate. The plain DNN and every student choose the same way on the same rows, so
a student's gain over the plain DNN is not a gain of tuning one and not the other. Test rows are
never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..train.config import MONITORS
from ..train.early_stopping import improves
from .spec import ExperimentSpec

__all__ = ["candidate_dir", "best_monitor", "choose", "train_candidates", "choice_fields"]


def candidate_dir(unit_dir: Optional[Path], spec: ExperimentSpec, index: int, many: bool) -> Optional[Path]:
    """The checkpoint folder of candidate ``index``: the unit's own with one candidate, else a
    subfolder named by position (two close values must not share one: a checkpoint's manifest
    does not hold the dropout)."""
    if unit_dir is None or not many:
        return unit_dir
    return unit_dir / f"candidate{index}-dropout{spec.student_dropout:g}"


def best_monitor(summary: dict) -> Optional[float]:
    """The best monitored value of a ``train_model`` or ``Distiller.fit`` summary."""
    return summary.get("student", summary).get("best_monitor")


def choose(early_stop: str, summaries: Sequence[dict]) -> int:
    """Index of the summary with the best monitored value under ``early_stop``'s direction (a
    non-finite or missing value never wins; with none finite, the first)."""
    best, pick = None, 0
    for i, s in enumerate(summaries):
        v = best_monitor(s)
        if v is not None and improves(v, best, MONITORS[early_stop]):
            best, pick = v, i
    return pick


def train_candidates(candidates: Sequence[ExperimentSpec], early_stop: str,
                     fit: Callable[[int, ExperimentSpec], Tuple[Any, dict, float]]) -> Tuple[Any, int, List[dict],
                                                                                      List[float]]:
    """Each candidate trained in turn by ``fit(index, spec) -> (model, summary, seconds)``, only
    the best so far kept (a candidate's model may hold large data); returns ``(the chosen model,
    its index, every summary, every candidate's seconds)``."""
    kept, pick, summaries, seconds = None, 0, [], []
    for i, c in enumerate(candidates):
        model, summary, secs = fit(i, c)
        summaries.append(summary)
        seconds.append(secs)
        if choose(early_stop, summaries) == i:
            kept, pick = model, i
        del model
    return kept, pick, summaries, seconds


def choice_fields(candidates: Sequence[ExperimentSpec], summaries: Sequence[dict], seconds: Sequence[float],
                  chosen: int) -> dict:
    """What a record keeps of the choice: the chosen dropout and every candidate's monitored value,
    epochs and seconds (empty with one candidate)."""
    if len(candidates) < 2:
        return {}
    rows: List[dict] = [{"dropout": c.student_dropout, "monitor": best_monitor(s),
                         "epochs": s.get("student", s).get("epochs"), "seconds": round(t, 2)}
                        for c, s, t in zip(candidates, summaries, seconds)]
    return {"student_dropout": candidates[chosen].student_dropout, "dropout_candidates": rows}
