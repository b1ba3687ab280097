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


def hash_column(field: str, values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
    """Token hash v1 of every value of one column: (N,) int64.

    ``values`` may be a pyarrow string/binary array (fast path, no Python loop per value) or any
    sequence of str/None.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=object), type=pa.string())
    if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)):
        values = pc.cast(values, pa.string())
    values = values.cast(pa.large_binary())
    n = len(values)
    prefix = _fnv1a_py(FNV_OFFSET, field.encode("utf-8"))
    missing_token = token_hash(field, None)
    if n == 0:
        return np.zeros(0, dtype=np.int64)

    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[values.offset : values.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(1, np.uint8)
    if len(data) == 0:
        data = np.zeros(1, np.uint8)
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    valid = np.asarray(values.is_valid()) & (lens > 0)

    h = np.full(n, _fnv1a_py(prefix, bytes([SEP_VALUE])), dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    rows = np.flatnonzero(valid)
    max_len = int(lens[rows].max()) if len(rows) else 0
    last = len(data) - 1
    for j in range(max_len):
        # Rows still active at byte j; lengths are sorted out by shrinking the active set.
        rows = rows[lens[rows] > j]
        b = data[np.minimum(starts[rows] + j, last)].astype(np.uint64)
        h[rows] = (h[rows] ^ b) * prime
    out = _fmix64_np(h).view(np.int64)
    out[out == 0] = 1
    out[~valid] = missing_token
    return out
