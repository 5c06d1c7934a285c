"""The student's embedding started from a trained teacher's (``student_embed_init="teacher"``) and
the hint weight as an experiment setting (``ExperimentSpec.hint_weight``, ``--hint-weight``)."""
from __future__ import annotations

import pytest
import torch

from helpers import quick_config
from fastkd import Distiller
from fastkd.data import make_synthetic
from fastkd.experiment import ExperimentSpec, parse_ablation
from fastkd.models import build_model
from fastkd.train.embed_transfer import copy_embedding, embedding_source

SIZES = [5, 7, 3]


def _model(name, dim=4, seed=0):
    torch.manual_seed(seed)
    return build_model(name, SIZES, embed_dim=dim, hidden_units=(8,))


def test_the_source_is_the_best_monitor_auc_among_teachers_that_fit():
    # mutations caught: argmin instead of argmax; a teacher of another width chosen
    student = _model("dnn")
    teachers = [_model("deepfm", seed=1), _model("dcn", dim=8, seed=2), _model("xdeepfm", seed=3)]
    y = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    good, bad = y.float() * 2 - 1, 1 - 2 * y.float()
    assert embedding_source(student, teachers, torch.stack([bad, good, good], 1), y) == 2
    assert embedding_source(student, teachers, torch.stack([good, good, bad], 1), y) == 0
    with pytest.raises(ValueError, match="no teacher's embedding has the student's field sizes"):
        embedding_source(student, teachers[1:2], good[:, None], y)
    with pytest.raises(ValueError, match="needs a student with an `embedding` module"):
        embedding_source(torch.nn.Linear(3, 1), teachers, good[:, None], y)


def test_copy_embedding_copies_the_tables_in_place():
    student, teacher = _model("dnn"), _model("deepfm", seed=1)
    params = [p for p in student.embedding.parameters()]
    before = [p.detach().clone() for p in params]
    copy_embedding(student, teacher)
    for p, b, t in zip(params, before, teacher.embedding.parameters()):
        assert torch.equal(p, t) and not torch.equal(p, b)  # same objects, the teacher's values
    assert list(student.embedding.parameters())[0] is params[0]
    with pytest.raises(ValueError, match="does not fit"):
        copy_embedding(student, _model("dcn", dim=8))


def _fit(embed_init, lr=1e-3, hint_weight=0.0):
    train, valid, _ = make_synthetic(1200, n_fields=3, seed=0).split((0.8, 0.1, 0.1))
    fs = train.field_sizes
    torch.manual_seed(0)
    teachers = [build_model(n, fs, embed_dim=4, hidden_units=(8,)) for n in ("deepfm", "dcn")]
    student = build_model("dnn", fs, embed_dim=4, hidden_units=(8,))
    kd = Distiller(teachers, student, config=quick_config(max_epochs=1, lr=lr), student_embed_init=embed_init,
                   hint_weight=hint_weight)
    kd.fit(train, valid)
    return kd


def test_distiller_starts_the_student_from_the_chosen_teacher():
    # mutation caught: the option accepted but the copy skipped (the student's own random tables)
    kd = _fit("teacher", lr=1e-9)  # one epoch at a negligible rate: the tables are the teacher's still
    src = kd.summary["embed_from"]
    for s, t in zip(kd.student.embedding.parameters(), kd.teachers[src].embedding.parameters()):
        assert torch.allclose(s, t, rtol=0, atol=1e-7)
    plain = _fit(None, lr=1e-9)
    assert "embed_from" not in plain.summary
    assert not torch.allclose(next(plain.student.embedding.parameters()),
                              next(plain.teachers[src].embedding.parameters()), rtol=0, atol=1e-7)


def test_embed_init_bad_values():
    teachers, student = [_model("deepfm")], _model("dnn")
    with pytest.raises(ValueError, match="student_embed_init must be None or one of"):
        Distiller(teachers, student, student_embed_init="best")
    with pytest.raises(ValueError, match="needs mode='pretrain'"):
        Distiller(teachers, student, mode="cotrain", student_embed_init="teacher")
    with pytest.raises(ValueError, match="student_embed_init must be None or one of"):
        ExperimentSpec(student_embed_init="deepfm")
    with pytest.raises(ValueError, match="needs mode='pretrain'"):
        ExperimentSpec(mode="cotrain", student_embed_init="teacher")
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="hint_weight must be finite and >= 0"):
            ExperimentSpec(hint_weight=bad)


def test_spec_settings_are_ablation_keys_and_reach_the_report():
    # mutation caught: a run trained with either option whose report says nothing of it
    from fastkd.experiment.report import _settings

    spec = ExperimentSpec(student_embed_init="teacher")
    assert parse_ablation("hint_weight=0.5", spec).overrides == {"hint_weight": 0.5}
    assert not parse_ablation("student_embed_init=teacher", ExperimentSpec()).plain  # students only
    # co-training's teachers are untrained when the student starts: its row drops the option
    assert parse_ablation("cotrain", spec).overrides["student_embed_init"] is None
    assert "embedding tables of the teacher" in _settings(spec)
    assert "hint loss with weight 0.5" in _settings(ExperimentSpec(hint_weight=0.5))
    assert "hint" not in _settings(ExperimentSpec()) and "embedding tables" not in _settings(ExperimentSpec())


def test_runs_started_before_the_settings_resume():
    # settings at their default are left out of run.json, so an older run's manifest still matches
    from fastkd.experiment.resume import run_manifest

    train, valid, test = make_synthetic(300, n_fields=3, seed=0).split((0.8, 0.1, 0.1))
    m = run_manifest(ExperimentSpec(), train, valid, test)
    assert "hint_weight" not in m and "student_embed_init" not in m
    m = run_manifest(ExperimentSpec(hint_weight=1.0, student_embed_init="teacher"), train, valid, test)
    assert m["hint_weight"] == 1.0 and m["student_embed_init"] == "teacher"


def test_cli_flags_reach_the_spec():
    from fastkd.cli import _spec, build_parser

    args = build_parser().parse_args(["distill", "--out", "o", "--hint-weight", "0.5", "--student-embed-init", "teacher"])
    spec = _spec(args)
    assert spec.hint_weight == 0.5 and spec.student_embed_init == "teacher"
    args = build_parser().parse_args(["distill", "--out", "o"])
    assert _spec(args).hint_weight == 0.0 and _spec(args).student_embed_init is None
