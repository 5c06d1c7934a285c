"""The accuracy options of the Distiller: cross-fitted teachers, teacher-labelled augmentation,
stacked gates, and their guarantees (honest soft labels, no hard label on augmented rows, gates
fitted on rows no teacher trained on, per-seed determinism)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import quick_config, small_model
import fastkd.train.distiller as distiller_mod
import fastkd.gates as gates_mod
import fastkd.train.teacher_signal as signal_mod
from fastkd import Distiller
from fastkd.augment import swap_augment
from fastkd.data import CTRData, make_synthetic
from fastkd.gates import FeatureGate, GateRows, LogitGate, ensemble_logits, fit_gate
from fastkd.train.teachers import fingerprint, fold_assignment, train_teachers



def _with_row_ids(data: CTRData) -> CTRData:
    """Prepend a field holding each row's own index, so any row can be recognised later."""
    n = len(data)
    return CTRData(np.concatenate([np.arange(n)[:, None], data.ids], 1), data.labels,
                   ["row"] + data.field_names, [n] + data.field_sizes)


@pytest.fixture(scope="module")
def splits():
    return _with_row_ids(make_synthetic(2400, seed=5)).split((0.7, 0.15, 0.15), seed=0)


def small(name, fs, seed=0):
    return small_model(name, fs, seed)


def cfg(**kw):
    return quick_config(**{"max_epochs": 2, **kw})


class Recorder(nn.Module):
    """A teacher that remembers the row ids (field 0) of every batch it trained on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.hidden_dim = inner.hidden_dim
        self.seen = set()

    def forward(self, ids, return_hidden=False):
        if self.training:
            self.seen.update(ids[:, 0].tolist())
        return self.inner(ids, return_hidden=return_hidden)


# --------------------------------------------------------------------------------------------
# cross-fitting
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,folds", [(10, 2), (11, 3), (1000, 5)])
def test_fold_assignment_is_balanced_and_seeded(n, folds):
    f = fold_assignment(n, folds, seed=3)
    counts = np.bincount(f, minlength=folds)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert np.array_equal(f, fold_assignment(n, folds, seed=3))
    assert not np.array_equal(f, fold_assignment(n, folds, seed=4))


def test_fold_assignment_rejects_too_few_rows():
    with pytest.raises(ValueError, match="at least"):
        fold_assignment(5, 3, seed=0)
    with pytest.raises(ValueError, match=">= 2"):
        fold_assignment(10, 1, seed=0)


def test_no_training_row_gets_a_soft_label_from_a_model_that_trained_on_it(splits):
    train, valid, _ = splits
    fs = train.field_sizes
    c = cfg(merge_validation=True)
    kd = Distiller([Recorder(small("dnn", fs, 1)), Recorder(small("deepfm", fs, 2))], small("dnn", fs, 3),
                   gate="mean", teacher_folds=3, config=c)
    kd.fit(train, valid)
    ts = kd.teacher_set
    rows, monitor = c.split_validation(train, valid)
    row_ids = rows.ids[:, 0]
    for j, teacher in enumerate(ts.models):
        for k, fold_model in enumerate(teacher.folds):
            own = row_ids[ts.fold_of == k]
            assert fold_model.seen, "the fold model trained on nothing"
            assert not fold_model.seen & set(own.tolist())                    # never trained on its fold
            assert not fold_model.seen & set(monitor.ids[:, 0].tolist())      # nor on the monitor rows
            # and its held-out fold's soft labels are its own predictions
            expect = fold_model.inner(torch.from_numpy(rows.ids[ts.fold_of == k])).detach().numpy()
            got = kd.cache.logits[torch.from_numpy(np.flatnonzero(ts.fold_of == k))][:, j].numpy()
            np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def test_cross_fitted_teacher_is_the_mean_of_its_fold_models_on_new_rows(splits):
    train, valid, test = splits
    fs = train.field_sizes
    ts = train_teachers([small("dnn", fs, 1)], train, valid, cfg(), folds=2, seed=0)
    x = torch.from_numpy(test.ids)
    folds = ts.models[0].folds
    with torch.no_grad():
        expect = (folds[0](x) + folds[1](x)) / 2
    np.testing.assert_allclose(ts.outputs(test)[0][:, 0], expect.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out-of-fold"):
        ts.out_of_fold(test)
    assert ts.honest_logits(train).shape == (len(train), 1)


def test_cross_fitting_refuses_hidden_vectors(splits):
    train, _, _ = splits
    fs = train.field_sizes
    with pytest.raises(ValueError, match="teacher_folds=1"):
        Distiller([small("dnn", fs)], small("dnn", fs), gate="hidden", teacher_folds=2)
    with pytest.raises(ValueError, match="teacher_folds=1"):
        Distiller([small("dnn", fs)], small("dnn", fs), gate="mean", hint_weight=1.0, teacher_folds=2)


def test_a_teacher_set_fitted_on_other_rows_is_refused(splits):
    train, valid, _ = splits
    fs = train.field_sizes
    ts = train_teachers([small("dnn", fs, 1)], train, valid, cfg(), folds=2, seed=0)
    kd = Distiller(ts, small("dnn", fs), gate="mean", config=cfg(merge_validation=True))
    with pytest.raises(ValueError, match="other rows"):
        kd.fit(train, valid)


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,f,ratio,p", [(1, 1, 3.0, 1.0), (50, 7, 0.5, 0.2), (333, 3, 2.0, 0.05)])
def test_swap_augment_draws_from_each_column(n, f, ratio, p):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (n, f)) * 10 + np.arange(f)  # column f's values end in digit f
    out = swap_augment(ids, ratio, p, seed=1)
    assert out.shape == (int(round(ratio * n)), f) and out.dtype == np.int64
    for col in range(f):
        assert set(out[:, col].tolist()) <= set(ids[:, col].tolist())
    assert np.array_equal(out, swap_augment(ids, ratio, p, seed=1))


def test_swap_augment_blocks_are_own_draws_written_in_place(tmp_path, monkeypatch):
    # mutation caught: one generator for every block (blocks repeat), `out` ignored or checked loosely
    import fastkd.augment as augment

    monkeypatch.setattr(augment, "BLOCK_ROWS", 8)
    ids = np.arange(100 * 3).reshape(100, 3)
    mm = np.lib.format.open_memmap(tmp_path / "aug.npy", mode="w+", dtype=np.int64, shape=(30, 3))
    got = swap_augment(ids, 0.3, 0.5, seed=4, out=mm)
    assert got is mm
    np.testing.assert_array_equal(np.load(tmp_path / "aug.npy"), swap_augment(ids, 0.3, 0.5, seed=4))
    assert not np.array_equal(got[0:8], got[8:16])
    # block 0 is the draw of a single generator seeded with `seed` (the rule before blocks)
    np.testing.assert_array_equal(got[:8], augment._swap_block(ids, 8, 0.5, np.random.default_rng(4)))
    with pytest.raises(ValueError, match="out must be int64"):
        swap_augment(ids, 0.3, 0.5, out=np.empty((29, 3), dtype=np.int64))


def test_swap_augment_changes_every_row_somewhere():
    ids = np.arange(2000 * 4).reshape(2000, 4)  # every value unique: a swap always changes the row
    out = swap_augment(ids, 1.0, 0.01, seed=0)
    parents = {tuple(r) for r in ids.tolist()}
    assert not any(tuple(r) in parents for r in out.tolist())


@pytest.mark.parametrize("kw,needle", [(dict(ratio=-1), "ratio"), (dict(ratio=float("nan")), "ratio"),
                                       (dict(ratio=1, swap_prob=0), "swap_prob"), (dict(ratio=1, swap_prob=1.5), "swap_prob")])
def test_swap_augment_rejects_bad_arguments(kw, needle):
    with pytest.raises(ValueError, match=needle):
        swap_augment(np.zeros((3, 2), dtype=np.int64), **kw)


@pytest.mark.parametrize("gate", ["mean", "logit"])
def test_augmented_rows_never_get_a_hard_label(splits, monkeypatch, gate):
    """The label slots of augmented rows are never read: filling them with 1 instead of 0
    changes nothing, while the same change on real rows would."""
    train, valid, test = splits
    fs = train.field_sizes

    def run(slot):
        monkeypatch.setattr(distiller_mod, "_AUG_LABEL_SLOT", slot)
        teachers = [small("dnn", fs, 1), small("deepfm", fs, 2)]
        kd = Distiller(teachers, small("dnn", fs, 3), gate=gate, augment=1.0, config=cfg())
        summary = kd.fit(train, valid)
        assert summary["augmented_rows"] == len(train) + len(valid) - round(0.2 * len(valid)) or \
            summary["augmented_rows"] == len(train)
        return kd.predict(test)

    torch.testing.assert_close(run(0.0), run(1.0), rtol=0, atol=0)


def test_mixed_loss_ignores_augmented_labels_and_reads_real_ones(splits):
    train, _, _ = splits
    fs = train.field_sizes
    kd = Distiller([small("dnn", fs, 1), small("dnn", fs, 2)], small("dnn", fs), gate="mean")
    z_s = torch.randn(6, requires_grad=True)
    target = torch.randn(6, 1)
    real = torch.tensor([True, True, True, False, False, False])
    y0 = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    y1 = y0.clone()
    y1[~real] = 1.0
    a = kd._mixed_loss(z_s, target, y0, None, real)
    b = kd._mixed_loss(z_s, target, y1, None, real)
    assert torch.equal(a, b)
    y2 = y0.clone()
    y2[0] = 0.0
    assert not torch.equal(a, kd._mixed_loss(z_s, target, y2, None, real))


# --------------------------------------------------------------------------------------------
# stacked gates
# --------------------------------------------------------------------------------------------
def test_ensemble_logits_logit_and_prob():
    z = torch.tensor([[1.0, -1.0], [2.0, 4.0]])
    a = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(ensemble_logits(z, a, "logit"), torch.tensor([-0.5, 3.0]))
    p = (a * torch.sigmoid(z / 2.0)).sum(1)
    torch.testing.assert_close(torch.sigmoid(ensemble_logits(z, a, "prob", 2.0) / 2.0), p)
    with pytest.raises(ValueError, match="ensemble"):
        ensemble_logits(z, a, "median")


def test_stacked_gate_learns_a_per_segment_teacher_and_falls_back_to_averaging():
    """On rows where teacher 0 is right in segment 0 and teacher 1 in segment 1, the feature gate
    learns the split; where no teacher is better, it stays at plain averaging."""
    rng = np.random.default_rng(0)
    n = 4000
    seg = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n).astype(np.float32)
    good = (2 * y - 1) * 3.0
    noise = rng.standard_normal((n, 2)) * 3
    z = np.where(np.stack([seg == 0, seg == 1], 1), good[:, None], noise).astype(np.float32)
    ids = np.stack([seg, rng.integers(0, 5, n)], 1)
    rows = GateRows(ids[:3000], z[:3000], y[:3000])
    mon = GateRows(ids[3000:], z[3000:], y[3000:])
    torch.manual_seed(0)
    gate = FeatureGate([2, 5], 2)
    s = fit_gate(gate, rows, mon, max_epochs=30, batch_size=256)
    assert s["monitor_loss"] < 0.5 * s["uniform_loss"] and s["kept"] and s["z"] > 2
    alpha = torch.softmax(gate(torch.from_numpy(ids[3000:]), None), 1).detach().numpy()
    assert alpha[seg[3000:] == 0, 0].mean() > 0.9 and alpha[seg[3000:] == 1, 1].mean() > 0.9
    assert not any(p.requires_grad for p in gate.parameters())  # frozen
    # identical teachers: nothing to gain, the gate keeps its start (plain averaging)
    same = GateRows(ids[:3000], np.repeat(z[:3000, :1], 2, 1), y[:3000])
    same_mon = GateRows(ids[3000:], np.repeat(z[3000:, :1], 2, 1), y[3000:])
    flat = LogitGate(2)
    s2 = fit_gate(flat, same, same_mon)
    assert s2["best_epoch"] == 0 and torch.equal(flat.weight, torch.zeros(2))


def test_stacked_gate_resets_to_averaging_without_a_significant_edge():
    """Teachers equally good everywhere, tiny monitor: whatever edge the best epoch found on the
    monitor rows is noise, and the gate must come back as plain averaging (z below min_z).
    Mutation caught: dropping the reset keeps the noisy gate (alpha not uniform)."""
    rng = np.random.default_rng(15)  # a draw whose best epoch (2) beats averaging on the monitor by noise
    n = 600
    y = rng.integers(0, 2, n).astype(np.float32)
    z = ((2 * y - 1)[:, None] * 0.5 + rng.standard_normal((n, 3)) * 2).astype(np.float32)
    ids = rng.integers(0, 50, (n, 2))
    rows, mon = GateRows(ids[:400], z[:400], y[:400]), GateRows(ids[400:], z[400:], y[400:])
    torch.manual_seed(0)
    gate = FeatureGate([50, 50], 3)
    s = fit_gate(gate, rows, mon, lr=0.03, max_epochs=30, batch_size=64)
    assert s["best_epoch"] > 0 and 0 < s["z"] < 2
    assert not s["kept"] and s["monitor_loss"] == s["uniform_loss"]
    alpha = torch.softmax(gate(torch.from_numpy(ids[400:]), None), 1)
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / 3))
    with pytest.raises(ValueError, match="min_z"):
        fit_gate(FeatureGate([50, 50], 3), rows, mon, min_z=-1.0)


@pytest.mark.parametrize("folds,teacher_rows", [(1, "train"), (3, "train"), (1, "merged")])
def test_stacked_gate_never_sees_training_row_logits(splits, monkeypatch, folds, teacher_rows):
    train, valid, _ = splits
    fs = train.field_sizes
    seen = {}
    real_fit = gates_mod.fit_gate

    def spy(gate, fit, monitor, **kw):
        seen["fit"], seen["monitor"] = fit, monitor
        return real_fit(gate, fit, monitor, **kw)

    monkeypatch.setattr(signal_mod, "fit_gate", spy)
    c = cfg(merge_validation=True)
    teachers = [Recorder(small("dnn", fs, 1)), Recorder(small("deepfm", fs, 2))]
    kd = Distiller(teachers, small("dnn", fs, 3), gate="features", teacher_folds=folds, config=c,
                   teacher_rows=teacher_rows)
    kd.fit(train, valid)
    fit, monitor = seen["fit"], seen["monitor"]
    rows, mon_rows = c.split_validation(train, valid)
    trained_on = set().union(*(t.seen for t in teachers))
    if teacher_rows == "merged":
        # the teachers trained on every student row; the gate fits and stops on the monitor rows' halves
        assert trained_on == set(rows.ids[:, 0].tolist())
        half = len(mon_rows) // 2
        assert np.array_equal(fit.ids, mon_rows.ids[:half]) and np.array_equal(monitor.ids, mon_rows.ids[half:])
        assert not trained_on & set(mon_rows.ids[:, 0].tolist())
        assert kd.teacher_set.saw_validation
        return
    assert np.array_equal(monitor.ids, mon_rows.ids)
    if folds == 1:
        # the merged validation rows: in the student's rows, outside every teacher's training rows
        assert set(fit.ids[:, 0].tolist()) == set(rows.ids[len(train):, 0].tolist())
        assert not trained_on & set(fit.ids[:, 0].tolist())
    else:
        # every student row, each with the logit of the fold model that did not train on it
        ts = kd.teacher_set
        np.testing.assert_array_equal(fit.logits, ts.out_of_fold(rows))
        for j, t in enumerate(ts.models):
            for k, m in enumerate(t.folds):
                assert not m.seen & set(rows.ids[ts.fold_of == k, 0].tolist())
    assert kd.gate_weights(valid).shape == (len(valid), 2)


def test_gate_options_are_checked(splits):
    train, _, _ = splits
    fs = train.field_sizes
    t, s = [small("dnn", fs)], small("dnn", fs)
    with pytest.raises(ValueError, match="gate_fit='stacked'"):
        Distiller(t, s, gate="features", gate_fit="joint")
    with pytest.raises(ValueError, match="gate must be one of"):
        Distiller(t, s, gate="median")
    with pytest.raises(ValueError, match="mode='pretrain'"):
        Distiller(t, s, mode="cotrain", augment=1.0)
    with pytest.raises(ValueError, match="augment"):
        Distiller(t, s, augment=-0.5)
    with pytest.raises(ValueError, match="teacher_rows must be one of"):
        Distiller(t, s, teacher_rows="valid")
    with pytest.raises(ValueError, match="merge_validation=True"):
        Distiller(t, s, teacher_rows="merged", config=cfg(merge_validation=False))
    with pytest.raises(ValueError, match="mode='pretrain'"):
        Distiller(t, s, mode="cotrain", teacher_rows="merged", config=cfg(merge_validation=True))


def test_a_teacher_set_trained_on_merged_rows_is_refused_where_its_gate_would_not_be_honest(splits):
    # mutation caught: dropping either check lets a stacked gate fit on rows the teachers trained on
    train, valid, _ = splits
    fs = train.field_sizes
    c = cfg(merge_validation=True)
    rows, mon = c.split_validation(train, valid)
    ts = train_teachers([small("dnn", fs, 1)], rows, mon, c.for_teachers())
    ts.saw_validation, ts.fitted = True, fingerprint(rows)
    with pytest.raises(ValueError, match="merge_validation=True"):  # no monitor rows to fit on
        Distiller(ts, small("dnn", fs, 3), config=cfg(merge_validation=False))
    other = cfg(merge_validation=True, monitor_fraction=0.3)  # other merged rows than the set saw
    with pytest.raises(ValueError, match="trained on other rows"):
        Distiller(ts, small("dnn", fs, 3), config=other, augment=0).fit(train, valid)
    Distiller(ts, small("dnn", fs, 3), config=c, augment=0).fit(train, valid)  # its own rows: fine


def test_an_ablation_without_merged_rows_gives_merged_teachers_the_training_split():
    from fastkd.experiment import ExperimentSpec, parse_ablation
    from fastkd.train import TrainConfig

    spec = ExperimentSpec(teacher_rows="merged", config=TrainConfig(merge_validation=True))
    for item in ("kd-stop", "merge", "merge_validation=false"):
        ab = parse_ablation(item, spec)
        sub = spec.with_overrides({k: v for k, v in ab.overrides.items() if k != "hint_weight"})
        assert not sub.config.merge_validation and sub.teacher_rows == "train", item
    with pytest.raises(ValueError, match="merge_validation"):  # asked for explicitly: refused
        spec.with_overrides({"merge_validation": False, "teacher_rows": "merged"})


def test_teachers_said_to_have_seen_the_merged_rows_make_the_gate_fit_on_monitor_rows(splits, monkeypatch):
    # trained elsewhere on the student's rows (teachers_trained=True, teacher_rows="merged"): the
    # merged rows' logits are not honest, so the gate takes the monitor rows' halves
    train, valid, _ = splits
    fs = train.field_sizes
    seen = {}
    real_fit = gates_mod.fit_gate
    monkeypatch.setattr(signal_mod, "fit_gate",
                        lambda gate, fit, monitor, **kw: seen.update(fit=fit) or real_fit(gate, fit, monitor, **kw))
    c = cfg(merge_validation=True)
    _, mon_rows = c.split_validation(train, valid)
    kd = Distiller([small("dnn", fs, 1), small("deepfm", fs, 2)], small("dnn", fs, 3), gate="features", config=c,
                   teachers_trained=True, teacher_rows="merged", augment=0)
    kd.fit(train, valid)
    assert np.array_equal(seen["fit"].ids, mon_rows.ids[:len(mon_rows) // 2])


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def test_every_option_together_is_deterministic_per_seed(splits):
    train, valid, test = splits
    fs = train.field_sizes

    def run(seed):
        kd = Distiller([small("dnn", fs, 1), small("deepfm", fs, 2)], small("dnn", fs, 3), gate="features",
                       teacher_folds=2, augment=0.5, config=cfg(merge_validation=True, seed=seed))
        kd.fit(train, valid)
        return kd.predict(test)

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# settings refused when given, not when training reaches them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,error,needle", [
    ({"hint_weight": float("nan")}, ValueError, "hint_weight must be finite and >= 0"),
    ({"hint_weight": -1.0}, ValueError, "hint_weight must be finite and >= 0"),
    ({"augment": "1"}, TypeError, "augment must be a real number"),
    ({"augment": -1}, ValueError, "augment must be finite and >= 0"),
    ({"augment_swap": 1.5}, ValueError, r"augment_swap must be in \(0, 1\]"),
    ({"temperature": None}, TypeError, "temperature must be a real number"),
    ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
    ({"kd_weight": float("inf")}, ValueError, "kd_weight must be finite and >= 0"),
    ({"config": {}}, TypeError, "config must be a TrainConfig"),
])
def test_distiller_refuses_bad_settings(kw, error, needle):
    # mutation caught: hint_weight=nan silently switching hints off, augment='1' failing in numpy
    fs = [5, 7]
    with pytest.raises(error, match=needle):
        Distiller([small_model("dnn", fs)], small_model("dnn", fs), **kw)


@pytest.mark.parametrize("kw,needle", [
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"lr": "0.1"}, "lr must be a finite number > 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"seed": None}, "seed must be an int"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"max_epochs": 2.5}, "max_epochs must be an int"),
    ({"max_epochs": True}, "max_epochs must be an int"),
    ({"max_epochs": float("nan")}, "max_epochs must be an int"),
    ({"batch_size": "64"}, "batch_size must be an int"),
    ({"monitor_fraction": "0.5"}, "monitor_fraction must be a number"),
    ({"reduce_lr_on_plateau": "no"}, "reduce_lr_on_plateau must be True or False"),
])
def test_train_config_refuses_bad_values(kw, needle):
    from fastkd import TrainConfig

    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kw)


@pytest.mark.filterwarnings("ignore:every value of student_logits")  # an untrained tiny student's logits
def test_a_student_without_return_hidden_distils_when_no_hints():
    # mutation caught: predict() passing return_hidden=False to every model (a plain nn.Module
    # student fails although it is never asked for hidden vectors)
    class Plain(nn.Module):
        def __init__(self, fs):
            super().__init__()
            self.inner = small_model("dnn", fs)

        def forward(self, ids):
            return self.inner(ids)

    train, valid, test = make_synthetic(1200, n_fields=4, seed=0).split((0.8, 0.1, 0.1))
    fs = train.field_sizes
    kd = Distiller([small_model("dnn", fs)], Plain(fs), config=quick_config(max_epochs=1), augment=0.0)
    kd.fit(train, valid)
    assert 0.0 <= kd.evaluate(test)["auc"] <= 1.0
