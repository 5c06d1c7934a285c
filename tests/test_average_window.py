"""TrainConfig(average_window=True): the restored weights are the mean of the best monitor
window's epochs (checkpoint averaging), for students and plain models alike; off by default."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import quick_config, small_model
from fastkd import TrainConfig
from fastkd.cli import build_parser, _spec
from fastkd.data import make_synthetic
from fastkd.experiment.spec import ExperimentSpec, parse_ablation
from fastkd.train import EarlyStopper, train_model
from fastkd.train.manifest import resume_config


@pytest.fixture(scope="module")
def splits():
    return make_synthetic(3000, seed=3).split((0.7, 0.15, 0.15), seed=0)


def test_the_stopper_keeps_the_mean_of_the_last_epochs_weights():
    # weights 1, 2, 3, 4 at epochs 0..3; the best (smoothed) value at epoch 2 keeps the mean of
    # epochs 0..2 = 2, and an integer buffer comes from the last of them. Mutation caught:
    # averaging the window of the last epoch seen instead of the best one (2.5 or 3)
    m = nn.BatchNorm1d(1)
    s = EarlyStopper("auc", patience=3, average=3)
    for epoch, (w, v) in enumerate(zip([1.0, 2.0, 3.0, 4.0], [0.6, 0.7, 0.8, 0.75])):
        with torch.no_grad():
            m.weight.fill_(w)
        m.num_batches_tracked.fill_(10 * epoch)
        s.step(v, epoch, {"m": m})
    assert s.best_epoch == 2
    assert float(s.best_state["m"]["weight"]) == pytest.approx(2.0)
    assert int(s.best_state["m"]["num_batches_tracked"]) == 20
    # a checkpointed stopper carries its recent weights; one without the option keeps the old format
    again = EarlyStopper("auc", patience=3, average=3)
    again.load_state_dict(s.state_dict())
    assert len(again.recent) == 3
    assert "recent" not in EarlyStopper("auc", patience=3).state_dict()


def test_the_restored_model_is_the_mean_of_the_best_windows_epochs(splits, monkeypatch):
    # the epochs are the same with or without the option (it changes what is restored, not the
    # training); the averaged run's weights equal the mean of the plain run's window weights
    train, valid, _ = splits
    fs = train.field_sizes
    seen = []
    real = EarlyStopper.step

    def spy(self, value, epoch, modules):
        seen.append({k: v.clone() for k, v in modules["model"].state_dict().items()})
        return real(self, value, epoch, modules)

    monkeypatch.setattr(EarlyStopper, "step", spy)
    c = quick_config(max_epochs=5, patience=5, monitor_window=2, lr=0.01)
    plain = small_model("dnn", fs, 1)
    summary = train_model(plain, train, valid, c)
    per_epoch, seen[:] = list(seen), []
    averaged = small_model("dnn", fs, 1)
    summary_avg = train_model(averaged, train, valid, TrainConfig(**{**c.__dict__, "average_window": True}))
    assert [h["monitor"] for h in summary["history"]] == [h["monitor"] for h in summary_avg["history"]]
    best = summary_avg["best_epoch"] - 1
    window = per_epoch[max(0, best - 1):best + 1]
    for name, t in averaged.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(t, torch.stack([w[name] for w in window]).mean(0))
    # the window's epochs differ, so restoring its last epoch instead would fail the check above
    assert len(window) == 2 and any(not torch.equal(window[0][n], window[1][n]) for n in window[0]
                                    if window[0][n].is_floating_point())


def test_an_interrupted_averaging_run_resumes_to_the_same_weights(splits, tmp_path):
    train, valid, _ = splits
    fs = train.field_sizes
    c = quick_config(max_epochs=4, patience=4, monitor_window=3, lr=0.01, average_window=True)
    whole = small_model("dnn", fs, 2)
    train_model(whole, train, valid, c)
    part = small_model("dnn", fs, 2)
    with pytest.raises(KeyboardInterrupt):
        train_model(part, train, valid, c, checkpoint=tmp_path / "m.pt", stop_after_epoch=2)
    part = small_model("dnn", fs, 2)
    train_model(part, train, valid, c, checkpoint=tmp_path / "m.pt", resume=True)
    for a, b in zip(whole.state_dict().values(), part.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_settings_teachers_manifest_cli_and_ablation():
    with pytest.raises(ValueError, match="average_window"):
        TrainConfig(average_window=1)
    on = TrainConfig(average_window=True)
    assert on.for_teachers().average_window is False and TrainConfig().for_teachers() == TrainConfig()
    # absent from a manifest at its default (older checkpoints and run folders still resume)
    assert "average_window" not in resume_config(TrainConfig()) and resume_config(on)["average_window"] is True
    args = build_parser().parse_args(["distill", "--data", "synthetic:100", "--out", "x", "--average-window"])
    assert _spec(args).config.average_window is True
    ab = parse_ablation("average_window=on", ExperimentSpec())
    assert ab.overrides == {"average_window": True} and ab.plain  # the plain DNN gets its own row
