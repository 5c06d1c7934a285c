"""One teacher signal for several students: ``Distiller.prepare`` / ``fit(signal_from=...)``, the
dropout candidates sharing it, and a gated student whose targets equal the mean student's reusing
that student instead of training it again."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import fastkd.experiment.students as students
import fastkd.train.distiller_signal as distiller_signal
import fastkd.train.teacher_signal as signal_mod
from fastkd import Distiller, TrainConfig
from fastkd.data import CTRData, make_synthetic
from fastkd.data.rows import is_file_backed
from fastkd.experiment import ExperimentSpec, run_experiment
from fastkd.experiment.report import reuse_note
from fastkd.models import build_model
from fastkd.train import train_teachers

_FIT_GATE = signal_mod.fit_gate
SMALL = {"embed_dim": 4, "hidden_units": (16,)}
# timing fields differ between runs (also inside the candidates' and gate fit's entries);
# everything else of a record must not
TIMING = {"seconds", "cache_seconds", "epoch_seconds", "train_samples_per_s", "infer_samples_per_s",
          "teacher_seconds", "student_from"}


def _untimed(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k not in TIMING}
    if "dropout_candidates" in out:
        out["dropout_candidates"] = [{k: v for k, v in c.items() if k != "seconds"} for c in out["dropout_candidates"]]
    if "gate_fit_summary" in out:
        out["gate_fit_summary"] = {k: v for k, v in out["gate_fit_summary"].items() if k != "seconds"}
    return out


@pytest.fixture(scope="module")
def data():
    return make_synthetic(2400, seed=5).split((0.7, 0.15, 0.15), seed=0)


@pytest.fixture(scope="module")
def teacher_set(data):
    train, valid, _ = data
    cfg = TrainConfig(max_epochs=2, batch_size=256)
    models = [build_model(n, train.field_sizes, **SMALL) for n in ("dnn", "deepfm")]
    return train_teachers(models, train, valid, cfg)


def _distiller(ts, fs, dropout=0.1, **kw):
    torch.manual_seed(11)
    cfg = kw.pop("config", TrainConfig(max_epochs=2, batch_size=256, seed=3))
    return Distiller(ts, build_model("dnn", fs, dropout=dropout, **SMALL), config=cfg, **kw)


def test_a_shared_signal_trains_the_student_its_own_would(data, teacher_set, monkeypatch):
    # mutation caught: the shared targets of another gate/row order, the augmented rows redrawn
    train, valid, test = data
    fs = train.field_sizes
    builds = []
    real = distiller_signal.transfer_cache
    monkeypatch.setattr(distiller_signal, "transfer_cache", lambda *a, **k: builds.append(1) or real(*a, **k))
    own = _distiller(teacher_set, fs, dropout=0.3)
    own.fit(train, valid)
    first = _distiller(teacher_set, fs).prepare(train, valid)
    second = _distiller(teacher_set, fs, dropout=0.3)
    first.fit(train, valid, signal_from=first)
    second.fit(train, valid, signal_from=first)
    assert len(builds) == 2  # `own` and `first`: `second` built no cache
    assert second.summary["signal_shared"] and "signal_shared" not in first.summary
    assert second.targets is first.targets and second.cache is first.cache
    assert torch.equal(own.targets, first.targets)
    # a plain fit drops the rows it prepared; prepare() keeps them until release()
    assert own._prepared is None and first._prepared is not None and second._prepared is None
    for a, b in zip(own.student.parameters(), second.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(own.predict(test), second.predict(test))
    # the student history is its own, the signal's summary the shared one
    assert own.summary["student"]["epochs"] == second.summary["student"]["epochs"]
    assert second.summary["augmented_rows"] == first.summary["augmented_rows"] > 0
    first.release()
    assert first.cache is None and first.targets is None
    assert first.predict(test).shape == (len(test),)  # the student and teachers stay


def test_a_signal_that_is_not_this_fits_is_refused(data, teacher_set):
    train, valid, _ = data
    fs = train.field_sizes
    first = _distiller(teacher_set, fs).prepare(train, valid)
    cases = [
        (_distiller(teacher_set, fs), (train, valid.subset(slice(0, 100))), "other train/valid"),
        (_distiller(teacher_set, fs, temperature=2.0), (train, valid), "'temperature' differs"),
        (_distiller(teacher_set, fs, gate="mean"), (train, valid), "'gate' differs"),
        (_distiller(teacher_set, fs, config=TrainConfig(max_epochs=2, batch_size=256, seed=4)), (train, valid),
         "TrainConfig differs"),
        (_distiller([build_model("dnn", fs, **SMALL), build_model("deepfm", fs, **SMALL)], fs,
                    teachers_trained=True), (train, valid), "same trained teacher models"),
    ]
    for kd, rows, match in cases:
        with pytest.raises(ValueError, match=match):
            kd.fit(*rows, signal_from=first)
    with pytest.raises(TypeError, match="signal_from must be a Distiller"):
        _distiller(teacher_set, fs).fit(train, valid, signal_from=first.cache)
    # a setting one side leaves out at its default: teachers said to have seen the merged rows
    merged_cfg = TrainConfig(max_epochs=2, batch_size=256, seed=3, merge_validation=True)
    merged = _distiller(teacher_set, fs, config=merged_cfg, teacher_rows="merged").prepare(train, valid)
    with pytest.raises(ValueError, match="'teacher_rows' differs"):
        _distiller(teacher_set, fs, config=merged_cfg).fit(train, valid, signal_from=merged)
    unprepared = _distiller(teacher_set, fs)
    with pytest.raises(ValueError, match="no prepared signal"):
        _distiller(teacher_set, fs).fit(train, valid, signal_from=unprepared)
    first.release()
    with pytest.raises(ValueError, match="no prepared signal"):
        _distiller(teacher_set, fs).fit(train, valid, signal_from=first)
    co = Distiller([build_model("dnn", fs, **SMALL)], build_model("dnn", fs, **SMALL), mode="cotrain")
    with pytest.raises(ValueError, match="pre-train"):
        co.fit(train, valid, signal_from=first)
    with pytest.raises(ValueError, match="pre-train"):
        co.prepare(train, valid)


def _run(data, min_z: float, reuse: bool, monkeypatch):
    train, valid, test = data
    # the gate's keep rule moved so the test decides whether the gate is kept
    monkeypatch.setattr(signal_mod, "fit_gate", functools.partial(_FIT_GATE, min_z=min_z))
    monkeypatch.setattr(students, "_REUSE_SAME_SIGNAL", reuse)
    logs = []
    spec = ExperimentSpec(teachers=("dnn", "deepfm"), model_kwargs=SMALL, student_dropout=(0.1, 0.3), seeds=(0,),
                          config=TrainConfig(max_epochs=3, batch_size=256, merge_validation=True))
    res = run_experiment(train, valid, test, spec, log=logs.append)
    monkeypatch.undo()
    return res, logs


@pytest.mark.parametrize("min_z, kept", [(1e9, False), (0.0, True)])
def test_a_gated_student_with_the_mean_signal_is_the_mean_student_reused(data, monkeypatch, min_z, kept):
    # the records equal a run that trains the gated student itself (the reuse changes only the
    # time spent); with the gate kept nothing is reused. Mutation caught: reusing whatever the
    # gate (wrong AUC with the gate kept), or a key without the targets' digest
    reused, logs = _run(data, min_z, True, monkeypatch)
    trained, _ = _run(data, min_z, False, monkeypatch)
    gated = next(r for r in reused.records if r["model"] == "dnn (gate)")
    assert gated["gate_fit_summary"]["kept"] is kept
    assert ("student_from" in gated) is (not kept)
    note = reuse_note(reused.records)
    if not kept:
        assert gated["student_from"] == "dnn (mean)"
        assert any("reused, not trained again" in line for line in logs)
        assert "`dnn (gate)` in 1 of 1 seeds" in note
    else:
        assert note == ""
    assert len(reused.records) == len(trained.records)
    for a, b in zip(reused.records, trained.records):
        assert _untimed(a) == _untimed(b)
    mean = next(r for r in reused.records if r["model"] == "dnn (mean)")
    assert (gated["auc"] == mean["auc"]) is (not kept)
    for label, alphas in reused.gate_alphas.items():
        torch.testing.assert_close(torch.as_tensor(alphas[0]), torch.as_tensor(trained.gate_alphas[label][0]))


def test_memory_mapped_rows_share_one_cache_file_and_match_in_memory_rows(data, tmp_path, monkeypatch):
    # with memory-mapped rows the signal lives in files inside the first candidate's checkpoint
    # folder; the second candidate reads them, and the run equals the in-memory one
    train, valid, test = data
    np.save(tmp_path / "ids.npy", train.ids)
    np.save(tmp_path / "labels.npy", train.labels)
    mapped = CTRData(np.load(tmp_path / "ids.npy", mmap_mode="c"), np.load(tmp_path / "labels.npy", mmap_mode="c"),
                     train.field_names, train.field_sizes)
    assert is_file_backed(mapped.ids)
    builds = []
    real = distiller_signal.transfer_cache
    monkeypatch.setattr(distiller_signal, "transfer_cache", lambda *a, **k: builds.append(k["path"]) or real(*a, **k))
    spec = ExperimentSpec(teachers=("dnn", "deepfm"), model_kwargs=SMALL, student_dropout=(0.1, 0.3), seeds=(0,),
                          config=TrainConfig(max_epochs=2, batch_size=256, merge_validation=True))
    on_disk = run_experiment(mapped, valid, test, spec, log=lambda *a: None, checkpoint_dir=tmp_path / "ckpt")
    assert builds and all(p is not None and p.parent.name == "candidate0-dropout0.1" for p in builds)
    builds.clear()
    in_memory = run_experiment(train, valid, test, spec, log=lambda *a: None)
    assert builds == [None] * len(builds)
    for a, b in zip(on_disk.records, in_memory.records):
        assert _untimed(a) == _untimed(b)
