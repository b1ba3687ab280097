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
# Key table v3: a perfect hash with one probe. Each key has exactly one slot, found with two
# reads: its group's displacement, then the slot's (key, value) pair (16 bytes, in one cache
# line). With u the key's two's-complement bits as an unsigned 64-bit integer and all arithmetic
# unsigned 64-bit (only the product u * A wraps, mod 2^64; an odd A makes it a bijection, so
# distinct keys have distinct y, and it mixes structured keys such as small integers or
# multiples of 2^32, whose own halves would put them all in one group or give them one step):
#     y      = (u * A) mod 2^64                          (A: the table's odd multiplier)
#     lo, hi = y mod 2^32, y div 2^32
#     g      = hi mod G                                  (the key's group; G prime too)
#     s0     = lo mod M
#     s1     = 1 + hi mod (M - 1)                        (M prime: s1 visits every slot)
#     slot   = (s0 + disp[g] * s1) mod M
#     value  = the slot's value if the slot's key is k, else the caller's default.
# The table is one (2 + M + ceil(G / 2), 2) int64 array that describes itself:
#     row 0 = (M, G), row 1 = (A, n_keys), rows 2 .. 2 + M = the slots' (key, value) pairs,
#     and, in the flat view, element 2 (2 + M) + g = disp[g] (two displacements per row).
# Every displacement is below 2^16 and M below 2^32, so s0 + disp * s1 < 2^49 never wraps.
# The build places the groups largest first; a group takes the smallest displacement that puts
# all its keys in free, distinct slots (groups of one size try the same displacement together,
# a slot wanted by several of them going to the first). Empty slots hold a filler key that is in
# no slot of its own, so no query, whatever its value, can match an empty slot; keys are unique
# (the first value of a duplicate key wins, as a left binary search would give). When placement
# fails the table grows by a few slots and takes another multiplier. v2 (two-choice buckets of 4
# keys and 4 values: two cache lines per key, and in onnxruntime a 64-byte row gather and a
# 16-lane compare per candidate) and v1 are no longer built or read: bundles that carry them are
# refused by their table_version, and checkpoints rebuild their tables from their vocabulary.
# ---------------------------------------------------------------------------------------------

KEY_TABLE_VERSION = 3
ROW = 2  # a slot row: key, value
META_ROWS = 2  # (M, G), (A, n_keys)
MIN_SLOTS = 4  # fillers need a slot of their own outside the keys'
DEFAULT_LOAD = 0.85  # keys per slot
GROUP_SIZE = 4  # keys per displacement (on average)
MAX_DISPLACEMENT = 1 << 16
MAX_KEYS = 1 << 31  # the build orders keys by group * M + base, which must fit in an int64
_LO32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class KeyTable:
    """A built key table: ``rows`` (2 + M + ceil(G / 2), 2) int64 (layout: "Key tables")."""

    rows: np.ndarray
    n_keys: int

    @property
    def n_slots(self) -> int:
        return int(self.rows[0, 0])

    @property
    def n_groups(self) -> int:
        return int(self.rows[0, 1])

    @property
    def multiplier(self) -> int:
        """A as an unsigned 64-bit integer (stored in its two's-complement int64 form)."""
        return int(self.rows[1, 0]) & _U64

    @property
    def keys(self) -> np.ndarray:
        """(M,) view of the slots' keys (fillers in empty slots)."""
        return self.rows[META_ROWS : META_ROWS + self.n_slots, 0]

    @property
    def values(self) -> np.ndarray:
        """(M,) view of the slots' values (0 in empty slots)."""
        return self.rows[META_ROWS : META_ROWS + self.n_slots, 1]

    @property
    def displacements(self) -> np.ndarray:
        """(G,) view of the groups' displacements."""
        start = ROW * (META_ROWS + self.n_slots)
        return self.rows.reshape(-1)[start : start + self.n_groups]

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


def table_rows(n_slots: int, n_groups: int) -> int:
    """Rows of a v3 table with M slots and G groups."""
    return META_ROWS + n_slots + -(-n_groups // ROW)


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 2^32 (bases 2, 7, 61)."""
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 61):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 7, 61):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime_at_least(n: int) -> int:
    while not _is_prime(n):
        n += 1
    return n


def _multiplier(seed: int) -> int:
    """An odd 64-bit multiplier from a seed (the SplitMix64 output for it, low bit set)."""
    z = (seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) | 1


def slot_hashes(keys: np.ndarray, n_slots: int, n_groups: int,
                multiplier: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) int64 keys -> their group g, base s0 and step s1 (int64 arrays; see above)."""
    if n_slots < 2 or n_slots >= 1 << 32 or n_groups < 1:
        raise ValueError(f"a key table needs 2 <= slots < 2^32 and >= 1 group, got "
                         f"{n_slots} slots, {n_groups} groups")
    y = np.asarray(keys, dtype=np.int64).reshape(-1).view(np.uint64) * np.uint64(multiplier)
    hi = y >> np.uint64(32)  # (numpy arrays wrap the product silently)
    g = (hi % np.uint64(n_groups)).astype(np.int64)
    s0 = ((y & np.uint64(_LO32)) % np.uint64(n_slots)).astype(np.int64)
    s1 = (np.uint64(1) + hi % np.uint64(n_slots - 1)).astype(np.int64)
    return g, s0, s1


def key_slots(table: KeyTable, keys: np.ndarray) -> np.ndarray:
    """(N,) int64 keys -> (N,) int64 slots in [0, M): where each key is, or would be."""
    g, s0, s1 = slot_hashes(keys, table.n_slots, table.n_groups, table.multiplier)
    return (s0 + table.displacements[g] * s1) % table.n_slots


def _place(g: np.ndarray, s0: np.ndarray, s1: np.ndarray, n_slots: int,
           n_groups: int) -> np.ndarray | None:
    """Displacement per group so that every key has a slot of its own, or None.

    Groups are placed largest first (the order that lets a perfect hash of this kind succeed at
    high loads); all pending groups of one size try the same displacement in each round, and a
    group is placed when its keys' slots are free and distinct and no earlier group of the round
    wants any of them. Two keys of one group with the same base and step collide at every
    displacement, so that fails at once (two keys of one group otherwise collide at one
    displacement at most: M is prime)."""
    counts = np.bincount(g, minlength=n_groups)
    # Keys by (group, base): one int64 (g * M + s0 < M^2) sorts 3x faster than a lexsort of
    # three columns; a group's keys end up side by side (the order within one is irrelevant).
    group_base = g * n_slots
    group_base += s0
    order = np.argsort(group_base)
    in_order = group_base[order]
    at = np.flatnonzero(in_order[1:] == in_order[:-1])  # keys sharing a group and a base (rare)
    del in_order
    if len(at):
        sub = order[np.unique(np.concatenate([at, at + 1]))]
        sub = sub[np.lexsort((s1[sub], group_base[sub]))]
        if ((group_base[sub[1:]] == group_base[sub[:-1]]) & (s1[sub[1:]] == s1[sub[:-1]])).any():
            return None  # two keys of one group with one base and step: no displacement parts them
    del group_base, at
    starts = np.zeros(n_groups, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    taken = np.zeros(n_slots, dtype=bool)
    disp = np.zeros(n_groups, dtype=np.int64)
    dt = np.int32 if n_slots < 1 << 30 else np.int64  # slot + step < 2M fits
    for size in range(int(counts.max(initial=0)), 0, -1):
        grp = np.flatnonzero(counts == size)
        if len(grp) == 0:
            continue
        members = order[starts[grp][:, None] + np.arange(size)]
        slots = s0[members].astype(dt)  # (P, size): the slots at displacement d, kept
        b = s1[members].astype(dt)  # incrementally (slots + d * b mod M without a multiply)
        del members
        d = 0
        while len(grp):
            if d >= min(MAX_DISPLACEMENT, n_slots):  # d and d + M give the same slots
                return None
            cand = np.flatnonzero(~taken[slots].any(axis=1))
            if size > 1 and len(cand):
                srt = np.sort(slots[cand], axis=1)
                cand = cand[(srt[:, 1:] != srt[:, :-1]).all(axis=1)]
            if len(cand):
                flat = slots[cand].reshape(-1)
                _, first = np.unique(flat, return_index=True)  # the first group wanting a slot
                wins = np.zeros(len(flat), dtype=bool)
                wins[first] = True
                placed = cand[wins.reshape(-1, size).all(axis=1)]
                taken[slots[placed]] = True
                disp[grp[placed]] = d
                keep = np.ones(len(grp), dtype=bool)
                keep[placed] = False
                grp, slots, b = grp[keep], slots[keep], b[keep]
            slots += b
            slots[slots >= n_slots] -= n_slots
            d += 1
    return disp


def _filler(keys: np.ndarray, table: KeyTable, avoid: set[int], start: int) -> tuple[int, int]:
    """A key not in ``keys`` (sorted, unique) whose own slot is not in ``avoid`` (searching
    upward from ``start``), and that slot."""
    c = start
    while True:
        cand = np.arange(c, c + 64, dtype=np.int64)
        if len(keys):
            at = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
            cand = cand[keys[at] != cand]
        for k, p in zip(cand.tolist(), key_slots(table, cand).tolist(), strict=True):
            if p not in avoid:
                return k, p
        c += 64


def build_key_table(keys: np.ndarray, values: np.ndarray, seed: int = 0,
                    load: float = DEFAULT_LOAD, group_size: int = GROUP_SIZE) -> KeyTable:
    """Key table mapping ``keys[i] -> values[i]`` (the first i of a repeated key).

    ``load`` is keys per slot: M = the first prime >= max(5, ceil(n / load) + 1) slots (prime,
    so that every step s1 visits every slot), and G = the first prime >= ceil(n / group_size)
    groups (prime, so that keys whose hashes differ by multiples of a power of two, as the
    products of structured keys do, still spread over every group). ``seed``
    picks the multiplier. If placement fails, the table grows by 2% of its slots and is placed
    again with the next multiplier.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} differ in length")
    if not 0 < load < 1 or group_size < 1:
        raise ValueError(f"need 0 < load < 1 and group_size >= 1, got {load}, {group_size}")
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
    if n > MAX_KEYS:
        raise ValueError(f"a key table holds at most {MAX_KEYS} keys, got {n}")
    n_slots = _prime_at_least(max(MIN_SLOTS + 1, int(np.ceil(n / load)) + 1))
    n_groups = _prime_at_least(max(2, -(-n // group_size)))
    attempt = 0
    while True:
        mult = _multiplier(seed + attempt)
        g, s0, s1 = slot_hashes(uniq, n_slots, n_groups, mult)
        disp = _place(g, s0, s1, n_slots, n_groups)
        if disp is not None:
            break
        del g, s0, s1
        attempt += 1
        n_slots = _prime_at_least(n_slots + max(1, n_slots // 50))
    # Each intermediate is dropped once used: at a 43M-key vocabulary each is 350 MB, and this
    # build is what peaked full-table training (docs/RESULTS.md, "Full-table training peak").
    slot = s0
    slot += disp[g] * s1
    slot %= n_slots
    del g, s1
    rows = np.zeros((table_rows(n_slots, n_groups), ROW), dtype=np.int64)
    rows[0] = n_slots, n_groups
    rows[1] = np.array([mult], np.uint64).view(np.int64)[0], n
    start = ROW * (META_ROWS + n_slots)
    rows.reshape(-1)[start : start + n_groups] = disp
    table = KeyTable(rows=rows, n_keys=n)
    free = np.ones(n_slots, dtype=bool)
    free[slot] = False
    f1, p1 = _filler(uniq, table, set(), 0)
    f2, _ = _filler(uniq, table, {p1}, f1 + 1)
    body = rows[META_ROWS : META_ROWS + n_slots]
    body[free, 0] = f1
    if free[p1]:
        body[p1, 0] = f2
    body[slot, 0] = uniq
    body[slot, 1] = vals
    return table


def key_table_lookup(table: KeyTable, queries: np.ndarray, default: np.ndarray | int) -> np.ndarray:
    """Reference lookup: value of each query where its key is in the table, else ``default``
    (broadcast against ``queries``)."""
    q = np.asarray(queries, dtype=np.int64)
    flat_q = q.reshape(-1)
    slot = key_slots(table, flat_q)  # one (key, value) pair per query
    hit = (table.keys[slot] == flat_q).reshape(q.shape)
    got = table.values[slot].reshape(q.shape)
    return np.where(hit, got, np.broadcast_to(default, q.shape))
