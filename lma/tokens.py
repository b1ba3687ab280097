"""Token hash v1: a stable 64-bit id for each (field, raw categorical value).

    token(field, value) = fix0(fmix64(FNV-1a-64(utf8(field) + 0x1F + utf8(value))))
    token(field, missing) = fix0(fmix64(FNV-1a-64(utf8(field) + 0x1E)))

read as a signed int64 (two's complement). ``fmix64`` is MurmurHash3's 64-bit finaliser, and
``fix0`` maps 0 to 1 because token 0 is reserved for padding of multi-valued fields. Empty strings
and nulls are missing. The same bytes give the same token in every process and on every machine
(no Python ``hash()``), and the vectorised numpy version below is checked against the scalar one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
SEP_VALUE = 0x1F
SEP_MISSING = 0x1E
PAD_TOKEN = 0


def _fnv1a_py(h: int, data: bytes) -> int:
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def _fmix64_py(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    h ^= h >> 33
    return h


def _to_int64(h: int) -> int:
    h = h or 1
    return h - (1 << 64) if h >= 1 << 63 else h


def token_hash(field: str, value: str | None) -> int:
    """Scalar reference of token hash v1 (use :func:`hash_column` for arrays)."""
    prefix = _fnv1a_py(FNV_OFFSET, field.encode("utf-8"))
    if value is None or value == "":
        return _to_int64(_fmix64_py(_fnv1a_py(prefix, bytes([SEP_MISSING]))))
    h = _fnv1a_py(prefix, bytes([SEP_VALUE]) + value.encode("utf-8"))
    return _to_int64(_fmix64_py(h))


def _fmix64_np(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _offsets_and_data(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n + 1,) int64 and data bytes of a string/binary array (large or not), zero-copy."""
    bufs = values.buffers()
    n = len(values)
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    off_dtype = np.int64 if large else np.int32
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[values.offset : values.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64, copy=False), data


def hash_column(field: str, values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
    """Token hash v1 of every value of one column: (N,) int64.

    ``values`` may be a pyarrow array (fast path, no Python loop per value; non-string arrays are
    cast to their string form) or any sequence of str/None.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not isinstance(values, pa.Array):
        values = pa.array(
            [None if v is None else v.decode() if isinstance(v, bytes) else str(v) for v in values],
            type=pa.string(),
        )
    if isinstance(values.type, pa.DictionaryType):
        values = values.dictionary_decode()
    if not (
        pa.types.is_string(values.type)
        or pa.types.is_binary(values.type)
        or pa.types.is_large_string(values.type)
        or pa.types.is_large_binary(values.type)
    ):
        values = pc.cast(values, pa.string())
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = _fnv1a_py(FNV_OFFSET, field.encode("utf-8"))
    missing_token = token_hash(field, None)
    offsets, data = _offsets_and_data(values)
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    valid = lens > 0
    if values.null_count:
        valid &= np.asarray(values.is_valid())

    h = np.full(n, missing_token, dtype=np.int64)
    init = np.uint64(_fnv1a_py(prefix, bytes([SEP_VALUE])))
    prime = np.uint64(FNV_PRIME)
    width = int(lens[0])
    if width > 0 and (offsets[-1] - offsets[0]) == width * n and (lens == width).all():
        # Every slot (nulls included) holds `width` bytes back to back: hash all, then mask.
        mat = data[int(offsets[0]) : int(offsets[-1])].reshape(n, width)
        hv = np.full(n, init, dtype=np.uint64)
        for j in range(width):
            hv ^= mat[:, j]
            hv *= prime
        out = _fmix64_np(hv).view(np.int64)
        out[out == 0] = 1
        return np.where(valid, out, h)
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        return h
    lr = lens[rows]
    lmin, lmax = int(lr.min()), int(lr.max())
    first, end = int(starts[rows[0]]), int(offsets[rows[-1] + 1])
    hv = np.full(len(rows), init, dtype=np.uint64)
    if lmin == lmax and end - first == lmin * len(rows):
        # Fixed-width values stored back to back (e.g. Criteo's 8 hex digits, missing cells
        # take no bytes): a (rows, width) byte matrix, one column per step, no gathers.
        mat = data[first:end].reshape(len(rows), lmin)
        for j in range(lmin):
            hv ^= mat[:, j]
            hv *= prime
    else:
        # Sort by length, longest first: the rows still active at byte j are a prefix.
        order = np.argsort(-lr, kind="stable")
        rows, lr = rows[order], lr[order]
        st = starts[rows]
        asc = lr[::-1]
        for j in range(lmax):
            k = len(lr) - int(np.searchsorted(asc, j, side="right"))
            part = hv[:k]
            part ^= data[st[:k] + j]
            part *= prime
    out = _fmix64_np(hv).view(np.int64)
    out[out == 0] = 1
    h[rows] = out
    return h
