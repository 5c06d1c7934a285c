"""``fastkd.integration``: teacher logits aligned by sample index in any DataLoader, and
distillation through DeepCTR-Torch's and FuxiCTR's own ``fit`` (skipped where those packages are
absent); the examples of docs/integration.md are executed.

Mutations that fail these tests:
- TeacherLogitsDataset hands out another row's logits (``index + 1``, or the i-th of the batch
  instead of the sample's): ``test_dataset_alignment_*``.
- DeepCTR: the pre-hook decodes the row columns wrongly (``hi * ROW_BASE`` dropped), does not strip
  them, or the loss gathers ``teacher[arange(B)]``: ``test_deepctr_rows_aligned``; the gate is
  not registered in the module tree / optimizer: ``test_deepctr_gate_trained_and_checkpointed``;
  the loss ignores DeepCTR's ``reduction="sum"``: ``test_deepctr_loss_value``; the
  ``student_outputs`` check is dropped: ``test_deepctr_refuses_*``.
- FuxiCTR: ``loader()`` loses the shuffling or the collate, ``train_step`` reads no rows, the gate
  is not in the optimizer or the checkpoint: the ``test_fuxictr_*`` tests.
- a docs example grows past 10 lines of glue or stops running: ``test_docs_example``.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import REPO
from fastkd import GatedDistillLoss, TeacherCache
from fastkd.integration import TeacherLogitsDataset

DOC = REPO / "docs" / "integration.md"


# ------------------------------------------------------------------------------------- helpers
class _Rows(Dataset):
    """Sample i knows its own index: tuples ``(i, label)`` or dicts ``{"row": i, "label": ...}``."""

    def __init__(self, n: int, as_dict: bool = False) -> None:
        self.n, self.as_dict = n, as_dict

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if self.as_dict:
            return {"row": torch.tensor(i), "label": torch.tensor(float(i % 2))}
        return torch.tensor(i), torch.tensor(float(i % 2))


def _logits(n: int, m: int = 3) -> torch.Tensor:
    # row i, teacher j: i + j / 10, exact in float32 for these n
    return (torch.arange(n, dtype=torch.float32)[:, None] + torch.arange(m, dtype=torch.float32) / 10).contiguous()


class _Recording(GatedDistillLoss):
    """GatedDistillLoss that records the teacher logits and labels of every call."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen = []

    def forward(self, student, teacher, labels=None, teacher_hidden=None):
        self.seen.append((teacher.detach().clone(), labels.detach().reshape(-1).clone()))
        return super().forward(student, teacher, labels, teacher_hidden)


def _aligned_teacher(labels: np.ndarray, m: int = 3) -> torch.Tensor:
    """Teacher logits that encode their row and agree with the label's sign: row i, teacher j
    holds ±(1 + i / n) ± j / 100, sign (2y − 1). A misaligned row shows as a sign or value error."""
    n = len(labels)
    sign = torch.from_numpy(labels.astype(np.float32)) * 2 - 1
    base = 1 + torch.arange(n, dtype=torch.float64) / n
    return (sign[:, None] * (base[:, None] + torch.arange(m) / 100)).float()


def _decode_rows(teacher: torch.Tensor, n: int) -> torch.Tensor:
    return torch.round((teacher[:, 0].abs().double() - 1) * n).long()


def _check_records(seen, labels: np.ndarray, epochs: int) -> None:
    n = len(labels)
    rows = []
    for t, y in seen:
        r = _decode_rows(t, n)
        torch.testing.assert_close(t, _aligned_teacher(labels)[r])  # every teacher column of that row
        assert torch.equal(torch.sign(t[:, 0]), y * 2 - 1), "teacher logits of another row than the label's"
        rows.append(r)
    rows = torch.cat(rows)
    assert len(rows) == epochs * n
    assert torch.equal(torch.bincount(rows, minlength=n), torch.full((n,), epochs))  # each row once an epoch
    assert not torch.equal(rows[:n], torch.arange(n)), "the trainer did not shuffle: alignment not exercised"


def _example(tag: str) -> str:
    m = re.search(r"<!-- example: " + re.escape(tag) + r"[^>]*-->\s*```python\n(.*?)```", DOC.read_text("utf-8"), re.S)
    assert m, f"docs/integration.md example {tag!r} not found"
    return m.group(1)


# --------------------------------------------------------------------------- TeacherLogitsDataset
@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_alignment_shuffled_loader(as_dict, workers):
    n = 103
    ds = TeacherLogitsDataset(_Rows(n, as_dict), _logits(n))
    loader = DataLoader(ds, batch_size=7, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(1))
    seen = []
    for batch in loader:
        if as_dict:
            assert set(batch) == {"row", "label", "teacher_logits"}
            rows, t = batch["row"], batch["teacher_logits"]
        else:
            rows, _, t = batch
        assert t.shape == (len(rows), 3)
        torch.testing.assert_close(t, _logits(n)[rows], rtol=0, atol=0)
        seen.append(rows)
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(n)) and seen.tolist() != list(range(n))


def test_dataset_alignment_teacher_cache(tmp_path):
    n = 50
    logits = _logits(n, 2).numpy()
    for cache in (TeacherCache(logits), TeacherCache.from_arrays(logits, path=tmp_path / "cache")):
        ds = TeacherLogitsDataset(TensorDataset(torch.arange(n), torch.zeros(n)), cache)
        for rows, _, t in DataLoader(ds, batch_size=8, shuffle=True):
            torch.testing.assert_close(t, torch.from_numpy(logits)[rows], rtol=0, atol=0)
    # numpy arrays and plain values are wrapped too
    rows, t = next(iter(DataLoader(TeacherLogitsDataset(list(range(n)), logits), batch_size=n, shuffle=True)))
    torch.testing.assert_close(t, torch.from_numpy(logits)[rows], rtol=0, atol=0)


def test_dataset_errors():
    with pytest.raises(ValueError, match="dataset has 5 rows but teacher_logits has 6"):
        TeacherLogitsDataset(_Rows(5), _logits(6))
    with pytest.raises(ValueError, match="teacher_logits must be a floating-point"):
        TeacherLogitsDataset(_Rows(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="teacher_logits must be a TeacherCache"):
        TeacherLogitsDataset(_Rows(5), [[0.0]] * 5)
    ds = TeacherLogitsDataset(_Rows(5, as_dict=True), _logits(5), key="row")
    with pytest.raises(ValueError, match="already have a 'row' key"):
        ds[0]


# --------------------------------------------------------------------------------- DeepCTR-Torch
def _deepctr_setup(n=600, seed=0):
    pytest.importorskip("deepctr_torch")
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    from fastkd.data import make_synthetic

    data = make_synthetic(n, n_fields=4, seed=seed)
    cols = [SparseFeat(f"f{i}", vocabulary_size=s, embedding_dim=4) for i, s in enumerate(data.field_sizes)]
    x = {f"f{i}": data.ids[:, i] for i in range(data.ids.shape[1])}

    def model(seed=0, **kw):
        m = DeepFM([], cols, use_fm=False, dnn_hidden_units=(16,), seed=seed, **kw)
        m.compile("adam", "binary_crossentropy", metrics=["auc", "binary_crossentropy"])
        return m

    return data, x, model


def test_deepctr_row_columns_exact_in_float32():
    from fastkd.integration import deepctr as kd_deepctr

    rows = np.array([0, 1, kd_deepctr.ROW_BASE - 1, kd_deepctr.ROW_BASE, 2 ** 24 + 1, 2 ** 40 + 12345, 2 ** 44 - 1])
    cols = torch.from_numpy(kd_deepctr.row_columns(rows)).float()  # DeepCTR's batches are float32
    assert torch.equal(kd_deepctr.rows_of(cols), torch.from_numpy(rows))


def test_deepctr_rows_aligned(monkeypatch):
    from fastkd.integration import deepctr as kd_deepctr

    monkeypatch.setattr(kd_deepctr, "ROW_BASE", 16)  # both row columns in use on 600 rows
    data, x, model = _deepctr_setup()
    student = model()
    crit = _Recording(3, student_outputs="prob")
    kd = kd_deepctr.attach(student, _aligned_teacher(data.labels), crit)
    hist = student.fit(kd.inputs(x), data.labels, batch_size=64, epochs=2, verbose=2,
                       validation_data=(x, data.labels))  # training and validation metrics keep working
    _check_records(crit.seen, data.labels, epochs=2)
    assert 0.0 <= hist.history["val_auc"][-1] <= 1.0 and "binary_crossentropy" in hist.history
    p = student.predict(x, 256)  # predictions stay probabilities, with or without the index columns
    assert p.min() >= 0 and p.max() <= 1
    np.testing.assert_array_equal(p, student.predict(kd.inputs(x), 256))


def test_deepctr_loss_value():
    from fastkd.integration import deepctr as kd_deepctr

    data, x, model = _deepctr_setup(n=200)
    student = model()
    T = torch.randn(200, 3)
    kd = kd_deepctr.attach(student, T, GatedDistillLoss(3, student_outputs="prob"))
    X = torch.from_numpy(np.concatenate([a.reshape(len(a), -1) for a in kd.inputs(x)], 1)).float()
    rows = torch.tensor([5, 199, 0, 17])
    y = torch.from_numpy(data.labels[rows.numpy()])
    student.train()
    y_pred = student(X[rows]).squeeze(-1)
    got = student.loss_func(y_pred, y, reduction="sum")
    want = GatedDistillLoss(3)(torch.logit(y_pred.double(), eps=1e-7).float(), T[rows], y) * 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.loss_func(student(X[rows]).squeeze(-1), y, reduction="mean"), want / 4,
                               rtol=1e-5, atol=1e-6)


def test_deepctr_gate_trained_and_checkpointed(tmp_path):
    from fastkd.integration import deepctr as kd_deepctr

    data, x, model = _deepctr_setup()  # skips without deepctr_torch
    from deepctr_torch.callbacks import EarlyStopping, ModelCheckpoint

    teachers = [model(seed=s) for s in (1, 2, 3)]
    for t in teachers:
        t.fit(x, data.labels, batch_size=64, epochs=1, verbose=0)
    T = kd_deepctr.teacher_logits(teachers, x)
    for t in teachers:  # teachers ran frozen, once: eval mode, not part of the student
        assert not t.training
    want = torch.logit(torch.from_numpy(teachers[1].predict(x, 256).reshape(-1)), eps=1e-7).float()
    torch.testing.assert_close(T[:, 1], want)
    student = model()
    kd = kd_deepctr.attach(student, T, GatedDistillLoss(3, student_outputs="prob"))
    gate = student.fastkd_loss
    assert any(p is gate.weight for g in student.optim.param_groups for p in g["params"])
    assert not any(isinstance(m, type(teachers[0])) for m in student.modules() if m is not student)
    ckpt = tmp_path / "w.pt"
    student.fit(kd.inputs(x), data.labels, batch_size=64, epochs=2, verbose=0, validation_data=(x, data.labels),
                callbacks=[ModelCheckpoint(str(ckpt), save_weights_only=True),
                           EarlyStopping("val_auc", patience=2, restore_best_weights=True)])
    assert gate.weight.abs().sum() > 0, "the gate did not train"
    saved = torch.load(ckpt)
    assert {"fastkd_loss.weight", "fastkd_loss.bias"} <= set(saved)
    # a whole-model pickle carries the gate, not the teacher logits
    torch.save(student, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(again.fastkd_loss.weight, gate.weight)
    assert again.loss_func.teacher is None
    # remove(): the plain model back, for serving
    kd.remove()
    assert not any("fastkd" in k for k in student.state_dict())
    assert not any(p is gate.weight for g in student.optim.param_groups for p in g["params"])
    student.fit(x, data.labels, batch_size=64, epochs=1, verbose=0)  # its own loss again


@pytest.mark.parametrize("train_mode", [True, False])
def test_deepctr_training_batches_run_in_training_mode(train_mode):
    # mutation caught: the hook no longer restoring train() (DeepCTR-Torch 0.3.0 leaves the model in
    # eval mode after its first validation pass), or restoring it for validation/predict batches
    from fastkd.integration import deepctr as kd_deepctr

    data, x, model = _deepctr_setup(n=300)
    student = model(dnn_dropout=0.5)
    crit = GatedDistillLoss(3, student_outputs="prob")
    kd = kd_deepctr.attach(student, torch.randn(300, 3), crit, train_mode=train_mode)
    modes = []  # (training batch?, training mode) for every forward pass
    student.register_forward_pre_hook(lambda m, a: modes.append((torch.is_grad_enabled(), m.training)))
    student.fit(kd.inputs(x), data.labels, batch_size=100, epochs=3, verbose=0, validation_data=(x, data.labels))
    train_batches = [t for grad, t in modes if grad]
    assert len(train_batches) == 9 and not any(t for grad, t in modes if not grad)  # validation: eval mode
    assert all(train_batches) if train_mode else not all(train_batches[3:])


def test_deepctr_lr_decay_on_plateau():
    # mutation caught: decaying after an improving epoch, or never
    from fastkd.integration import deepctr as kd_deepctr

    pytest.importorskip("deepctr_torch")
    cb = kd_deepctr.lr_decay_on_plateau("val_auc", factor=0.5)

    class Model:
        optim = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    cb.set_model(Model)
    cb.on_train_begin()
    lrs = []
    for auc in (0.6, 0.7, 0.65, 0.7, 0.8, 0.1):
        cb.on_epoch_end(0, {"val_auc": auc})
        lrs.append(Model.optim.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.25, 0.125]
    cb.on_epoch_end(0, {"val_auc": float("nan")})  # a NaN monitor is no improvement (fastkd's rule)
    assert Model.optim.param_groups[0]["lr"] == 0.0625
    with pytest.raises(KeyError, match="'val_auc' is not in DeepCTR's epoch logs"):
        cb.on_epoch_end(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="mode"):
        kd_deepctr.lr_decay_on_plateau(mode="up")


def test_deepctr_refuses_and_explains():
    from fastkd.integration import deepctr as kd_deepctr

    data, x, model = _deepctr_setup(n=200)
    with pytest.raises(ValueError, match="student_outputs='prob'"):
        kd_deepctr.attach(model(), torch.randn(200, 3), GatedDistillLoss(3))  # sigmoid model, "logit" loss
    with pytest.raises(ValueError, match="compile"):
        from deepctr_torch.models import DeepFM
        kd_deepctr.attach(DeepFM([], model().dnn_feature_columns, use_fm=False, dnn_hidden_units=(4,)),
                          torch.randn(200, 3), GatedDistillLoss(3, student_outputs="prob"))
    student = model()
    kd = kd_deepctr.attach(student, torch.randn(200, 3), GatedDistillLoss(3, student_outputs="prob"))
    with pytest.raises(ValueError, match="x has 100 rows but teacher_logits has 200"):
        kd.inputs({k: v[:100] for k, v in x.items()})
    with pytest.raises(RuntimeError, match=r"kd\.inputs"):
        student.fit(x, data.labels, batch_size=64, epochs=1, verbose=0)  # forgot kd.inputs(x)
    student.compile("adam", "binary_crossentropy")  # a compile after attach drops the distillation
    with pytest.raises(RuntimeError, match="compile first, then attach"):
        student.fit(kd.inputs(x), data.labels, batch_size=64, epochs=1, verbose=0)
    # a model without its sigmoid (task="regression") takes logits
    plain = model(task="regression")
    kd_deepctr.attach(plain, torch.randn(200, 3), GatedDistillLoss(3))


# --------------------------------------------------------------------------------------- FuxiCTR
def _fuxictr_setup(tmp_path, n=600, meta_row=False):
    pytest.importorskip("fuxictr")
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    from fastkd.data import make_synthetic
    from fastkd.integration.fuxictr import ROW_KEY

    class DNN(BaseModel):
        def __init__(self, feature_map, model_id="DNN", **kwargs):
            super().__init__(feature_map, model_id=model_id, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, 4)
            self.mlp = MLP_Block(feature_map.sum_emb_out_dim(), [16], output_dim=1,
                                 output_activation=self.output_activation)
            self.compile(kwargs["optimizer"], kwargs["loss"], 1e-2)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            return {"y_pred": self.mlp(self.embedding_layer(self.get_inputs(inputs)).flatten(start_dim=1))}

    data = make_synthetic(n, n_fields=4, seed=0)
    root = str(tmp_path)
    fm = FeatureMap("t", root)
    os.makedirs(os.path.join(root, "t"), exist_ok=True)
    for i, s in enumerate(data.field_sizes):
        fm.features[f"f{i}"] = {"type": "categorical", "vocab_size": int(s), "source": ""}
    cols = {f"f{i}": data.ids[:, i] for i in range(data.ids.shape[1])}
    if meta_row:
        fm.features[ROW_KEY] = {"type": "meta"}
        cols[ROW_KEY] = np.arange(n)
    fm.labels, fm.default_emb_dim = ["label"], 4
    fm.set_column_index()
    path = os.path.join(root, "train.npz")
    np.savez(path, label=data.labels, **cols)
    train_gen, valid_gen = RankDataLoader(fm, stage="train", train_data=path, valid_data=path, batch_size=64,
                                          shuffle=True, num_workers=0)
    kw = dict(optimizer="adam", loss="binary_crossentropy", verbose=0, model_root=root, metrics=["AUC", "logloss"])
    return data, DNN, fm, train_gen, valid_gen, kw


@pytest.mark.parametrize("route", ["loader", "meta_row"])
def test_fuxictr_rows_aligned(tmp_path, route):
    from fastkd.integration import fuxictr as kd_fuxictr

    data, DNN, fm, train_gen, valid_gen, kw = _fuxictr_setup(tmp_path, meta_row=route == "meta_row")
    student = DNN(fm, model_id="s", **kw)
    crit = _Recording(3, student_outputs="prob")
    kd = kd_fuxictr.attach(student, _aligned_teacher(data.labels), crit)
    gen = kd.loader(train_gen) if route == "loader" else train_gen
    torch.manual_seed(0)
    student.fit(gen, epochs=2, validation_data=valid_gen)
    _check_records(crit.seen, data.labels, epochs=2)
    logs = student.evaluate(valid_gen)  # FuxiCTR's metrics on its probabilities
    assert 0.0 <= logs["AUC"] <= 1.0 and logs["logloss"] > 0


def test_fuxictr_gate_trained_and_checkpointed(tmp_path):
    from fastkd.integration import fuxictr as kd_fuxictr

    data, DNN, fm, train_gen, valid_gen, kw = _fuxictr_setup(tmp_path)
    teachers = [DNN(fm, model_id=f"t{i}", **kw) for i in range(3)]
    for t in teachers:
        t.fit(train_gen, epochs=1, validation_data=valid_gen)
    T = kd_fuxictr.teacher_logits(teachers, train_gen)  # a shuffling loader, read in row order
    assert all(not t.training for t in teachers)
    seq = DataLoader(train_gen.dataset, batch_size=600, collate_fn=train_gen.collate_fn)
    with torch.no_grad():
        want = torch.logit(teachers[2].forward(next(iter(seq)))["y_pred"].reshape(-1).double(), eps=1e-7).float()
    torch.testing.assert_close(T[:, 2], want)
    student = DNN(fm, model_id="s", **kw)
    kd = kd_fuxictr.attach(student, T, GatedDistillLoss(3, student_outputs="prob"))
    gate = student.fastkd_loss
    assert any(p is gate.weight for g in student.optimizer.param_groups for p in g["params"])
    student.fit(kd.loader(train_gen), epochs=2, validation_data=valid_gen)
    assert gate.weight.abs().sum() > 0, "the gate did not train"
    saved = torch.load(student.checkpoint)  # FuxiCTR's best-model checkpoint, reloaded by fit
    torch.testing.assert_close(saved["fastkd_loss.weight"], gate.weight.detach())
    kd.remove()
    assert "train_step" not in student.__dict__ and not any("fastkd" in k for k in student.state_dict())
    student.fit(train_gen, epochs=1, validation_data=valid_gen)  # its own loss again


def test_fuxictr_refuses_and_explains(tmp_path):
    from fastkd.integration import fuxictr as kd_fuxictr

    data, DNN, fm, train_gen, valid_gen, kw = _fuxictr_setup(tmp_path, n=200)
    with pytest.raises(ValueError, match="student_outputs='prob'"):
        kd_fuxictr.attach(DNN(fm, **kw), torch.randn(200, 3), GatedDistillLoss(3))
    student = DNN(fm, **kw)
    kd_fuxictr.attach(student, torch.randn(200, 3), GatedDistillLoss(3, student_outputs="prob"))
    with pytest.raises(RuntimeError, match=r"kd\.loader"):
        student.fit(train_gen, epochs=1)  # neither kd.loader(...) nor a fastkd_row column
    with pytest.raises(ValueError, match="attached twice"):
        kd_fuxictr.attach(student, torch.randn(200, 3), GatedDistillLoss(3, student_outputs="prob"))
    with pytest.raises(TypeError, match="meta column"):
        kd_fuxictr.FuxiCTRDistillation.loader(None, [{"a": 1}])


# ------------------------------------------------------------------------------------ docs/integration.md
@pytest.mark.parametrize("tag,package", [("plain", None), ("deepctr", "deepctr_torch"), ("fuxictr", "fuxictr")])
def test_docs_example(tag, package, tmp_path, monkeypatch, capsys):
    if package:
        pytest.importorskip(package)
    code = _example(tag)
    glue = [line for line in code.splitlines() if line.rstrip().endswith("# fastkd") or "# fastkd:" in line]
    assert 3 <= len(glue) <= 10, f"{tag}: {len(glue)} lines of glue"
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, f"docs/integration.md[{tag}]", "exec"), ns)
    if tag == "plain":
        assert torch.isfinite(ns["loss"]) and ns["criterion"].weight.abs().sum() > 0
    else:
        student = ns["student"]
        assert student.fastkd_loss.weight.abs().sum() > 0, "the gate did not train"
        assert "AUC" in capsys.readouterr().out.upper()
