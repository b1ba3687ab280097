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
