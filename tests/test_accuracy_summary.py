"""bench/accuracy/summarize.py: the cross-dataset table README's results block is made from."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from helpers import REPO


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", REPO / "bench" / "accuracy" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(model, role, distill, seed, auc, logloss=0.5, variant="", **kw):
    return {"model": model, "role": role, "distill": distill, "variant": variant, "seed": seed, "auc": auc,
            "logloss": logloss, **kw}


def _records(plain, ens, gate, mean):
    out = []
    for s, (p, e, g, m) in enumerate(zip(plain, ens, gate, mean)):
        out += [_rec("ensemble (mean)", "ensemble", "mean", s, e, teacher_seconds=10.0),
                _rec("dnn", "student", "none", s, p, 0.6),
                _rec("dnn (mean)", "student", "mean", s, m, gate="mean"),
                _rec("dnn (gate)", "student", "gate", s, g, 0.4, gate="features/stacked", epoch_seconds=2.0,
                     gate_fit_summary={"z": 3.0, "kept": True})]
    return out


def test_headline_readme_block_and_ratio_of_means(tmp_path, monkeypatch):
    """Gain kept is (student - plain) / (ensemble - plain) of the means: 50% here, although one
    seed's own ratio is 0% and the other's 67%. Mutation caught: per-seed ratios (33%)."""
    d = tmp_path / "results" / "frappe"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_records(plain=[0.80, 0.80], ens=[0.81, 0.83],
                                                        gate=[0.80, 0.82], mean=[0.805, 0.815])))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold table\n<!-- results:end -->\noutro\n")
    md = tmp_path / "results" / "SUMMARY.md"
    monkeypatch.setattr(sys, "argv", ["summarize", str(tmp_path / "results"), "--markdown", str(md),
                                      "--readme", str(readme)])
    _summarize().main()
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:begin -->\n| dataset |") and text.endswith("<!-- results:end -->\noutro\n")
    assert "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| frappe |"))
    assert "| 50% |" in row and "**0.8100 ± 0.0141**" in row and "0.4000 / 0.6000" in row
    assert "| frappe | features/stacked | 2 / 2 | 3.0 (3.0..3.0) |" in md.read_text()


def test_readme_without_markers_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "results" / "frappe"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_records([0.8], [0.81], [0.805], [0.805])))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    monkeypatch.setattr(sys, "argv", ["summarize", str(tmp_path / "results"), "--readme", str(readme)])
    with pytest.raises(SystemExit, match="results:begin"):
        _summarize().main()
    assert readme.read_text() == "no markers\n"


def test_an_ensemble_below_the_plain_dnn_has_no_gain_to_keep(tmp_path, monkeypatch):
    # frappe_log's test split: the students beat an ensemble that is below the plain DNN; the
    # share is then "–", not "nan%" or a negative ratio. Mutation caught: formatting the NaN
    d = tmp_path / "results" / "frappe_log"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_records(plain=[0.80, 0.80], ens=[0.79, 0.795],
                                                        gate=[0.81, 0.812], mean=[0.81, 0.81])))
    md = tmp_path / "results" / "SUMMARY.md"
    monkeypatch.setattr(sys, "argv", ["summarize", str(tmp_path / "results"), "--markdown", str(md)])
    _summarize().main()
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| frappe_log | 2 |"))
    assert "| – |" in row and "nan" not in text
