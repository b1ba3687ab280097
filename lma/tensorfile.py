"""A numpy-only reader and writer of the safetensors layout (no pickle, memory-mapped reads).

Layout: 8 bytes little-endian header length N, N bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, padded with spaces), then the
tensors' bytes, offsets relative to the end of the header. Files written here are read by the
``safetensors`` package and the other way round (tests/test_bundle_format.py checks both).
Bundles keep their weights in one such file, which ``model.onnx`` also points into.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES = {v: k for k, v in DTYPES.items()}
# The first tensor starts on a page boundary, so the largest one (written first) can be mapped.
ALIGN = 4096


class TensorFileError(ValueError):
    """A tensor file that cannot be read (truncated, bad header, unknown dtype)."""


def header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data section)."""
    p = Path(path)
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TensorFileError(f"{p}: too short for a tensor file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise TensorFileError(f"{p}: header of {n} bytes is not plausible")
        try:
            h = json.loads(f.read(n))
        except ValueError as exc:
            raise TensorFileError(f"{p}: bad header ({exc})") from None
    if not isinstance(h, dict):
        raise TensorFileError(f"{p}: the header is not a JSON object")
    return h, 8 + n


def read(path: str | Path, names: Iterable[str] | None = None, *,
         private: bool = False) -> dict[str, np.ndarray]:
    """Tensors of ``path`` as copy-on-write memory maps (nothing is read until used), or with
    ``private`` read into arrays of the process's own (anonymous) memory. Mapped pages are the
    page cache's, shared by every process that maps the file; private arrays cost their bytes
    per process but may be backed by transparent huge pages, which file pages are not (fewer
    TLB misses for scattered reads of a large table)."""
    p = Path(path)
    h, start = header(p)
    size = p.stat().st_size
    out: dict[str, np.ndarray] = {}
    wanted = None if names is None else set(names)
    if wanted is not None and (absent := sorted(wanted - set(h))):
        raise TensorFileError(f"{p}: no tensor named {', '.join(map(repr, absent[:5]))}")
    with open(p, "rb", buffering=0) if private else contextlib.nullcontext() as f:
        for name, info in h.items():
            if name == "__metadata__" or (wanted is not None and name not in wanted):
                continue
            out[name] = _tensor(p, f, name, info, start, size)
    return out


def _tensor(p: Path, f: Any, name: str, info: Any, start: int, size: int) -> np.ndarray:
    """One tensor of the file: mapped (``f`` None) or read from ``f`` into a new array."""
    if not isinstance(info, dict):
        raise TensorFileError(f"{p}: tensor {name!r}: bad entry {info!r}")
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        b, e = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TensorFileError(f"{p}: tensor {name!r}: bad entry {info!r} ({exc})") from None
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if e - b != n * dtype.itemsize or start + e > size or b < 0:
        raise TensorFileError(f"{p}: tensor {name!r}: offsets {b}..{e} do not fit its shape "
                              f"{shape} {info['dtype']} or the file ({size} bytes)")
    if n == 0:
        return np.empty(shape, dtype)
    if f is None:
        return np.memmap(p, dtype=dtype, mode="c", offset=start + b, shape=shape)
    a = np.empty(shape, dtype)
    view = memoryview(a.reshape(-1).view(np.uint8))
    f.seek(start + b)
    got = 0
    while got < len(view):  # a raw read may return fewer bytes than asked
        k = f.readinto(view[got:])
        if not k:
            raise TensorFileError(f"{p}: tensor {name!r}: the file ended after {got} of its "
                                  f"{len(view)} bytes")
        got += k
    return a


def write(path: str | Path, tensors: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Write ``tensors`` (largest first); returns each one's absolute (offset, length) in the
    file, as ONNX external-data references need them."""
    items = sorted(tensors.items(), key=lambda kv: -kv[1].nbytes)
    h: dict[str, Any] = {}
    pos = 0
    for name, a in items:
        if a.dtype not in CODES:
            raise TensorFileError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        h[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    if metadata:
        h["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(h, separators=(",", ":")).encode()
    n = len(text) + (-(8 + len(text)) % ALIGN)
    text = text + b" " * (n - len(text))
    refs = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(text)
        for name, a in items:
            refs[name] = (8 + n + h[name]["data_offsets"][0], a.nbytes)
            if a.nbytes:
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    return refs
