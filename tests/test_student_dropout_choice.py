"""Student-dropout candidates (fastkd.experiment.candidates): every student and the plain DNN is
trained once per value and the one with the best stopping value on the monitor rows is kept."""
from __future__ import annotations

import math

import pytest

from fastkd.data import make_synthetic
from fastkd.experiment import ExperimentSpec, run_experiment
from fastkd.experiment.candidates import choose
from fastkd.train import TrainConfig

SMALL = {"embed_dim": 4, "hidden_units": (16,), "dropout": 0.3}
CANDIDATES = (0.0, 0.5)
# what must be equal between a chosen model and the same model trained at that value alone
KEYS = ("auc", "logloss", "epochs", "best_epoch", "monitor")


@pytest.mark.parametrize("given, parsed", [("0.1/0.3", (0.1, 0.3)), ("0.1,0.3", (0.1, 0.3)), ([0.2], 0.2),
                                           ((0.3, 0.1), (0.3, 0.1)), (0, 0), (None, None),
                                           ("none", None)])
def test_student_dropout_values_are_parsed(given, parsed):
    assert ExperimentSpec(student_dropout=given).student_dropout == parsed


@pytest.mark.parametrize("bad", ["0.1/1.5", "0.1/0.1", "x", (0.1, None), True, -0.1])
def test_bad_student_dropout_values_are_refused(bad):
    with pytest.raises(ValueError, match="student_dropout"):
        ExperimentSpec(student_dropout=bad)


def test_a_spec_with_candidates_has_no_single_student_network():
    spec = ExperimentSpec(student_dropout="0.1/0.3", model_kwargs={"dropout": 0.3})
    with pytest.raises(ValueError, match="candidates"):
        spec.student_kwargs
    assert [c.student_kwargs["dropout"] for c in spec.student_candidates()] == [0.1, 0.3]


@pytest.mark.parametrize("early_stop, values, pick", [
    ("auc", [0.70, 0.72], 1), ("auc", [0.72, 0.70], 0), ("logloss", [0.50, 0.45], 1),
    ("logloss", [0.45, 0.50], 0), ("auc", [0.71, 0.71], 0), ("auc", [math.nan, 0.60], 1),
    ("kd", [math.inf, 0.3, 0.2], 2), ("auc", [None, None], 0)])
def test_the_best_monitored_value_wins(early_stop, values, pick):
    # mutation caught: the direction ignored (always max), ties to the last, a NaN winning
    assert choose(early_stop, [{"best_monitor": v} for v in values]) == pick
    # a Distiller's summary keeps it under "student"
    assert choose(early_stop, [{"student": {"best_monitor": v}} for v in values]) == pick


@pytest.fixture(scope="module")
def chosen_run(tmp_path_factory):
    train, valid, test = make_synthetic(2500, seed=3).split((0.7, 0.15, 0.15), seed=0)
    spec = ExperimentSpec(teachers=("dnn", "deepfm"), model_kwargs=SMALL, student_dropout=CANDIDATES, augment=0.5,
                          ablations=[f"student_dropout={p}" for p in CANDIDATES],
                          config=TrainConfig(max_epochs=4, batch_size=256, merge_validation=True, patience=2))
    ckpt = tmp_path_factory.mktemp("ckpt")
    saved = tmp_path_factory.mktemp("student")
    res = run_experiment(train, valid, test, spec, log=lambda *a: None, checkpoint_dir=ckpt, student_dir=saved)
    return train, valid, test, spec, ckpt, res, saved


def test_each_model_keeps_the_candidate_best_on_the_monitor_rows(chosen_run):
    # the chosen row equals the same model trained at the chosen value alone (the ablation rows),
    # and that value's monitored value is the best of the candidates'. Mutation caught: keeping
    # the worse candidate, or the last one
    *_, res, _ = chosen_run
    recs = res.records
    students = [r for r in recs if r["role"] == "student" and r["variant"] == ""]
    assert [r["model"] for r in students] == ["dnn", "dnn (mean)", "dnn (gate)"]
    for r in students:
        cands = r["dropout_candidates"]
        assert [c["dropout"] for c in cands] == list(CANDIDATES)
        monitors = [c["monitor"] for c in cands]
        assert r["monitor"] == max(monitors) and r["student_dropout"] == CANDIDATES[monitors.index(max(monitors))]
        # the ablation rows (one value each) have the plain DNN and the gated student
        alone = {x["variant"]: x for x in recs if x["model"] == r["model"] and x["variant"]}
        if r["model"] == "dnn (mean)":
            continue
        for p, c in zip(CANDIDATES, cands):
            assert alone[f"student_dropout={p}"]["monitor"] == c["monitor"]
        fixed = alone[f"student_dropout={r['student_dropout']}"]
        assert {k: r[k] for k in KEYS} == {k: fixed[k] for k in KEYS}
        # the cost of the choice is every candidate's training
        assert r["seconds"] >= sum(c["seconds"] for c in cands) - 0.05
    # the candidates' monitored values differ, or the test would not tell a choice from another
    assert all(len({c["monitor"] for c in r["dropout_candidates"]}) == 2 for r in students)


def test_a_run_with_candidates_resumes_from_its_finished_units(chosen_run):
    train, valid, test, spec, ckpt, res, _ = chosen_run
    again = run_experiment(train, valid, test, spec, log=lambda *a: None, checkpoint_dir=ckpt, resume=True)
    assert again.loaded == len(res.records)
    assert [{k: r.get(k) for k in ("model", "variant", "auc", "student_dropout")} for r in again.records] == \
        [{k: r.get(k) for k in ("model", "variant", "auc", "student_dropout")} for r in res.records]


def test_the_report_says_which_dropout_each_seed_chose(chosen_run, tmp_path):
    from fastkd.experiment import write_report
    from fastkd.experiment.report import dropout_table

    *_, spec, _, res, _ = chosen_run
    text = write_report(tmp_path, res, command="x", data_desc="d", spec=spec, wall_seconds=1.0).read_text()
    assert "each of 0, 0.5" in text and "Student dropout chosen on the monitor rows" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in dropout_table(res.records).splitlines()[2:]}
    for r in res.records:
        if r.get("dropout_candidates"):
            other = [c["dropout"] for c in r["dropout_candidates"] if c["dropout"] != r["student_dropout"]][0]
            assert f"{r['student_dropout']:g}: 1" in rows[r["model"]] and f"{other:g}: 0" in rows[r["model"]]
    assert dropout_table([r for r in res.records if not r.get("dropout_candidates")]) == ""


def test_the_saved_student_is_built_with_the_dropout_it_chose(chosen_run):
    # dropout changes no shape, so only the saved settings tell a wrong candidate's kwargs apart
    from fastkd.serving import load_student

    *_, res, saved = chosen_run
    (gate,) = [r for r in res.records if r["model"] == "dnn (gate)" and r["variant"] == ""]
    assert load_student(saved).model_kwargs["dropout"] == gate["student_dropout"]


def test_an_older_run_is_told_how_to_resume_under_the_new_default(tmp_path):
    from fastkd.experiment import check_resume
    from fastkd.experiment.resume import _start, run_manifest
    from fastkd.train.manifest import ArtifactMismatchError

    train, valid, test = make_synthetic(300, seed=0).split((0.8, 0.1, 0.1))
    old = ExperimentSpec(student_dropout=None)
    _start(tmp_path, run_manifest(old, train, valid, test), resume=False)
    with pytest.raises(ArtifactMismatchError, match="--student-dropout none"):
        check_resume(tmp_path, ExperimentSpec(), train, valid, test)
    check_resume(tmp_path, old, train, valid, test)
