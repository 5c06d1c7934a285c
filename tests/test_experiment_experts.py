"""The ablation rows whose teachers are made to differ (fastkd.experiment.experts): each segment
expert trains and stops on its own segment's rows, and the row brings a mean and a gated student
of the same experts."""
from __future__ import annotations

import numpy as np
import pytest

import fastkd.experiment.experts as experts_mod
from fastkd.data.segmented import make_segmented
from fastkd.experiment import ExperimentSpec, parse_ablation, run_experiment
from fastkd.train import TrainConfig

SMALL = {"embed_dim": 4, "hidden_units": (16,), "dropout": 0.0}


@pytest.fixture(scope="module")
def segmented_run():
    data = make_segmented(3000, seed=1, structures=("mf", "deep", "mf"), n_fields=4, active_fields=3,
                          max_cardinality=50, calibration_rows=2000)
    train, valid, test = data.split((0.7, 0.15, 0.15), seed=0)
    seen = []
    real = experts_mod.train_teachers

    def spy(models, rows, stop, cfg, **kw):
        seen.append((np.unique(rows.ids[:, 0]).tolist(), np.unique(stop.ids[:, 0]).tolist()))
        return real(models, rows, stop, cfg, **kw)

    experts_mod.train_teachers = spy
    try:
        spec = ExperimentSpec(teachers=("deepfm", "dcn"), ablations=["segments"], segment_field="segment",
                              model_kwargs=SMALL, augment=0.0,
                              config=TrainConfig(max_epochs=2, batch_size=256, merge_validation=True))
        res = run_experiment(train, valid, test, spec, log=lambda *a: None)
    finally:
        experts_mod.train_teachers = real
    return res, seen


def test_each_segment_expert_trains_and_stops_on_its_own_segment(segmented_run):
    # mutation caught: experts on the whole split (every segment value in `rows`), or stopped on
    # the whole validation split
    _, seen = segmented_run
    assert seen == [([v], [v]) for v in (0, 1, 2)]


def test_segment_experts_row_has_its_teachers_mean_and_gated_students(segmented_run):
    res, _ = segmented_run
    rows = [(r["model"], r["distill"]) for r in res.records if r["variant"].startswith("segment experts")]
    # three segments, architectures in turn from the spec's teachers
    assert rows[:4] == [("deepfm (segment 0)", "none"), ("dcn (segment 1)", "none"), ("deepfm (segment 2)", "none"),
                        ("ensemble (mean)", "mean")]
    assert ("dnn (mean)", "mean") in rows and ("dnn (gate)", "gate") in rows and ("ensemble (gate)", "gate") in rows
    # the gated student's α has one column per expert
    (label,) = [k for k in res.gate_alphas if "segment experts" in k]
    assert res.gate_alphas[label][0].shape[1] == 3


def test_segments_ablation_needs_a_segment_field():
    with pytest.raises(ValueError, match="segment field"):
        parse_ablation("segments", ExperimentSpec())
