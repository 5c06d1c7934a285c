"""fastkd.hashing: bit-exactness against xxhash/mmh3, every input kind, missing values, bad input,
the native build, the torch custom op, and CPU == CUDA (skipped without a GPU).

Every CPU test runs twice where it matters: on the native engine and on the pure-Python fallback
(``impl`` fixture), which must give identical ids.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import xxhash

from fastkd import hashing
from fastkd.hashing import FeatureHasher, engine, hash_ints, hash_string_tensors, hash_strings
from helpers import REPO, requires_cuda

mmh3 = pytest.importorskip("mmh3")
pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

_ALGOS = ["xxh3", "murmur3"]
# (num_buckets, seed) pairs: tiny, odd, power of two, 2^32 +- 1, the 2^63 maximum, large seeds
_BUCKET_SEED_PARAMS = [
    (1, 0),
    (7, 1),
    (1024, 42),
    (2**32 - 1, 2**31 + 5),
    (2**32 + 1, 2**32 - 1),
    (10**18 + 9, 123456789),
    (2**63, 2**32 - 2),
]
# lengths exercising every XXH3 branch: 0, 1-3, 4-8, 9-16, 17-128, 129-240, > 240 (block edges)
_LENGTHS = list(range(0, 41)) + [63, 64, 65, 96, 97, 127, 128, 129, 200, 239, 240, 241, 255, 256, 1023, 1024,
                                 1025, 2048, 5000]


def _ref_hash(data: bytes, seed: int, algorithm: str) -> int:
    if algorithm == "xxh3":
        return xxhash.xxh3_64_intdigest(data, seed)
    return mmh3.hash(data, seed, signed=False)


def _seed(seed, algorithm):
    return seed if algorithm == "xxh3" else seed % 2**32


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    """Run the test on the native engine and on the pure-Python fallback."""
    if request.param == "native":
        if not hashing.NATIVE:
            pytest.skip("native extension not built")
    else:
        monkeypatch.setattr(engine, "_C", None)
    return request.param


def _random_bytes(rng, lengths):
    return [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in lengths]


# ------------------------------------------------------------------ build
def test_native_extension_built_under_ci():
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced under CI=true (CI always builds the extension)")
    assert hashing.NATIVE, "fastkd._hashing did not build"
    if shutil.which("nvcc") and os.environ.get("FASTKD_CUDA", "") != "0":
        assert hashing.NATIVE_CUDA, "nvcc is present but fastkd._hashing_cuda did not build"


@pytest.mark.skipif(not hashing.NATIVE, reason="native extension not built")
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**63 + 11, 2**64 - 1])
def test_native_primitives_match_references(seed):
    rng = np.random.default_rng(seed % 2**32)
    for n, b in zip(_LENGTHS, _random_bytes(rng, _LENGTHS)):
        assert engine._C.xxh3_64(b, seed) == xxhash.xxh3_64_intdigest(b, seed), n
        assert engine._C.murmur3_32(b, seed % 2**32) == mmh3.hash(b, seed % 2**32, signed=False), n
    for v in [0, 1, -1, 2**63 - 1, -(2**63), 255, 256] + rng.integers(-(2**63), 2**63 - 1, 50).tolist():
        b = int(v).to_bytes(8, "little", signed=True)
        assert engine._C.xxh3_64_int(v, seed) == xxhash.xxh3_64_intdigest(b, seed)
        assert engine._C.murmur3_32_int(v, seed % 2**32) == mmh3.hash(b, seed % 2**32, signed=False)


@pytest.mark.skipif(not hashing.NATIVE, reason="native extension not built")
def test_fast_modulo_is_exact():
    rng = np.random.default_rng(0)
    divisors = [1, 2, 3, 5, 7, 10, 255, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 1, 2**62 + 1, 2**63 - 25,
                2**63 - 1, 2**63] + [int(d) for d in rng.integers(1, 2**63, 60, dtype=np.uint64)] \
        + [int(d) for d in rng.integers(1, 5000, 60)]
    xs = [0, 1, 2**63 - 1, 2**63, 2**64 - 1] + [int(x) for x in rng.integers(0, 2**64, 60, dtype=np.uint64)]
    for d in divisors:
        for x in xs + [d - 1, d, min(d + 1, 2**64 - 1), min(2 * d - 1, 2**64 - 1)]:
            assert engine._C.fastmod(x, d) == x % d, (x, d)


# ------------------------------------------------------------------ bit-exactness of the public API
@pytest.mark.parametrize("algorithm", _ALGOS)
@pytest.mark.parametrize("num_buckets,seed", _BUCKET_SEED_PARAMS)
def test_hash_strings_exact(impl, algorithm, num_buckets, seed):
    seed = _seed(seed, algorithm)
    rng = np.random.default_rng(1)
    values = _random_bytes(rng, _LENGTHS) + ["", "a", "héllo wörld", "日本語テキスト", "x" * 300]
    got = hash_strings(values, num_buckets, seed=seed, algorithm=algorithm)
    enc = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    want = [_ref_hash(v, seed, algorithm) % num_buckets for v in enc]
    assert got.dtype == np.int64 and got.tolist() == want


@pytest.mark.parametrize("algorithm", _ALGOS)
@pytest.mark.parametrize("num_buckets,seed", _BUCKET_SEED_PARAMS)
def test_hash_ints_exact(impl, algorithm, num_buckets, seed):
    seed = _seed(seed, algorithm)
    rng = np.random.default_rng(2)
    values = np.concatenate([[0, 1, -1, 2**63 - 1, -(2**63)], rng.integers(-(2**63), 2**63 - 1, 500)]).astype(np.int64)
    got = hash_ints(values, num_buckets, seed=seed, algorithm=algorithm)
    want = [_ref_hash(int(v).to_bytes(8, "little", signed=True), seed, algorithm) % num_buckets for v in values]
    assert got.tolist() == want


@pytest.fixture(params=["simd", "scalar"])
def simd(request):
    """Run with the AVX-512 paths on (where the CPU has them) and forced off."""
    if not hashing.NATIVE:
        pytest.skip("native extension not built")
    before = engine._C.simd_enabled()
    if request.param == "simd" and not engine._C.set_simd(True):
        pytest.skip("no AVX-512 on this CPU")
    if request.param == "scalar":
        engine._C.set_simd(False)
    yield request.param
    engine._C.set_simd(before)


@pytest.mark.skipif(not hashing.NATIVE, reason="native extension not built")
def test_simd_modulo_exact():
    """The vector modulo (multiply-shift, or a double-precision estimate for 2^13 < d < 2^52) is exact,
    also at the edges: multiples of d +- 1 near 2^64, 0, 2^64 - 1."""
    if not engine._C.simd_enabled():
        pytest.skip("no AVX-512 on this CPU")
    rng = np.random.default_rng(11)
    divisors = [3, 7, 8191, 8193, 2**13 + 1, 10**6 + 3, 2**32 - 1, 2**32 + 1, 2**51 + 1, 2**52 - 1, 2**52 + 1,
                2**62 + 1, 2**63 - 1, 2**63, 2**20] + [int(d) for d in rng.integers(8193, 2**52, 40, dtype=np.uint64)]
    for d in divisors:
        top = (2**64 - 1) // d
        xs = [0, 1, d - 1, d, d + 1, 2**64 - 1, top * d, top * d - 1, min(top * d + d - 1, 2**64 - 1),
              (top // 2) * d + d - 1] + [int(x) for x in rng.integers(0, 2**64, 14, dtype=np.uint64)]
        xs += [0] * (-len(xs) % 8)
        for k in range(0, len(xs), 8):
            assert engine._C.fastmod_simd(xs[k:k + 8], d) == [x % d for x in xs[k:k + 8]], d


@pytest.mark.parametrize("num_buckets,seed", _BUCKET_SEED_PARAMS + [(8193, 3), (2**52 - 1, 9), (2**52 + 1, 1)])
def test_simd_and_scalar_paths_exact(simd, num_buckets, seed):
    """Arrow strings of 0..12 bytes (blocks of 8 in 4..8 bytes take the vector path, others not)
    and int64, odd lengths so the tails are scalar; plain and bucket0; strided output."""
    rng = np.random.default_rng(seed % 2**32)
    lens = np.where(rng.random(2003) < 0.9, rng.integers(4, 9, 2003), rng.integers(0, 13, 2003))
    vals = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in lens]
    arr = pa.array(vals, type=pa.binary())
    got = hash_strings(arr, num_buckets, seed=seed)
    assert got.tolist() == [xxhash.xxh3_64_intdigest(v, seed) % num_buckets for v in vals]
    ints = rng.integers(-(2**63), 2**63 - 1, 2003, dtype=np.int64)
    out = np.zeros((2003, 2), dtype=np.int64)
    hash_ints(ints, num_buckets, seed=seed, out=out[:, 1])
    assert out[:, 1].tolist() == [xxhash.xxh3_64_intdigest(int(v).to_bytes(8, "little", signed=True), seed)
                                  % num_buckets for v in ints]
    if num_buckets >= 2:
        ids = FeatureHasher(num_buckets, seeds=[seed, seed]).transform([arr, ints])
        m = num_buckets - 1
        assert ids[:, 0].tolist() == [1 + xxhash.xxh3_64_intdigest(v, seed) % m if v else 0 for v in vals]
        assert ids[:, 1].tolist() == [1 + xxhash.xxh3_64_intdigest(int(v).to_bytes(8, "little", signed=True), seed)
                                      % m for v in ints]


def test_huge_and_invalid_utf8_values(impl):
    big = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # 3 MB
    bad = b"\xff\xfe\x80 not utf-8"
    got = hash_strings([big, bad, big.decode("latin-1")], 2**63, seed=5)
    assert got.tolist() == [xxhash.xxh3_64_intdigest(v, 5) % 2**63
                            for v in (big, bad, big.decode("latin-1").encode("utf-8"))]


# ------------------------------------------------------------------ input kinds
def _sample_strings(n=257):
    rng = np.random.default_rng(4)
    vals = [None if i % 11 == 3 else "" if i % 13 == 5 else f"v{int(x):x}é" for i, x in
            enumerate(rng.integers(0, 10**9, n))]
    return vals


def _expected(vals, nb, seed, algorithm="xxh3", bucket0=False):
    out = []
    for v in vals:
        b = b"" if v is None else v.encode("utf-8") if isinstance(v, str) else v
        if bucket0:
            out.append(0 if not b else 1 + _ref_hash(b, seed, algorithm) % (nb - 1))
        else:
            out.append(_ref_hash(b, seed, algorithm) % nb)
    return out


def _string_inputs(vals):
    arr = pa.array(vals, type=pa.string())
    big = pa.array(vals, type=pa.large_string())
    inputs = {
        "list": list(vals),
        "tuple": tuple(vals),
        "numpy_object": np.array(vals, dtype=object),
        "numpy_object_strided": np.array([x for v in vals for x in (v, "pad")], dtype=object)[::2],
        "arrow_string": arr,
        "arrow_large_string": big,
        "arrow_binary": pa.array([None if v is None else v.encode() for v in vals], type=pa.binary()),
        "arrow_chunked": pa.chunked_array([arr.slice(0, 100), arr.slice(100, 57), arr.slice(157)]),
        "arrow_dictionary": arr.dictionary_encode(),
        "pandas_object": pd.Series(vals, dtype=object),
        "pandas_arrow": pd.Series(vals, dtype="string[pyarrow]"),
        "pandas_arrowdtype": pd.Series(arr, dtype=pd.ArrowDtype(pa.string())),
    }
    if hasattr(pa, "string_view"):
        inputs["arrow_string_view"] = arr.cast(pa.string_view())
    return inputs


@pytest.mark.parametrize("kind", list(_string_inputs(["a"]).keys()))
def test_string_input_kinds_agree(impl, kind):
    vals = _sample_strings()
    got = hash_strings(_string_inputs(vals)[kind], 997, seed=3)
    assert got.tolist() == _expected(vals, 997, 3)


def test_sliced_arrow_with_nulls_and_offsets(impl):
    vals = _sample_strings(300)
    arr = pa.array(vals)
    for start, length in [(0, 300), (1, 7), (13, 200), (299, 1), (150, 0)]:
        got = hash_strings(arr.slice(start, length), 1000, seed=9)
        assert got.tolist() == _expected(vals[start:start + length], 1000, 9)


def test_numpy_fixed_width_inputs(impl):
    u = np.array(["a", "bcd", "", "héllo"])  # 'U' (UCS-4)
    s = np.array([b"a", b"bcd", b"", b"x\x00y"])  # 'S': numpy strips only trailing NULs
    assert hash_strings(u, 100).tolist() == _expected(list(u), 100, 0)
    assert hash_strings(s, 100).tolist() == _expected([bytes(x) for x in s], 100, 0)


def test_polars_series():
    pl = pytest.importorskip("polars")
    vals = _sample_strings(50)
    assert hash_strings(pl.Series(vals), 101, seed=1).tolist() == _expected(vals, 101, 1)
    ints = pl.Series([1, 2, 3], dtype=pl.Int64)
    assert hash_ints(ints, 50).tolist() == hash_ints(np.array([1, 2, 3]), 50).tolist()


def test_int_input_kinds_agree(impl):
    v = np.array([5, -7, 2**62, 0, 123456789], dtype=np.int64)
    want = hash_ints(v, 1000, seed=4).tolist()
    for x in [v.tolist(), torch.from_numpy(v), pa.array(v), pa.chunked_array([v[:2], v[2:]]), pd.Series(v),
              pd.Series(v, dtype="int64[pyarrow]"), np.concatenate([v, v])[::2][:0]]:
        got = hash_ints(x, 1000, seed=4)
        got = got.tolist() if not isinstance(got, list) else got
        assert got == want[:len(got)] and (len(got) == len(want) or len(got) == 0)
    t = hash_ints(torch.from_numpy(v), 1000, seed=4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64


def test_arrow_int_nulls_hash_as_empty(impl):
    arr = pa.array([1, None, 3], type=pa.int64())
    got = hash_ints(arr, 1000, seed=2).tolist()
    assert got[1] == xxhash.xxh3_64_intdigest(b"", 2) % 1000
    assert got[0] == hash_ints(np.array([1]), 1000, seed=2)[0]


def test_all_null_and_all_empty_arrow_columns(impl):
    empty_hash = xxhash.xxh3_64_intdigest(b"") % 100
    for a in [pa.array([None, None], pa.string()), pa.array(["", ""]), pa.array([None, None]),
              pa.array([b"", b""], pa.large_binary())]:
        assert hash_strings(a, 100).tolist() == [empty_hash] * 2
        assert FeatureHasher(100).transform([a]).ravel().tolist() == [0, 0]


def test_empty_inputs(impl):
    for x in [[], np.array([], dtype=object), pa.array([], type=pa.string()), pa.chunked_array([], type=pa.string())]:
        r = hash_strings(x, 10)
        assert r.shape == (0,) and r.dtype == np.int64
    assert hash_ints(np.array([], dtype=np.int64), 10).shape == (0,)
    assert FeatureHasher(10).transform([[], []]).shape == (0, 2)


def test_threads_and_out_buffers():
    if not hashing.NATIVE:
        pytest.skip("native extension not built")
    n = 150_000  # several threads' worth (>= 32768 rows each)
    rng = np.random.default_rng(5)
    chars = rng.integers(ord("a"), ord("z") + 1, size=(n, 6), dtype=np.uint8)
    arr = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 6),
                                                 pa.py_buffer(chars.tobytes())])
    one = hash_strings(arr, 12345, num_threads=1)
    for t in (2, 3, 7):
        assert np.array_equal(hash_strings(arr, 12345, num_threads=t), one)
    assert one[:50].tolist() == _expected(arr.slice(0, 50).to_pylist(), 12345, 0)
    buf = np.full((n, 3), -1, dtype=np.int64)
    col = buf[:, 1]  # a strided view: the engine must write through it, not into a contiguous copy
    res = hash_strings(arr, 12345, out=col, num_threads=2)
    assert res is col and np.shares_memory(res, buf)
    assert np.array_equal(buf[:, 1], one) and (buf[:, 0] == -1).all() and (buf[:, 2] == -1).all()
    tout = torch.empty(n, dtype=torch.int64)
    assert hash_strings(arr, 12345, out=tout) is tout and np.array_equal(tout.numpy(), one)


# ------------------------------------------------------------------ bad input
def test_bad_values_name_the_row(impl):
    with pytest.raises(TypeError, match="row 2"):
        hash_strings(["a", "b", 3, "d"], 10)
    with pytest.raises(TypeError, match="row 1"):
        hash_strings(np.array(["a", 1.5], dtype=object), 10)
    with pytest.raises(TypeError, match="field 1, row 0"):
        FeatureHasher(10).transform([["a"], [object()]])
    with pytest.raises(ValueError, match="row 0"):
        hash_strings(["\ud800"], 10)  # lone surrogate: not encodable


@pytest.mark.parametrize("nb", [0, -1, 2**63 + 1, 2**70])
def test_bad_num_buckets(nb):
    with pytest.raises(ValueError):
        hash_strings(["a"], nb)
    with pytest.raises(ValueError):
        hash_ints([1], nb)
    with pytest.raises(ValueError):
        FeatureHasher(nb)


def test_bad_arguments():
    with pytest.raises(ValueError):
        FeatureHasher(1)  # bucket0 needs two ids
    with pytest.raises(TypeError):
        hash_strings(["a"], 10.0)
    with pytest.raises(ValueError):
        hash_strings(["a"], 10, seed=2**64)
    with pytest.raises(ValueError):
        hash_strings(["a"], 10, seed=2**32, algorithm="murmur3")
    with pytest.raises(ValueError):
        hash_strings(["a"], 10, algorithm="md5")
    with pytest.raises(ValueError):
        FeatureHasher(10, missing="drop")
    with pytest.raises(TypeError):
        hash_strings("abc", 10)  # a scalar, not a column
    with pytest.raises(ValueError):
        hash_strings(["a", "b"], 10, out=np.empty(3, dtype=np.int64))
    with pytest.raises(ValueError):
        hash_strings(["a"], 10, out=np.empty(1, dtype=np.int32))


@pytest.mark.parametrize("bad", [np.array([1, 2], dtype=np.int32), np.array([1.0]), np.array([1], dtype=np.uint64),
                                 ["1", "2"], [1.5], torch.tensor([1, 2], dtype=torch.int32),
                                 pa.array([1, 2], type=pa.int32())])
def test_wrong_int_dtypes_refused(bad):
    with pytest.raises(TypeError):
        hash_ints(bad, 10)


@pytest.mark.parametrize("bad", [np.array([1, 2]), torch.tensor([1, 2]), pa.array([1, 2]), np.array([1.0])])
def test_numbers_refused_as_strings(bad):
    with pytest.raises(TypeError):
        hash_strings(bad, 10)


# ------------------------------------------------------------------ FeatureHasher
def test_feature_hasher_missing_modes(impl):
    col = ["a", None, float("nan"), pd.NA, "", "b"]
    nb = 50
    b0 = FeatureHasher([nb], missing="bucket0").transform([col])[:, 0].tolist()
    assert b0[1:5] == [0, 0, 0, 0]
    assert b0[0] == 1 + xxhash.xxh3_64_intdigest(b"a", 0) % (nb - 1)
    h = FeatureHasher([nb], missing="hash").transform([col])[:, 0].tolist()
    assert h[1:5] == [xxhash.xxh3_64_intdigest(b"", 0) % nb] * 4
    assert h[5] == xxhash.xxh3_64_intdigest(b"b", 0) % nb
    arrow_nulls = FeatureHasher(nb).transform([pa.array(["a", None, ""])])[:, 0].tolist()
    assert arrow_nulls == [b0[0], 0, 0]


@pytest.mark.parametrize("algorithm", _ALGOS)
def test_feature_hasher_seeds_sizes_offsets(impl, algorithm):
    cols = [_sample_strings(40), _sample_strings(40)[::-1], np.arange(40, dtype=np.int64) * 7919]
    hasher = FeatureHasher([100, 7, 2**40], algorithm=algorithm)
    ids = hasher.transform(cols)
    assert ids.shape == (40, 3) and ids.dtype == np.int64
    assert hasher.field_sizes == [100, 7, 2**40] and hasher.offsets == [0, 100, 107]
    for f, (c, nb) in enumerate(zip(cols, hasher.field_sizes)):
        if f < 2:
            want = _expected(c, nb, f, algorithm, bucket0=True)
        else:
            want = [1 + _ref_hash(int(v).to_bytes(8, "little", signed=True), f, algorithm) % (nb - 1) for v in c]
        assert ids[:, f].tolist() == want
        assert (ids[:, f] >= 0).all() and (ids[:, f] < nb).all()
    custom = FeatureHasher(100, seeds=[5, 6, 7], algorithm=algorithm).transform(cols)
    assert custom[:, 0].tolist() == _expected(cols[0], 100, 5, algorithm, bucket0=True)
    base = FeatureHasher(100, seeds=5, algorithm=algorithm).transform(cols)
    assert np.array_equal(base, custom)
    with pytest.raises(ValueError):
        FeatureHasher(100).field_sizes  # F unknown
    assert FeatureHasher(100, num_fields=3).offsets == [0, 100, 200]
    with pytest.raises(ValueError):
        FeatureHasher([10, 10]).transform(cols)  # 3 columns for 2 fields
    with pytest.raises(ValueError):
        FeatureHasher(10).transform([["a"], ["a", "b"]])


def test_feature_hasher_table_inputs_agree():
    vals = [_sample_strings(30), _sample_strings(31)[1:]]
    want = FeatureHasher(64).transform(vals)
    table = pa.table({"a": vals[0], "b": vals[1]})
    for x in [table, table.to_batches()[0], pd.DataFrame({"a": vals[0], "b": vals[1]}),
              {"a": vals[0], "b": vals[1]}, np.array(vals, dtype=object).T]:
        assert np.array_equal(FeatureHasher(64).transform(x), want)
    out = np.empty((30, 2), dtype=np.int64)
    assert FeatureHasher(64).transform(vals, out=out) is out and np.array_equal(out, want)
    t = FeatureHasher(64)(torch.arange(12).reshape(6, 2))
    assert isinstance(t, torch.Tensor) and t.shape == (6, 2)
    assert t[:, 1].tolist() == [1 + xxhash.xxh3_64_intdigest(int(v).to_bytes(8, "little"), 1) % 63
                                for v in range(1, 12, 2)]


def test_feature_hasher_feeds_multifield_embedding():
    from fastkd import MultiFieldEmbedding

    hasher = FeatureHasher([11, 5, 3])
    ids = hasher.transform([_sample_strings(20), _sample_strings(20), np.arange(20, dtype=np.int64)])
    emb = MultiFieldEmbedding(hasher.field_sizes, dim=4)
    assert emb(torch.from_numpy(ids)).shape[0] == 20


def test_feature_encoder_hash_path_matches(monkeypatch):
    from fastkd.data.encoder import _hash_column

    vals = np.array(_sample_strings(100), dtype=object)
    want = _expected(vals, 1000, 3, bucket0=True)
    calls = []
    real = hashing._hash_field
    monkeypatch.setattr(hashing, "_hash_field", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _hash_column(vals, 1000, 3).tolist() == want
    assert len(calls) == 1
    ids = FeatureHasher(1000, seeds=3).transform([vals])[:, 0]
    assert ids.tolist() == want


# ------------------------------------------------------------------ torch.library op
def test_torch_custom_op():
    if engine._TORCH_OP is None:
        pytest.skip("torch.library.custom_op unavailable")
    t = torch.tensor([3, -4, 2**40], dtype=torch.int64)
    got = hash_ints(t, 2**63, seed=2**64 - 1)
    assert got.tolist() == hash_ints(t.numpy(), 2**63, seed=2**64 - 1).tolist()
    torch.library.opcheck(torch.ops.fastkd.hash_ints.default, (t, 1000, 5, 0, 0))
    torch.library.opcheck(torch.ops.fastkd.hash_ints.default, (t, 1000, 5, 1, 1))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x):
        return hash_ints(x, 97, seed=1) + 1

    assert f(t).tolist() == [v + 1 for v in hash_ints(t.numpy(), 97, seed=1).tolist()]


def test_hash_string_tensors_cpu(impl):
    vals = [v or "" for v in _sample_strings(60)]
    arr = pa.array(vals, type=pa.large_string())
    offsets = torch.from_numpy(np.frombuffer(arr.buffers()[1], dtype=np.int64)[:61].copy())
    data = torch.from_numpy(np.frombuffer(arr.buffers()[2], dtype=np.uint8).copy())
    got = hash_string_tensors(offsets, data, 777, seed=2)
    assert got.tolist() == hash_strings(vals, 777, seed=2).tolist()
    assert hash_string_tensors(offsets.int(), data, 777, seed=2).tolist() == got.tolist()
    with pytest.raises(ValueError):
        hash_string_tensors(offsets.flip(0), data, 777)
    with pytest.raises(TypeError):
        hash_string_tensors(offsets.float(), data, 777)


# ------------------------------------------------------------------ CUDA
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    """The .cu sources compile with nvcc (one architecture, to stay quick; `make cuda-check` does all)."""
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-I{REPO / 'csrc'}", "-Xcompiler", "-fPIC", "-arch=sm_80",
                           "-c", str(REPO / "csrc" / "hash_cuda.cu"), "-o", str(tmp_path / "hash_cuda.o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not hashing.NATIVE_CUDA, reason="CUDA extension not built")
def test_cuda_module_imports_without_gpu_and_fails_cleanly():
    """The CUDA module links the runtime statically: it imports anywhere; a launch without a usable
    GPU raises RuntimeError (never crashes)."""
    assert engine._CUDA.runtime_version() > 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        engine._CUDA.hash_int64(0, 10, 0, 1, 0, 10, 0, 0, 0, 0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("algorithm", _ALGOS)
@pytest.mark.parametrize("num_buckets,seed", _BUCKET_SEED_PARAMS)
def test_cuda_ints_match_cpu_bit_for_bit(algorithm, num_buckets, seed):
    seed = _seed(seed, algorithm)
    g = torch.Generator().manual_seed(7)
    v = torch.randint(-(2**63), 2**63 - 1, (100_003,), dtype=torch.int64, generator=g)
    cpu = hash_ints(v, num_buckets, seed=seed, algorithm=algorithm)
    dev = hash_ints(v.cuda(), num_buckets, seed=seed, algorithm=algorithm)
    assert dev.is_cuda and torch.equal(dev.cpu(), cpu)
    out = torch.empty_like(v, device="cuda")
    assert hash_ints(v.cuda(), num_buckets, seed=seed, algorithm=algorithm, out=out) is out
    assert torch.equal(out.cpu(), cpu)
    if num_buckets >= 2:
        cols = torch.stack([v[:1000], v[1000:2000].flip(0)], 1)
        # explicit per-field seeds: an int base seed gives field f the seed `seed + f`, which
        # leaves murmur3's 32-bit range when `seed` is its largest value
        hasher = FeatureHasher(num_buckets, seeds=[seed, seed], algorithm=algorithm)
        assert torch.equal(hasher.transform(cols.cuda()).cpu(), hasher.transform(cols))
    assert not (hashing.NATIVE_CUDA and engine._CUDA_UNUSABLE), "the CUDA kernels fell back to the CPU"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("algorithm", _ALGOS)
def test_cuda_strings_match_cpu_bit_for_bit(algorithm):
    rng = np.random.default_rng(8)
    vals = _random_bytes(rng, _LENGTHS * 20)
    arr = pa.array(vals, type=pa.large_binary())
    offsets = torch.from_numpy(np.frombuffer(arr.buffers()[1], dtype=np.int64)[:len(vals) + 1].copy())
    data = torch.from_numpy(np.frombuffer(arr.buffers()[2], dtype=np.uint8).copy())
    for nb, seed in _BUCKET_SEED_PARAMS:
        seed = _seed(seed, algorithm)
        cpu = hash_string_tensors(offsets, data, nb, seed, algorithm)
        for offs in (offsets, offsets.int()):
            dev = hash_string_tensors(offs.cuda(), data.cuda(), nb, seed, algorithm)
            assert dev.is_cuda and torch.equal(dev.cpu(), cpu)
    assert cpu.tolist() == [_ref_hash(v, seed, algorithm) % nb for v in vals]
    assert not (hashing.NATIVE_CUDA and engine._CUDA_UNUSABLE), "the CUDA kernels fell back to the CPU"


@pytest.mark.cuda
@requires_cuda
def test_cuda_runs_on_current_stream():
    if not hashing.NATIVE_CUDA:
        pytest.skip("CUDA extension not built")
    v = torch.arange(1 << 20, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = hash_ints(v, 1000)
    s.synchronize()
    assert torch.equal(out.cpu(), hash_ints(v.cpu(), 1000))


def test_unordered_or_keyed_columns_are_refused():
    # mutation caught: a set hashed in its arbitrary order, a dict's keys hashed as its values
    from fastkd.hashing import FeatureHasher, hash_strings

    for column in ({"b", "a", "c"}, frozenset({"a"}), {"x": "a"}):
        with pytest.raises(TypeError, match="in row order"):
            hash_strings(column, 1000)
    with pytest.raises(TypeError, match="field 0: expected a column of values in row order"):
        FeatureHasher(100).transform({"s": {"k": "a"}})
