"""Minhash signatures of tokens: the per-token state that lets LMA share memory by similarity.

A token's *set* is one of:

``rows`` (the LMA authors' definition)
    the ids of the sampled training rows in which the token occurs. Tokens of one field never
    share a row, so their Jaccard is 0; sharing happens between co-occurring tokens of different
    fields.
``cooccur``
    the (frequent) tokens of *other* fields that the token co-occurs with in the sampled rows.
    Tokens of one field that appear in similar contexts then get similar sets and share memory.

For each set we take ``NIBBLES`` = 16 minhash values, keep ``b`` = 4 bits of each and pack them
into one int64: nibble ``p`` sits at bits ``4p .. 4p+3``, which is what
:func:`lma.hashspec.lma_block_keys` reads. Two tokens with Jaccard ``J`` agree on a nibble with
probability ``J + (1 - J) / 16``.

Computation is two streaming passes over chunks of the sampled rows (token counts, then
minhashes; the sample is never held whole), vectorised with numpy: per chunk the (row, slot)
entries are sorted once by token, and each of the 16 hash functions is a group minimum
(``np.minimum.reduceat``) merged into a running minimum per token.

Tokens absent from the sample, seen fewer than ``min_count`` times in it, or with an empty set get
no signature; :class:`SignatureTable` resolves them (and tokens never seen, at serving) to the
token hash itself, which hashed as a signature gives a random (ROBE-like) allocation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lma.features import _merge_counts
from lma.hashspec import NIBBLES, SUBKEY_BITS, splitmix64
from lma.tokens import PAD_TOKEN

logger = logging.getLogger(__name__)

SIGNATURE_VERSION = 1
SET_KINDS = ("rows", "cooccur")
DEFAULT_SAMPLE_ROWS = 125_000
DEFAULT_MIN_COUNT = 2
_UMAX = np.uint64(np.iinfo(np.uint64).max)
_PACK_TOKENS = 1 << 18  # tokens per block when packing the minhashes into signatures


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping multiply): a bijective 64-bit mixer."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _salts(seed: int, n: int) -> np.ndarray:
    """(n,) uint64 per-hash-function salts from SplitMix64 of ``seed``."""
    state = (seed ^ 0x5EED5EED5EED5EED) & ((1 << 64) - 1)
    out = np.zeros(n, dtype=np.uint64)
    for i in range(n):
        state, r = splitmix64(state)
        out[i] = r
    return out


@dataclass
class SignatureTable:
    """Sorted token hashes -> 64-bit minhash signatures, with a token-hash fallback.

    tokens:      (U,) int64, strictly increasing token hashes that have a signature
    signatures:  (U,) int64, packed 16 x 4-bit minhash values of each token
    meta:        how the table was made (set kind, sample size, seed, ...), JSON-able
    """

    tokens: np.ndarray
    signatures: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.int64)
        self.signatures = np.ascontiguousarray(self.signatures, dtype=np.int64)
        if self.tokens.ndim != 1 or self.tokens.shape != self.signatures.shape:
            raise ValueError(
                f"signature table: tokens {self.tokens.shape} and signatures "
                f"{self.signatures.shape} must be 1-D of one length"
            )
        if len(self.tokens) > 1 and not (self.tokens[1:] > self.tokens[:-1]).all():
            raise ValueError("signature table: tokens must be strictly increasing (sorted, unique)")

    @classmethod
    def empty(cls) -> SignatureTable:
        """A table that resolves every token to its own hash (pure random allocation)."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), {"version": SIGNATURE_VERSION})

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes a server holds for this table (token hashes + signatures)."""
        return int(self.tokens.nbytes + self.signatures.nbytes)

    def contains(self, tokens: np.ndarray) -> np.ndarray:
        """Bool array of ``tokens``' shape: which tokens have a signature."""
        t = np.asarray(tokens, dtype=np.int64)
        if len(self.tokens) == 0:
            return np.zeros(t.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.tokens, t), len(self.tokens) - 1)
        return self.tokens[pos] == t

    def lookup(self, tokens: np.ndarray) -> np.ndarray:
        """Keys for hashing, any shape int64 -> same shape int64: signature where present, else
        the token hash itself."""
        t = np.asarray(tokens, dtype=np.int64)
        if len(self.tokens) == 0:
            return t.copy()
        pos = np.minimum(np.searchsorted(self.tokens, t), len(self.tokens) - 1)
        hit = self.tokens[pos] == t
        return np.where(hit, self.signatures[pos], t)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for an ``.npz`` (``sig_tokens``, ``sig_values``, ``sig_meta`` JSON string)."""
        return {
            "sig_tokens": self.tokens,
            "sig_values": self.signatures,
            "sig_meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> SignatureTable:
        meta_raw = arrays.get("sig_meta")
        meta = json.loads(str(np.asarray(meta_raw))) if meta_raw is not None else {}
        return cls(np.asarray(arrays["sig_tokens"]), np.asarray(arrays["sig_values"]), meta)

    def save(self, path: str | Path) -> None:
        np.savez(Path(path), **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> SignatureTable:
        with np.load(Path(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        version = json.loads(str(arrays.get("sig_meta", "{}"))).get("version", SIGNATURE_VERSION)
        if version != SIGNATURE_VERSION:
            raise ValueError(
                f"{path}: signature table version {version}, this build reads {SIGNATURE_VERSION}; "
                "recompute the signatures with this version"
            )
        return cls.from_arrays(arrays)


def _group_min(sorted_vals: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.minimum.reduceat(sorted_vals, starts)


def _field_starts(slot_fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column index where each field's (contiguous) slots start, and each slot's field index."""
    sf = np.asarray(slot_fields, dtype=np.int64)
    if len(sf) and (np.diff(sf) < 0).any():
        raise ValueError("slot_fields must be non-decreasing (a field's slots are contiguous)")
    starts = np.flatnonzero(np.r_[True, sf[1:] != sf[:-1]]) if len(sf) else np.zeros(0, np.int64)
    field_of_slot = np.cumsum(np.r_[True, sf[1:] != sf[:-1]]) - 1 if len(sf) else sf
    return starts, field_of_slot


def _token_counts(chunks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct non-padding tokens of all chunks and their counts (``np.unique`` of the
    concatenation, computed chunk by chunk: memory in distinct tokens, not in rows). Per-chunk
    counts are merged into the totals once they are as many as the totals."""
    tot_t, tot_c = np.zeros(0, np.int64), np.zeros(0, np.int64)
    pend_t: list[np.ndarray] = []
    pend_c: list[np.ndarray] = []
    pending = 0
    for chunk in chunks:
        u, k = np.unique(chunk[chunk != PAD_TOKEN], return_counts=True)
        pend_t.append(u)
        pend_c.append(k.astype(np.int64))
        pending += len(u)
        if pending >= max(len(tot_t), 1 << 16):
            tot_t, tot_c = _merge_counts([tot_t, *pend_t], [tot_c, *pend_c])
            pend_t, pend_c, pending = [], [], 0
    if pend_t:
        tot_t, tot_c = _merge_counts([tot_t, *pend_t], [tot_c, *pend_c])
    return tot_t, tot_c


def sample_rows(n_rows: int, n_sample: int | None, seed: int) -> np.ndarray:
    """Sorted (R,) int64 ids of the sampled rows: all rows when ``n_sample`` is None or >= n."""
    if n_sample is None or n_sample >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=n_sample, replace=False)).astype(np.int64)


def compute_signatures(
    tokens: np.ndarray,
    *,
    set_kind: str = "rows",
    n_sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    min_count: int = DEFAULT_MIN_COUNT,
    seed: int = 0,
    slot_fields: list[int] | np.ndarray | None = None,
    chunk_rows: int = 32_768,
    progress: bool = False,
) -> SignatureTable:
    """Minhash signatures of the tokens of training rows.

    tokens:        (N, S) int64 token matrix (numpy array, memmap, or anything indexed by an
                   array of row ids, e.g. :class:`lma.data.store.RowsView`); 0 is padding
    set_kind:      "rows" or "cooccur" (see module docstring)
    n_sample_rows: rows sampled (seeded, without replacement); None or >= N uses all rows
    min_count:     a token needs this many occurrences in the sample to get a signature (and, for
                   ``cooccur``, to count as an element of other tokens' sets)
    slot_fields:   (S,) field index of each column (``schema.slot_fields()``); default: one field
                   per column. Only ``cooccur`` uses it.
    returns:       a :class:`SignatureTable`
    """
    if set_kind not in SET_KINDS:
        raise ValueError(f"set_kind must be one of {SET_KINDS}, got {set_kind!r}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, S), got shape {tokens.shape}")
    n, s = tokens.shape
    rows = sample_rows(n, n_sample_rows, seed)
    sf = np.arange(s) if slot_fields is None else np.asarray(slot_fields, dtype=np.int64)
    if len(sf) != s:
        raise ValueError(f"slot_fields has {len(sf)} entries for {s} token columns")
    field_starts, field_of_slot = _field_starts(sf)

    def sample_chunks() -> Iterator[tuple[int, np.ndarray]]:
        # The sample is read a chunk at a time, twice (counts, then minhashes), so its (R, S)
        # matrix is never held whole: ``tokens`` may be a lazy view of rows on disk.
        for a in range(0, len(rows), chunk_rows):
            yield a, np.asarray(tokens[rows[a : a + chunk_rows]], dtype=np.int64)

    uniq, counts = _token_counts(c for _, c in sample_chunks())
    vocab = uniq[counts >= max(min_count, 1)]  # (U,) sorted token hashes with a signature
    meta = {
        "version": SIGNATURE_VERSION,
        "set_kind": set_kind,
        "n_sample_rows": int(len(rows)),
        "n_rows": int(n),
        "min_count": int(min_count),
        "seed": int(seed),
        "n_hashes": NIBBLES,
        "bits": SUBKEY_BITS,
    }
    if len(vocab) == 0:
        logger.warning("signatures: no token reaches min_count=%d in %d sampled rows", min_count, len(rows))
        return SignatureTable(np.zeros(0, np.int64), np.zeros(0, np.int64), meta)

    salts = _salts(seed, 2 * NIBBLES)  # first 16 order the elements, last 16 pick the nibbles
    mins = np.full((NIBBLES, len(vocab)), _UMAX, dtype=np.uint64)  # running minhash per token
    bar = tqdm(total=len(rows), unit="rows", desc=f"signatures ({set_kind})", disable=not progress)
    for a, chunk in sample_chunks():  # chunk: (c, S)
        pos = np.minimum(np.searchsorted(vocab, chunk), len(vocab) - 1)
        valid = vocab[pos] == chunk  # (c, S): entries whose token gets a signature
        r_idx, s_idx = np.nonzero(valid)
        tid = pos[r_idx, s_idx]  # (n,) token index of each valid entry
        if len(tid) == 0:
            bar.update(len(chunk))
            continue
        order = np.argsort(tid, kind="stable")
        tid_sorted = tid[order]
        starts = np.flatnonzero(np.r_[True, tid_sorted[1:] != tid_sorted[:-1]])
        utid = tid_sorted[starts]  # tokens present in this chunk
        if set_kind == "rows":
            row_ids = rows[a : a + len(chunk)].astype(np.uint64)  # element = original row id
        else:
            elem = chunk.view(np.uint64)
            entry_field = field_of_slot[s_idx]  # (n,)
        for i in range(NIBBLES):
            if set_kind == "rows":
                vals = _mix64(row_ids ^ salts[i])[r_idx]  # (n,)
            else:
                # Min over the row's elements outside the token's own field: per row keep the
                # smallest per-field minimum and the smallest from any other field.
                h = np.where(valid, _mix64(elem ^ salts[i]), _UMAX)  # (c, S)
                fmin = np.minimum.reduceat(h, field_starts, axis=1)  # (c, F)
                f1 = fmin.argmin(axis=1)  # (c,)
                rr = np.arange(len(chunk))
                m1 = fmin[rr, f1]
                fmin[rr, f1] = _UMAX
                m2 = fmin.min(axis=1)
                vals = np.where(entry_field == f1[r_idx], m2[r_idx], m1[r_idx])  # (n,)
            gmin = _group_min(vals[order], starts)
            mins[i, utid] = np.minimum(mins[i, utid], gmin)
        bar.update(len(chunk))
    bar.close()

    has_set = mins[0] != _UMAX  # cooccur: tokens that never met another field's element
    shifts = (np.arange(NIBBLES, dtype=np.uint64) * np.uint64(SUBKEY_BITS))[:, None]
    sig = np.empty(len(vocab), np.int64)
    # Packed a block of tokens at a time: the mixing's (16, block) temporaries, not (16, U) ones.
    for a in range(0, len(vocab), _PACK_TOKENS):
        m = mins[:, a : a + _PACK_TOKENS]
        nib = _mix64(m ^ salts[NIBBLES:, None]) & np.uint64((1 << SUBKEY_BITS) - 1)  # (16, u)
        sig[a : a + m.shape[1]] = np.bitwise_or.reduce(nib << shifts, axis=0).view(np.int64)
    del mins
    meta["n_tokens"] = int(has_set.sum())
    logger.info(
        "signatures (%s): %d tokens signed from %d sampled rows (%d distinct tokens seen)",
        set_kind, int(has_set.sum()), len(rows), len(uniq),
    )
    return SignatureTable(vocab[has_set], sig[has_set], meta)
