"""CTR models: shapes, gradient flow, determinism, a tiny overfit check, registry errors."""
import doctest

import pytest
import torch
import torch.nn.functional as F

import fastkd.models as models_pkg
from fastkd.embedding import MultiFieldEmbedding
from fastkd.models import MODELS, CTRModel, FastDropout, ReLUDropout, build_model

FIELD_SIZES = [7, 13, 3, 5, 2]
NF = len(FIELD_SIZES)
ALL_NAMES = sorted(MODELS)

# Small but structurally complete configurations (every sub-network present).
SMALL = dict(embed_dim=4, hidden_units=(16, 8))
EXTRA = {
    "dcn": dict(num_cross_layers=2),
    "dcnv2": dict(num_cross_layers=2),
    "xdeepfm": dict(cin_layer_units=(6, 5)),
    "autoint": dict(attention_layers=2, num_heads=2, attention_dim=3),
}
# Extra variants that change the hidden vector or the parameter set.
VARIANTS = [(name, {}) for name in ALL_NAMES] + [
    ("dnn", dict(hidden_units=())),
    ("dcnv2", dict(structure="stacked", low_rank=3)),
    ("xdeepfm", dict(cin_activation="relu", hidden_units=())),
    ("autoint", dict(hidden_units=(), residual=False)),
    ("deepfm", dict(batch_norm=False, dropout=0.0)),
]
VARIANT_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)]


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: intra-op threading only adds synchronisation, and on a shared
    # 2-core machine every parallel region can stall on a descheduled worker.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def small_model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SMALL, **EXTRA.get(name, {}), **overrides}
    return build_model(name, FIELD_SIZES, **kwargs)


def random_ids(batch, seed=0, field_sizes=FIELD_SIZES):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch,), generator=g) for s in field_sizes], dim=1)


def expected_hidden_dim(name, kw):
    fd = NF * 4
    units = kw.get("hidden_units", SMALL["hidden_units"])
    dnn = units[-1] if units else 0
    if name in ("dnn", "widedeep", "deepfm"):
        return dnn or fd
    if name == "dcn":
        return fd + (dnn or fd)
    if name == "dcnv2":
        if kw.get("structure") == "stacked":
            return dnn or fd
        return fd + (dnn or fd)
    if name == "xdeepfm":
        return 11 + (dnn or fd)
    if name == "autoint":
        return NF * 6 + dnn
    raise AssertionError(name)


def test_registry():
    assert set(MODELS) == {"dnn", "widedeep", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint"}
    for cls in MODELS.values():
        assert issubclass(cls, CTRModel)
    assert type(build_model("DeepFM", FIELD_SIZES, **SMALL)) is MODELS["deepfm"]


def test_build_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("fm2", FIELD_SIZES)
    msg = str(info.value)
    assert "fm2" in msg
    for name in ALL_NAMES:
        assert name in msg


def test_build_model_rejects_unknown_kwarg():
    with pytest.raises(TypeError):
        build_model("dnn", FIELD_SIZES, no_such_option=1)


@pytest.mark.parametrize(
    "name, kwargs, exc, match",
    [
        ("dnn", dict(dropout=1.0), ValueError, "dropout"),
        ("dnn", dict(hidden_units=400), TypeError, "hidden_units"),
        ("dnn", dict(hidden_units=(8, 0)), ValueError, r"hidden_units\[1\]"),
        ("dnn", dict(embed_reg=-1.0), ValueError, "embed_reg"),
        ("dnn", dict(embed_dim=0), ValueError, "dim"),
        ("dcn", dict(num_cross_layers=0), ValueError, "num_cross_layers"),
        ("dcnv2", dict(structure="serial"), ValueError, "structure"),
        ("dcnv2", dict(low_rank=0), ValueError, "low_rank"),
        ("xdeepfm", dict(cin_layer_units=()), ValueError, "cin_layer_units"),
        ("xdeepfm", dict(cin_activation="tanh"), ValueError, "cin_activation"),
        ("autoint", dict(attention_layers=0), ValueError, "attention_layers"),
        ("autoint", dict(num_heads=0), ValueError, "num_heads"),
    ],
)
def test_constructor_errors(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_model(name, FIELD_SIZES, **kwargs)


def test_common_attributes_and_defaults():
    model = build_model("dnn", FIELD_SIZES)
    assert isinstance(model.embedding, MultiFieldEmbedding)
    assert model.embed_dim == 16 and model.hidden_units == (400, 400, 400)
    assert model.hidden_dim == 400
    # the MLP block is Linear -> BatchNorm1d -> ReLU -> Dropout, without a dead pre-BN bias
    # (ReLU and Dropout fused into one module)
    kinds = [type(m).__name__ for m in model.mlp[:3]]
    assert kinds == ["Linear", "BatchNorm1d", "ReLUDropout"]
    assert model.mlp[0].bias is None
    assert model.regularization_loss().item() == 0.0


@pytest.mark.parametrize("name, kw", VARIANTS, ids=VARIANT_IDS)
def test_output_shapes(name, kw):
    model = small_model(name, **kw)
    assert model.hidden_dim == expected_hidden_dim(name, kw)
    for batch, train in [(1, False), (7, True), (7, False)]:
        model.train(train)
        ids = random_ids(batch, seed=batch)
        logits = model(ids)
        assert logits.shape == (batch,) and logits.dtype == torch.float32
        logits2, hidden = model(ids, return_hidden=True)
        assert logits2.shape == (batch,)
        assert hidden.shape == (batch, model.hidden_dim) and hidden.dtype == torch.float32
        assert torch.isfinite(logits2).all() and torch.isfinite(hidden).all()


@pytest.mark.parametrize("name, kw", VARIANTS, ids=VARIANT_IDS)
def test_every_parameter_gets_a_gradient(name, kw):
    model = small_model(name, **kw).train()
    logits, hidden = model(random_ids(32, seed=1), return_hidden=True)
    # the logit alone must reach every parameter (hidden is returned but not used here)
    F.binary_cross_entropy_with_logits(logits, torch.rand(32)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sparse_embedding_gradient(name):
    model = small_model(name, sparse=True)
    model(random_ids(16)).sum().backward()
    sparse = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse}
    linear_terms = {"first_order.weight", "wide.weight"}
    expected = {"embedding.weight"} | {n for n, _ in model.named_parameters() if n in linear_terms}
    assert sparse == expected
    # the documented optimiser split trains it
    opt_sparse = torch.optim.SparseAdam([p for n, p in model.named_parameters() if n in sparse])
    opt_dense = torch.optim.Adam([p for n, p in model.named_parameters() if n not in sparse])
    opt_sparse.step()
    opt_dense.step()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_eval_is_deterministic_and_seeded(name):
    model = small_model(name, seed=3)
    ids = random_ids(9, seed=2)
    model.train()
    model(ids)  # move BN running stats away from their init
    model.eval()
    with torch.no_grad():
        a = model(ids)
        b = model(ids)
        # per-sample: the batch must not influence a sample's output in eval mode
        c = torch.cat([model(ids[i : i + 1]) for i in range(9)])
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)

    # same seed -> same parameters and same training-mode (dropout) outputs
    m1, m2 = small_model(name, seed=11), small_model(name, seed=11)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    torch.manual_seed(5)
    o1 = m1.train()(ids)
    torch.manual_seed(5)
    o2 = m2.train()(ids)
    assert torch.equal(o1, o2)


def test_out_of_range_ids_are_reported():
    model = small_model("deepfm")
    ids = random_ids(4)
    ids[1, 3] = 5
    with pytest.raises(ValueError, match="field 3"):
        model(ids)


def test_regularization_loss():
    model = small_model("dnn", embed_reg=0.5)
    assert model.regularization_loss().item() == 0.0  # before any forward
    ids = random_ids(6)
    model(ids)
    reg = model.regularization_loss()
    expected = 0.5 * model.embedding(ids).pow(2).sum() / 6
    torch.testing.assert_close(reg, expected)
    reg.backward()
    rows = (ids + model.embedding.offsets).unique()
    grad = model.embedding.weight.grad
    assert grad[rows].abs().sum() > 0
    unused = torch.ones(grad.shape[0], dtype=torch.bool)
    unused[rows] = False
    assert grad[unused].abs().sum() == 0


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_cin_matches_naive_formula(activation):
    from fastkd.models import CIN

    torch.manual_seed(0)
    cin = CIN(5, (4, 3), activation).double()
    emb = torch.randn(7, 5, 6, dtype=torch.float64)
    xk, pooled = emb, []
    for weight, bias in zip(cin.weights, cin.biases):
        w = weight.view(weight.shape[0], 5, -1)  # [H_k, F, H_{k+1}]
        # X^{k+1}[b, h, d] = sum_{i,j} W[h, i, j] X^k[b, i, d] X^0[b, j, d] + bias[h]
        xk = torch.einsum("bid,bjd,ijh->bhd", xk, emb, w) + bias.view(1, -1, 1)
        if activation == "relu":
            xk = torch.relu(xk)
        pooled.append(xk.sum(dim=2))
    torch.testing.assert_close(cin(emb), torch.cat(pooled, dim=1))


def test_cin_gradcheck():
    # CIN's field contraction has a hand-written backward
    from fastkd.models import CIN

    torch.manual_seed(0)
    cin = CIN(4, (3, 2)).double()
    emb = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: cin(e), (emb,))
    params = tuple(cin.parameters())
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(
        cin, dict(zip([n for n, _ in cin.named_parameters()], ps)), (emb.detach(),)), params)


def test_fm_interaction_matches_pairwise_sum():
    from fastkd.models import fm_interaction

    emb = torch.randn(4, 6, 3, dtype=torch.float64)
    pairs = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(6) for j in range(i + 1, 6))
    torch.testing.assert_close(fm_interaction(emb), pairs)


def test_cross_layers_match_formulas():
    from fastkd.models import CrossNet, CrossNetV2

    torch.manual_seed(0)
    x0 = torch.randn(5, 8, dtype=torch.float64)
    v1 = CrossNet(8, 2).double()
    with torch.no_grad():
        v1.bias.normal_()
    x = x0
    for layer in range(2):
        x = x0 * (x @ v1.weight[layer]).unsqueeze(1) + v1.bias[layer] + x
    torch.testing.assert_close(v1(x0), x)
    v2 = CrossNetV2(8, 2).double()
    x = x0
    for lin in v2.layers:
        x = x0 * (x @ lin.weight.T + lin.bias) + x
    torch.testing.assert_close(v2(x0), x)


def test_deepcopy_and_pickle_after_forward():
    import copy
    import io

    model = small_model("deepfm", embed_reg=0.1)
    ids = random_ids(4)
    model(ids)  # caches the batch embeddings for regularization_loss
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model.eval(), clone.eval(), loaded.eval()
    assert torch.equal(model(ids), clone(ids)) and torch.equal(model(ids), loaded(ids))
    assert model._last_emb is not None  # the original keeps its cache


def test_fast_dropout():
    drop = FastDropout(0.1)
    assert abs(drop.effective_p - 0.1) < 1e-5
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1.0 / (1.0 - drop.effective_p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(200_000)), y.detach())
    odd = torch.randn(3, 5, 7)  # odd element count
    assert drop(odd).shape == odd.shape
    assert torch.equal(drop.eval()(odd), odd)
    assert torch.equal(FastDropout(0.0).train()(odd), odd)


def test_relu_dropout_matches_relu_then_dropout():
    x1 = torch.randn(33, 17, requires_grad=True)  # odd sizes: mask words are cut to length
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(33, 17)
    fused, drop = ReLUDropout(0.3), FastDropout(0.3)
    torch.manual_seed(1)
    y1 = fused(x1)
    torch.manual_seed(1)
    y2 = drop(torch.relu(x2))
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(fused.eval()(x1), torch.relu(x1))
    assert torch.equal(ReLUDropout(0.0)(x1), torch.relu(x1))


def auc(scores, labels):
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    pos = labels.bool()
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_tiny_overfit(name):
    # label = sign of a random additive score plus one pairwise interaction term
    sizes = [8, 6, 5, 4]
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, s, (256,), generator=g) for s in sizes], dim=1)
    score = sum(torch.randn(s, generator=g)[ids[:, f]] for f, s in enumerate(sizes))
    score = score + torch.randn(8, 6, generator=g)[ids[:, 0], ids[:, 1]]
    labels = (score > score.median()).float()

    torch.manual_seed(0)
    kwargs = {**SMALL, **EXTRA.get(name, {}), "hidden_units": (32, 16), "embed_dim": 8}
    model = build_model(name, sizes, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(ids), labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert auc(model(ids), labels) > 0.9


def test_docstring_examples():
    import fastkd.models.autoint
    import fastkd.models.base
    import fastkd.models.dcn
    import fastkd.models.dnn
    import fastkd.models.layers
    import fastkd.allocator
    import fastkd.models.xdeepfm

    mods = [models_pkg, fastkd.models.base, fastkd.models.dnn, fastkd.models.dcn,
            fastkd.models.xdeepfm, fastkd.models.autoint, fastkd.models.layers,
            fastkd.allocator]
    attempted = 0
    for mod in mods:
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, mod.__name__
        attempted += result.attempted
    assert attempted > 0


def test_embedding_options_reach_the_table_and_fused_update_trains_it():
    torch.manual_seed(0)
    model = build_model("dnn", [5, 7], embed_dim=4, hidden_units=(8,),
                        embedding_options={"fused_optimizer": "sgd", "lr": 0.5})
    assert model.embedding.fused_optimizer == "sgd"
    before = model.embedding.weight.detach().clone()
    ids = torch.tensor([[0, 1], [4, 6], [0, 3]])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert model.embedding.weight.grad is None  # updated in backward, Adam would skip it
    changed = (model.embedding.weight.detach() != before).any(dim=1)
    touched = torch.zeros_like(changed)
    touched[model.embedding.flat_ids(ids).reshape(-1)] = True
    assert changed.any() and not (changed & ~touched).any()


def test_sparse_and_init_std_may_come_through_embedding_options():
    model = build_model("dnn", [5, 7], embed_dim=4, hidden_units=(8,),
                        embedding_options={"sparse": True, "init_std": 0.5})
    assert model.embedding.sparse and model.embedding.weight.std() > 0.1
    same = build_model("dnn", [5, 7], embed_dim=4, hidden_units=(8,), sparse=True,
                       embedding_options={"sparse": True})
    assert same.embedding.sparse
    with pytest.raises(ValueError, match="sparse=True contradicts embedding_options"):
        build_model("dnn", [5, 7], embed_dim=4, hidden_units=(8,), sparse=True,
                    embedding_options={"sparse": False})
