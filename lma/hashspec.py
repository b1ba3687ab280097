"""Hash spec v1: the one definition of how a key and a block index become a memory slot.

Everything that turns a 64-bit key into a position of the shared embedding memory (numpy here,
torch CPU/CUDA kernels, ONNX functions, C++) must reproduce this module bit for bit. The spec is
written so that every step is exact in signed 64-bit arithmetic without overflow, needs no logical
shift of a negative number, and is a small integer matrix product plus masks:

Parameters (derived from ``seed`` by :func:`make_params`, so any runtime can rebuild them):
    n_blocks            number of blocks per embedding, d / Z
    A[c, j, i]          multipliers in [1, P - 1], c < n_blocks, j in {0, 1}, i < 4
    B[c, j]             offsets in [0, P - 1]
    W[p, c]             nibble weights for LMA block keys, p < 16 (see ``lma_block_keys``)
    positions[c, t]     the T distinct nibble positions block c reads, drawn without replacement

Slot of key ``k`` (int64) for block ``c``:
    u_i  = (k >> 16 i) & 0xFFFF, i = 0..3    (16-bit limbs of k's two's-complement bits)
    h_j  = (B[c, j] + sum_i A[c, j, i] * u_i) mod P,  P = 2^31 - 1
    H    = h_0 * P + h_1                            (< 2^62)
    start = H mod (M - Z + 1)                       (unaligned blocks)
    start = Z * (H mod floor(M / Z))                 (blocks aligned to multiples of Z)

Every product is below 2^47 and every sum below 2^50, so no runtime ever wraps. Per-block
multipliers make the blocks of one key independent (a hash linear in c would move every block of
two colliding keys together). For ``lma`` mode the hashed key of block c is not the token key but
a block key: T 4-bit sub-keys of the token's 64-bit minhash signature, at positions chosen per
block, concatenated (``lma_block_keys``); it is below 2^32 and is hashed exactly as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPEC_VERSION = 1
P = (1 << 31) - 1
MASK16 = 0xFFFF
MASK64 = (1 << 64) - 1
NIBBLES = 16  # sub-keys in one signature (b = 4 bits each)
SUBKEY_BITS = 4


def splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64 on Python ints: returns (new_state, output), both in [0, 2^64)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


@dataclass(frozen=True)
class HashParams:
    """Constants of hash spec v1 for one embedding layout (see module docstring)."""

    seed: int
    n_blocks: int
    n_subkeys: int  # T: sub-keys per LMA block key
    A: np.ndarray  # (n_blocks, 2, 4) int64
    B: np.ndarray  # (n_blocks, 2) int64
    positions: np.ndarray  # (n_blocks, T) int64, sub-key positions in [0, 16)

    @property
    def nibble_weights(self) -> np.ndarray:
        """W (16, n_blocks) int64 with block_key[c] = sum_p nibble[p] * W[p, c]."""
        w = np.zeros((NIBBLES, self.n_blocks), dtype=np.int64)
        for c in range(self.n_blocks):
            for t, p in enumerate(self.positions[c]):
                w[p, c] += 1 << (SUBKEY_BITS * t)
        return w


def make_params(seed: int, n_blocks: int, n_subkeys: int = 8) -> HashParams:
    """Derive the spec-v1 constants from a seed with SplitMix64 (order: per block A, B, positions)."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if not 1 <= n_subkeys <= 8:
        raise ValueError(f"n_subkeys (T) must be in 1..8 so a block key fits 32 bits, got {n_subkeys}")
    state = seed & MASK64
    a = np.zeros((n_blocks, 2, 4), dtype=np.int64)
    b = np.zeros((n_blocks, 2), dtype=np.int64)
    pos = np.zeros((n_blocks, n_subkeys), dtype=np.int64)
    for c in range(n_blocks):
        for j in range(2):
            for i in range(4):
                state, r = splitmix64(state)
                a[c, j, i] = 1 + r % (P - 1)
            state, r = splitmix64(state)
            b[c, j] = r % P
        # T distinct positions (a partial Fisher-Yates draw): a repeated position would make the
        # block key carry fewer than T independent sub-keys, so Pr[same block] would be
        # (J + (1 - J) / 16)^T' with T' < T for some blocks.
        free = list(range(NIBBLES))
        for t in range(n_subkeys):
            state, r = splitmix64(state)
            pos[c, t] = free.pop(r % len(free))
    return HashParams(seed=seed, n_blocks=n_blocks, n_subkeys=n_subkeys, A=a, B=b, positions=pos)


def n_starts(m: int, z: int, aligned: bool) -> int:
    """Number of distinct block starts in a memory of m floats."""
    if z < 1 or m < z:
        raise ValueError(f"need 1 <= Z <= M, got Z={z}, M={m}")
    return m // z if aligned else m - z + 1


def limbs(keys: np.ndarray) -> np.ndarray:
    """(...,) int64 -> (..., 4) int64 16-bit limbs of the two's-complement bits."""
    k = np.asarray(keys, dtype=np.int64)
    shifts = np.array([0, 16, 32, 48], dtype=np.int64)
    return (k[..., None] >> shifts) & MASK16


def block_hash(keys: np.ndarray, params: HashParams) -> np.ndarray:
    """H (< 2^62) of each key for each block.

    keys: (N,) int64, one key for all blocks (robez), or (N, n_blocks) int64, a key per block (lma).
    returns (N, n_blocks) int64.
    """
    u = limbs(keys)  # (N, 4) or (N, nb, 4)
    if u.ndim == 2:
        # (N, 4) x (nb, 2, 4) -> (N, nb, 2): the "one integer matmul" form.
        x = np.einsum("ni,cji->ncj", u, params.A)
    else:
        x = np.einsum("nci,cji->ncj", u, params.A)
    h = (x + params.B[None]) % P
    return h[..., 0] * P + h[..., 1]


def block_starts(h: np.ndarray, m: int, z: int, aligned: bool) -> np.ndarray:
    """Map block hashes H to start offsets in [0, M - Z]."""
    n = n_starts(m, z, aligned)
    s = h % n
    return s * z if aligned else s


def lma_block_keys(signatures: np.ndarray, params: HashParams) -> np.ndarray:
    """(N,) int64 signatures -> (N, n_blocks) int64 block keys (< 2^32).

    Nibble p of a signature is (sig >> 4p) & 15; block c concatenates the nibbles at
    positions[c, 0..T-1], the t-th one at bits 4t..4t+3.
    """
    sig = np.asarray(signatures, dtype=np.int64)
    shifts = np.arange(NIBBLES, dtype=np.int64) * SUBKEY_BITS
    nib = (sig[:, None] >> shifts) & 0xF  # (N, 16)
    return nib @ params.nibble_weights


def slot_indices(
    keys: np.ndarray, params: HashParams, m: int, z: int, mode: str, aligned: bool = False
) -> np.ndarray:
    """Reference lookup indices: (N,) int64 keys -> (N, n_blocks * Z) int64 memory indices."""
    keys = np.asarray(keys, dtype=np.int64)
    if mode == "lma":
        h = block_hash(lma_block_keys(keys, params), params)
    elif mode == "robez":
        h = block_hash(keys, params)
    else:
        raise ValueError(f"mode must be 'lma' or 'robez', got {mode!r}")
    starts = block_starts(h, m, z, aligned)  # (N, nb)
    idx = starts[:, :, None] + np.arange(z, dtype=np.int64)
    return idx.reshape(len(keys), params.n_blocks * z)


# ---------------------------------------------------------------------------------------------
# Key tables: constant-time token -> value (full-table row, LMA signature, QR row)
#
# Key table v2: a bucketed two-choice (cuckoo) hash table whose buckets are one 64-byte cache
# line each: 4 int64 keys followed by their 4 int64 values, so one probe reads a key and its value
# together. Key k may live in bucket b0(k) or b1(k), so a lookup reads two cache lines:
#     lo, hi = the low and high 32 bits of k's two's-complement bits (unsigned)
#     b0     = lo mod n_buckets
#     b1     = (b0 + 1 + hi mod (n_buckets - 1)) mod n_buckets      (never equal to b0)
#     value  = buckets[b, 4 + s] for the bucket b in {b0, b1} and slot s < 4 with
#              buckets[b, s] == k; else the caller's default.
# The keys are token hashes (token hash v1 ends in a MurmurHash3 finaliser), whose bits are
# already uniform, so the bucket choice needs no further mixing: three integer remainders per key
# instead of v1's hash spec block hashes. Empty slots hold a filler key that maps to neither of
# the buckets it sits in, so no query, whatever its value, can match an empty slot; keys are
# unique (the first value of a duplicate key wins, as a left binary search would give). When
# placement fails the table grows by a few buckets (which changes every remainder) and retries.
# v1 (two separate arrays of keys and values, buckets of 8 keys, hash spec v1 bucket hashes) is
# no longer built or read: bundles that carry v1 tables are refused by their table_version.
# ---------------------------------------------------------------------------------------------

BUCKET = 4  # keys per bucket; a bucket row is BUCKET keys then BUCKET values (64 bytes)
ROW = 2 * BUCKET
KEY_TABLE_VERSION = 2
MIN_BUCKETS = 4  # fillers need a bucket pair disjoint from another pair
DEFAULT_LOAD = 0.8
_LO32 = (1 << 32) - 1


@dataclass(frozen=True)
class KeyTable:
    """A built key table: ``buckets`` (n_buckets, 8) int64, each row 4 keys then their values."""

    buckets: np.ndarray
    n_keys: int

    @property
    def n_buckets(self) -> int:
        return int(self.buckets.shape[0])

    @property
    def keys(self) -> np.ndarray:
        """(n_buckets, 4) view of the keys (fillers in empty slots)."""
        return self.buckets[:, :BUCKET]

    @property
    def values(self) -> np.ndarray:
        """(n_buckets, 4) view of the values (0 in empty slots)."""
        return self.buckets[:, BUCKET:]

    @property
    def nbytes(self) -> int:
        return int(self.buckets.nbytes)


def bucket_pair(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    """(N,) int64 keys -> (N, 2) int64 candidate buckets (b0, b1), b0 != b1."""
    if n_buckets < 2:
        raise ValueError(f"a key table needs >= 2 buckets, got {n_buckets}")
    u = np.asarray(keys, dtype=np.int64).reshape(-1).view(np.uint64)
    lo = u & np.uint64(_LO32)
    hi = u >> np.uint64(32)
    b0 = lo % np.uint64(n_buckets)
    b1 = (b0 + np.uint64(1) + hi % np.uint64(n_buckets - 1)) % np.uint64(n_buckets)
    return np.stack([b0, b1], axis=1).astype(np.int64)


def _bucket_pairs(keys: np.ndarray, n_buckets: int, chunk: int = 1 << 20) -> np.ndarray:
    """:func:`bucket_pair` of many keys, a chunk at a time, so its temporaries (~50 bytes per
    key) are those of one chunk, not of a whole vocabulary."""
    out = np.empty((len(keys), 2), np.int64)
    for a in range(0, len(keys), chunk):
        out[a : a + chunk] = bucket_pair(keys[a : a + chunk], n_buckets)
    return out


def _place(b: np.ndarray, n_buckets: int, seed: int, max_rounds: int) -> np.ndarray | None:
    """Choice (0/1) per key so that no bucket holds more than BUCKET keys, or None.

    Parallel cuckoo placement: every key starts in b0; in each round every overfull bucket keeps
    the BUCKET keys whose other bucket is fullest and moves the rest to their other bucket.
    """
    n = len(b)
    choice = np.zeros(n, dtype=np.int8)
    rng = np.random.default_rng(seed)
    bid = b[:, 0].copy()
    for _ in range(max_rounds):
        counts = np.bincount(bid, minlength=n_buckets)
        over = np.flatnonzero(counts[bid] > BUCKET)
        if len(over) == 0:
            return choice
        ob = bid[over]
        alt = b[over, 1 - choice[over]]
        # Keep first: keys whose alternative is fullest (ties broken at random).
        prio = -counts[alt].astype(np.float64) + rng.random(len(over))
        order = np.lexsort((prio, ob))
        sb = ob[order]
        starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
        rank = np.arange(len(sb)) - np.repeat(starts, np.diff(np.r_[starts, len(sb)]))
        move = over[order[rank >= BUCKET]]
        choice[move] ^= 1
        bid[move] = b[move, choice[move]]
    return None


def _filler(keys: np.ndarray, n_buckets: int, avoid: set[int],
            start: int) -> tuple[int, tuple[int, int]]:
    """A key not in ``keys`` whose two buckets avoid ``avoid`` (searching upward from start)."""
    c = start
    while True:
        cand = np.arange(c, c + 64, dtype=np.int64)
        if len(keys):  # keys sorted and unique
            at = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
            cand = cand[keys[at] != cand]
        bp = bucket_pair(cand, n_buckets)
        for k, (p, q) in zip(cand.tolist(), bp.tolist(), strict=True):
            if p not in avoid and q not in avoid:
                return k, (p, q)
        c += 64


def build_key_table(keys: np.ndarray, values: np.ndarray, seed: int = 0,
                    load: float = DEFAULT_LOAD, max_rounds: int = 200) -> KeyTable:
    """Key table mapping ``keys[i] -> values[i]`` (the first i of a repeated key).

    ``load`` is keys per slot: buckets = max(MIN_BUCKETS, ceil(n / (4 load))). ``seed`` breaks
    ties in the placement. If placement fails, the table grows by 2% of its buckets (at least
    one) and placement is tried again.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} differ in length")
    if len(keys) and not np.all(keys[1:] >= keys[:-1]):
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    if first.all():
        uniq, vals = keys, values  # the usual case (a vocabulary): no copies
    else:
        uniq, vals = keys[first], values[first]  # stable: the first value of a repeated key
    del first
    n = len(uniq)
    n_buckets = max(MIN_BUCKETS, -(-n // max(1, int(BUCKET * load))) if n else MIN_BUCKETS)
    n_buckets = max(n_buckets, -(-n // BUCKET) + 1)
    attempt = 0
    while True:
        b = _bucket_pairs(uniq, n_buckets)
        choice = _place(b, n_buckets, seed + attempt, max_rounds)
        if choice is not None:
            break
        del b
        attempt += 1
        n_buckets += max(1, n_buckets // 50)
    # Each intermediate is dropped once used: at a 43M-key vocabulary each is 350 MB, and this
    # build is what peaked full-table training (docs/RESULTS.md, "Full-table training peak").
    bid = np.where(choice == 1, b[:, 1], b[:, 0])
    del b, choice
    order = np.argsort(bid, kind="stable")
    sb = bid[order]
    del bid
    starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]]) if n else np.zeros(0, np.int64)
    rank = np.arange(n)
    rank -= np.repeat(starts, np.diff(np.r_[starts, n]))
    del starts
    f1, pair1 = _filler(uniq, n_buckets, set(), 0)
    f2, _ = _filler(uniq, n_buckets, set(pair1), f1 + 1)
    table = np.zeros((n_buckets, ROW), dtype=np.int64)
    table[:, :BUCKET] = f1
    for p in pair1:
        table[p, :BUCKET] = f2
    table[sb, rank] = uniq[order]
    table[sb, BUCKET + rank] = vals[order]
    return KeyTable(buckets=table, n_keys=n)


def key_table_lookup(table: KeyTable, queries: np.ndarray, default: np.ndarray | int) -> np.ndarray:
    """Reference lookup: value of each query where its key is in the table, else ``default``
    (broadcast against ``queries``)."""
    q = np.asarray(queries, dtype=np.int64)
    flat_q = q.reshape(-1)
    b = bucket_pair(flat_q, table.n_buckets)  # (N, 2)
    cand = table.buckets[b]  # (N, 2, 8): two cache lines per query, keys and values
    eq = cand[:, :, :BUCKET] == flat_q[:, None, None]  # (N, 2, 4)
    hit = eq.reshape(len(flat_q), -1).any(axis=1)
    got = np.where(eq, cand[:, :, BUCKET:], 0).sum(axis=(1, 2))  # at most one slot matches
    return np.where(hit.reshape(q.shape), got.reshape(q.shape), np.broadcast_to(default, q.shape))
