"""Triton kernels of fastkd, installed as ``fastkd.kernels`` (never as a top-level ``kernels``).

One op per file (constants, then ``@triton.jit`` kernels, then launchers), each with a
plain-PyTorch twin in :mod:`fastkd.reference` that is the CPU path and the test oracle. The
launchers plug into the dispatch seam ``fastkd._autograd._fwd_impl``. No kernel has landed yet;
nothing here imports Triton or touches CUDA.
"""
