"""Training path: teacher cache, early stopping, pre-train / co-train, checkpoints and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REPO, quick_config, small_model
from fastkd import Distiller, TeacherCache, TrainConfig
from fastkd.data import make_synthetic
from fastkd.models import build_model
from fastkd.train import EarlyStopper, evaluate, train_model



@pytest.fixture(scope="module")
def splits():
    return make_synthetic(3000, seed=3).split((0.7, 0.15, 0.15), seed=0)


def small(name, fs, seed=0):
    return small_model(name, fs, seed)


def cfg(**kw):
    return quick_config(**{"max_epochs": 3, **kw})


def test_early_stopper_patience_and_best():
    m = nn.Linear(1, 1)
    s = EarlyStopper("auc", patience=2)
    for epoch, v in enumerate([0.6, 0.7, 0.69, 0.71, 0.70, 0.705]):
        s.step(v, epoch, {"m": m})
    assert s.best == 0.71 and s.best_epoch == 3 and s.should_stop
    s = EarlyStopper("kd", patience=3)
    for epoch, v in enumerate([1.0, 0.9, 0.95, 0.91, float("nan")]):
        s.step(v, epoch, {"m": m})
    assert s.best == 0.9 and s.should_stop  # NaN never counts as an improvement


def test_train_model_stops_and_restores_best(splits):
    train, valid, _ = splits
    model = small("dnn", train.field_sizes)
    out = train_model(model, train, valid, cfg(max_epochs=40, lr=0.05, patience=1))
    assert out["epochs"] < 40  # a large lr overfits fast; patience 1 stops early
    assert out["epochs"] == out["best_epoch"] + 1
    best = max(h["monitor"] for h in out["history"])
    assert evaluate(model, valid)["auc"] == pytest.approx(best, abs=1e-9)


class CountingTeacher(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.hidden_dim = inner.hidden_dim
        self.calls = 0

    def forward(self, ids, return_hidden=False):
        self.calls += 1
        return self.inner(ids, return_hidden=return_hidden)


@pytest.mark.parametrize("gate", ["logit", "hidden", "mean"])
def test_pretrain_student_epoch_never_calls_a_teacher(splits, gate):
    train, valid, test = splits
    fs = train.field_sizes
    teachers = [CountingTeacher(small(n, fs, i)) for i, n in enumerate(("deepfm", "dcn"))]
    kd = Distiller(teachers, small("dnn", fs), gate=gate, augment=0,
                   config=cfg(max_epochs=2), teachers_trained=True)
    calls = []
    orig = TeacherCache.build.__func__

    def build(cls, *a, **k):
        out = orig(cls, *a, **k)
        calls.append([t.calls for t in teachers])
        return out

    TeacherCache.build = classmethod(build)
    try:
        kd.fit(train, valid)
    finally:
        TeacherCache.build = classmethod(orig)
    # every teacher call happened inside cache building; training itself ran none
    assert [t.calls for t in teachers] == calls[-1]
    n_batches = -(-len(train) // 256)
    assert all(c <= 2 for c in calls[0]) and n_batches > 2  # one pass over the data (one eval batch)
    assert kd.evaluate(test)["auc"] > 0.5


def test_teacher_cache_memmap_roundtrip_and_incomplete_build(tmp_path, splits):
    train, _, _ = splits
    fs = train.field_sizes
    teachers = [small("dnn", fs, 1), small("deepfm", fs, 2)]
    mem = TeacherCache.build(teachers, train, hidden=True)
    disk = TeacherCache.build(teachers, train, hidden=True, path=tmp_path / "c")
    idx = torch.tensor([0, 5, 3, len(train) - 1])
    for a, b in zip(mem.gather(idx), TeacherCache.load(tmp_path / "c").gather(idx)):
        torch.testing.assert_close(a, b)
    assert disk.logits.shape == (len(train), 2)

    class Boom(nn.Module):
        hidden_dim = teachers[0].hidden_dim

        def forward(self, ids, return_hidden=False):
            raise RuntimeError("teacher died")

    with pytest.raises(RuntimeError):
        TeacherCache.build([teachers[0], Boom()], train, path=tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        TeacherCache.load(tmp_path / "broken")


def test_cotrain_kd_gradient_flows_teacher_to_student_only(splits):
    train, valid, _ = splits
    fs = train.field_sizes
    teachers = [small("deepfm", fs, 1), small("dcn", fs, 2)]
    student = small("dnn", fs, 3)
    kd = Distiller(teachers, student, mode="cotrain", config=cfg(max_epochs=1))
    ids = torch.from_numpy(train.ids[:128])
    y = torch.from_numpy(train.labels[:128])
    for t in teachers:
        t.train()
    student.train()
    # teacher gradients from the joint loss equal those of their own label losses alone
    torch.manual_seed(0)
    t_logits = torch.stack([t(ids) for t in teachers], 1)
    own = sum(nn.functional.binary_cross_entropy_with_logits(t_logits[:, i], y) for i in range(2))
    g_own = torch.autograd.grad(own, list(teachers[0].parameters()))
    torch.manual_seed(0)
    t_logits = torch.stack([t(ids) for t in teachers], 1)
    own = sum(nn.functional.binary_cross_entropy_with_logits(t_logits[:, i], y) for i in range(2))
    joint = own + kd._student_loss(ids, y, t_logits.detach(), None)
    g_joint = torch.autograd.grad(joint, list(teachers[0].parameters()))
    for a, b in zip(g_own, g_joint):
        torch.testing.assert_close(a, b)
    summary = kd.fit(train, valid)
    assert summary["student"]["epochs"] == 1


def test_kd_early_stopping_with_merged_validation(splits):
    train, valid, test = splits
    fs = train.field_sizes
    teachers = [small("deepfm", fs, 1)]
    train_model(teachers[0], train, valid, cfg(max_epochs=2))
    c = cfg(max_epochs=30, early_stop="kd", merge_validation=True, monitor_fraction=0.25, lr=0.02, monitor_window=1)
    kd = Distiller(teachers, small("dnn", fs), gate="mean", augment=0, config=c, teachers_trained=True)
    summary = kd.fit(train, valid)
    k = round(0.25 * len(valid))
    assert len(kd.cache) == len(train) + len(valid) - k  # the rest of valid was trained on
    s = summary["student"]
    assert c.patience == 3
    assert s["epochs"] == 30 or s["epochs"] - s["best_epoch"] == 3
    mon = [h["monitor"] for h in s["history"]]
    assert s["best_monitor"] == min(mon)


def test_label_stopping_with_merged_validation_monitors_the_held_out_slice(splits):
    """The label-stopped baseline with the same training rows as a merged-validation student."""
    train, valid, test = splits
    c = cfg(max_epochs=4, early_stop="auc", merge_validation=True, monitor_fraction=0.25, monitor_window=1)
    grown, monitor = c.split_validation(train, valid)
    k = round(0.25 * len(valid))
    assert (len(grown), len(monitor)) == (len(train) + len(valid) - k, k)
    np.testing.assert_array_equal(monitor.ids, valid.ids[:k])
    np.testing.assert_array_equal(grown.ids[len(train):], valid.ids[k:])
    model = small("dnn", train.field_sizes)
    s = train_model(model, train, valid, c)
    assert s["best_monitor"] == pytest.approx(evaluate(model, monitor)["auc"], abs=1e-12)
    assert s["best_monitor"] != pytest.approx(evaluate(model, valid)["auc"], abs=1e-12)
    # teachers never train on validation rows: their predictions there are the student's targets
    assert c.for_teachers().merge_validation is False
    assert c.for_teachers().early_stop == "auc"
    with pytest.raises(ValueError, match="at least 2 rows"):
        c.split_validation(train, valid.subset(np.arange(1)))


def test_same_seed_same_result(splits):
    train, valid, test = splits
    fs = train.field_sizes
    res = []
    for _ in range(2):
        teachers = [small("deepfm", fs, 1), small("dnn", fs, 2)]
        kd = Distiller(teachers, small("dnn", fs, 3), config=cfg(max_epochs=2))
        kd.fit(train, valid)
        res.append(kd.predict(test))
    torch.testing.assert_close(res[0], res[1], rtol=0, atol=0)


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, splits):
    train, valid, test = splits
    fs = train.field_sizes

    def run(ckpt, stop=None, resume=False):
        teachers = [small("deepfm", fs, 1), small("dnn", fs, 2)]
        kd = Distiller(teachers, small("dnn", fs, 3), config=cfg(max_epochs=4, patience=4))
        kd.fit(train, valid, checkpoint_dir=ckpt, resume=resume, stop_after_epoch=stop)
        return kd.predict(test)

    full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=2)  # the student loop dies after its second epoch
    resumed = run(tmp_path / "b", resume=True)
    torch.testing.assert_close(full, resumed, rtol=0, atol=0)


KILL_SCRIPT = r"""
import sys, torch, json
from fastkd import Distiller, TrainConfig
from fastkd.data import make_synthetic
from fastkd.models import build_model
torch.set_num_threads(1)
train, valid, test = make_synthetic(3000, seed=3).split((0.7, 0.15, 0.15), seed=0)
fs = train.field_sizes
def small(name, seed):
    torch.manual_seed(seed)
    return build_model(name, fs, embed_dim=4, hidden_units=(16,), dropout=0.0)
kd = Distiller([small("deepfm", 1)], small("dnn", 3), config=TrainConfig(max_epochs=6, patience=6, batch_size=64, progress=False))
kd.fit(train, valid, checkpoint_dir=sys.argv[1], resume=True)
print(json.dumps(kd.evaluate(test)))
"""


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real kill -9 in the middle of training, then resume: same final metrics."""
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt / "student.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # into the next student epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    again = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == json.loads(ref.stdout.strip().splitlines()[-1])


def test_bf16_precision_trains_with_float32_state(splits):
    train, valid, test = splits
    fs = train.field_sizes
    auc = {}
    for precision in ("fp32", "bf16"):
        model = small("dnn", fs)
        out = train_model(model, train, valid, cfg(max_epochs=3, precision=precision, lr=0.01))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert np.isfinite(out["history"][-1]["train_loss"])
        auc[precision] = evaluate(model, test)["auc"]
    assert auc["bf16"] != auc["fp32"]  # autocast really ran
    assert abs(auc["bf16"] - auc["fp32"]) < 0.03
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("emb", [dict(sparse=True), dict(embedding_options={"fused_optimizer": "adagrad", "lr": 0.05})],
                         ids=["sparse-SparseAdam", "fused-adagrad"])
def test_sparse_and_fused_embeddings_train_in_the_loops(tmp_path, splits, emb):
    """sparse=True tables get SparseAdam, fused tables update in backward; both resume exactly."""
    train, valid, test = splits
    fs = train.field_sizes
    from fastkd.train.loop import _Optimizer

    def run(stop=None, resume=False):
        torch.manual_seed(0)
        model = build_model("dnn", fs, embed_dim=4, hidden_units=(16,), **emb)
        start = model.embedding.weight.detach().clone()
        c = cfg(max_epochs=3, patience=1, lr=0.01)
        try:
            s = train_model(model, train, valid, c, checkpoint=tmp_path / "m.pt", resume=resume, stop_after_epoch=stop)
        except KeyboardInterrupt:
            return None, None, None
        return model, s, start

    model, s, start = run()
    opt = _Optimizer({"m": model}, list(model.parameters()), 0.01)
    if "sparse" in emb:
        assert opt.sparse is not None and any(p is model.embedding.weight for g in opt.sparse.param_groups for p in g["params"])
    else:
        assert opt.sparse is None and opt.fused == [model.embedding]
        assert all(p is not model.embedding.weight for g in opt.dense.param_groups for p in g["params"])
        # the plateau schedule reaches the fused table's own learning rate
        mon = [h["monitor"] for h in s["history"]]
        bad = sum(1 for k in range(1, len(mon)) if mon[k] <= max(mon[:k]))
        assert model.embedding.lr == pytest.approx(0.05 * 0.1 ** bad)
        lr = model.embedding.lr
        opt.scale_lr(0.1)
        assert model.embedding.lr == pytest.approx(0.1 * lr)
        model.embedding.lr = lr
    assert not torch.equal(model.embedding.weight.detach(), start)  # the table trained
    assert evaluate(model, test)["auc"] > 0.55
    (tmp_path / "m.pt").unlink()
    run(stop=1)
    resumed, s2, _ = run(resume=True)
    torch.testing.assert_close(predict_logits(resumed, test), predict_logits(model, test), rtol=0, atol=0)


def predict_logits(model, data):
    from fastkd.train import predict
    return predict(model, data)


@pytest.mark.parametrize("window,epochs", [(1, 3), (3, 4)])
def test_monitor_window_smooths_the_stopping_decision(splits, monkeypatch, window, epochs):
    """A noisy dip (0.58 after 0.6) stops a patience-1 run at once; averaged over 3 epochs it is
    still progress (0.56 > 0.55), so training goes on."""
    import fastkd.train.loop as T

    train, valid, _ = splits
    values = iter([0.5, 0.6, 0.58, 0.7])
    monkeypatch.setattr(T, "_label_monitor", lambda *a: (lambda: next(values)))
    s = train_model(small("dnn", train.field_sizes), train, valid,
                    cfg(max_epochs=4, patience=1, monitor_window=window))
    assert s["epochs"] == epochs
    smoothed = [h["smoothed_monitor"] for h in s["history"]]
    expect = [np.mean([0.5, 0.6, 0.58, 0.7][max(0, i - window + 1):i + 1]) for i in range(epochs)]
    np.testing.assert_allclose(smoothed, expect)


def test_monitor_window_is_checked():
    with pytest.raises(ValueError, match="monitor_window"):
        TrainConfig(monitor_window=0)
