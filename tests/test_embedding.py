"""MultiFieldEmbedding against per-field nn.Embedding / nn.EmbeddingBag and torch.optim.

Covers the default dense path, merged sparse gradients, the fused SGD/Adagrad update (equal to
the unfused torch optimizer step, duplicates included), bag mode, the Triton kernels under the
interpreter on CPU tensors (no GPU here), and CPU/CUDA parity where a GPU exists.
"""
import doctest
import importlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fastkd.embedding import MultiFieldEmbedding, MultiFieldEmbeddingRef, multi_field_embedding
from fastkd.embedding import modules as embedding_modules
from fastkd.embedding import ops as embedding_ops
from fastkd.reference import embedding as embedding_ref
from helpers import requires_cuda

# is_available() asks the driver without creating a context, so collection stays CUDA-free. The
# interpreter flag must be set before Triton is imported (as tests/conftest.py does).
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIELD_SIZES = [5, 1, 17, 3, 2]


def random_ids(field_sizes, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch,), generator=g) for s in field_sizes], dim=1)


def make_pair(field_sizes=FIELD_SIZES, dim=4, sparse=False, seed=0):
    torch.manual_seed(seed)
    fused = MultiFieldEmbedding(field_sizes, dim, sparse=sparse, init_std=1.0)
    return fused, MultiFieldEmbeddingRef.from_fused(fused)


def test_layout_and_properties():
    emb = MultiFieldEmbedding(FIELD_SIZES, 3)
    assert emb.num_fields == 5
    assert emb.field_sizes == tuple(FIELD_SIZES)
    assert emb.dim == 3
    assert emb.offsets.dtype == torch.int64
    assert emb.offsets.tolist() == [0, 5, 6, 23, 26]
    assert emb.weight.shape == (sum(FIELD_SIZES), 3)
    assert emb.num_embeddings == sum(FIELD_SIZES)
    # offsets are derived from field_sizes, so checkpoints hold only the learned table
    assert list(emb.state_dict()) == ["weight"]
    assert torch.equal(emb.field_weight(2), emb.weight[6:23])


def test_default_init_is_small():
    torch.manual_seed(0)
    emb = MultiFieldEmbedding([1000], 8)
    assert 0.5e-4 < emb.weight.std().item() < 2e-4


@pytest.mark.parametrize("dim", [1, 3, 7])
@pytest.mark.parametrize("batch", [1, 9])
def test_forward_matches_reference(dim, batch):
    fused, ref = make_pair(dim=dim)
    ids = random_ids(FIELD_SIZES, batch, seed=dim)
    out = fused(ids)
    assert out.shape == (batch, len(FIELD_SIZES), dim)
    assert torch.equal(out, ref(ids))
    # each output row is the right table row
    for f in range(len(FIELD_SIZES)):
        assert torch.equal(out[:, f], fused.field_weight(f)[ids[:, f]])


def test_int32_ids_match_int64():
    fused, _ = make_pair()
    ids = random_ids(FIELD_SIZES, 11)
    assert torch.equal(fused(ids.int()), fused(ids))


def test_empty_batch():
    fused, _ = make_pair()
    out = fused(torch.zeros(0, len(FIELD_SIZES), dtype=torch.long))
    assert out.shape == (0, len(FIELD_SIZES), 4)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dim", [1, 5])
def test_backward_matches_reference(sparse, dim):
    fused, ref = make_pair(dim=dim, sparse=sparse)
    ids = random_ids(FIELD_SIZES, 64, seed=3)  # 64 draws over tiny fields: many duplicates
    upstream = torch.randn(64, len(FIELD_SIZES), dim)
    (fused(ids) * upstream).sum().backward()
    (ref(ids) * upstream).sum().backward()
    grad = fused.weight.grad
    assert grad.is_sparse == sparse
    if sparse:
        grad = grad.to_dense()
    torch.testing.assert_close(grad, ref.fused_grad(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_duplicate_ids_accumulate(sparse):
    fused, _ = make_pair(dim=2, sparse=sparse)
    ids = torch.tensor([[4, 0, 16, 2, 1]] * 6)
    fused(ids).sum().backward()
    grad = fused.weight.grad.to_dense() if sparse else fused.weight.grad
    rows = (ids + fused.offsets).unique()
    expected = torch.zeros_like(fused.weight)
    expected[rows] = 6.0
    assert torch.equal(grad, expected)


def test_out_of_range_names_field():
    emb = MultiFieldEmbedding(FIELD_SIZES, 2)
    ids = random_ids(FIELD_SIZES, 4)
    ids[2, 2] = 17  # == field_sizes[2]
    with pytest.raises(ValueError, match="field 2"):
        emb(ids)


def test_negative_id_names_field():
    emb = MultiFieldEmbedding(FIELD_SIZES, 2)
    ids = random_ids(FIELD_SIZES, 4)
    ids[0, 3] = -1
    with pytest.raises(ValueError, match="field 3"):
        emb(ids)


def test_id_valid_for_another_field_is_rejected():
    # 3 is a valid id for field 0 but not for field 1 (size 1): the offset must not hide it
    emb = MultiFieldEmbedding([5, 1], 2)
    with pytest.raises(ValueError, match="field 1"):
        emb(torch.tensor([[0, 3]]))


def test_reference_validates_too():
    _, ref = make_pair()
    ids = random_ids(FIELD_SIZES, 3)
    ids[1, 4] = 2
    with pytest.raises(ValueError, match="field 4"):
        ref(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.uint8])
def test_non_integer_ids_raise_type_error(dtype):
    emb = MultiFieldEmbedding(FIELD_SIZES, 2)
    with pytest.raises(TypeError, match="int64"):
        emb(random_ids(FIELD_SIZES, 2).to(dtype))


def test_non_tensor_ids_raise_type_error():
    emb = MultiFieldEmbedding([3], 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        emb([[0]])


@pytest.mark.parametrize("shape", [(4, 4), (4, 6), (5,), (2, 5, 1)])
def test_wrong_shape_raises(shape):
    emb = MultiFieldEmbedding(FIELD_SIZES, 2)
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        emb(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize(
    "field_sizes, dim, exc, match",
    [
        ([], 4, ValueError, "at least one"),
        ([3, 0], 4, ValueError, r"field_sizes\[1\]"),
        ([3, -2], 4, ValueError, r"field_sizes\[1\]"),
        (7, 4, TypeError, "sequence"),
        ([3], 0, ValueError, "dim"),
        ([3], 2.5, ValueError, "dim"),
    ],
)
def test_constructor_errors(field_sizes, dim, exc, match):
    with pytest.raises(exc, match=match):
        MultiFieldEmbedding(field_sizes, dim)


def test_load_from_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        MultiFieldEmbeddingRef([3, 4], 2).load_from(MultiFieldEmbedding([3, 5], 2))


def test_deterministic_given_seed():
    torch.manual_seed(7)
    a = MultiFieldEmbedding(FIELD_SIZES, 4)
    torch.manual_seed(7)
    b = MultiFieldEmbedding(FIELD_SIZES, 4)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("module", [embedding_modules, embedding_ops], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------------
# Sparse / fused-optimizer backward, bag mode, Triton (interpreter) and CUDA parity
# ------------------------------------------------------------------------------------------------
# (name, field_sizes, dim, batch): a power-of-two dim, an odd one with many duplicate ids, a
# dim wider than one Triton column block, and a single row.
_SHAPE_PARAMS = [
    pytest.param([5, 1, 17, 3, 2], 4, 9, id="small"),
    pytest.param([7, 13, 3], 5, 33, id="odd-dups"),
    pytest.param([3, 4], 130, 6, id="wide"),
    pytest.param([6], 3, 1, id="single-row"),
]


def _per_field_opt(ref, name, **kw):
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name]
    return cls(ref.parameters(), **kw)


@pytest.fixture(autouse=True)
def _quiet_sparse_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        yield


@pytest.mark.parametrize("field_sizes, dim, batch", _SHAPE_PARAMS)
def test_sparse_grad_is_merged_and_matches_reference(field_sizes, dim, batch):
    fused, ref = make_pair(field_sizes, dim, sparse=True)
    ids = random_ids(field_sizes, batch, seed=1)
    upstream = torch.randn(batch, len(field_sizes), dim)
    (grad,) = torch.autograd.grad(fused(ids), fused.weight, upstream)
    (fused(ids) * upstream).sum().backward()
    assert grad.is_sparse and grad.is_coalesced()
    rows = grad._indices()[0]
    assert torch.equal(rows, (ids + fused.offsets).unique())  # one entry per touched row
    (ref(ids) * upstream).sum().backward()
    torch.testing.assert_close(grad.to_dense(), ref.fused_grad(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
@pytest.mark.parametrize("field_sizes, dim, batch", _SHAPE_PARAMS)
def test_fused_update_equals_torch_optimizer(opt, field_sizes, dim, batch, backend):
    torch.manual_seed(0)
    kw = {"lr": 0.3} if opt == "sgd" else {"lr": 0.3, "eps": 1e-8, "initial_accumulator_value": 0.1}
    fused = MultiFieldEmbedding(field_sizes, dim, fused_optimizer=opt, init_std=1.0,
                                backend=backend, **kw)
    # The same step by torch: our merged sparse grad + torch.optim (bit-identical on fp32 for the
    # reference; the native CPU step rounds sqrt correctly where torch's vectorised sqrt is off by
    # an ulp now and then, so Adagrad there is equal to an ulp), and per-field nn.Embedding with
    # its own (unmerged) sparse grads + torch.optim.
    unfused = MultiFieldEmbedding(field_sizes, dim, sparse=True, init_std=1.0)
    unfused.weight.data.copy_(fused.weight)
    ref = MultiFieldEmbeddingRef.from_fused(unfused)
    opt_unfused = _per_field_opt(unfused, opt, **kw)
    opt_ref = _per_field_opt(ref, opt, **kw)
    for step in range(3):
        ids = random_ids(field_sizes, batch, seed=10 + step)
        upstream = torch.randn(batch, len(field_sizes), dim)
        for m, o in ((fused, None), (unfused, opt_unfused), (ref, opt_ref)):
            (m(ids) * upstream).sum().backward()
            if o is not None:
                o.step()
                o.zero_grad()
        assert fused.weight.grad is None
    if backend == "torch" or opt == "sgd" or not embedding_ops.NATIVE_CPU:
        assert torch.equal(fused.weight, unfused.weight)
    else:
        torch.testing.assert_close(fused.weight, unfused.weight, rtol=1e-6, atol=1e-7)
    fresh = MultiFieldEmbeddingRef.from_fused(fused)
    for a, b in zip(fresh.tables, ref.tables):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    if opt == "adagrad":
        state = torch.cat([opt_ref.state[t.weight]["sum"] for t in ref.tables])
        torch.testing.assert_close(fused.state_sum, state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_fused_update_in_chunks_equals_one_pass(opt, monkeypatch):
    # The CPU step walks the unique rows in chunks; tiny chunks (2 rows here) must not change it.
    field_sizes, dim, batch = [7, 13, 3], 3, 33
    ids = random_ids(field_sizes, batch, seed=4)
    upstream = torch.randn(batch, len(field_sizes), dim)
    results = []
    for chunk in (embedding_ref.UPDATE_CHUNK_ELEMS, 7):
        monkeypatch.setattr(embedding_ref, "UPDATE_CHUNK_ELEMS", chunk)
        torch.manual_seed(0)
        emb = MultiFieldEmbedding(field_sizes, dim, fused_optimizer=opt, lr=0.1, init_std=1.0,
                                  backend="torch")
        emb(ids).backward(upstream)
        results.append(emb.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])


def test_fused_duplicates_are_one_step_of_the_summed_gradient():
    emb = MultiFieldEmbedding([4], 2, fused_optimizer="adagrad", lr=1.0, init_std=0.0)
    ids = torch.tensor([[1], [1], [1], [3]])
    emb(ids).sum().backward()
    # row 1: g = 3 -> s = 9, w = -3/3 = -1 (three separate steps would give a different value)
    assert emb.state_sum[:, 0].tolist() == [0.0, 9.0, 0.0, 1.0]
    assert emb.weight[:, 0].tolist() == [0.0, -1.0, 0.0, -1.0]


def test_fused_table_is_left_alone_by_outer_optimizer():
    emb = MultiFieldEmbedding([5, 3], 4, fused_optimizer="sgd", lr=0.1)
    head = nn.Linear(4, 1)
    outer = torch.optim.AdamW(list(emb.parameters()) + list(head.parameters()), lr=1.0,
                              weight_decay=0.5)
    ids = random_ids([5, 3], 6)
    head(emb(ids)).sum().backward()
    after_backward = emb.weight.detach().clone()
    outer.step()
    assert emb.weight.grad is None
    assert torch.equal(emb.weight, after_backward)  # Adam skipped it (no grad, no decay)
    assert head.weight.grad is not None


def test_fused_backward_twice_raises():
    emb = MultiFieldEmbedding([5, 3], 2, fused_optimizer="sgd")
    out = emb(random_ids([5, 3], 4)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_fused_weight_with_grad_raises():
    emb = MultiFieldEmbedding([5, 3], 2, fused_optimizer="adagrad")
    emb.weight.pow(2).sum().backward()  # a penalty on the whole table: would be a double update
    with pytest.raises(RuntimeError, match="weight.grad is set"):
        emb(random_ids([5, 3], 2))


def test_fused_frozen_module_is_not_updated():
    emb = MultiFieldEmbedding([5, 3], 2, fused_optimizer="sgd", lr=1.0)
    emb.requires_grad_(False)
    head = nn.Linear(2, 1)
    before = emb.weight.detach().clone()
    head(emb(random_ids([5, 3], 4))).sum().backward()
    assert torch.equal(emb.weight, before)


def test_fused_state_dict_round_trip():
    a = MultiFieldEmbedding([5, 3], 2, fused_optimizer="adagrad", initial_accumulator_value=0.5)
    assert set(a.state_dict()) == {"weight", "state_sum"}
    assert torch.all(a.state_sum == 0.5)
    a(random_ids([5, 3], 8)).sum().backward()
    b = MultiFieldEmbedding([5, 3], 2, fused_optimizer="adagrad")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.state_sum, a.state_sum) and torch.equal(b.weight, a.weight)


def test_fused_update_never_builds_a_table_sized_buffer():
    rows, dim, batch = 200_000, 16, 64
    emb = MultiFieldEmbedding([rows // 2, rows // 2], dim, fused_optimizer="adagrad")
    ids = random_ids([rows // 2, rows // 2], batch)
    table_bytes = rows * dim * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        emb(ids).sum().backward()
    biggest = max(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert 0 < biggest < table_bytes // 100


@pytest.mark.parametrize("kwargs, match", [
    ({"sparse": True, "fused_optimizer": "sgd"}, "exclude"),
    ({"fused_optimizer": "adam"}, "fused_optimizer"),
    ({"mode": "multi"}, "mode"),
    ({"pooling": "max"}, "pooling"),
    ({"backend": "cuda"}, "backend"),
    ({"fused_optimizer": "sgd", "lr": -1.0}, "lr"),
])
def test_new_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiFieldEmbedding([3, 4], 2, **kwargs)


def test_fused_out_of_range_raises():
    emb = MultiFieldEmbedding([3, 4], 2, fused_optimizer="adagrad")
    with pytest.raises(ValueError, match="field 1"):
        emb(torch.tensor([[0, 4]]))


# ---- bag mode ----------------------------------------------------------------------------------
def random_bags(field_sizes, batch, seed=0, max_len=3, weights=False):
    g = torch.Generator().manual_seed(seed)
    values, offsets, psw = [], [], []
    for s in field_sizes:
        lengths = torch.randint(0, max_len + 1, (batch,), generator=g)  # empty bags included
        offsets.append(torch.cumsum(lengths, 0) - lengths)
        values.append(torch.randint(0, s, (int(lengths.sum()),), generator=g))
        psw.append(torch.rand(values[-1].shape[0], generator=g))
    return values, offsets, (psw if weights else None)


def make_bag_pair(field_sizes, dim, pooling, **kw):
    torch.manual_seed(0)
    fused = MultiFieldEmbedding(field_sizes, dim, mode="bag", pooling=pooling, init_std=1.0, **kw)
    plain = MultiFieldEmbedding(field_sizes, dim, mode="bag", pooling=pooling,
                                sparse=bool(kw.get("fused_optimizer")), init_std=1.0)
    plain.weight.data.copy_(fused.weight)
    return fused, MultiFieldEmbeddingRef.from_fused(plain)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("pooling, weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("field_sizes, dim, batch", _SHAPE_PARAMS)
def test_bag_matches_per_field_embedding_bag(field_sizes, dim, batch, pooling, weighted, sparse):
    fused, ref = make_bag_pair(field_sizes, dim, pooling, sparse=sparse)
    values, offsets, psw = random_bags(field_sizes, batch, seed=dim, weights=weighted)
    if weighted:
        psw = [p.requires_grad_() for p in psw]
    out = fused(values, offsets, psw)
    expected = ref(values, offsets, psw)
    assert out.shape == (batch, len(field_sizes), dim)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(out)
    inputs = [fused.weight] + (psw if weighted else [])
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_inputs = [t.weight for t in ref.tables] + (psw if weighted else [])
    ref_grads = torch.autograd.grad(expected, ref_inputs, upstream)
    assert grads[0].is_sparse == sparse
    dense = grads[0].to_dense() if sparse else grads[0]
    ref_dense = torch.cat([g.to_dense() if g.is_sparse else g for g in ref_grads[: len(field_sizes)]])
    torch.testing.assert_close(dense, ref_dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1:], ref_grads[len(field_sizes):]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_bag_fused_adagrad_equals_torch(pooling):
    field_sizes, dim = [7, 3, 5], 3
    fused, ref = make_bag_pair(field_sizes, dim, pooling, fused_optimizer="adagrad", lr=0.2)
    opt = torch.optim.Adagrad(ref.parameters(), lr=0.2)
    for step in range(2):
        values, offsets, _ = random_bags(field_sizes, 8, seed=step, max_len=4)
        upstream = torch.randn(8, len(field_sizes), dim)
        (fused(values, offsets) * upstream).sum().backward()
        (ref(values, offsets) * upstream).sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = MultiFieldEmbeddingRef.from_fused(fused)
    for a, b in zip(fresh.tables, ref.tables):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_bag_fused_per_sample_weights_get_gradient_before_update():
    emb = MultiFieldEmbedding([4], 2, mode="bag", fused_optimizer="sgd", lr=1.0, init_std=1.0)
    w0 = emb.weight.detach().clone()
    values, offsets = [torch.tensor([1, 2, 1])], [torch.tensor([0, 2])]
    psw = [torch.tensor([0.5, 2.0, 1.0], requires_grad=True)]
    emb(values, offsets, psw).sum().backward()
    # d out / d psw_j = weight[values[j]] as it was in the forward (before the fused step)
    torch.testing.assert_close(psw[0].grad, w0[values[0]].sum(1))


@pytest.mark.parametrize("call, exc, match", [
    (lambda e: e([torch.tensor([0, 9])], [torch.tensor([0])]), ValueError, "field 0"),
    (lambda e: e([torch.tensor([0])], [torch.tensor([1])]), ValueError, "start at 0"),
    (lambda e: e([torch.tensor([0])], None), ValueError, "offsets"),
    (lambda e: e(torch.tensor([0]), [torch.tensor([0])]), TypeError, "list"),
    (lambda e: e([torch.tensor([0]), torch.tensor([0])], [torch.tensor([0])] * 2), ValueError, "one tensor per field"),
])
def test_bag_input_errors(call, exc, match):
    emb = MultiFieldEmbedding([5], 2, mode="bag")
    with pytest.raises(exc, match=match):
        call(emb)


def test_bag_per_sample_weights_need_sum_pooling():
    emb = MultiFieldEmbedding([5], 2, mode="bag", pooling="mean")
    with pytest.raises(ValueError, match="pooling='sum'"):
        emb([torch.tensor([0])], [torch.tensor([0])], [torch.tensor([1.0])])


def test_bag_batches_must_agree():
    emb = MultiFieldEmbedding([5, 5], 2, mode="bag")
    with pytest.raises(ValueError, match="one bag per sample"):
        emb([torch.tensor([0]), torch.tensor([0, 1])], [torch.tensor([0]), torch.tensor([0, 1])])


def test_onehot_rejects_offsets():
    emb = MultiFieldEmbedding([5], 2)
    with pytest.raises(ValueError, match="mode='bag'"):
        emb(torch.tensor([[0]]), [torch.tensor([0])])


def test_functional_validates_arguments():
    w = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="state"):
        multi_field_embedding(torch.tensor([0]), w, grad="adagrad")
    with pytest.raises(ValueError, match="grad must be"):
        multi_field_embedding(torch.tensor([0]), w, grad="adam")
    leaf = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        multi_field_embedding(torch.tensor([0]), leaf * 2, grad="sgd")


# ---- Triton kernels under the interpreter (CPU tensors) ----------------------------------------
@pytest.fixture
def triton_on_cpu():
    """fastkd.kernels.embedding running in Triton's interpreter on CPU tensors.

    Only without a GPU, where TRITON_INTERPRET=1 was set when this module was imported (before
    Triton loads); on a GPU machine the CUDA tests below run the compiled kernels instead.
    """
    if ON_GPU:
        pytest.skip("interpreter tests run on CPU-only machines; CUDA tests cover the kernels")
    pytest.importorskip("triton")
    return importlib.import_module("fastkd.kernels.embedding")


_TRITON_SHAPES = [
    pytest.param([7, 1, 3], 5, 12, id="odd-dups"),
    pytest.param([3, 4], 130, 3, id="wide"),
    pytest.param([6], 3, 1, id="single-row"),
]
# (dtype, atol, rtol) of the table; grads/updates are computed in fp32 inside the kernels.
_DTYPE_PARAMS = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]


def _triton_and_torch(field_sizes, dim, dtype, **kw):
    torch.manual_seed(0)
    tri = MultiFieldEmbedding(field_sizes, dim, backend="triton", init_std=1.0, **kw).to(dtype)
    ref = MultiFieldEmbedding(field_sizes, dim, backend="torch", init_std=1.0, **kw).to(dtype)
    ref.load_state_dict(tri.state_dict())
    return tri, ref


@pytest.mark.parametrize("dtype, atol, rtol", _DTYPE_PARAMS)
@pytest.mark.parametrize("grad", ["dense", "sparse", "sgd", "adagrad"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("field_sizes, dim, batch", _TRITON_SHAPES)
def test_triton_onehot_matches_torch(triton_on_cpu, field_sizes, dim, batch, grad, deterministic,
                                     dtype, atol, rtol):
    kw = {"sparse": grad == "sparse", "deterministic": deterministic}
    if grad in ("sgd", "adagrad"):
        kw.update(fused_optimizer=grad, lr=0.1)
    tri, ref = _triton_and_torch(field_sizes, dim, dtype, **kw)
    ids = random_ids(field_sizes, batch, seed=2)
    upstream = torch.randn(batch, len(field_sizes), dim).to(dtype)
    out_t, out_r = tri(ids), ref(ids)
    assert torch.equal(out_t, out_r)  # a gather is exact in any dtype
    out_t.backward(upstream)
    out_r.backward(upstream)
    if grad in ("sgd", "adagrad"):
        assert tri.weight.grad is None
        torch.testing.assert_close(tri.weight, ref.weight, atol=atol, rtol=rtol)
        if grad == "adagrad":
            torch.testing.assert_close(tri.state_sum, ref.state_sum, atol=atol, rtol=rtol)
        return
    g_t, g_r = tri.weight.grad, ref.weight.grad
    assert g_t.is_sparse == (grad == "sparse") and g_t.dtype == dtype
    if grad == "sparse":
        # AccumulateGrad rebuilds a stolen sparse grad without its coalesced flag; the rows are
        # still unique and sorted.
        assert torch.equal(g_t._indices(), g_r._indices())
        assert bool((g_t._indices()[0].diff() > 0).all())
        g_t, g_r = g_t.to_dense(), g_r.to_dense()
    torch.testing.assert_close(g_t, g_r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grad", ["dense", "adagrad"])
@pytest.mark.parametrize("pooling, weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_triton_bag_matches_torch(triton_on_cpu, pooling, weighted, grad):
    field_sizes, dim, batch = [5, 3], 3, 4
    kw = {"mode": "bag", "pooling": pooling}
    if grad == "adagrad":
        kw.update(fused_optimizer="adagrad", lr=0.1)
    tri, ref = _triton_and_torch(field_sizes, dim, torch.float32, **kw)
    values, offsets, psw = random_bags(field_sizes, batch, seed=5, weights=weighted)
    psw_t = [p.clone().requires_grad_() for p in psw] if weighted else None
    psw_r = [p.clone().requires_grad_() for p in psw] if weighted else None
    out_t, out_r = tri(values, offsets, psw_t), ref(values, offsets, psw_r)
    torch.testing.assert_close(out_t, out_r, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(out_t)
    out_t.backward(upstream)
    out_r.backward(upstream)
    if grad == "dense":
        torch.testing.assert_close(tri.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(tri.weight, ref.weight, rtol=1e-5, atol=1e-6)
    if weighted:
        for a, b in zip(psw_t, psw_r):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_triton_deterministic_sums_in_lookup_order(triton_on_cpu):
    # Many lookups of one row: the sort-based merge adds them in lookup order, like the CPU path,
    # so the results agree bit for bit.
    rows = torch.tensor([2, 0, 2, 2, 1, 2, 0])
    grad_rows = torch.randn(7, 5)
    unique, merged = triton_on_cpu.embedding_merge_rows(rows, grad_rows, deterministic=True)
    ref_unique, ref_merged = embedding_ref.embedding_merge_rows_ref(rows, grad_rows)
    assert torch.equal(unique, ref_unique) and torch.equal(merged, ref_merged)


# ---- torch.library ops and torch.compile -------------------------------------------------------
def _op_cases(impl, device):
    """(launcher, args) for every ``fastkd::`` embedding op: small tensors, duplicate rows, an
    empty bag, a dense gradient in another dtype than the upstream one."""
    g = torch.Generator().manual_seed(0)
    w, state = torch.randn(7, 3, generator=g).to(device), torch.rand(7, 3, generator=g).to(device)
    rows = torch.tensor([[1, 6], [1, 0], [3, 1]], device=device)
    flat, grad_rows = rows.reshape(-1), torch.randn(6, 3, generator=g).to(device)
    starts, psw = torch.tensor([0, 2, 2, 6], device=device), torch.rand(6, generator=g).to(device)
    return [
        ("multi_field_embedding_forward", (w, rows, impl)),
        ("multi_field_embedding_bag_forward", (w, flat, starts, psw, False, impl)),
        ("multi_field_embedding_bag_forward", (w, flat, starts, None, True, impl)),
        ("embedding_dense_grad", (flat, grad_rows, 7, torch.bfloat16, False, impl)),
        ("embedding_merge_rows", (flat, grad_rows, False, 7, impl)),
        ("embedding_fused_update", (flat, grad_rows, w.clone(), state.clone(), "adagrad", 0.1, 1e-10, False, impl)),
        ("embedding_fused_update", (flat, grad_rows, w.clone(), None, "sgd", 0.1, 0.0, False, impl)),
    ]


@pytest.mark.parametrize("impl", ["cpu", "torch", "triton"])
def test_opcheck_embedding_ops(impl):
    # schema (declared mutations), fake kernel against the real one, AOT dispatch with dynamic
    # shapes; "triton" runs the interpreter on CPU tensors, the kernels on a GPU
    device = "cpu"
    if impl == "triton":
        pytest.importorskip("triton")
        device = "cuda" if ON_GPU else "cpu"
    cases = _op_cases(impl, device)
    assert {name for name, _ in cases} == set(embedding_ops._OPS)  # every registered op
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.fastkd, name).default, args)


class _TinyCTR(nn.Module):
    """A multi-field embedding under a linear head: the smallest model that trains a table."""

    def __init__(self, **kw):
        super().__init__()
        self.emb = MultiFieldEmbedding([5, 7, 3], 4, init_std=1.0, **kw)
        self.head = nn.Linear(12, 1)

    def forward(self, *inputs):
        return self.head(self.emb(*inputs).flatten(1)).squeeze(1)


@pytest.mark.parametrize("kw", [
    pytest.param({"fused_optimizer": "adagrad", "lr": 0.1}, id="fused-adagrad"),
    pytest.param({"fused_optimizer": "sgd", "lr": 0.1, "deterministic": True}, id="fused-sgd"),
    pytest.param({"fused_optimizer": "adagrad", "lr": 0.1, "mode": "bag", "pooling": "mean"}, id="fused-bag"),
    pytest.param({"dtype": torch.bfloat16}, id="dense-bf16"),  # bf16 dense goes through the op too
])
def test_compiled_model_matches_eager(kw):
    # fullgraph=True fails on any graph break, forward or backward (dynamo traces the Function's
    # backward when it traces the forward). backend="aot_eager": AOTAutograd traces the joint graph
    # through the fake kernels and functionalises the fused update, as inductor would see it;
    # inductor itself takes ~20 s per model on CPU.
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float32)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, model = _TinyCTR(**kw).to(dtype), _TinyCTR(**kw).to(dtype)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(3):
        if kw.get("mode") == "bag":
            inputs = random_bags([5, 7, 3], 6, seed=step)[:2]
        else:
            inputs = (random_ids([5, 7, 3], 6, seed=step),)
        if step == 2 and "lr" in kw:
            eager.emb.lr = model.emb.lr = 0.5  # a changed lr must reach the compiled fused step
        out_e, out_c = eager(*inputs), compiled(*inputs)
        assert torch.equal(out_c, out_e)
        out_e.sum().backward()
        out_c.sum().backward()
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the fused steps, Adagrad's state, the head
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


def test_backend_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(embedding_ops, "_load_kernels", lambda: None)
    emb = MultiFieldEmbedding([3], 2, backend="triton")
    with pytest.raises(RuntimeError, match="triton"):
        emb(torch.tensor([[0]]))


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastkd.kernels import embedding as E

def build(kernel, consts, ptrs, num_warps=4):
    kinds = dict(N="i32", D="i32", U="i32", stride_w="i32", lr="fp32", eps="fp32")
    sig = {n: "constexpr" if n in consts else kinds.get(n, ptrs.get(n, "*fp32"))
           for n in kernel.arg_names}
    out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                         target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=num_warps, enable_fp_fusion=False))
    assert ".local" not in out.asm["ptx"], kernel.fn.__name__ + ": register spills"

bf = "*bf16"
build(E._mfe_gather_kernel, dict(BLOCK_N=32, BLOCK_D=128), dict(out_ptr=bf, weight_ptr=bf, rows_ptr="*i64"))
build(E._mfe_bag_fwd_kernel, dict(MEAN=True, HAS_PSW=True, BLOCK_V=16, BLOCK_D=64),
      dict(out_ptr=bf, weight_ptr=bf, values_ptr="*i64", starts_ptr="*i64", psw_ptr=bf), 2)
build(E._mfe_scatter_add_kernel, dict(BLOCK_N=256, BLOCK_D=16), dict(slots_ptr="*i64"))
for mode, block_d, warps in ((E.STORE_SLOT, 16, 1), (E.ADAGRAD, 16, 1), (E.ADAGRAD, 64, 2)):
    build(E._mfe_segment_kernel, dict(MODE=mode, BLOCK_D=block_d),
          dict(sorted_ptr="*i64", perm_ptr="*i64", slot_ptr="*i64", weight_ptr=bf), warps)
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter runs the kernels as Python; the GPU compiler has its own rules (a while
    # loop inside a runtime `if` in the segment kernel, a loop with loaded bounds in the bag
    # kernel, bf16 stores). Compiling them ahead of time for Hopper with Triton's bundled ptxas
    # needs no GPU. A subprocess, since this process interprets.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # really compile, every time
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton build ships no ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ---- CUDA parity (skipped without a GPU) -------------------------------------------------------
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPE_PARAMS)
@pytest.mark.parametrize("grad", ["dense", "sparse", "sgd", "adagrad"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_matches_cpu(backend, grad, deterministic, dtype, atol, rtol):
    field_sizes, dim, batch = [1000, 3, 70_000, 17], 50, 513
    kw = {"sparse": grad == "sparse", "deterministic": deterministic}
    if grad in ("sgd", "adagrad"):
        kw.update(fused_optimizer=grad, lr=0.1)
    torch.manual_seed(0)
    cpu = MultiFieldEmbedding(field_sizes, dim, init_std=1.0, **kw).to(dtype)
    gpu = MultiFieldEmbedding(field_sizes, dim, init_std=1.0, backend=backend, **kw).to(dtype).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = random_ids(field_sizes, batch, seed=4)
    upstream = torch.randn(batch, len(field_sizes), dim).to(dtype)
    out_c, out_g = cpu(ids), gpu(ids.cuda())
    assert torch.equal(out_g.cpu(), out_c)
    out_c.backward(upstream)
    out_g.backward(upstream.cuda())
    if grad in ("sgd", "adagrad"):
        torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=atol, rtol=rtol)
        return
    g_c, g_g = cpu.weight.grad, gpu.weight.grad.cpu()
    if grad == "sparse":
        g_c, g_g = g_c.to_dense(), g_g.to_dense()
    # Duplicate rows are summed in a different order on each device (field 1 has 3 rows for 513
    # lookups), so both are held to the float64 sum within the classic bound of a sum of n terms
    # accumulated in fp32, count * eps32 * sum|terms|, plus one rounding to the table's dtype.
    rows = (ids + cpu.offsets).reshape(-1)
    terms = upstream.reshape(-1, dim).double()
    exact = torch.zeros(cpu.weight.shape, dtype=torch.float64).index_add_(0, rows, terms)
    absum = torch.zeros_like(exact).index_add_(0, rows, terms.abs())
    count = torch.bincount(rows, minlength=exact.shape[0]).unsqueeze(1).double()
    bound = count * torch.finfo(torch.float32).eps * absum + torch.finfo(dtype).eps * exact.abs()
    for name, g in (("cpu", g_c), ("cuda", g_g)):
        excess = (g.double() - exact).abs() - bound
        assert excess.max() <= 0, f"{name}: gradient off the float64 sum by more than the bound"


@pytest.mark.cuda
@requires_cuda
def test_cuda_deterministic_is_bitwise_repeatable():
    emb = MultiFieldEmbedding([50, 2], 24, fused_optimizer="adagrad", deterministic=True).cuda()
    ids = random_ids([50, 2], 4096).cuda()
    upstream = torch.randn(4096, 2, 24, device="cuda")
    results = []
    for _ in range(2):
        emb.reset_parameters()
        torch.manual_seed(0)
        emb.weight.data.normal_()
        emb(ids).backward(upstream)
        results.append(emb.weight.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.cuda
@requires_cuda
def test_cuda_bag_matches_cpu():
    field_sizes, dim = [40, 7], 33
    torch.manual_seed(0)
    cpu = MultiFieldEmbedding(field_sizes, dim, mode="bag", pooling="mean", init_std=1.0)
    gpu = MultiFieldEmbedding(field_sizes, dim, mode="bag", pooling="mean", init_std=1.0).cuda()
    gpu.load_state_dict(cpu.state_dict())
    values, offsets, _ = random_bags(field_sizes, 64, seed=3, max_len=6)
    out_c = cpu(values, offsets)
    out_g = gpu([v.cuda() for v in values], [o.cuda() for o in offsets])
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-5, atol=1e-6)


def test_repr_names_mode_and_fused_optimizer():
    r = repr(MultiFieldEmbedding([3, 4], 2, fused_optimizer="sgd", mode="bag", lr=0.5))
    assert "mode='bag'" in r and "fused_optimizer='sgd'" in r and "lr=0.5" in r
