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


def field_seed(field: str) -> int:
    """FNV-1a state after ``utf8(field) + 0x1F``: where every value of ``field`` starts hashing."""
    return _fnv1a_py(FNV_OFFSET, field.encode("utf-8") + bytes([SEP_VALUE]))


def _as_text_array(values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> pa.Array:
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
    return values


# Up to _PAD_MAX_VALUES values of up to _PAD_WIDTH bytes are hashed from one padded (width, n)
# byte matrix (fewest numpy calls: what a small request needs); more or longer values by a loop
# over byte positions of the values sorted by length (no padding memory; faster for large n).
_PAD_WIDTH = 48
_PAD_MAX_VALUES = 8192


def _fnv_bytes(
    data: np.ndarray, starts: np.ndarray, lens: np.ndarray, seeds: np.ndarray
) -> np.ndarray:
    """FNV-1a-64 of ``data[starts[i] : starts[i] + lens[i]]`` from state ``seeds[i]`` (lens > 0)."""
    n = len(lens)
    prime = np.uint64(FNV_PRIME)
    hv = np.array(seeds, dtype=np.uint64, copy=True)
    lmin, lmax = int(lens.min()), int(lens.max())
    first = int(starts[0])
    if lmin == lmax and int(starts[-1]) + lmax - first == lmax * n:
        # Equal-length values back to back (Criteo's 8 hex digits, missing cells take no bytes):
        # a (n, width) view of the data, one column per step, no gathers.
        mat = data[first : first + lmax * n].reshape(n, lmax)
        for j in range(lmax):
            hv ^= mat[:, j]
            hv *= prime
        return hv
    if n > _PAD_MAX_VALUES:
        return _fnv_sorted(data, starts, lens, hv)
    if lmax > _PAD_WIDTH:
        long = lens > _PAD_WIDTH
        if not long.all():
            short = ~long
            hv[short] = _fnv_bytes(data, starts[short], lens[short], hv[short])
        hv[long] = _fnv_long(data, starts[long], lens[long], hv[long])
        return hv
    # One gather into a (width, n) matrix; the state after byte j is kept for the values that
    # end there, so padding bytes never reach a result.
    idx = starts[None, :] + np.arange(lmax, dtype=np.int64)[:, None]
    np.minimum(idx, len(data) - 1, out=idx)
    mat = data[idx]
    states = np.empty((lmax, n), dtype=np.uint64)
    for j in range(lmax):
        hv ^= mat[j]
        hv *= prime
        states[j] = hv
    return states[lens - 1, np.arange(n)]


def _fnv_long(data: np.ndarray, starts: np.ndarray, lens: np.ndarray, hv: np.ndarray) -> np.ndarray:
    """:func:`_fnv_bytes` for long values: a Python loop over each value's bytes when there are
    few of them (one numpy step per byte position costs more than a few Python steps), else the
    length-sorted loop."""
    if len(lens) <= 16:
        return np.array(
            [
                _fnv1a_py(int(h), data[s : s + ln].tobytes())
                for h, s, ln in zip(hv.tolist(), starts.tolist(), lens.tolist(), strict=True)
            ],
            dtype=np.uint64,
        )
    return _fnv_sorted(data, starts, lens, hv)


def _fnv_sorted(
    data: np.ndarray, starts: np.ndarray, lens: np.ndarray, hv: np.ndarray
) -> np.ndarray:
    # Sort by length, longest first: the values still active at byte j are a prefix.
    prime = np.uint64(FNV_PRIME)
    n = len(lens)
    order = np.argsort(-lens, kind="stable")
    lr, st, hs = lens[order], starts[order], hv[order]
    asc = lr[::-1]
    for j in range(int(lr[0])):
        k = n - int(np.searchsorted(asc, j, side="right"))
        part = hs[:k]
        part ^= data[st[:k] + j]
        part *= prime
    out = np.empty_like(hs)
    out[order] = hs
    return out


def hash_seeded(values: pa.Array, seeds: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Token hash v1 of values that belong to different fields, in one vectorised pass: (N,) int64.

    ``values`` is a string/binary array; ``seeds[i]`` is :func:`field_seed` of value i's field and
    ``missing[i]`` that field's missing token (used for nulls and empty values).
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets, data = _offsets_and_data(values)
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    valid = lens > 0
    if values.null_count:
        valid &= np.asarray(values.is_valid())
    out = np.array(missing, dtype=np.int64, copy=True)
    if valid.all():
        hv = _fnv_bytes(data, starts, lens, seeds)
        res = _fmix64_np(hv).view(np.int64)
        res[res == 0] = 1
        return res
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        return out
    hv = _fnv_bytes(data, starts[rows], lens[rows], np.asarray(seeds)[rows])
    res = _fmix64_np(hv).view(np.int64)
    res[res == 0] = 1
    out[rows] = res
    return out


def hash_column(field: str, values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
    """Token hash v1 of every value of one column: (N,) int64.

    ``values`` may be a pyarrow array (fast path, no Python loop per value; non-string arrays are
    cast to their string form) or any sequence of str/None.
    """
    values = _as_text_array(values)
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    seeds = np.full(n, field_seed(field), dtype=np.uint64)
    missing = np.full(n, token_hash(field, None), dtype=np.int64)
    return hash_seeded(values, seeds, missing)
