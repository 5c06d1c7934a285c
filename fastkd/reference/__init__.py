"""Plain-PyTorch implementations of every fastkd op, one module per op, every function ``<op>..._ref``.

Two kinds of function live here, and both are public so benchmarks and tests can import them:

* ``*_ref``: the **oracle**. Written with ordinary differentiable torch ops (``autograd`` derives
  the gradients, torch's own ``binary_cross_entropy_with_logits`` / ``log_softmax`` compute the
  cross-entropies), it states the semantics as plainly as possible. Tests compare everything else
  against it, including double-backward.
* ``*_fwd_ref``: the **CPU fast path**. It has exactly the interface of the Triton launchers in
  ``fastkd.kernels`` (the op's argument dataclass, :mod:`fastkd.loss_args`): one call returns the per-sample loss *and* the per-sample gradients in
  closed form (the terminal-loss trick), so the ``autograd.Function`` in ``fastkd._autograd`` only
  has to scale them by ``grad_output``. It is derived independently of the oracle (hand-written
  gradients, numerically stable softplus / log-sum-exp) and tested against it.

Shapes: B samples, M teachers, C classes (C = 1 means binary: one logit per sample, shape [B]),
d hidden width. All maths is in float32 (float64 inputs stay float64 so gradcheck works).

Semantics (T = temperature, CE(t, z) = -t·log σ(z) - (1-t)·log σ(-z), softmax-CE for C ≥ 2)::

    distill:  hard_weight·CE(y, z_S) + kd_weight·s_T·CE(σ(z_T/T), z_S/T)        s_T = T² if t2_scale else 1
    gated:    α = softmax_i(s_i),  s_i = w_i·z_Ti + b_i | w_i·h_Ti + b_i | 0 | fixed α
              target = σ(Σ α_i z_Ti / T)  (ensemble="logit")  or  Σ α_i σ(z_Ti / T)  (ensemble="prob")
              hard_weight·CE(y, z_S) + kd_weight·s_T·CE(target, z_S/T) + gate_loss_weight·CE(y, Σ α_i z_Ti)
              α is a constant in the KD term; the gate term reaches the gate parameters only.
    hint:     ‖W v_T − v_S‖² summed over features (no gradient to v_T)

A non-finite teacher logit makes the loss non-finite (σ(±inf) is finite, so this is done on purpose
by adding ``0·Σ z_T``): a diverged teacher must never turn silently into a finite loss.
"""
from __future__ import annotations

from .distill_loss import distill_loss_fwd_ref, distill_loss_ref
from .gated_distill_loss import (TRAINABLE_GATES, gate_param_grads_ref, gate_weights_ref, gated_distill_loss_fwd_reduced_ref,
                                 gated_distill_loss_fwd_ref, gated_distill_loss_ref)
from .hint_loss import hint_loss_fwd_ref

# The embedding and hashing twins (``fastkd.reference.embedding``, ``fastkd.reference.hashing``)
# are imported by their modules where needed, so `import fastkd` does not load them.
__all__ = [
    "distill_loss_ref",
    "gated_distill_loss_ref",
    "hint_loss_fwd_ref",
    "gate_weights_ref",
    "distill_loss_fwd_ref",
    "gated_distill_loss_fwd_ref",
    "gated_distill_loss_fwd_reduced_ref",
    "gate_param_grads_ref",
    "TRAINABLE_GATES",
]
