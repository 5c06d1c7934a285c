"""The ``nn.Module`` layer of the losses (``fastkd/losses.py``: DistillLoss, GatedDistillLoss,
HintLoss) and the input validation shared by all losses.

Each op's own tests (values, gradients, kernels) are in its file: tests/test_distill_loss.py,
tests/test_gated_distill_loss.py, tests/test_hint_loss.py; the dispatch seam and the
``torch.library`` registration in tests/test_autograd.py.
"""
from __future__ import annotations

import pytest
import torch

from helpers import HIDDEN, make_inputs
from fastkd import DistillLoss, GatedDistillLoss, HintLoss
from fastkd.functional import distill_loss, gated_distill_loss, hint_loss
from fastkd.reference import distill_loss_ref


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def test_module_parameters_state_and_training():
    crit = GatedDistillLoss(num_teachers=3, temperature=2.0)
    assert set(dict(crit.named_parameters())) == {"weight", "bias"}
    assert torch.all(crit.weight == 0) and torch.all(crit.bias == 0)
    zs, zt, y, _ = make_inputs(64, 3, 1)
    crit(zs, zt, y)
    torch.testing.assert_close(crit.last_alpha, torch.full((64, 3), 1 / 3))  # zero init = averaging
    # the gate learns to prefer the teacher that matches the labels
    zt = torch.stack([torch.randn(256), (torch.rand(256) < 0.5).float() * 8 - 4, torch.randn(256)], 1)
    y = (zt[:, 1] > 0).float()
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        crit(torch.zeros(256), zt, y).backward()
        opt.step()
    assert crit.last_alpha.mean(0).argmax().item() == 1
    sd = crit.state_dict()
    clone = GatedDistillLoss(num_teachers=3, temperature=2.0)
    clone.load_state_dict(sd)
    torch.testing.assert_close(clone.weight, crit.weight)
    fixed = GatedDistillLoss(2, gate=torch.tensor([0.25, 0.75]))
    assert "fixed_weights" in fixed.state_dict() and len(list(fixed.parameters())) == 0
    hidden = GatedDistillLoss(2, gate="hidden", hidden_dim=HIDDEN)
    assert hidden.weight.shape == (2, HIDDEN)
    assert GatedDistillLoss(2, num_classes=4).weight.shape == (2, 4)


def test_fixed_weights_gate():
    zs, zt, y, _ = make_inputs(10, 2, 1)
    crit = GatedDistillLoss(2, gate=torch.tensor([0.25, 0.75]), hard_weight=0.0, temperature=2.0)
    want = distill_loss_ref(zs, 0.25 * zt[:, 0] + 0.75 * zt[:, 1], None, temperature=2.0, hard_weight=0.0)
    torch.testing.assert_close(crit(zs, zt, y), want)


def test_hint_module():
    hint = HintLoss(teacher_dim=9, student_dim=4)
    vs, vt = torch.randn(5, 4, requires_grad=True), torch.randn(5, 9)
    out = hint(vs, vt)
    torch.testing.assert_close(out, ((vt @ hint.proj.weight.T - vs) ** 2).sum(1).mean())
    out.backward()
    assert hint.proj.weight.grad is not None and vs.grad is not None


# --------------------------------------------------------------------------------------------
# Input normalisation and bad input, shared by all losses
# --------------------------------------------------------------------------------------------
def test_binary_column_vector_logits_accepted():
    zs, zt, y, _ = make_inputs(8, 3, 1)
    a = gated_distill_loss(zs.view(-1, 1), zt.unsqueeze(-1), y.view(-1, 1))
    torch.testing.assert_close(a, gated_distill_loss(zs, zt, y))
    torch.testing.assert_close(distill_loss(zs.view(-1, 1), zt[:, :1], y), distill_loss(zs, zt[:, 0], y))


def test_integer_and_bool_binary_labels():
    zs, zt, y, _ = make_inputs(8, 3, 1)
    base = gated_distill_loss(zs, zt, y)
    torch.testing.assert_close(gated_distill_loss(zs, zt, y.long()), base)
    torch.testing.assert_close(gated_distill_loss(zs, zt, y.bool()), base)
    soft = torch.full((8,), 0.3)
    assert torch.isfinite(distill_loss(zs, zt[:, 0], soft))


BAD_CASES = [
    ("shape mismatch", ValueError, "teacher_logits", lambda: distill_loss(torch.randn(6), torch.randn(5))),
    ("teacher shape", ValueError, "teacher_logits", lambda: gated_distill_loss(torch.randn(6), torch.randn(6))),
    ("M != num_teachers", ValueError, "num_teachers",
     lambda: GatedDistillLoss(2)(torch.randn(6), torch.randn(6, 3), torch.ones(6))),
    ("labels > 1", ValueError, "labels", lambda: distill_loss(torch.randn(3), torch.randn(3), torch.tensor([0.0, 2.0, 1.0]))),
    ("labels < 0", ValueError, "labels", lambda: gated_distill_loss(torch.randn(3), torch.randn(3, 2), torch.tensor([0.0, -1.0, 1.0]))),
    ("labels nan", ValueError, "labels", lambda: distill_loss(torch.randn(2), torch.randn(2), torch.tensor([0.0, float("nan")]))),
    ("class out of range", ValueError, "labels", lambda: distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]))),
    ("negative class", ValueError, "labels", lambda: distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([-1, 0]))),
    ("float class labels", TypeError, "labels", lambda: distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.0, 1.0]))),
    ("labels shape", ValueError, "labels", lambda: distill_loss(torch.randn(3), torch.randn(3), torch.ones(4))),
    ("T = 0", ValueError, "temperature", lambda: distill_loss(torch.randn(3), torch.randn(3), temperature=0.0)),
    ("T < 0", ValueError, "temperature", lambda: DistillLoss(temperature=-1.0)),
    ("T nan", ValueError, "temperature", lambda: GatedDistillLoss(2, temperature=float("nan"))),
    ("T inf", ValueError, "temperature", lambda: distill_loss(torch.randn(3), torch.randn(3), temperature=float("inf"))),
    ("T tensor", TypeError, "temperature", lambda: distill_loss(torch.randn(3), torch.randn(3), temperature=torch.tensor(2.0))),
    ("empty batch", ValueError, "empty", lambda: distill_loss(torch.randn(0), torch.randn(0))),
    ("empty batch gated", ValueError, "empty", lambda: gated_distill_loss(torch.randn(0), torch.randn(0, 2), torch.ones(0))),
    ("integer student", TypeError, "student_logits", lambda: distill_loss(torch.ones(3, dtype=torch.long), torch.randn(3))),
    ("integer teacher", TypeError, "teacher_logits", lambda: gated_distill_loss(torch.randn(3), torch.ones(3, 2, dtype=torch.int32), torch.ones(3))),
    ("hidden without teacher_hidden", ValueError, "teacher_hidden",
     lambda: GatedDistillLoss(3, gate="hidden", hidden_dim=4)(torch.randn(6), torch.randn(6, 3), torch.ones(6))),
    ("hidden without hidden_dim", ValueError, "hidden_dim", lambda: GatedDistillLoss(3, gate="hidden")),
    ("hidden dim mismatch", ValueError, "hidden_dim",
     lambda: GatedDistillLoss(3, gate="hidden", hidden_dim=4)(torch.randn(6), torch.randn(6, 3), torch.ones(6), torch.randn(6, 3, 5))),
    ("unknown gate", ValueError, "gate", lambda: GatedDistillLoss(3, gate="attention")),
    ("unknown ensemble", ValueError, "ensemble", lambda: GatedDistillLoss(3, ensemble="median")),
    ("unknown reduction", ValueError, "reduction", lambda: DistillLoss(reduction="batchmean")),
    ("negative weight", ValueError, "kd_weight", lambda: DistillLoss(kd_weight=-0.1)),
    ("fixed weights sum", ValueError, "sum to 1", lambda: GatedDistillLoss(2, gate=torch.tensor([0.5, 0.6]))),
    ("fixed weights negative", ValueError, ">= 0", lambda: GatedDistillLoss(2, gate=torch.tensor([1.5, -0.5]))),
    ("fixed weights shape", ValueError, "shape", lambda: GatedDistillLoss(3, gate=torch.tensor([0.5, 0.5]))),
    ("trainable gate without labels", ValueError, "labels",
     lambda: GatedDistillLoss(3)(torch.randn(6), torch.randn(6, 3))),
    ("hard term without labels", ValueError, "labels", lambda: gated_distill_loss(torch.randn(6), torch.randn(6, 3))),
    ("logit gate without params", ValueError, "gate_weight",
     lambda: gated_distill_loss(torch.randn(6), torch.randn(6, 3), torch.ones(6), gate="logit")),
    ("num_classes mismatch", ValueError, "num_classes",
     lambda: GatedDistillLoss(3, num_classes=4)(torch.randn(6, 5), torch.randn(6, 3, 5), torch.zeros(6, dtype=torch.long))),
    ("3-d student", ValueError, "student_logits", lambda: distill_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))),
    ("hint shapes", ValueError, "weight", lambda: hint_loss(torch.randn(3, 4), torch.randn(3, 5), torch.randn(5, 4))),
    ("hint batch", ValueError, "batch", lambda: HintLoss(5, 4)(torch.randn(3, 4), torch.randn(2, 5))),
    ("bad num_teachers", ValueError, "num_teachers", lambda: GatedDistillLoss(0)),
    ("not a tensor", TypeError, "student_logits", lambda: distill_loss([0.1, 0.2], torch.randn(2))),
]


@pytest.mark.parametrize("name,exc,match,call", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises(name, exc, match, call):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------
# student_outputs / teacher_outputs: probabilities from a trainer whose model ends in a sigmoid
# --------------------------------------------------------------------------------------------
# Mutations that fail these tests: drop the torch.logit conversion of either side (values
# differ); drop the clamp (PROB_EPS = 0: infinite logits, non-finite loss); drop the float32
# upcast (float16 1 − 1e-7 rounds to 1: an infinite logit); drop the [0, 1] range check; drop
# the warning or its batch-size / spread conditions; skip the modules' spot checks.
import warnings  # noqa: E402

from fastkd import functional as FK  # noqa: E402


def _prob_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "lies in [0, 1]" in str(w.message)]


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
def test_prob_outputs_equal_the_logit_path(side):
    zs, zt, y, _ = make_inputs(96, 3, 1, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    kw = {f"{s}_outputs": "prob" for s in (("student", "teacher") if side == "both" else (side,))}
    ps = zs.sigmoid() if "student_outputs" in kw else zs
    pt = zt.sigmoid() if "teacher_outputs" in kw else zt

    def run(inp_s, inp_t, **extra):
        x = inp_s.detach().clone().requires_grad_()
        gw, gb = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = gated_distill_loss(x, inp_t, y, gate="logit", gate_weight=gw, gate_bias=gb, temperature=2.0, **extra)
        loss.backward()
        return loss, x, gw, gb

    base, xs, bw, bb = run(zs, zt)
    # the student's gradient through its sigmoid equals the logit path's
    zs_leaf = zs.detach().clone().requires_grad_()
    gw, gb = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = gated_distill_loss(zs_leaf.sigmoid() if "student_outputs" in kw else zs_leaf, pt, y, gate="logit",
                              gate_weight=gw, gate_bias=gb, temperature=2.0, **kw)
    loss.backward()
    torch.testing.assert_close(loss, base)
    torch.testing.assert_close(zs_leaf.grad, xs.grad)
    torch.testing.assert_close(gw.grad, bw.grad)
    torch.testing.assert_close(gb.grad, bb.grad)
    # distill_loss and both modules take the same arguments
    torch.testing.assert_close(distill_loss(ps, pt[:, 0], y, temperature=2.0, **kw),
                               distill_loss(zs, zt[:, 0], y, temperature=2.0))
    torch.testing.assert_close(DistillLoss(temperature=2.0, **kw)(ps, pt[:, 0], y),
                               DistillLoss(temperature=2.0)(zs, zt[:, 0], y))
    torch.testing.assert_close(GatedDistillLoss(3, **kw)(ps, pt, y), GatedDistillLoss(3)(zs, zt, y))
    assert "prob" in repr(GatedDistillLoss(3, **kw)) and "outputs" not in repr(GatedDistillLoss(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prob_outputs_are_clamped_to_eps(dtype):
    pt = torch.tensor([[0.0, 1.0], [0.5, 1.0]], dtype=dtype)
    zs = torch.zeros(2, dtype=dtype)
    y = torch.tensor([0.0, 1.0])
    edge = torch.logit(torch.tensor([FK.PROB_EPS, 1 - FK.PROB_EPS]))  # about -16.1 and +15.9
    want = gated_distill_loss(zs.float(), torch.stack([edge, torch.tensor([0.0, float(edge[1])])]), y)
    got = gated_distill_loss(zs, pt, y, teacher_outputs="prob")
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(distill_loss(torch.tensor([0.0, 1.0], dtype=dtype), pt[:, 0], y, student_outputs="prob"))


PROB_BAD_CASES = [
    ("teacher prob > 1", "teacher_outputs='prob'",
     lambda: gated_distill_loss(torch.randn(4), torch.tensor([[0.5, 2.5]] * 4), torch.ones(4), teacher_outputs="prob")),
    ("student prob < 0", "student_outputs='prob'",
     lambda: distill_loss(torch.tensor([0.2, -0.3]), torch.randn(2), student_outputs="prob")),
    ("unknown kind", "student_outputs must be one of", lambda: DistillLoss(student_outputs="probability")),
    ("unknown kind functional", "teacher_outputs must be one of",
     lambda: gated_distill_loss(torch.randn(2), torch.randn(2, 2), torch.ones(2), teacher_outputs="sigmoid")),
    ("multi-class prob", "binary", lambda: distill_loss(torch.rand(2, 3), torch.rand(2, 3), student_outputs="prob")),
]


@pytest.mark.parametrize("name,match,call", PROB_BAD_CASES, ids=[c[0] for c in PROB_BAD_CASES])
def test_prob_outputs_bad_input(name, match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_probabilities_passed_as_logits_warn():
    zs, zt, y, _ = make_inputs(64, 3, 1)
    ps, pt = zs.sigmoid(), zt.sigmoid()
    # the student's probabilities as logits: a warning naming student_outputs (functional and module)
    msgs = _prob_warnings(lambda: gated_distill_loss(ps, zt, y))
    assert len(msgs) == 1 and "student_outputs='prob'" in msgs[0]
    msgs = _prob_warnings(lambda: GatedDistillLoss(3)(ps, zt, y))
    assert len(msgs) == 1 and "student_outputs" in msgs[0]
    msgs = _prob_warnings(lambda: distill_loss(zs, pt[:, 0], y))
    assert len(msgs) == 1 and "teacher_outputs='prob'" in msgs[0]
    # no warning: logits, probabilities declared as such, small batches, and near-constant
    # batches (an untrained model's logits may all lie in [0, 1]: fastkd's own tiny test runs)
    assert not _prob_warnings(lambda: gated_distill_loss(zs, zt, y))
    assert not _prob_warnings(lambda: gated_distill_loss(ps, pt, y, student_outputs="prob", teacher_outputs="prob"))
    assert not _prob_warnings(lambda: gated_distill_loss(ps[:63], zt[:63], y[:63]))
    assert not _prob_warnings(lambda: gated_distill_loss(torch.zeros(64), zt, y))
    narrow = 0.1 + 0.15 * torch.rand(64)  # spread 0.15 < PROB_CHECK_MIN_SPAN
    assert not _prob_warnings(lambda: gated_distill_loss(narrow, narrow[:, None].expand(64, 3) + 0.01, y))
    assert len(_prob_warnings(lambda: gated_distill_loss(narrow * 4 - 0.3, zt, y))) == 1  # spread 0.6


def test_module_spot_checks_off_the_cpu(monkeypatch):
    # Off the CPU (here: values_checkable() forced False) the functional reads no values; a
    # module checks calls 1, 10, 100 and 1000 only (one host sync each).
    zs, zt, y, _ = make_inputs(64, 3, 1)
    monkeypatch.setattr("fastkd._validate.values_checkable", lambda t: False)
    assert not _prob_warnings(lambda: gated_distill_loss(zs.sigmoid(), zt, y))
    crit = GatedDistillLoss(3)
    warned = [len(_prob_warnings(lambda: crit(zs.sigmoid(), zt, y))) for _ in range(12)]
    assert warned == [1] + [0] * 8 + [1, 0, 0]
    assert len(_prob_warnings(lambda: [crit(zs.sigmoid(), zt, y) for _ in range(88)])) == 1  # call 100
    assert crit._calls == 100
    assert len(_prob_warnings(lambda: DistillLoss()(zs, zt[:, 0].sigmoid(), y))) == 1
