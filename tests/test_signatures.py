"""Minhash signatures: collision rates match Jaccard, the vectorised pass matches a naive one,
sampling / frequency floor / fallback lookup, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lma import hashspec as hs
from lma.signatures import (
    NIBBLES,
    SignatureTable,
    _mix64,
    _salts,
    compute_signatures,
)


def _nibbles(sig: np.ndarray) -> np.ndarray:
    """(N,) int64 -> (N, 16) nibbles, nibble p at bits 4p..4p+3."""
    return (sig[:, None] >> (np.arange(16, dtype=np.int64) * 4)) & 0xF


def _row_set_pairs(n_pairs: int, jaccard: float, u: int, seed: int) -> np.ndarray:
    """Token matrix (n_pairs * u, 2) where the row sets of tokens A_k (column 0) and B_k
    (column 1) have Jaccard exactly round(J * u) / u. Pair k owns rows [k u, (k + 1) u)."""
    rng = np.random.default_rng(seed)
    inter = round(jaccard * u)
    rest = u - inter
    tok = np.zeros((n_pairs * u, 2), dtype=np.int64)
    for k in range(n_pairs):
        rows = k * u + rng.permutation(u)
        a_rows = np.r_[rows[:inter], rows[inter : inter + rest // 2]]
        b_rows = np.r_[rows[:inter], rows[inter + rest // 2 :]]
        tok[a_rows, 0] = 10 * k + 1
        tok[b_rows, 1] = 10 * k + 2
    return tok


def _pair_signatures(table: SignatureTable, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    a = 10 * np.arange(n_pairs, dtype=np.int64) + 1
    assert table.contains(a).all() and table.contains(a + 1).all()
    return table.lookup(a), table.lookup(a + 1)


@pytest.mark.parametrize("jaccard", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_nibble_collision_rate_matches_jaccard(jaccard: float) -> None:
    n_pairs, u = 400, 32
    tok = _row_set_pairs(n_pairs, jaccard, u, seed=1)
    table = compute_signatures(tok, n_sample_rows=None, min_count=1, seed=3)
    sa, sb = _pair_signatures(table, n_pairs)
    rate = (_nibbles(sa) == _nibbles(sb)).mean()
    j = round(jaccard * u) / u
    p = j + (1 - j) / 16
    sd = math.sqrt(p * (1 - p) / (n_pairs * NIBBLES))
    if j == 1.0:
        assert rate == 1.0
    else:
        assert abs(rate - p) < 4.5 * sd, (rate, p, sd)


@pytest.mark.parametrize("t", [1, 4, 8])
@pytest.mark.parametrize("jaccard", [0.0, 0.5, 0.875])
def test_block_collision_rate(t: int, jaccard: float) -> None:
    """Block keys of T sub-keys collide with probability (J + (1 - J) / 16)^T."""
    n_pairs, u = 1500, 16
    tok = _row_set_pairs(n_pairs, jaccard, u, seed=2)
    table = compute_signatures(tok, n_sample_rows=None, min_count=1, seed=5)
    sa, sb = _pair_signatures(table, n_pairs)
    params = hs.make_params(9, 16, t)
    ka, kb = hs.lma_block_keys(sa, params), hs.lma_block_keys(sb, params)
    # One block per pair, so that the trials are independent.
    c = np.arange(n_pairs) % 16
    hit = ka[np.arange(n_pairs), c] == kb[np.arange(n_pairs), c]
    j = round(jaccard * u) / u
    p = (j + (1 - j) / 16) ** t
    sd = math.sqrt(p * (1 - p) / n_pairs)
    assert abs(hit.mean() - p) < 4.5 * sd + 1.5 / n_pairs, (hit.mean(), p)


@pytest.mark.parametrize("jaccard", [0.0, 0.5, 0.8])
def test_cooccur_sets_share_within_a_field(jaccard: float) -> None:
    """Tokens of one field with contexts of Jaccard J agree on nibbles at J + (1 - J) / 16."""
    n_pairs, u = 300, 20
    rng = np.random.default_rng(4)
    inter = round(jaccard * u)
    rows = []
    for k in range(n_pairs):
        ctx = 1_000_000 + k * 100 + rng.permutation(u)
        half = (u - inter) // 2
        sa = np.r_[ctx[:inter], ctx[inter : inter + half]]
        sb = np.r_[ctx[:inter], ctx[inter + half :]]
        rows += [(10 * k + 1, c) for c in sa] + [(10 * k + 2, c) for c in sb]
    tok = np.array(rows, dtype=np.int64)  # field 0: the pair's tokens, field 1: context tokens
    table = compute_signatures(tok, set_kind="cooccur", n_sample_rows=None, min_count=1, seed=8)
    sa, sb = _pair_signatures(table, n_pairs)
    rate = (_nibbles(sa) == _nibbles(sb)).mean()
    j = inter / u
    p = j + (1 - j) / 16
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / (n_pairs * NIBBLES)), (rate, p)
    # With the "rows" sets the same two tokens never share a row: Jaccard 0.
    rows_table = compute_signatures(tok, set_kind="rows", n_sample_rows=None, min_count=1, seed=8)
    ra, rb = _pair_signatures(rows_table, n_pairs)
    assert abs((_nibbles(ra) == _nibbles(rb)).mean() - 1 / 16) < 0.02


def _naive(tokens: np.ndarray, set_kind: str, min_count: int, seed: int,
           slot_fields: list[int]) -> dict[int, int]:
    """Per-token Python reference of the minhash definition (all rows sampled)."""
    salts = _salts(seed, 2 * NIBBLES)
    vals, cnts = np.unique(tokens[tokens != 0], return_counts=True)
    keep = {int(v) for v, c in zip(vals, cnts, strict=True) if c >= min_count}
    sets: dict[int, set[int]] = {v: set() for v in keep}
    for r, row in enumerate(tokens.tolist()):
        for s, v in enumerate(row):
            if v not in keep:
                continue
            if set_kind == "rows":
                sets[v].add(r)
            else:
                sets[v].update(
                    w for s2, w in enumerate(row) if w in keep and slot_fields[s2] != slot_fields[s]
                )
    out = {}
    for v, elems in sets.items():
        if not elems:
            continue
        e = np.array(sorted(elems), dtype=np.int64).view(np.uint64)
        sig = 0
        for i in range(NIBBLES):
            m = _mix64(e ^ salts[i]).min()
            nib = int(_mix64(np.array([m ^ salts[NIBBLES + i]], dtype=np.uint64))[0]) & 0xF
            sig |= nib << (4 * i)
        out[v] = sig - (1 << 64) if sig >= 1 << 63 else sig
    return out


@pytest.mark.parametrize("set_kind", ["rows", "cooccur"])
@pytest.mark.parametrize("min_count", [1, 3])
def test_vectorised_matches_naive(set_kind: str, min_count: int) -> None:
    rng = np.random.default_rng(12)
    slot_fields = [0, 1, 1, 2]  # field 1 is a two-slot bag
    tok = rng.integers(1, 25, size=(150, 4)).astype(np.int64) * np.array([1, 100, 100, 10_000])
    tok[rng.random(tok.shape) < 0.1] = 0  # padding
    table = compute_signatures(
        tok, set_kind=set_kind, n_sample_rows=None, min_count=min_count, seed=2,
        slot_fields=slot_fields, chunk_rows=17,
    )
    want = _naive(tok, set_kind, min_count, 2, slot_fields)
    assert table.tokens.tolist() == sorted(want)
    assert table.signatures.tolist() == [want[v] for v in sorted(want)]


def test_deterministic_and_seeded() -> None:
    tok = np.random.default_rng(0).integers(1, 500, size=(3000, 5)).astype(np.int64)
    a = compute_signatures(tok, n_sample_rows=1000, seed=1)
    b = compute_signatures(tok, n_sample_rows=1000, seed=1, chunk_rows=100)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.signatures, b.signatures)
    c = compute_signatures(tok, n_sample_rows=1000, seed=2)
    common = np.intersect1d(a.tokens, c.tokens)
    assert np.mean(a.lookup(common) != c.lookup(common)) > 0.99
    assert a.meta["n_sample_rows"] == 1000 and a.meta["n_rows"] == 3000


def test_sampling_and_frequency_floor() -> None:
    n = 5000
    tok = np.zeros((n, 2), dtype=np.int64)
    tok[:, 0] = 7  # in every row
    tok[0, 1] = 99  # in one row only
    tok[1:, 1] = 5 + np.arange(1, n) % 3
    table = compute_signatures(tok, n_sample_rows=200, min_count=2, seed=0)
    assert table.meta["n_sample_rows"] == 200
    assert table.contains(np.array([7, 5, 6, 7])).all()
    assert not table.contains(np.array([99, 0, 12345])).any()  # rare, padding, never seen


def test_lookup_fallback_and_shapes() -> None:
    table = SignatureTable(np.array([-5, 3, 10]), np.array([111, 222, 333]))
    q = np.array([[3, 4, -5], [0, 10, 2**62]])
    np.testing.assert_array_equal(table.lookup(q), [[222, 4, 111], [0, 333, 2**62]])
    np.testing.assert_array_equal(table.contains(q), [[True, False, True], [False, True, False]])
    empty = SignatureTable.empty()
    np.testing.assert_array_equal(empty.lookup(q), q)
    assert table.nbytes == 48 and empty.nbytes == 0
    with pytest.raises(ValueError):
        SignatureTable(np.array([3, 1]), np.array([0, 0]))


def test_save_load_round_trip(tmp_path) -> None:
    tok = np.random.default_rng(0).integers(1, 50, size=(400, 3)).astype(np.int64)
    table = compute_signatures(tok, set_kind="cooccur", n_sample_rows=None, seed=4)
    table.save(tmp_path / "sig.npz")
    back = SignatureTable.load(tmp_path / "sig.npz")
    np.testing.assert_array_equal(back.tokens, table.tokens)
    np.testing.assert_array_equal(back.signatures, table.signatures)
    assert back.meta == table.meta and back.meta["set_kind"] == "cooccur"
    again = SignatureTable.from_arrays(table.to_arrays())
    np.testing.assert_array_equal(again.signatures, table.signatures)


def test_table_accepts_tokens_far_apart():
    # Sorted int64 hashes more than 2^63 apart: a difference-based check would overflow.
    from lma.signatures import SignatureTable

    t = SignatureTable(np.array([-(2**63) + 5, 2**63 - 7], dtype=np.int64), np.array([1, 2]))
    assert t.lookup(np.array([2**63 - 7]))[0] == 2


def test_blockwise_packing_and_chunked_counts_change_nothing(monkeypatch) -> None:
    # Signatures are packed a block of tokens at a time and the sample is counted chunk by
    # chunk; tiny blocks and chunks must give the table of one block and one chunk.
    import lma.signatures as sig_mod

    tok = np.random.default_rng(3).integers(1, 400, size=(2000, 4)).astype(np.int64)
    tok[::7, 2] = 0  # padding
    ref = compute_signatures(tok, n_sample_rows=1500, seed=4, chunk_rows=100_000)
    monkeypatch.setattr(sig_mod, "_PACK_TOKENS", 7)
    got = compute_signatures(tok, n_sample_rows=1500, seed=4, chunk_rows=33)
    assert len(ref) > 7 * 10
    np.testing.assert_array_equal(ref.tokens, got.tokens)
    np.testing.assert_array_equal(ref.signatures, got.signatures)
