"""The native CPU backward of MultiFieldEmbedding (``fastkd._embedding``) against its oracle.

``fastkd.reference.embedding`` is the oracle: merged gradients and the SGD step must be bit-identical
(same summation order, the weight step one fused multiply-add as in torch's ``add_(alpha=)``);
Adagrad's state is bit-identical and its weight equal to an ulp (the native step rounds sqrt
correctly; torch's vectorised sqrt is sometimes an ulp off). The AVX-512, AVX2 and portable loops, and
one or two threads, must give the same bits.
"""
import os
from collections import namedtuple

import pytest
import torch

from fastkd.embedding import MultiFieldEmbedding, _impl
from fastkd.embedding import _native as native
from fastkd.reference import embedding as embedding_ref

needs_native = pytest.mark.skipif(not native.NATIVE, reason="fastkd._embedding not built")

Case = namedtuple("Case", "name n dim num_rows")
# An odd dim with a masked tail, a dim over 128 (9 lane blocks), dim 1, one lookup, heavy duplicates, a table that needs three
# radix passes (2^22 + 1 rows), and enough lookups for two threads to split the runs.
CASES = [
    Case("odd-dim", 37, 17, 50),
    Case("wide", 90, 130, 40),
    Case("dim-1", 20, 1, 7),
    Case("single-row", 1, 5, 3),
    Case("all-duplicates", 64, 16, 1),
    Case("three-passes", 500, 3, 2**22 + 1),
    Case("two-threads", 40_000, 20, 3_000),
]
IDS = [c.name for c in CASES]


def make(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, case.num_rows, (case.n,), generator=g)
    grad = torch.randn(case.n, case.dim, generator=g)
    return rows, grad


def tables(case, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Only rows the lookups can touch matter; a large table stays cheap with a zero fill.
    weight = torch.zeros(case.num_rows, case.dim)
    state = torch.zeros(case.num_rows, case.dim)
    k = min(case.num_rows, 4096)
    weight[:k] = torch.randn(k, case.dim, generator=g)
    state[:k] = torch.rand(k, case.dim, generator=g)
    return weight, state


def test_extension_is_built_in_ci():
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced under CI=true (CI always builds the extension)")
    assert native.NATIVE, "fastkd._embedding did not build"


@needs_native
def test_cpu_dispatch_uses_native_backward():
    impl = _impl(torch.device("cpu"), "auto", torch.float32)
    assert impl.embedding_fused_update is native.embedding_fused_update
    assert impl.embedding_merge_rows is native.embedding_merge_rows


def test_torch_backend_is_the_plain_reference():
    # "torch" is the plain reference, the oracle, whether the extension is built or not
    ref = _impl(torch.device("cpu"), "torch", torch.float32)
    assert ref.embedding_fused_update is embedding_ref.embedding_fused_update_ref
    assert ref.embedding_merge_rows is embedding_ref.embedding_merge_rows_ref


@needs_native
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_rows_is_bit_identical(case):
    rows, grad = make(case)
    u, m = native.embedding_merge_rows(rows, grad, num_rows=case.num_rows)
    u_ref, m_ref = embedding_ref.embedding_merge_rows_ref(rows, grad, num_rows=case.num_rows)
    assert u.dtype == torch.int64 and m.dtype == torch.float32
    assert torch.equal(u, u_ref)
    assert torch.equal(m, m_ref)


@needs_native
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_update_matches_reference(case, opt):
    rows, grad = make(case)
    w, s = tables(case)
    w_ref, s_ref = w.clone(), s.clone()
    native.embedding_fused_update(rows, grad, w, s, opt, lr=0.3, eps=1e-8)
    embedding_ref.embedding_fused_update_ref(rows, grad, w_ref, s_ref if opt == "adagrad" else None,
                                             opt, lr=0.3, eps=1e-8)
    assert torch.equal(s, s_ref)  # SGD leaves it alone; Adagrad adds g*g rounded as torch does
    if opt == "sgd":
        assert torch.equal(w, w_ref)
    else:
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(case.num_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(w[untouched], tables(case)[0][untouched])


def bits(t):
    return t.contiguous().view(torch.int32)


@needs_native
def test_merged_zero_has_the_references_sign():
    # A lone -0.0 gradient: embedding_bag's sum starts from +0 and gives +0.0; so must the extension
    # (torch.equal alone cannot tell -0.0 from +0.0, hence the bit patterns)
    rows, grad = torch.tensor([3, 1, 3]), torch.tensor([[-0.0, 1.0], [-0.0, -0.0], [0.0, -0.0]])
    u, m = native.embedding_merge_rows(rows, grad, num_rows=5)
    u_ref, m_ref = embedding_ref.embedding_merge_rows_ref(rows, grad, num_rows=5)
    assert torch.equal(bits(m), bits(m_ref)) and torch.equal(u, u_ref)


def _adagrad_oracle(rows, grad, w, s, lr, eps):
    """numpy float32 Adagrad on the merged rows, sqrt correctly rounded (np.sqrt), the weight step
    one rounding of w - lr*q (the product of two float32 is exact in float64)."""
    import numpy as np

    u, g = embedding_ref.embedding_merge_rows_ref(rows, grad, num_rows=w.shape[0])
    u, g = u.numpy(), g.numpy()
    w, s = w.numpy().copy(), s.numpy().copy()
    f32 = np.float32
    sv = (s[u] + (g * g).astype(f32)).astype(f32)
    q = (g / (np.sqrt(sv) + f32(eps)).astype(f32)).astype(f32)
    w[u] = (np.float64(-f32(lr)) * q.astype(np.float64) + w[u].astype(np.float64)).astype(f32)
    s[u] = sv
    return torch.from_numpy(w), torch.from_numpy(s)


@needs_native
@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_adagrad_is_exact_against_a_correctly_rounded_oracle(case):
    rows, grad = make(case)
    w, s = tables(case)
    w_ora, s_ora = _adagrad_oracle(rows, grad, w, s, lr=0.3, eps=1e-8)
    native.embedding_fused_update(rows, grad, w, s, "adagrad", lr=0.3, eps=1e-8)
    assert torch.equal(bits(s), bits(s_ora))
    assert torch.equal(bits(w), bits(w_ora))


@needs_native
@pytest.mark.parametrize("state, match", [
    (torch.zeros(2, 6), "must match the weight"),
    ("weight", "must not share memory"),
])
def test_adagrad_state_must_fit_the_weight(state, match):
    w = torch.zeros(1000, 6)
    state = w if isinstance(state, str) else state
    with pytest.raises(ValueError, match=match):
        native.embedding_fused_update(torch.tensor([999]), torch.ones(1, 6), w, state, "adagrad", 0.1, 0.0)


@needs_native
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_avx512_avx2_and_portable_loops_agree(opt):
    case = Case("mixed", 3000, 37, 400)  # 37 = 2 x 16 + 5 = 4 x 8 + 5: masked tails on both widths
    rows, grad = make(case)
    results = {}
    before = native._C.simd_level()
    try:
        for level in (2, 1, 0):
            got = native._C.set_simd_level(level)
            w, s = tables(case)
            native.embedding_fused_update(rows, grad, w, s, opt, lr=0.1, eps=1e-10)
            u, m = native.embedding_merge_rows(rows, grad, num_rows=case.num_rows)
            results[got] = (w, s, u, m)  # a CPU without AVX-512 runs level 1 twice
    finally:
        native._C.set_simd_level(before)
    assert 0 in results
    for level, res in results.items():
        for a, b in zip(res, results[0]):
            assert torch.equal(a, b), level


@needs_native
def test_thread_count_does_not_change_bits():
    case = CASES[-1]  # 40k lookups: two threads take half the runs each
    rows, grad = make(case)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            w, s = tables(case)
            native.embedding_fused_update(rows, grad, w, s, "adagrad", lr=0.1, eps=1e-10)
            results.append((w, s))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_native
@pytest.mark.parametrize("bad", [-1, 10, 2**40])
def test_out_of_range_row_raises_before_writing(bad):
    rows = torch.tensor([0, 3, bad, 1])
    w = torch.zeros(10, 2)
    with pytest.raises(IndexError, match=rf"row id {bad} at lookup 2 .* 10 rows"):
        native.embedding_fused_update(rows, torch.ones(4, 2), w, None, "sgd", 0.1, 0.0)
    assert not w.any()


@needs_native
@pytest.mark.parametrize("call, match", [
    (lambda: native._C.sort_rows(0, -1, 5), "n \\(lookups\\)"),
    (lambda: native._C.sort_rows(0, 0, 0), "num_rows"),
    (lambda: native._C.sort_rows(0, 3, 5), "rows must be a non-null"),
])
def test_binding_checks_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# bf16 and non-contiguous tables go to the reference; a non-contiguous gradient is made
# contiguous and taken natively; an empty batch touches nothing
@needs_native
@pytest.mark.parametrize("variant", ["bf16-table", "non-contiguous-table", "non-contiguous-grad", "empty"])
def test_inputs_the_extension_does_not_take_fall_back_to_the_reference(variant):
    rows = torch.tensor([2, 0, 2, 1])
    grad = torch.randn(4, 6)
    w = torch.randn(3, 6)
    s = torch.zeros(3, 6)
    if variant == "bf16-table":
        w, s = w.to(torch.bfloat16), s.to(torch.bfloat16)
    elif variant == "non-contiguous-table":
        w, s = torch.randn(6, 3).t(), torch.zeros(6, 3).t()
    elif variant == "non-contiguous-grad":
        grad = torch.randn(6, 4).t()
    else:
        rows, grad = rows[:0], grad[:0]
    w_ref, s_ref = w.clone(), s.clone()
    native.embedding_fused_update(rows, grad, w, s, "adagrad", lr=0.1, eps=1e-10)
    embedding_ref.embedding_fused_update_ref(rows, grad, w_ref, s_ref, "adagrad", lr=0.1, eps=1e-10)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


@needs_native
def test_module_training_native_matches_reference_backend():
    # Three fused Adagrad steps through the module: default CPU path vs backend="torch".
    sizes, dim, batch = [50, 7, 300], 33, 64
    results = []
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        emb = MultiFieldEmbedding(sizes, dim, fused_optimizer="adagrad", lr=0.05, init_std=1.0,
                                  backend=backend)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            ids = torch.stack([torch.randint(0, s, (batch,), generator=g) for s in sizes], 1)
            emb(ids).backward(torch.randn(batch, len(sizes), dim, generator=g))
        results.append(emb)
    torch.testing.assert_close(results[0].weight, results[1].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0].state_sum, results[1].state_sum, rtol=1e-6, atol=1e-7)


@needs_native
def test_fused_update_bumps_version_counters():
    # The extension writes through raw pointers; autograd must still see an in-place change.
    w, s = torch.zeros(4, 2), torch.zeros(4, 2)
    vw, vs = w._version, s._version
    native.embedding_fused_update(torch.tensor([1, 1]), torch.ones(2, 2), w, s, "adagrad", 0.1, 0.0)
    assert w._version > vw and s._version > vs
