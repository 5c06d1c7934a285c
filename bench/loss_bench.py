"""Timing helpers shared by the loss benchmarks (bench/test_bench_distill_loss.py and
bench/test_bench_gated_distill_loss.py); nothing here touches CUDA at import.

Each benchmarked call is one forward + ``torch.autograd.grad``. On CPU, fastkd is compared with
autograd through the reference (:func:`fwd_bwd_cpu`). On a GPU (:func:`fwd_bwd_cuda`), fastkd's
fused Triton kernel is compared with the eager reference and ``torch.compile(reference)``
(:func:`provider_loss`); each call ends with ``torch.cuda.synchronize()`` (pytest-benchmark
times on the host), and ``extra_info`` records:

* ``bytes``: what the op must move at least (see each file's ``bytes_moved``); ``GB/s`` is that
  over the median time;
* ``floor_ms``: ``bytes`` over the device-to-device copy bandwidth measured in this session
  (the ``copy_bandwidth`` fixture, bench/conftest.py);
* ``peak_mem_MB``: ``torch.cuda.max_memory_allocated`` during one forward+backward, above what
  was allocated before it (inputs excluded).

bench/gpu_check.sh prints these as one table.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PROVIDERS = ["fastkd", "eager", "compile"]
ROUNDS = 20
WARMUP = 3

_compiled: dict = {}


def nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def provider_loss(provider: str, fastkd_loss: Callable, reference_loss: Callable, key) -> Callable:
    """The loss function a provider times: fastkd's, the eager reference, or the reference under
    ``torch.compile`` (one compiled function per ``key``; dynamic shapes after a recompile)."""
    if provider == "fastkd":
        return fastkd_loss
    if provider == "eager":
        return reference_loss
    if key not in _compiled:
        _compiled[key] = torch.compile(reference_loss)
    return _compiled[key]


def cuda_step(provider: str, fastkd_loss: Callable, reference_loss: Callable, key, wrt: Callable) -> Callable:
    """``run(*args)`` for a provider (see :func:`provider_loss`): the gradients of its loss of
    ``args`` with respect to ``wrt(*args)``, then ``torch.cuda.synchronize()``."""
    loss_fn = provider_loss(provider, fastkd_loss, reference_loss, key)

    def run(*args):
        grads = torch.autograd.grad(loss_fn(*args), wrt(*args))
        torch.cuda.synchronize()
        return grads

    return run


def fwd_bwd_cpu(benchmark, loss: Callable, reference: Callable, wrt, atol: float, rtol: float) -> None:
    """Time ``grad(loss(), wrt)`` (20 rounds), then check it against autograd through ``reference``."""

    def run():
        return torch.autograd.grad(loss(), wrt)

    grads = benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    for g, r in zip(grads, torch.autograd.grad(reference(), wrt)):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)


def fwd_bwd_cuda(benchmark, copy_bandwidth: float, run: Callable, args: tuple, moved: int, **info):
    """Time ``run(*args)`` (one synchronised forward+backward) after WARMUP untimed calls, which
    keep Triton's JIT and inductor's compile out of the timings and the peak-memory window; fill
    ``extra_info`` (``info`` plus the fields above) and return the last timed call's result."""
    for _ in range(WARMUP):
        run(*args)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(*args)
    peak = torch.cuda.max_memory_allocated() - before

    out = benchmark.pedantic(run, args=args, rounds=ROUNDS, warmup_rounds=1)

    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        **info, bytes=moved, peak_mem_MB=round(peak / 2**20, 2),
        **{"GB/s": round(moved / median / 1e9, 1)},
        floor_ms=round(moved / copy_bandwidth * 1e3, 4), copy_GBps=round(copy_bandwidth / 1e9, 1),
    )
    return out
