"""MultiFieldEmbedding against the per-field reference (MultiFieldEmbeddingRef)."""
import doctest

import pytest
import torch

import fastkd.embedding as embedding_module
from fastkd.embedding import MultiFieldEmbedding, MultiFieldEmbeddingRef

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


def test_docstring_examples():
    result = doctest.testmod(embedding_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
