"""The shared-memory (robez, lma) and compositional (qr) embedding kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lma import hashspec as hs
from lma.embeddings import EMBEDDINGS, EmbeddingSpec, build_embedding
from lma.embeddings.lma import LMAEmbedding
from lma.embeddings.qr import _candidates, choose_radices
from lma.features import FeatureMap
from lma.schema import CategoricalField, Schema, criteo_schema
from lma.signatures import SignatureTable

DIM = 8


def _fmap(sizes: tuple[int, ...] = (40, 300, 7), seed: int = 0) -> FeatureMap:
    """A feature map with fields of the given vocabulary sizes; the last field is a 2-slot bag."""
    rng = np.random.default_rng(seed)
    cats = [CategoricalField(f"f{i}") for i in range(len(sizes) - 1)]
    cats.append(CategoricalField("tags", separator="|", max_values=2))
    schema = Schema(name="t", label="y", dense=(), categorical=tuple(cats))
    toks = [np.sort(rng.choice(2**62, n, replace=False)).astype(np.int64) + i for i, n in enumerate(sizes)]
    counts = [rng.integers(1, 10, n) for n in sizes]
    return FeatureMap(schema, toks, counts, n_rows=1000)


def _batch(fmap: FeatureMap, b: int = 64, seed: int = 1, oov: float = 0.1) -> torch.Tensor:
    """(b, S) tokens drawn from each slot's field vocabulary, a share replaced by unseen ones."""
    rng = np.random.default_rng(seed)
    sf = fmap.schema.slot_fields()
    out = np.stack([rng.choice(fmap.tokens[f], b) for f in sf], axis=1)
    unseen = rng.random(out.shape) < oov
    out[unseen] = rng.integers(-(2**63), 2**63 - 1, int(unseen.sum()), dtype=np.int64)
    return torch.from_numpy(out)


def _spec(kind: str, fmap: FeatureMap, compression: float, **options) -> EmbeddingSpec:
    full = fmap.full_table_rows(1) * DIM
    return EmbeddingSpec(kind=kind, dim=DIM, n_params=int(full / compression), seed=3, options=options)


def _build(kind: str, fmap: FeatureMap, compression: float = 4, train: np.ndarray | None = None, **opts):
    spec = _spec(kind, fmap, compression, **opts)
    state = {}
    if kind == "lma":
        train = train if train is not None else _batch(fmap, 500, seed=9, oov=0).numpy()
        state = EMBEDDINGS["lma"].prepare(spec, fmap, train)
    return build_embedding(spec, fmap, **state)


KINDS = ["robez", "lma", "qr"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compression", [1, 4, 16, 64])
def test_shapes_and_budget(kind: str, compression: float) -> None:
    fmap = _fmap((400, 3000, 70))
    emb = _build(kind, fmap, compression)
    assert emb.kind == kind
    x = _batch(fmap)
    out = emb(x)
    assert out.shape == (*x.shape, DIM) and out.dtype == torch.float32
    budget = emb.spec.n_params
    assert emb.parameter_count() == sum(p.numel() for p in emb.parameters()) <= budget
    if kind in ("robez", "lma"):
        assert emb.parameter_count() == budget
    elif compression == 1:
        assert emb.parameter_count() == budget  # qr at 1x is exactly the full tables
    else:
        assert emb.parameter_count() >= 0.5 * budget
    assert emb.serving_bytes() == 4 * emb.parameter_count() + emb.state_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_init_matches_full_table_variance(kind: str) -> None:
    """At init an output element has variance 1 / (3 d), as under the full tables' U(+-1/sqrt(d))."""
    fmap = _fmap((3000, 3000, 50))
    emb = _build(kind, fmap, 8)
    out = emb(_batch(fmap, 2000, oov=0)).detach()
    # qr: a product of few shared component rows has a noisier realised variance; a wrong scale
    # (the same U(+-1/sqrt(d)) for each component) would be off by a factor 3 d = 24.
    tol = 0.35 if kind == "qr" else 0.15
    assert abs(out.var().item() * 3 * DIM - 1) < tol
    assert abs(out.mean().item()) < 0.02


@pytest.mark.parametrize("mode", ["robez", "lma"])
@pytest.mark.parametrize("z,aligned", [(1, False), (2, False), (4, True)])
def test_forward_and_gradient_match_manual(mode: str, z: int, aligned: bool) -> None:
    fmap = _fmap((5, 5, 5))
    spec = EmbeddingSpec(kind=mode, dim=4, n_params=37, seed=1, options={"z": z, "aligned": aligned, "t": 3})
    sig = SignatureTable(np.sort(fmap.tokens[0]), np.arange(5, dtype=np.int64) * 1234567 - 99)
    emb = build_embedding(spec, fmap, signatures=sig) if mode == "lma" else build_embedding(spec, fmap)
    tokens = _batch(fmap, 6, oov=0.3)  # (6, 4), with repeated tokens and fallbacks
    keys = sig.lookup(tokens.numpy()) if mode == "lma" else tokens.numpy()
    params = hs.make_params(spec.seed, 4 // z, 3)  # the hash seed defaults to spec.seed
    idx = hs.slot_indices(keys.reshape(-1), params, 37, z, mode, aligned)  # (24, 4)
    mem = emb.memory.detach().numpy()
    out = emb(tokens)
    np.testing.assert_array_equal(out.detach().numpy().reshape(-1, 4), mem[idx])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * g).sum().backward()
    want = np.zeros(37, np.float64)
    np.add.at(want, idx.ravel(), g.numpy().reshape(-1).astype(np.float64))  # scatter-add
    np.testing.assert_allclose(emb.memory.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (emb.memory.grad != 0).sum() <= idx.size


def test_lma_equal_signatures_share_fallback_random() -> None:
    fmap = _fmap((4, 4, 4))
    t = np.sort(fmap.tokens[0])
    sig = SignatureTable(t, np.array([77, 77, 5, 2**40], dtype=np.int64))
    spec = EmbeddingSpec(kind="lma", dim=DIM, n_params=100_000, seed=0, options={"z": 2})
    emb = build_embedding(spec, fmap, signatures=sig)
    unseen = np.int64(123456789)
    x = torch.tensor([[t[0], t[1], t[2], unseen]])
    out = emb(x)[0]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)  # equal signatures
    assert (out[0] != out[2]).any()
    # Fallback: an unsigned token is hashed by its own value, like a signature equal to it.
    np.testing.assert_array_equal(emb.resolve_keys(x).numpy(), [[77, 77, 5, unseen]])
    direct = emb.gather(torch.tensor([[unseen]]))[0, 0]
    torch.testing.assert_close(out[3], direct, rtol=0, atol=0)
    keys = _batch(fmap, 50, oov=0.5)
    np.testing.assert_array_equal(emb.resolve_keys(keys).numpy(), sig.lookup(keys.numpy()))
    assert emb.state_bytes() == emb.key_table.nbytes() >= 4 * 16  # the key table serving holds


def test_lma_similar_tokens_share_more_memory() -> None:
    """Tokens that always co-occur (Jaccard 1) share all blocks; independent ones almost none."""
    rng = np.random.default_rng(0)
    n = 4000
    tok = np.zeros((n, 3), np.int64)
    a = rng.integers(0, 50, n)
    tok[:, 0] = 1000 + a  # field 0
    tok[:, 1] = 2000 + a  # field 1: a copy of field 0 (same row sets)
    tok[:, 2] = 3000 + rng.integers(0, 50, n)  # independent field
    schema = Schema(name="t", label=None, dense=(), categorical=tuple(CategoricalField(f"f{i}") for i in range(3)))
    u = [np.unique(tok[:, i]) for i in range(3)]
    fmap = FeatureMap(schema, u, [np.ones(len(x), np.int64) for x in u], n_rows=n)
    spec = EmbeddingSpec(kind="lma", dim=DIM, n_params=10_000, seed=0, options={"z": 1, "t": 4})
    emb = build_embedding(spec, fmap, **LMAEmbedding.prepare(spec, fmap, tok))
    x = torch.from_numpy(np.stack([1000 + np.arange(50), 2000 + np.arange(50), 3000 + np.arange(50)], 1))
    out = emb(x).detach()  # (50, 3, d)
    assert (out[:, 0] == out[:, 1]).all()
    assert (out[:, 0] == out[:, 2]).float().mean() < 0.05


def test_qr_unique_embeddings_and_oov() -> None:
    fmap = _fmap((500, 2000, 30))
    emb = _build("qr", fmap, 32)
    assert any(len(r) >= 2 for r in emb.radices)
    for f in range(2):
        toks = torch.from_numpy(fmap.tokens[f])
        x = torch.full((len(toks), 4), int(fmap.tokens[2][0]))
        x[:, f] = toks
        out = emb(x)[:, f].detach()  # (V_f, d)
        assert len(torch.unique(out, dim=0)) == len(toks)  # every vocabulary token its own row
        oov = torch.full((3, 4), int(fmap.tokens[2][0]))
        oov[:, f] = torch.tensor([1, 2, 3])
        o = emb(oov)[:, f]
        torch.testing.assert_close(o[0], o[1], rtol=0, atol=0)  # unseen tokens share the OOV row
        assert not any(torch.equal(o[0], r) for r in out)


def test_qr_radices() -> None:
    for n in (1, 2, 3, 10, 97, 1000, 12345):
        for c in _candidates(n):
            assert int(np.prod(c)) >= n
    sizes = [1000, 50, 20000, 3]
    for budget in (sum(sizes) * 4, 20000, 5000, 1200):
        r = choose_radices(sizes, 4, budget)
        assert 4 * sum(sum(x) for x in r) <= budget
    with pytest.raises(ValueError, match="lower the compression"):
        choose_radices(sizes, 4, 40)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip(kind: str, tmp_path) -> None:
    fmap = _fmap()
    emb = _build(kind, fmap, 16, z=2, aligned=True) if kind != "qr" else _build(kind, fmap, 4)
    with torch.no_grad():
        for p in emb.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained" weights
    cfg = emb.config()
    np.savez(tmp_path / "state.npz", **emb.extra_state_arrays())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    spec = EmbeddingSpec(kind=cfg["kind"], dim=cfg["dim"], n_params=cfg["n_params"], seed=cfg["seed"],
                         min_count=cfg["min_count"], options=cfg["options"])
    back = build_embedding(spec, fmap, **arrays)
    back.load_state_dict(emb.state_dict())
    x = _batch(fmap, 100, oov=0.2)
    torch.testing.assert_close(back(x), emb(x), rtol=0, atol=0)
    assert back.state_bytes() == emb.state_bytes()
    if kind == "lma":
        assert len(arrays["sig_tokens"]) > 0 and back.set_kind == "rows"


def test_option_errors() -> None:
    fmap = _fmap()
    with pytest.raises(ValueError, match="divide"):
        _build("robez", fmap, 4, z=3)
    spec = EmbeddingSpec(kind="lma", dim=DIM, n_params=4, seed=0, options={"z": 8})
    with pytest.raises(ValueError, match="budget"):
        build_embedding(spec, fmap)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_export(kind: str) -> None:
    """Every kind (LMA's searchsorted key lookup included) exports with torch.export."""
    fmap = _fmap()
    emb = _build(kind, fmap, 4).eval()
    x = _batch(fmap, 16, oov=0.3)
    ep = torch.export.export(emb, (x,))
    torch.testing.assert_close(ep.module()(x), emb(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["robez", "lma"])
def test_sparse_gradient_path_matches_dense(kind):
    """Large memories train with sparse gradients; they must equal the dense scatter-add."""

    empty = [np.zeros(0, np.int64)] * 26
    fm = FeatureMap(criteo_schema(), empty, empty, 0)
    torch.manual_seed(0)
    toks = torch.randint(-(2**62), 2**62, (64, 26))
    toks[:, 1] = toks[:, 0]  # repeated keys: the sparse gradient must add their contributions
    opts = {"z": 4}
    dense = build_embedding(EmbeddingSpec(kind=kind, dim=16, n_params=5000,
                                          options={**opts, "sparse": False}), fm)
    sparse = build_embedding(EmbeddingSpec(kind=kind, dim=16, n_params=5000,
                                           options={**opts, "sparse": True}), fm)
    sparse.load_state_dict(dense.state_dict())
    assert sparse.sparse_parameters() == [sparse.memory] and dense.sparse_parameters() == []
    w = torch.randn(64, 26, 16)
    (dense(toks) * w).sum().backward()
    (sparse(toks) * w).sum().backward()
    assert sparse.memory.grad.is_sparse
    torch.testing.assert_close(sparse.memory.grad.to_dense(), dense.memory.grad, atol=1e-5, rtol=1e-5)
    sparse.eval()
    assert torch.equal(sparse(toks), dense(toks))


@pytest.mark.parametrize("kind", ["full", "lma", "qr"])
def test_key_table_lookup_equals_binary_search(kind: str) -> None:
    """lookup="table" (default) and lookup="search" (the old binary search) give the same rows /
    signatures, extreme and unseen tokens included, and the same embeddings."""
    fmap = _fmap()
    tokens = _batch(fmap, 200, seed=4, oov=0.2)
    extreme = torch.tensor([-(2**63), 2**63 - 1, 0, 1, -1], dtype=torch.int64)
    tokens[: len(extreme), 0] = extreme
    train = _batch(fmap, 500, seed=9, oov=0).numpy()
    embs = [_build(kind, fmap, 1 if kind == "full" else 4, train=train, lookup=mode)
            for mode in ("table", "search")]
    if kind == "lma":
        a, b = (e.resolve_keys(tokens) for e in embs)
    else:
        a, b = (e.rows(tokens) for e in embs)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(embs[0](tokens), embs[1](tokens))
    assert embs[0].key_table is not None and embs[1].key_table is None
    # Full tables and LMA store the built table (and full tables no other form of the
    # vocabulary); QR rebuilds its table and stores what it stored before.
    table_keys, search_keys = (set(e.state_dict()) for e in embs)
    stored = {f"key_table.{n}" for n in ("table", "header")}
    if kind == "qr":
        assert table_keys == search_keys
    else:
        assert table_keys == (search_keys - {"vocab"}) | stored
        assert ("vocab" in search_keys) == (kind == "full")
    with pytest.raises(ValueError, match="lookup"):
        _build(kind, fmap, 4, train=train, lookup="bogus")
