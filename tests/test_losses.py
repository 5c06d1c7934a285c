"""Exactness tests of the distillation losses against hand values, the oracle and closed forms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import requires_cuda
from fastkd import DistillLoss, GatedDistillLoss, HintLoss
from fastkd.functional import distill_loss, gated_distill_loss, hint_loss
from fastkd.reference import distill_loss_ref, gated_distill_loss_ref, hint_loss_ref

# (name, B, M, C): C = 1 is binary. Always an odd B, a single row, and a larger batch.
_SHAPE_PARAMS = [
    ("single_row", 1, 2, 1),
    ("odd", 37, 3, 1),
    ("one_teacher", 16, 1, 1),
    ("five_teachers", 1025, 5, 1),
    ("classes_odd", 13, 2, 5),
    ("classes_single_row", 1, 3, 3),
]
_SHAPE_IDS = [p[0] for p in _SHAPE_PARAMS]
_GATES = ["logit", "hidden", "mean", "fixed"]
_ENSEMBLES = ["logit", "prob"]
_REDUCTIONS = ["mean", "sum", "none"]
# (dtype, atol, rtol): inputs are upcast to float32 inside, so every dtype is compared with
# float32 tolerances against the oracle evaluated on the same (rounded) values.
_DTYPE_PARAMS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-5, 1e-5),
    (torch.float16, 1e-5, 1e-5),
]
HIDDEN = 6


def make_inputs(B, M, C, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if C == 1:
        zs = torch.randn(B, generator=g) * scale
        zt = torch.randn(B, M, generator=g) * scale
        y = torch.randint(0, 2, (B,), generator=g).float()
    else:
        zs = torch.randn(B, C, generator=g) * scale
        zt = torch.randn(B, M, C, generator=g) * scale
        y = torch.randint(0, C, (B,), generator=g)
    h = torch.randn(B, M, HIDDEN, generator=g)
    return zs.to(dtype), zt.to(dtype), y, h.to(dtype)


def gate_params(gate, M, C, seed=1, dtype=torch.float32):
    """Random non-zero gate parameters (zero init would hide gradient bugs)."""
    g = torch.Generator().manual_seed(seed)
    if gate == "logit":
        w = torch.randn((M,) if C == 1 else (M, C), generator=g, dtype=dtype)
    elif gate == "hidden":
        w = torch.randn(M, HIDDEN, generator=g, dtype=dtype)
    else:
        return None, None
    return w.requires_grad_(), torch.randn(M, generator=g, dtype=dtype).requires_grad_()


def gate_arg(gate, M):
    if gate == "fixed":
        w = torch.arange(1, M + 1, dtype=torch.float32)
        return w / w.sum()
    return gate


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------
def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_distill_hand_values_binary():
    # zs = 0, zt = 0, y = 1, T = 1: CE(1, 0) = log 2 and CE(0.5, 0) = log 2.
    out = distill_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert out.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # zs = 2, zt = -1, y = 0, T = 2, γ = 0.3, β = 0.7
    p = sigmoid(-0.5)
    want = 0.3 * softplus(2.0) + 0.7 * (softplus(1.0) - p * 1.0)
    out = distill_loss(torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.0]),
                       temperature=2.0, hard_weight=0.3, kd_weight=0.7)
    assert out.item() == pytest.approx(want, abs=1e-6)
    # t2_scale multiplies the KD term by T²
    out = distill_loss(torch.tensor([2.0]), torch.tensor([-1.0]), None, temperature=2.0, t2_scale=True)
    assert out.item() == pytest.approx(4 * (softplus(1.0) - p), abs=1e-5)


def test_distill_hand_values_classes():
    zs, zt = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0]
    T = 2.0
    e = [math.exp(v / T) for v in zt]
    p = [v / sum(e) for v in e]
    lse_s = math.log(sum(math.exp(v / T) for v in zs))
    kd = -sum(pc * (zc / T - lse_s) for pc, zc in zip(p, zs))
    hard = -(zs[2] - math.log(sum(math.exp(v) for v in zs)))
    out = distill_loss(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([2]), temperature=T)
    assert out.item() == pytest.approx(hard + kd, abs=1e-6)


def test_gated_hand_values():
    zt = torch.tensor([[1.0, 3.0]])
    zs = torch.tensor([0.5])
    y = torch.tensor([1.0])
    # mean gate, logit ensemble: target σ(2)
    out = gated_distill_loss(zs, zt, y, gate="mean", hard_weight=0.0)
    assert out.item() == pytest.approx(softplus(0.5) - sigmoid(2.0) * 0.5, abs=1e-6)
    # mean gate, prob ensemble: target (σ(1) + σ(3)) / 2
    out = gated_distill_loss(zs, zt, y, gate="mean", hard_weight=0.0, ensemble="prob")
    t = (sigmoid(1.0) + sigmoid(3.0)) / 2
    assert out.item() == pytest.approx(softplus(0.5) - t * 0.5, abs=1e-6)
    # logit gate w = [1, 0], b = [0, 0]: s = [1, 0], α = softmax(s); plus the gate's label loss
    a0 = math.exp(1) / (math.exp(1) + 1)
    m = a0 * 1.0 + (1 - a0) * 3.0
    want = (softplus(0.5) - sigmoid(m) * 0.5) + 0.25 * (softplus(m) - m)
    out, alpha = gated_distill_loss(zs, zt, y, gate="logit", gate_weight=torch.tensor([1.0, 0.0]),
                                    gate_bias=torch.zeros(2), hard_weight=0.0, gate_loss_weight=0.25,
                                    return_weights=True)
    assert out.item() == pytest.approx(want, abs=1e-6)
    assert alpha[0, 0].item() == pytest.approx(a0, abs=1e-6)


def test_hint_hand_value():
    vs = torch.tensor([[1.0, 2.0]])
    vt = torch.tensor([[3.0]])
    W = torch.tensor([[1.0], [2.0]])  # W v_T = [3, 6]
    assert hint_loss(vs, vt, W).item() == pytest.approx(4.0 + 16.0)


# --------------------------------------------------------------------------------------------
# Values and gradients against the oracle, every gate × ensemble × shape × reduction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,B,M,C", _SHAPE_PARAMS, ids=_SHAPE_IDS)
@pytest.mark.parametrize("gate", _GATES)
@pytest.mark.parametrize("ensemble", _ENSEMBLES)
@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_gated_matches_oracle(name, B, M, C, gate, ensemble, reduction):
    zs, zt, y, h = make_inputs(B, M, C)
    zs.requires_grad_()
    w, b = gate_params(gate, M, C)
    kw = dict(gate=gate_arg(gate, M), gate_weight=w, gate_bias=b, temperature=1.7, hard_weight=0.6,
              kd_weight=1.4, ensemble=ensemble, gate_loss_weight=0.8, reduction=reduction)
    out, alpha = gated_distill_loss(zs, zt, y, h, return_weights=True, **kw)
    ref, ref_alpha = gated_distill_loss_ref(zs, zt, y, h, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha.detach(), atol=1e-6, rtol=1e-6)
    assert not alpha.requires_grad
    # grad_output ≠ 1: a random per-sample vector for "none", a random scalar otherwise
    go = torch.rand_like(out) + 0.5
    params = [zs] + ([w, b] if w is not None else [])
    got = torch.autograd.grad(out, params, go)
    want = torch.autograd.grad(ref, params, go)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,B,M,C", _SHAPE_PARAMS, ids=_SHAPE_IDS)
@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_distill_matches_oracle(name, B, M, C, reduction):
    zs, zt, y, _ = make_inputs(B, M, C)
    zt = zt[:, 0]
    zs.requires_grad_()
    kw = dict(temperature=3.0, hard_weight=0.4, kd_weight=2.0, reduction=reduction)
    out = distill_loss(zs, zt, y, **kw)
    ref = distill_loss_ref(zs, zt, y, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    go = torch.rand_like(out) + 0.5
    torch.testing.assert_close(torch.autograd.grad(out, zs, go)[0], torch.autograd.grad(ref, zs, go)[0],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", _DTYPE_PARAMS, ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("gate", ["logit", "hidden"])
def test_low_precision_inputs(dtype, atol, rtol, gate):
    B, M, C = 33, 3, 1
    zs, zt, y, h = make_inputs(B, M, C, dtype=dtype)
    zs.requires_grad_()
    w, b = gate_params(gate, M, C)
    kw = dict(gate=gate, gate_weight=w, gate_bias=b, temperature=2.0)
    out = gated_distill_loss(zs, zt, y, h, **kw)
    assert out.dtype == torch.float32
    # the oracle on the same rounded values, upcast: fastkd computes in float32 throughout
    ref, _ = gated_distill_loss_ref(zs.float(), zt.float(), y, h.float(), **kw)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.autograd.grad(out, zs)[0]
    assert g.dtype == dtype
    zs32 = zs.detach().float().requires_grad_()
    ref32, _ = gated_distill_loss_ref(zs32, zt.float(), y, h.float(), **kw)
    g_ref = torch.autograd.grad(ref32, zs32)[0]
    # the only extra error is rounding the gradient to the input dtype
    torch.testing.assert_close(g.float(), g_ref.to(dtype).float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# gradcheck (float64) of the closed-form Functions, gradgradcheck of the oracles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("gate", ["logit", "hidden"])
@pytest.mark.parametrize("ensemble", _ENSEMBLES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gated_gradcheck(C, gate, ensemble, reduction):
    B, M = 5, 3
    zs, zt, y, h = make_inputs(B, M, C, dtype=torch.float64)
    w, b = gate_params(gate, M, C, dtype=torch.float64)
    zs.requires_grad_()

    def f(zs, w, b, kd_weight=1.5):
        return gated_distill_loss(zs, zt, y, h, gate=gate, gate_weight=w, gate_bias=b, temperature=1.5,
                                  hard_weight=0.5, kd_weight=kd_weight, ensemble=ensemble, reduction=reduction)

    # The full loss is a true function of the student logits ...
    assert torch.autograd.gradcheck(lambda z: f(z, w.detach(), b.detach()), (zs,))
    # ... but not of the gate parameters: the KD term holds α constant by design (stop-gradient),
    # so the numerical derivative w.r.t. w, b is only the gradient of the gate term.
    assert torch.autograd.gradcheck(lambda w, b: f(zs.detach(), w, b, kd_weight=0.0), (w, b))


@pytest.mark.parametrize("C", [1, 4])
def test_distill_gradcheck(C):
    zs, zt, y, _ = make_inputs(6, 1, C, dtype=torch.float64)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: distill_loss(z, zt[:, 0], y, temperature=0.7, reduction="none"), (zs,))


@pytest.mark.parametrize("C", [1, 3])
def test_oracles_gradgradcheck(C):
    zs, zt, y, h = make_inputs(4, 2, C, dtype=torch.float64)
    w, b = gate_params("logit", 2, C, dtype=torch.float64)
    zs.requires_grad_()
    def f(z, w, b, kd_weight=1.0):
        return gated_distill_loss_ref(z, zt, y, gate="logit", gate_weight=w, gate_bias=b, temperature=1.3,
                                      kd_weight=kd_weight)[0]

    # α is a stop-gradient constant in the KD term, so derivatives w.r.t. the gate are checked
    # on the gate term alone (see test_gated_gradcheck)
    assert torch.autograd.gradgradcheck(lambda z: f(z, w.detach(), b.detach()), (zs,))
    assert torch.autograd.gradgradcheck(lambda w, b: f(zs.detach(), w, b, kd_weight=0.0), (w, b))
    assert torch.autograd.gradgradcheck(lambda z: distill_loss_ref(z, zt[:, 0], y, temperature=2.0), (zs,))


def test_double_backward_is_refused_clearly():
    zs = torch.randn(4, requires_grad=True)
    loss = distill_loss(zs, torch.randn(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, zs, create_graph=True)


def test_hint_gradients_independent_formula():
    vs = torch.randn(7, 5, requires_grad=True)
    vt = torch.randn(7, 9, requires_grad=True)
    W = torch.randn(5, 9, requires_grad=True)
    out = hint_loss(vs, vt, W)
    # independent: explicit per-sample loop
    want = sum(((W @ vt[i] - vs[i]) ** 2).sum() for i in range(7)) / 7
    torch.testing.assert_close(out, want)
    g_vs, g_w, g_vt = torch.autograd.grad(out, (vs, W, vt), allow_unused=True)
    resid = (vt.detach() @ W.detach().T - vs.detach())
    torch.testing.assert_close(g_vs, -2 * resid / 7)
    torch.testing.assert_close(g_w, 2 * resid.T @ vt.detach() / 7)
    assert g_vt is None  # no gradient to the teacher's hint
    torch.testing.assert_close(hint_loss(vs, vt, W, "none"), hint_loss_ref(vs, vt, W, "none"))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 3])
def test_mean_gate_is_plain_averaging(C):
    B, M = 20, 4
    zs, zt, y, _ = make_inputs(B, M, C)
    T = 2.5
    got = gated_distill_loss(zs, zt, y, gate="mean", temperature=T, hard_weight=0.0, reduction="none")
    # independent: the averaged teacher logit as one teacher
    want = distill_loss_ref(zs, zt.mean(1), None, temperature=T, hard_weight=0.0, reduction="none")
    torch.testing.assert_close(got, want)
    got_p = gated_distill_loss(zs, zt, y, gate="mean", temperature=T, hard_weight=0.0, ensemble="prob",
                               reduction="none")
    if C == 1:
        target = torch.sigmoid(zt / T).mean(1)
        want_p = F.binary_cross_entropy_with_logits(zs / T, target, reduction="none")
    else:
        target = torch.softmax(zt / T, -1).mean(1)
        want_p = -(target * torch.log_softmax(zs / T, -1)).sum(-1)
    torch.testing.assert_close(got_p, want_p)


@pytest.mark.parametrize("gate", ["logit", "hidden", "mean"])
@pytest.mark.parametrize("ensemble", _ENSEMBLES)
def test_one_teacher_equals_distill_loss(gate, ensemble):
    zs, zt, y, h = make_inputs(31, 1, 1)
    zs.requires_grad_()
    w, b = gate_params(gate, 1, 1)
    crit = DistillLoss(temperature=3.0, hard_weight=0.5, kd_weight=2.0)
    got = gated_distill_loss(zs, zt, y, h, gate=gate, gate_weight=w, gate_bias=b, temperature=3.0,
                             hard_weight=0.5, kd_weight=2.0, ensemble=ensemble, gate_loss_weight=0.0)
    want = crit(zs, zt[:, 0], y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(want, zs)[0])
    if w is not None:  # α ≡ 1 for one teacher: the gate gets exactly zero gradient from every term
        full = gated_distill_loss(zs, zt, y, h, gate=gate, gate_weight=w, gate_bias=b)
        gw, gb = torch.autograd.grad(full, (w, b))
        assert torch.all(gw == 0) and torch.all(gb == 0)


@pytest.mark.parametrize("T", [0.05, 0.5, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("ensemble", _ENSEMBLES)
def test_kd_gradient_closed_form(T, ensemble):
    B, M = 50, 3
    zs, zt, y, _ = make_inputs(B, M, 1, scale=3.0)
    zs.requires_grad_()
    loss, alpha = gated_distill_loss(zs, zt, y, gate="mean", temperature=T, hard_weight=0.0,
                                     ensemble=ensemble, reduction="sum", return_weights=True)
    (g,) = torch.autograd.grad(loss, zs)
    target = torch.sigmoid(zt.mean(1) / T) if ensemble == "logit" else torch.sigmoid(zt / T).mean(1)
    # float32 rounding of σ is amplified by 1/T
    torch.testing.assert_close(g, (torch.sigmoid(zs.detach() / T) - target) / T, atol=1e-6 * max(1.0, 1 / T),
                               rtol=1e-5)


def test_no_gradient_reaches_teachers():
    zs, zt, y, h = make_inputs(9, 3, 1)
    zs.requires_grad_()
    zt.requires_grad_()
    h.requires_grad_()
    for gate in ("logit", "hidden", "mean"):
        w, b = gate_params(gate, 3, 1)
        loss = gated_distill_loss(zs, zt, y, h, gate=gate, gate_weight=w, gate_bias=b)
        g_t, g_h = torch.autograd.grad(loss, (zt, h), allow_unused=True)
        assert g_t is None and g_h is None
    loss = distill_loss(zs, zt[:, 0], y)
    assert torch.autograd.grad(loss, zt, allow_unused=True)[0] is None


def test_kd_term_does_not_train_gate_and_gate_term_does_not_train_student():
    zs, zt, y, _ = make_inputs(12, 3, 1)
    zs.requires_grad_()
    w, b = gate_params("logit", 3, 1)
    kd_only = gated_distill_loss(zs, zt, y, gate="logit", gate_weight=w, gate_bias=b, hard_weight=0.0,
                                 gate_loss_weight=0.0)
    gw, gb = torch.autograd.grad(kd_only, (w, b))
    assert torch.all(gw == 0) and torch.all(gb == 0)
    gate_only = gated_distill_loss(zs, zt, y, gate="logit", gate_weight=w, gate_bias=b, hard_weight=0.0,
                                   kd_weight=0.0)
    (gs,) = torch.autograd.grad(gate_only, zs)
    assert torch.all(gs == 0)


@pytest.mark.parametrize("T", [0.05, 1.0, 100.0])
def test_extreme_logits_finite_and_correct_limits(T):
    big = 1e4
    zs = torch.tensor([big, -big, big, -big, 0.0], requires_grad=True)
    zt = torch.tensor([big, big, -big, -big, big])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    loss = distill_loss(zs, zt, y, temperature=T, hard_weight=0.0, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), zs)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    # agreeing saturated logits cost nothing; disagreeing ones cost |z_S|/T (softplus limit)
    torch.testing.assert_close(loss[[0, 3]], torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(loss[[1, 2]], torch.full((2,), big / T), rtol=1e-5, atol=0)
    p = torch.sigmoid(zt / T)
    torch.testing.assert_close(g, (torch.sigmoid(zs.detach() / T) - p) / T, atol=1e-6, rtol=1e-6)
    # the gated loss with large logits everywhere, every gate
    zs2, zt2, y2, h2 = make_inputs(16, 3, 1, scale=big)
    for gate in ("logit", "hidden", "mean"):
        w, b = gate_params(gate, 3, 1)
        out = gated_distill_loss(zs2.requires_grad_(), zt2, y2, h2 * big, gate=gate, gate_weight=w,
                                 gate_bias=b, temperature=T, ensemble="prob")
        grads = torch.autograd.grad(out, [zs2] + ([w, b] if w is not None else []))
        assert torch.isfinite(out) and all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_never_give_a_finite_loss(bad):
    zs, zt, y, _ = make_inputs(4, 2, 1)
    zt_bad = zt.clone()
    zt_bad[1, 0] = bad
    assert not torch.isfinite(gated_distill_loss(zs, zt_bad, y))
    assert not torch.isfinite(gated_distill_loss(zs, zt_bad, y, gate="logit", gate_weight=torch.zeros(2),
                                                 gate_bias=torch.zeros(2), ensemble="prob"))
    assert not torch.isfinite(distill_loss(zs, zt_bad[:, 0], y))
    zs_bad = zs.clone()
    zs_bad[2] = bad
    assert not torch.isfinite(distill_loss(zs_bad, zt[:, 0], y))
    assert not torch.isfinite(gated_distill_loss(zs_bad, zt, y))


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
    torch.testing.assert_close(out, hint_loss_ref(vs, vt, hint.proj.weight))
    out.backward()
    assert hint.proj.weight.grad is not None and vs.grad is not None


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


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def _bin():
    return make_inputs(6, 3, 1)


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
# CUDA (skips cleanly without a device)
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("gate", ["logit", "hidden", "mean"])
@pytest.mark.parametrize("C", [1, 3])
def test_cpu_cuda_parity(gate, C):
    zs, zt, y, h = make_inputs(257, 3, C)
    w, b = gate_params(gate, 3, C)
    outs = []
    for dev in ("cpu", "cuda"):
        z = zs.to(dev).requires_grad_()
        wd = bd = None
        if w is not None:
            wd, bd = w.detach().to(dev).requires_grad_(), b.detach().to(dev).requires_grad_()
        loss = gated_distill_loss(z, zt.to(dev), y.to(dev), h.to(dev), gate=gate, gate_weight=wd,
                                  gate_bias=bd, temperature=2.0)
        grads = torch.autograd.grad(loss, [z] + ([wd, bd] if wd is not None else []))
        outs.append([loss.cpu()] + [g.cpu() for g in grads])
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_normalized_hint_is_scale_free_and_matches_cosine_formula():
    torch.manual_seed(0)
    vs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    vt = torch.randn(5, 7, dtype=torch.float64)
    W = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    out = hint_loss(vs, vt, W, "none", normalize=True)
    cos = torch.nn.functional.cosine_similarity(vt @ W.T, vs, dim=-1)
    torch.testing.assert_close(out, 2 - 2 * cos)
    # shrinking W or v_S (the collapse of the plain formula) does not lower it
    torch.testing.assert_close(hint_loss(0.01 * vs, vt, 0.01 * W, "none", normalize=True), out)
    assert hint_loss(0.01 * vs, vt, 0.01 * W).item() < 1e-2 * hint_loss(vs, vt, W).item()
    # its gradient is orthogonal to each vector: gradient steps cannot shrink them to zero
    g_vs, g_w = torch.autograd.grad(out.sum(), [vs, W])
    torch.testing.assert_close((g_vs * vs).sum(-1), torch.zeros(5, dtype=torch.float64))
    mod = HintLoss(7, 4, reduction="sum", normalize=True)
    torch.testing.assert_close(mod(vs.float(), vt.float()),
                               hint_loss(vs.float(), vt.float(), mod.proj.weight, "sum", normalize=True))
