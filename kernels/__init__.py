"""Triton kernels of fastkd, installed as ``fastkd.kernels`` (never as a top-level ``kernels``).

One op per file (constants, then ``@triton.jit`` kernels, then launchers), each with a
plain-PyTorch twin in :mod:`fastkd.reference` that is the CPU path and the test oracle. The
launchers plug into the dispatch seam ``fastkd._autograd._fwd_impl``:

* ``distill_loss``: single-teacher KD loss, loss and student gradient in one pass;
* ``gated_distill_loss``: teacher-gated multi-teacher KD loss, loss, student gradient and
  (deterministically reduced) gate-parameter gradients in one pass.

Importing this package imports nothing; the op modules import Triton and register their
``torch.library`` ops when first imported (by the seam), and never touch CUDA at import.
"""
