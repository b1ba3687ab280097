"""Encoded rows on disk: the out-of-core training path's one copy of the data.

A streaming pass over a :class:`~lma.data.base.DataSource` writes each encoded chunk as
fixed-size records (tokens int64, dense float32, label float32, time) to one file; training then
reads rows back by index through a read-only memory map. Peak memory does not grow with the
row count: only the rows of the current batch are materialised, and the pages a read touched are
dropped from the process (``madvise(MADV_DONTNEED)``) every ``release_bytes`` of reads, so the
file's pages stay in the kernel's page cache, not in the training process.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path

import numpy as np

from lma.data.base import DataSource
from lma.features import Encoded

log = logging.getLogger(__name__)

STORE_VERSION = 1


def record_dtype(n_slots: int, n_dense: int, time_dtype: np.dtype | None) -> np.dtype:
    fields: list[tuple] = [("tokens", np.int64, (n_slots,)), ("dense", np.float32, (n_dense,)),
                           ("label", np.float32)]
    if time_dtype is not None:
        fields.append(("time", time_dtype))
    return np.dtype(fields)


class EncodedStore:
    """Rows of one source, encoded, in ``directory/rows.bin`` (+ ``rows.json``)."""

    def __init__(self, directory: str | Path, release_bytes: int = 256 << 20):
        self.directory = Path(directory)
        info = json.loads((self.directory / "rows.json").read_text())
        if info.get("version") != STORE_VERSION:
            raise ValueError(f"{self.directory}: encoded-rows version {info.get('version')}, "
                             f"this build reads {STORE_VERSION}")
        time_dtype = np.dtype(info["time_dtype"]) if info.get("time_dtype") else None
        self.dtype = record_dtype(info["n_slots"], info["n_dense"], time_dtype)
        self.n = int(info["rows"])
        self.labelled = bool(info["labelled"])
        self._file = open(self.directory / "rows.bin", "rb")  # noqa: SIM115 - lives with the store
        if self.n:
            self._mm: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.records = np.frombuffer(self._mm, dtype=self.dtype, count=self.n)
        else:
            self._mm = None
            self.records = np.zeros(0, self.dtype)
        self.release_bytes = release_bytes
        self._read = 0

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def fingerprint(source: DataSource) -> dict[str, object]:
        """What identifies a source's rows: its name, bad-line policy, and for a file its size
        and modification time."""
        out: dict[str, object] = {"source": source.name, "on_error": source.on_error,
                                  "schema": source.schema.to_dict()}
        path = getattr(source, "path", None)
        if path is not None:
            st = os.stat(path)
            out["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return out

    @classmethod
    def open_or_write(cls, source: DataSource, directory: str | Path) -> EncodedStore:
        """The store in ``directory`` when it holds this source's rows (same fingerprint, whole
        file), else a fresh :meth:`write`."""
        d = Path(directory)
        try:
            info = json.loads((d / "rows.json").read_text())
        except (OSError, ValueError):
            info = None
        if info is not None and info.get("fingerprint") == json.loads(
                json.dumps(cls.fingerprint(source))):
            store = cls(d)
            if os.path.getsize(d / "rows.bin") == store.n * store.dtype.itemsize:
                log.info("%s: reusing %d encoded rows in %s", source.name, store.n, d)
                return store
            store.close()
        return cls.write(source, d)

    @classmethod
    def write(cls, source: DataSource, directory: str | Path) -> EncodedStore:
        """One streaming pass over ``source`` (encoding, bad-line handling as the source does)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "rows.json").unlink(missing_ok=True)  # the old description must not outlive its rows
        schema = source.schema
        n = 0
        dtype = None
        labelled = source.labelled
        with open(d / "rows.bin", "wb") as out:
            for enc in source.iter_chunks():
                if dtype is None:
                    dtype = record_dtype(schema.n_token_slots, len(schema.dense),
                                         None if enc.times is None else enc.times.dtype)
                    labelled = enc.labels is not None
                rec = np.empty(len(enc), dtype)
                rec["tokens"] = enc.tokens
                rec["dense"] = enc.dense
                rec["label"] = enc.labels if enc.labels is not None else 0.0
                if "time" in dtype.names:
                    rec["time"] = enc.times
                out.write(rec.tobytes())
                n += len(enc)
        time_dtype = dtype["time"].str if dtype is not None and "time" in dtype.names else None
        (d / "rows.json").write_text(json.dumps({
            "version": STORE_VERSION, "rows": n, "n_slots": schema.n_token_slots,
            "n_dense": len(schema.dense), "labelled": labelled, "time_dtype": time_dtype,
            "source": source.name, "fingerprint": cls.fingerprint(source),
        }))
        log.info("%s: %d encoded rows written to %s (%.1f MB)", source.name, n, d,
                 os.path.getsize(d / "rows.bin") / 1e6)
        return cls(d)

    # -- reads --------------------------------------------------------------------------------

    def _touch(self, rows: int) -> None:
        self._read += rows * max(self.dtype.itemsize, mmap.PAGESIZE)
        if self._read >= self.release_bytes:
            self.release()

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache)."""
        self._read = 0
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def take(self, idx: np.ndarray) -> Encoded:
        """Rows ``idx`` (in that order) as an in-memory :class:`Encoded`."""
        rec = self.records[np.asarray(idx)]
        self._touch(len(rec))
        return Encoded(
            dense=np.ascontiguousarray(rec["dense"]),
            tokens=np.ascontiguousarray(rec["tokens"]),
            labels=np.ascontiguousarray(rec["label"]) if self.labelled else None,
            times=np.ascontiguousarray(rec["time"]) if "time" in self.dtype.names else None,
        )

    def times(self) -> np.ndarray | None:
        """All rows' times (8 bytes per row in memory), or None without a time column."""
        if "time" not in self.dtype.names:
            return None
        out = np.empty(self.n, self.dtype["time"])
        step = 1 << 20
        for a in range(0, self.n, step):
            out[a : a + step] = self.records["time"][a : a + step]
            self._touch(min(step, self.n - a))
        return out

    def close(self) -> None:
        self.records = np.zeros(0, self.dtype)
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._file.close()


class RowsView:
    """The token matrix of ``store`` rows ``idx`` as a lazy (len(idx), S) array: indexing with
    row positions reads only those rows (what :func:`lma.signatures.compute_signatures` does
    with its sample)."""

    def __init__(self, store: EncodedStore, idx: np.ndarray):
        self.store, self.idx = store, np.asarray(idx)
        self.shape = (len(self.idx), store.dtype["tokens"].shape[0])
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.store.take(self.idx[np.asarray(rows)]).tokens
