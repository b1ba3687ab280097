import numpy as np
import pytest
import torch

from lma.embeddings import EmbeddingSpec, build_embedding
from lma.features import Encoded, FeatureMap
from lma.model import DLRM, DLRMConfig
from lma.schema import CategoricalField, DenseField, Schema


def _schema(multi: bool = False) -> Schema:
    cats = [CategoricalField("a"), CategoricalField("b")]
    if multi:
        cats.append(CategoricalField("tags", separator="|", max_values=3))
    return Schema(name="t", label="y", dense=(DenseField("x"),), categorical=tuple(cats))


def _fmap(schema: Schema, n: int = 200) -> tuple[FeatureMap, Encoded]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(n, schema.n_token_slots)).astype(np.int64)
    enc = Encoded(dense=rng.normal(size=(n, 1)).astype(np.float32), tokens=tokens,
                  labels=rng.integers(0, 2, n).astype(np.float32))
    return FeatureMap.build(schema, [enc]), enc


@pytest.mark.parametrize("kind", ["full", "hash"])
@pytest.mark.parametrize("interaction", ["dot", "dot-cat"])
def test_forward_backward_shapes(kind, interaction):
    schema = _schema()
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind=kind, dim=8, n_params=400), fmap)
    cfg = DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=8, interaction=interaction)
    model = DLRM(cfg, emb)
    dense = torch.from_numpy(enc.dense[:32])
    tokens = torch.from_numpy(enc.tokens[:32])
    logits = model(dense, tokens)
    assert logits.shape == (32,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(32))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert emb.table.weight.grad.abs().sum() > 0


def test_full_table_vocab_and_oov():
    schema = _schema()
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="full", dim=4, n_params=0, min_count=1), fmap)
    n_vocab = sum(fmap.vocab_sizes(1))
    assert emb.parameter_count() == (n_vocab + 2) * 4
    rows = emb.rows(torch.from_numpy(enc.tokens[:5]))
    assert (rows < n_vocab).all()
    unseen = torch.tensor([[10**12, 10**12 + 1]])
    assert emb.rows(unseen).tolist() == [[n_vocab, n_vocab + 1]]  # each field's OOV row


def test_hash_rows_budget():
    schema = _schema()
    fmap, _ = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="hash", dim=8, n_params=800), fmap)
    assert emb.parameter_count() == 800
    out = emb(torch.tensor([[-5, 7]]))
    assert out.shape == (1, 2, 8)


def test_multivalued_field_mean_pools_and_ignores_padding():
    schema = _schema(multi=True)
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="hash", dim=4, n_params=4000), fmap)
    model = DLRM(DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=4), emb)
    toks = torch.tensor([[3, 4, 11, 12, 0]])  # tags = {11, 12}, third slot padded
    vec = model.field_vectors(toks)
    assert vec.shape == (1, 3, 4)
    expected = (emb(torch.tensor([[11]])) + emb(torch.tensor([[12]]))) / 2
    assert torch.allclose(vec[0, 2], expected[0, 0], atol=1e-6)


def test_no_dense_features():
    schema = Schema(name="t", label="y", dense=(), categorical=(CategoricalField("a"), CategoricalField("b")))
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="hash", dim=4, n_params=400), fmap)
    model = DLRM(DLRMConfig(n_dense=0, slot_fields=schema.slot_fields(), dim=4), emb)
    out = model(torch.zeros(3, 0), torch.from_numpy(enc.tokens[:3]))
    assert out.shape == (3,)


def test_dense_standardisation_buffers():
    schema = _schema()
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="hash", dim=4, n_params=400), fmap)
    model = DLRM(DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=4), emb).eval()
    dense = torch.from_numpy(enc.dense[:8])
    tokens = torch.from_numpy(enc.tokens[:8])
    plain = model((dense - 2.0) / 3.0, tokens)
    model.dense_mean.fill_(2.0)
    model.dense_std.fill_(3.0)
    assert torch.allclose(model(dense, tokens), plain)
    assert "dense_mean" in model.state_dict()  # saved with the weights, so serving applies it


def _fo_model(kind: str = "full", multi: bool = False, dim: int = 8) -> tuple[DLRM, Encoded]:
    from lma.model import build_dlrm, first_order_spec

    schema = _schema(multi)
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind=kind, dim=dim, n_params=400), fmap)
    spec = first_order_spec(kind, fmap.full_table_rows(1) if kind == "full" else 50, 1, 0)
    cfg = DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=dim, first_order=spec)
    return build_dlrm(cfg, emb, fmap), enc


@pytest.mark.parametrize("kind", ["full", "hash"])
def test_first_order_term_starts_at_zero_and_learns(kind):
    model, enc = _fo_model(kind)
    dense, tokens = torch.from_numpy(enc.dense[:32]), torch.from_numpy(enc.tokens[:32])
    # Every first-order weight and the deep part's last layer start at 0: logits are exactly 0.
    assert torch.equal(model(dense, tokens), torch.zeros(32))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, tokens), torch.ones(32))
    loss.backward()
    assert model.first_order.table.weight.grad.abs().sum() > 0
    assert model.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.first_order.table.weight.normal_()
        model.linear.weight.fill_(0.5)
    # wide_only: the logit is the first-order term alone, i.e. the sum of the tokens' scalars
    # plus the dense linear term.
    model.wide_only = True
    w = model.first_order(tokens).squeeze(-1).sum(1) + 0.5 * dense[:, 0] + model.linear.bias
    assert torch.allclose(model(dense, tokens), w, atol=1e-6)


def test_first_order_pools_multivalued_fields_without_padding():
    model, enc = _fo_model("full", multi=True)
    with torch.no_grad():
        model.first_order.table.weight.normal_()
    model.wide_only = True
    tokens = torch.from_numpy(enc.tokens[:4].copy())
    dense = torch.zeros(4, 1)
    # Slots 2..4 are the multi-valued field; a padded slot must not count.
    t1 = tokens.clone()
    t1[:, 3:] = 0  # one value left
    t2 = t1.clone()
    t2[:, 3] = t1[:, 2]  # the same value twice: its mean is unchanged
    assert torch.allclose(model(dense, t1), model(dense, t2), atol=1e-6)


def test_first_order_config_and_table_must_match():
    schema = _schema()
    fmap, _ = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="full", dim=4, n_params=0), fmap)
    cfg = DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=4,
                     first_order={"kind": "full", "n_params": 10, "min_count": 1, "seed": 0})
    with pytest.raises(ValueError, match="first_order"):
        DLRM(cfg, emb)
    from lma.model import first_order_spec

    with pytest.raises(ValueError, match="'full' or 'hash'"):
        first_order_spec("lma", 10, 1, 0)


@pytest.mark.parametrize("n_dense", [0, 1])
def test_interaction_pairs_are_the_upper_triangle_in_order(n_dense):
    # The pairs come from one index_select over the flattened (n, n) dot products; they must be
    # the strict upper triangle in row-major order, bit for bit, as (i, j) indexing gives.
    schema = _schema(multi=False)
    if n_dense == 0:
        schema = Schema(name="t", label="y", dense=(), categorical=schema.categorical)
    fmap, enc = _fmap(schema)
    emb = build_embedding(EmbeddingSpec(kind="hash", dim=4, n_params=400), fmap)
    model = DLRM(DLRMConfig(n_dense=n_dense, slot_fields=schema.slot_fields(), dim=4), emb).eval()
    captured = {}
    model.top.register_forward_pre_hook(lambda m, a: captured.setdefault("top_in", a[0]))
    dense = torch.from_numpy(enc.dense[:16, :n_dense])
    tokens = torch.from_numpy(enc.tokens[:16])
    with torch.no_grad():
        model(dense, tokens)
        vecs = model.field_vectors(tokens)
        if n_dense:
            x = model.bottom((dense - model.dense_mean) / model.dense_std)
            vecs = torch.cat([x[:, None, :], vecs], dim=1)
        n = vecs.shape[1]
        inter = torch.bmm(vecs, vecs.transpose(1, 2))
        i, j = torch.triu_indices(n, n, offset=1)
        want = inter[:, i, j]
    got = captured["top_in"][:, 4 * n_dense:]
    assert got.shape == (16, n * (n - 1) // 2)
    assert torch.equal(got, want)


def test_interaction_index_is_computed_on_a_meta_built_model():
    schema = _schema()
    fmap, _ = _fmap(schema)
    with torch.device("meta"):
        emb = build_embedding(EmbeddingSpec(kind="hash", dim=4, n_params=400), fmap)
        model = DLRM(DLRMConfig(n_dense=1, slot_fields=schema.slot_fields(), dim=4), emb)
    assert model.pair_index.device.type == "cpu"
    assert model.pair_index.tolist() == [1, 2, 5]  # n = 3: (0, 1), (0, 2), (1, 2)
    assert "pair_index" not in model.state_dict()
