"""``hint_loss`` (hint regression ‖W v_T − v_S‖², and its normalised form) against hand values,
and independent formulas; its one implementation is ``fastkd/reference/hint_loss.py`` (no kernel)."""
from __future__ import annotations

import pytest
import torch

from fastkd import HintLoss
from fastkd.functional import hint_loss


def test_hint_hand_value():
    vs = torch.tensor([[1.0, 2.0]])
    vt = torch.tensor([[3.0]])
    W = torch.tensor([[1.0], [2.0]])  # W v_T = [3, 6]
    assert hint_loss(vs, vt, W).item() == pytest.approx(4.0 + 16.0)


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
    torch.testing.assert_close(hint_loss(vs, vt, W, "none"), ((vt @ W.T - vs) ** 2).sum(1))


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
