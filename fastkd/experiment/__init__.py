"""Experiments: teachers, plain baseline and distilled students over seeds, with a report.

* :mod:`.spec`: what to train (:class:`ExperimentSpec`) and the ablation rows;
* :mod:`.runner`: training every row for every seed (:func:`run_experiment`), resumable;
* :mod:`.report`: ``report.md``, ``results.json`` and plots (:func:`write_report`).
"""
from .report import command_line, segment_table, summarize, table, write_report
from .runner import ExperimentResult, check_resume, run_experiment
from .spec import ABLATIONS, Ablation, ExperimentSpec, parse_ablation

__all__ = ["ExperimentSpec", "ExperimentResult", "Ablation", "run_experiment", "check_resume", "write_report", "table",
           "segment_table", "summarize", "parse_ablation", "command_line", "ABLATIONS"]
