"""Hash spec v1: pinned values, ranges, numpy/torch parity and the mixing of slots.

The expected values below were computed once from the numpy reference (``hashspec.slot_indices``)
and written in; a change to any of them is a change of the spec (bump ``SPEC_VERSION``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lma import hashspec as hs
from lma.ops import HashedGatherConfig, slot_indices_torch

KEYS = [0, -1, 2**63 - 1, -(2**63), 1, 12345678901234567, -987654321, 0x0123456789ABCDEF]
SEED = 7

# (mode, M, Z, aligned) -> first two block starts of each key in KEYS (one when d / Z == 1),
# for d = 16 (n_blocks = 16 / Z), T = 8, seed 7.
EXPECTED = {
    ('robez', 97, 1, False): [[20, 29], [37, 36], [18, 46], [71, 19], [72, 94], [47, 46], [20, 34], [84, 93]],
    ('robez', 97, 1, True): [[20, 29], [37, 36], [18, 46], [71, 19], [72, 94], [47, 46], [20, 34], [84, 93]],
    ('robez', 97, 4, False): [[79, 37], [18, 11], [77, 61], [47, 81], [81, 28], [29, 85], [63, 4], [74, 69]],
    ('robez', 97, 4, True): [[28, 28], [56, 84], [84, 28], [68, 84], [4, 56], [92, 4], [36, 40], [56, 84]],
    ('robez', 97, 16, False): [[25], [32], [69], [73], [13], [67], [21], [10]],
    ('robez', 97, 16, True): [[16], [32], [48], [80], [16], [80], [48], [32]],
    ('robez', 1099511627776, 1, False): [[360948957103, 989619515895], [86203369118, 55626763109], [1094298312701, 1005545661975], [450218157649, 39700617029], [49073622641, 151229698294], [223296576663, 982284201841], [144458192313, 737622396506], [238391622886, 669046247573]],
    ('robez', 1099511627776, 1, True): [[360948957103, 989619515895], [86203369118, 55626763109], [1094298312701, 1005545661975], [450218157649, 39700617029], [49073622641, 151229698294], [223296576663, 982284201841], [144458192313, 737622396506], [238391622886, 669046247573]],
    ('robez', 1099511627776, 4, False): [[360956995219, 989628311013], [86210182676, 55631803526], [1094307112598, 1005557293326], [450224209423, 39702821213], [49079338934, 151232849908], [223298649981, 982291861732], [144467866791, 737630195057], [238393414105, 669053457206]],
    ('robez', 1099511627776, 4, True): [[344284200636, 659943180252], [344813476472, 222507052436], [1078658367476, 723647764572], [701361002820, 158802468116], [196294490564, 604918793176], [893186306652, 630601924036], [577832769252, 751466330472], [953566491544, 477161734740]],
    ('robez', 1099511627776, 16, False): [[360989147683], [86237436908], [1094342312186], [450248416519], [49102204106], [223306943253], [144506564703], [238400578981]],
    ('robez', 1099511627776, 16, True): [[277625174768], [279742278112], [1016098586576], [606420755728], [785177962256], [274210343280], [112307821456], [515731082848]],
    ('lma', 97, 1, False): [[20, 29], [37, 91], [31, 91], [26, 29], [20, 38], [24, 76], [76, 13], [58, 12]],
    ('lma', 97, 1, True): [[20, 29], [37, 91], [31, 91], [26, 29], [20, 38], [24, 76], [76, 13], [58, 12]],
    ('lma', 97, 4, False): [[79, 37], [11, 7], [90, 7], [0, 37], [79, 91], [9, 18], [32, 65], [34, 78]],
    ('lma', 97, 4, True): [[28, 28], [36, 84], [80, 84], [80, 28], [28, 52], [4, 8], [64, 60], [72, 80]],
    ('lma', 97, 16, False): [[25], [63], [8], [80], [25], [11], [4], [54]],
    ('lma', 97, 16, True): [[16], [48], [32], [32], [16], [16], [64], [0]],
    ('lma', 1099511627776, 1, False): [[360948957103, 989619515895], [741732730753, 1085324069093], [1058402482684, 1085324069093], [44279205172, 989619515895], [360948957103, 401532713669], [149492899217, 982487293186], [394885389560, 828485886191], [714557252386, 864039044860]],
    ('lma', 1099511627776, 1, True): [[360948957103, 989619515895], [741732730753, 1085324069093], [1058402482684, 1085324069093], [44279205172, 989619515895], [360948957103, 401532713669], [149492899217, 982487293186], [394885389560, 828485886191], [714557252386, 864039044860]],
    ('lma', 1099511627776, 4, False): [[360956995219, 989628311013], [741740878279, 1085328402650], [1058406231673, 1085328402650], [44291641825, 989628311013], [360956995219, 401538971942], [149496500987, 982490395840], [394895912114, 828495043055], [714562379809, 864048248551]],
    ('lma', 1099511627776, 4, True): [[344284200636, 659943180252], [767907667460, 1042761393044], [935075047408, 1042761393044], [177116820688, 659943180252], [344284200636, 506619226900], [597971596868, 631414289416], [480029930464, 15408661436], [659205753992, 157621296112]],
    ('lma', 1099511627776, 16, False): [[360989147683], [741773468383], [1058421227629], [44341388437], [360989147683], [149510908067], [394938002330], [714582889501]],
    ('lma', 1099511627776, 16, True): [[277625174768], [872607414288], [441765306304], [708467282752], [277625174768], [192863131920], [820608094080], [437799760416]],
}


def _chi2_upper(df: int, z: float = 5.0) -> float:
    """Upper quantile of chi-square(df) at a standard-normal z (Wilson-Hilferty approximation)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_params_pinned() -> None:
    p = hs.make_params(SEED, 2, 8)
    assert p.A[0].tolist() == [
        [1751225710, 91052413, 1427254291, 1009375126],
        [1261020208, 317842307, 217454665, 583756110],
    ]
    assert p.B.tolist() == [[1371838632, 1543542871], [1501033933, 1130588100]]
    assert p.positions.tolist() == [[11, 1, 7, 8, 9, 10, 13, 15], [7, 5, 4, 2, 0, 13, 3, 9]]
    # Positions within a block are distinct (T independent sub-keys per block key).
    many = hs.make_params(SEED, 64, 8).positions
    assert all(len(set(row)) == 8 for row in many.tolist())
    assert ((p.A >= 1) & (p.A <= hs.P - 1)).all()
    assert ((p.B >= 0) & (p.B < hs.P)).all()
    # A longer layout starts with the same constants (the stream is consumed block by block).
    q = hs.make_params(SEED, 5, 8)
    np.testing.assert_array_equal(q.A[:2], p.A)
    np.testing.assert_array_equal(q.positions[:2], p.positions)


@pytest.mark.parametrize("case", sorted(EXPECTED, key=str))
def test_pinned_slots(case: tuple[str, int, int, bool]) -> None:
    mode, m, z, aligned = case
    params = hs.make_params(SEED, 16 // z, 8)
    idx = hs.slot_indices(np.array(KEYS, dtype=np.int64), params, m, z, mode, aligned)
    assert idx.shape == (len(KEYS), 16)
    assert idx[:, ::z][:, :2].tolist() == EXPECTED[case]


@pytest.mark.parametrize("mode", ["robez", "lma"])
@pytest.mark.parametrize("m", [1, 16, 97, 2**20 + 7, 2**40, 2**62])
@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("aligned", [False, True])
def test_range_and_alignment(mode: str, m: int, z: int, aligned: bool) -> None:
    if m < z:
        with pytest.raises(ValueError):
            hs.n_starts(m, z, aligned)
        return
    rng = np.random.default_rng(m % 1000 + z)
    keys = np.concatenate(
        [np.array(KEYS, dtype=np.int64), rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64)]
    )
    params = hs.make_params(3, 16 // z, 8)
    idx = hs.slot_indices(keys, params, m, z, mode, aligned)
    assert idx.min() >= 0 and idx.max() < m
    starts = idx[:, ::z]
    # Blocks are Z contiguous floats.
    offsets = idx.reshape(len(keys), -1, z) - starts[:, :, None]
    assert (offsets == np.arange(z)).all()
    if aligned:
        assert (starts % z == 0).all()
    assert starts.max() <= m - z


@pytest.mark.parametrize("mode", ["robez", "lma"])
@pytest.mark.parametrize("z,aligned", [(1, False), (4, False), (4, True), (16, True), (2, False)])
@pytest.mark.parametrize("m", [1000, 2**33 + 5, 2**61 + 1])
def test_torch_matches_numpy(mode: str, z: int, aligned: bool, m: int) -> None:
    rng = np.random.default_rng(11)
    keys = np.concatenate(
        [np.array(KEYS, dtype=np.int64), rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)]
    )
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=m, n_subkeys=6, seed=99)
    a, b, w = cfg.param_tensors()
    got = slot_indices_torch(torch.from_numpy(keys), (a, b, w), cfg)
    want = hs.slot_indices(keys, cfg.params(), m, z, mode, aligned)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)


def test_block_hash_exact_against_python_ints() -> None:
    """The int64 vectorised hash equals the same formula on unbounded Python ints."""
    params = hs.make_params(5, 3, 8)
    for key in KEYS:
        u = [((key & hs.MASK64) >> (16 * i)) & 0xFFFF for i in range(4)]
        for c in range(3):
            h = [
                (int(params.B[c, j]) + sum(int(params.A[c, j, i]) * u[i] for i in range(4))) % hs.P
                for j in range(2)
            ]
            want = h[0] * hs.P + h[1]
            assert hs.block_hash(np.array([key], dtype=np.int64), params)[0, c] == want


def test_lma_block_keys_are_nibble_concatenations() -> None:
    rng = np.random.default_rng(0)
    sig = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64)
    params = hs.make_params(1, 4, 8)
    bk = hs.lma_block_keys(sig, params)
    assert bk.min() >= 0 and bk.max() < 2**32
    for s, row in zip(sig.tolist(), bk.tolist(), strict=True):
        nib = [((s & hs.MASK64) >> (4 * p)) & 0xF for p in range(16)]
        for c in range(4):
            want = sum(nib[p] << (4 * t) for t, p in enumerate(params.positions[c]))
            assert row[c] == want


def test_lma_block_depends_only_on_its_positions() -> None:
    """Changing a nibble that block c does not read leaves block c where it was."""
    params = hs.make_params(2, 16, 4)
    rng = np.random.default_rng(1)
    sig = rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)
    base = hs.slot_indices(sig, params, 10**9, 1, "lma")
    for p in range(16):
        flipped = sig ^ np.int64(0x5) << np.int64(4 * p) if p < 15 else sig ^ np.int64(-(2**63))
        moved = hs.slot_indices(flipped, params, 10**9, 1, "lma")
        for c in range(16):
            same = (moved[:, c] == base[:, c]).all()
            assert same == (p not in params.positions[c]), (p, c)


def _slots(keys: np.ndarray, m: int, mode: str = "robez", n_blocks: int = 1, seed: int = 4) -> np.ndarray:
    return hs.slot_indices(keys, hs.make_params(seed, n_blocks, 8), m, 1, mode)


@pytest.mark.parametrize("m", [1024, 1009, 4096])
def test_uniform_random_keys(m: int) -> None:
    keys = np.random.default_rng(m).integers(-(2**63), 2**63 - 1, 100 * m, dtype=np.int64)
    for mode in ("robez", "lma"):
        counts = np.bincount(_slots(keys, m, mode)[:, 0], minlength=m)
        assert _chi2(counts) < _chi2_upper(m - 1), mode


@pytest.mark.parametrize("m", [1024, 1009])
@pytest.mark.parametrize("start", [0, -(2**63), 2**40 - 17])
def test_uniform_consecutive_keys(m: int, start: int) -> None:
    keys = np.int64(start) + np.arange(100 * m, dtype=np.int64)
    counts = np.bincount(_slots(keys, m, n_blocks=3)[:, 2], minlength=m)
    assert _chi2(counts) < _chi2_upper(m - 1)


def test_uniform_one_bit_neighbours() -> None:
    """Keys that differ from a few bases in a single bit spread over all slots."""
    m = 512
    bases = np.random.default_rng(3).integers(-(2**63), 2**63 - 1, 800, dtype=np.int64)
    bits = np.arange(64, dtype=np.int64)
    keys = (bases[:, None] ^ (np.int64(1) << bits)).ravel()  # (800 * 64,)
    counts = np.bincount(_slots(keys, m)[:, 0], minlength=m)
    assert _chi2(counts) < _chi2_upper(m - 1)
    # A single flipped bit moves the slot almost always (stays with probability ~1/m).
    base_slots = np.repeat(_slots(bases, m)[:, 0], 64)
    assert (counts.sum() > 0) and np.mean(_slots(keys, m)[:, 0] == base_slots) < 3.0 / m


@pytest.mark.parametrize("keyset", ["random-robez", "consecutive-robez", "random-lma"])
def test_blocks_of_a_key_are_independent(keyset: str) -> None:
    """Two keys that collide on block 0 collide on the other blocks only at the chance rate 1/m."""
    m, nb, n = 101, 16, 200_000
    kind, mode = keyset.split("-")
    if kind == "random":
        keys = np.random.default_rng(5).integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    else:
        keys = np.arange(n, dtype=np.int64) - 77
    s = _slots(keys, m, mode, n_blocks=nb)  # (N, 16)
    # Disjoint pairs colliding on block 0 (so that the pairs are independent trials): sort by the
    # block-0 slot and pair neighbours 2i, 2i + 1 that share it.
    order = np.argsort(s[:, 0], kind="stable")
    a, b = order[0:-1:2], order[1::2]
    same = s[a, 0] == s[b, 0]
    a, b = a[same], b[same]
    assert len(a) > 90_000
    hits = s[a, 1:] == s[b, 1:]  # (pairs, 15)
    rate = hits.mean(axis=0)
    tol = 5 * math.sqrt((1 / m) * (1 - 1 / m) / len(a))
    assert np.all(rate < 1 / m + tol), rate
    if kind == "random":
        assert np.all(rate > 1 / m - tol), rate
    # (Consecutive keys fall below the chance rate on some blocks: a pair's collisions are set by
    # the key difference, and differences that collide on block 0 mostly miss elsewhere. Fewer
    # joint collisions than chance is harmless; more would make colliding keys share rows.)
    # The number of other blocks on which a colliding pair also collides is Binomial(15, 1/m).
    k = hits.sum(axis=1)
    assert np.mean(k >= 3) < 10 * math.comb(15, 3) / m**3
