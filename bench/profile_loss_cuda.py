"""Where the time of one fused-loss step goes on a GPU: host overhead against device time.

For each gate at B = 64K, M = 4 (the shape of the issue's speed target), one step is forward +
``torch.autograd.grad`` of fastkd's ``gated_distill_loss``, the eager reference and
``torch.compile`` of it. Printed per provider:

* ``host ms``: wall time of one step ending in ``torch.cuda.synchronize()`` (what the
  pytest-benchmark comparison times), median of 30;
* ``device ms``: CUDA-event time per step over 30 steps queued back to back (no sync in between),
  which hides host overhead whenever the GPU is the bottleneck;

then a ``torch.profiler`` table of fastkd's step (top ops by self CPU time, and by device time).

With ``--cprofile``, the host side of 50 fastkd steps (logit gate) is also run under cProfile
and its top entries by cumulative time are printed: where the Python overhead sits.

    python bench/profile_loss_cuda.py [--cprofile]       # needs a CUDA device; prints only
"""
import cProfile
import pstats
import statistics
import sys
import time

import torch

from fastkd.functional import gated_distill_loss
from fastkd.reference import gated_distill_loss_ref
from test_bench_gated_distill_loss import bench_inputs  # bench/ and tests/ on sys.path (see gpu_check.sh)

STEPS = 30


def steps(fn, args, kw):
    def one():
        loss = fn(*args, **kw)
        return torch.autograd.grad(loss, (args[0], kw["gate_weight"], kw["gate_bias"]))
    return one


def measure(one):
    for _ in range(5):
        one()
    torch.cuda.synchronize()
    host = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        one()
        torch.cuda.synchronize()
        host.append((time.perf_counter() - t0) * 1e3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(STEPS):
        one()
    end.record()
    torch.cuda.synchronize()
    return statistics.median(host), start.elapsed_time(end) / STEPS


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(torch.cuda.get_device_name(0), torch.__version__)
    for gate in ("logit", "hidden"):
        zs, zt, y, h, kw = bench_inputs(65536, 4, gate)
        args = (zs, zt, y, h)
        compiled = torch.compile(lambda *a, **k: gated_distill_loss_ref(*a, **k)[0])
        providers = {
            "fastkd": steps(gated_distill_loss, args, kw),
            "eager": steps(lambda *a, **k: gated_distill_loss_ref(*a, **k)[0], args, kw),
            "compile": steps(compiled, args, kw),
        }
        for name, one in providers.items():
            host, dev = measure(one)
            print(f"{gate:<7}{name:<9}host {host:8.3f} ms   device {dev:8.3f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                providers["fastkd"]()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        print(avg.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        print(avg.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))
        if "--cprofile" in sys.argv and gate == "logit":
            one = providers["fastkd"]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                one()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
