#!/usr/bin/env bash
# One prepared GPU check for fastkd, sized for a single call on a lent H100/H200 (under 10 min).
#
#   bash bench/gpu_check.sh            # from the repository root; results under $OUT
#
# It uses the machine's own Python (torch + Triton + pytest + pytest-benchmark, as the lent
# machines have them) and installs nothing from the network: fastkd itself is installed in place
# with --no-index --no-deps (building the native extensions, and CUDA hashing for sm_90 when nvcc
# is there). Wheels carried in .whl/ (e.g. mmh3, which the hashing tests compare against and the
# lent image lacks) are installed into a private folder first, also with --no-index.
# Stages, each under its own timeout (at most 580 s in all) so the summary always prints:
#   1. every CUDA-marked test in tests/ (all ops, not only the losses)
#   2. every CUDA benchmark in bench/ (pytest -m cuda --benchmark-only), JSON to $OUT/bench.json
#   3. the fused-loss kernel matrix (the tests marked loss_kernels but not cuda, in
#      tests/test_distill_loss.py, tests/test_gated_distill_loss.py, tests/test_autograd.py),
#      which runs compiled on CUDA tensors where a GPU is present, and the CPU/CUDA parity tests
#      of tests/test_gated_distill_loss.py
#   4. bench/profile_loss_cuda.py: host vs device time of one fused-loss step, and a profile
#   5. a short table of the benchmarks, printed last (SKIP_BENCH=1 skips stage 2 on a rerun;
#      MATRIX_LIMIT sets stage 3's limit in seconds, default 50)
# Exit status: non-zero if any stage failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fastkd_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# FASTKD_BACKEND unset: CUDA tensors take the Triton kernels, as users get them
unset FASTKD_BACKEND TRITON_INTERPRET
status=0

stage() {  # stage NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    echo "=== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" - <<'EOF' | tee "$OUT/env.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, triton {triton.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs")
EOF

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "=== carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastkd_site .whl/*.whl && export PYTHONPATH="/tmp/fastkd_site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "=== install (in place, no network)"
FASTKD_CUDA_ARCHS="${FASTKD_CUDA_ARCHS:-90}" timeout 150 "$PY" -m pip install -q --no-index --no-deps \
    --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -n 20 "$OUT/install.log"; status=1; }

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
stage tests_cuda 150 "${PYTEST[@]}" -m cuda tests
[ "${SKIP_BENCH:-0}" = 1 ] && echo "=== bench_cuda skipped (SKIP_BENCH=1)" || \
stage bench_cuda 200 "${PYTEST[@]}" bench -m cuda --benchmark-only --benchmark-json "$OUT/bench.json" \
    --benchmark-group-by=group --benchmark-columns=min,median,rounds
stage kernel_matrix_on_cuda "${MATRIX_LIMIT:-50}" "${PYTEST[@]}" tests -m "loss_kernels and not cuda"
stage cpu_cuda_parity 30 "${PYTEST[@]}" tests/test_gated_distill_loss.py -k parity
stage profile_loss 60 env PYTHONPATH="bench:tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/profile_loss_cuda.py

echo "=== summary (median of each fwd+bwd; speedup = eager or compile time / fastkd time)"
"$PY" - "$OUT/bench.json" <<'EOF'
import collections, json, sys
try:
    runs = json.load(open(sys.argv[1]))["benchmarks"]
except (OSError, ValueError, KeyError) as exc:
    sys.exit(f"no benchmark results ({exc})")
groups = collections.defaultdict(dict)
other = []
nan = float("nan")


def div(a, b):  # a floor that rounds to 0 ms, or a missing provider, gives nan, not an exception
    return a / b if b and b == b else nan


for r in runs:
    info = r.get("extra_info", {})
    if "provider" in info:
        groups[r["group"]][info["provider"]] = (r["stats"]["median"], info)
    else:
        other.append(r)
print(f"{'group':<24}{'fastkd ms':>10}{'eager ms':>10}{'compile ms':>11}{'x eager':>9}{'x compile':>10}"
      f"{'GB/s':>8}{'floor ms':>9}{'x floor':>8}{'peak MB f/e/c':>20}")
def order(kv):  # the single-teacher loss (gate "-") first, then by gate, B, M
    info = kv[1][next(iter(kv[1]))][1]
    return info.get("gate", "-"), info.get("B", 0), info.get("M", 0)


for name, p in sorted(groups.items(), key=order):
    get = lambda k: p.get(k, (float("nan"), {}))
    (f, fi), (e, ei), (c, ci) = get("fastkd"), get("eager"), get("compile")
    peaks = "/".join(str(x.get("peak_mem_MB", "-")) for x in (fi, ei, ci))
    floor = fi.get("floor_ms", float("nan"))
    print(f"{name:<24}{f * 1e3:>10.3f}{e * 1e3:>10.3f}{c * 1e3:>11.3f}{div(e, f):>9.2f}{div(c, f):>10.2f}"
          f"{fi.get('GB/s', nan):>8}{floor:>9.4f}{div(f * 1e3, floor):>8.2f}{peaks:>20}")
emb = collections.defaultdict(dict)
for r in other:
    info = r.get("extra_info", {})
    if "emb_provider" in info:
        emb[r["group"]][info["emb_provider"]] = (r["stats"]["median"], info)
    else:
        print(f"{r['group'] or '-':<24}{r['name']:<60}{r['stats']['median'] * 1e3:>10.3f} ms")
if emb:
    names = ["fastkd", "fastkd-det", "per-field", "one-bag", "fbgemm-tbe"]
    print(f"\n{'embedding step (ms)':<32}" + "".join(f"{n:>12}" for n in names)
          + f"{'x per-field':>13}{'x tbe':>8}{'peak MB fastkd':>16}{'table MB':>10}")
    for g, p in sorted(emb.items()):
        t = {n: p[n][0] * 1e3 if n in p else nan for n in names}
        fi = p.get("fastkd", (nan, {}))[1]
        print(f"{g:<32}" + "".join(f"{t[n]:>12.3f}" for n in names)
              + f"{div(t['per-field'], t['fastkd']):>13.2f}{div(t['fbgemm-tbe'], t['fastkd']):>8.2f}"
              + f"{fi.get('peak_mem_MB', nan):>16}{fi.get('table_MB', nan):>10}")
EOF
echo "=== gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
