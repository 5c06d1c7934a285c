"""Forward+backward of the distillation losses: fastkd vs the autograd reference, side by side.

Run with ``make bench``. On CPU both providers run plain PyTorch; fastkd's closed-form gradients
(computed in the forward pass) replace autograd's graph. Compare the ratio within one run:
absolute times on shared machines are noise. Correctness is checked after each timed call.
"""
import pytest
import torch

from fastkd.functional import gated_distill_loss
from fastkd.reference import gated_distill_loss_ref
from test_losses import gate_params, make_inputs

SHAPES = [(4096, 3), (65536, 4)]
GATES = ["logit", "hidden"]


def _setup(B, M, gate):
    zs, zt, y, h = make_inputs(B, M, 1)
    zs.requires_grad_()
    w, b = gate_params(gate, M, 1)
    kw = dict(gate=gate, gate_weight=w, gate_bias=b, temperature=2.0)
    return zs, zt, y, h, w, b, kw


@pytest.mark.parametrize("provider", ["reference", "fastkd"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("B,M", SHAPES)
def test_gated_loss_fwd_bwd(benchmark, provider, gate, B, M):
    benchmark.group = f"gated-{gate}-B{B}-M{M}"
    zs, zt, y, h, w, b, kw = _setup(B, M, gate)

    def run():
        if provider == "fastkd":
            loss = gated_distill_loss(zs, zt, y, h, **kw)
        else:
            loss = gated_distill_loss_ref(zs, zt, y, h, **kw)[0]
        return torch.autograd.grad(loss, (zs, w, b))

    grads = benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    ref = torch.autograd.grad(gated_distill_loss_ref(zs, zt, y, h, **kw)[0], (zs, w, b))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
