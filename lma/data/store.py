"""Encoded rows on disk: the out-of-core training path's one copy of the data.

A streaming pass over a :class:`~lma.data.base.DataSource` writes each encoded chunk as
fixed-size records (tokens int64, dense float32, label float32, time) to one file; training then
reads rows back by index with positioned reads (``os.preadv``) into buffers of its own, a chunk
of at most ``CHUNK_ROWS`` records at a time. Peak memory does not grow with the row count: only
the rows asked for are materialised, and nothing of the file is mapped into the process.

Why not a memory map: a page fault on a file mapping maps the whole page-cache folio around
the faulting page, and on current kernels (large folios, e.g. ext4 on Linux 6.x) that is up to
2 MB per random row, not 4 KB. A 4096-row random batch of a multi-GB file then maps most of the
file into the process (measured: 1 row mapped 0.5-2 MB, 1000 random rows of a 1M-row file the
whole 251 MB), so the trainer's resident set grew by the file's 264 bytes per row however often
the mapping was dropped (docs/RESULTS.md, "Out-of-core training"). Reads into private buffers
cost ~1.3 us per random row from the page cache (a 4096-row batch in ~5 ms) and keep the
resident set at the batch. The file's pages stay in the kernel's page cache, which is not the
process's memory (a cgroup limit does count it, and the kernel reclaims it under pressure).
"""

from __future__ import annotations

import json
import logging
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


# Records read per positioned-read pass (the private record buffer is at most this many rows).
CHUNK_ROWS = 1 << 16
# Sorted rows closer than this many bytes apart are read in one call, the gap included: copying
# a few KB from the page cache costs less than a system call.
GAP_BYTES = 4096
# Runs shorter than this are read row by row (a buffer and a gather per run cost more).
MIN_RUN = 64


class EncodedStore:
    """Rows of one source, encoded, in ``directory/rows.bin`` (+ ``rows.json``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        info = json.loads((self.directory / "rows.json").read_text())
        if info.get("version") != STORE_VERSION:
            raise ValueError(f"{self.directory}: encoded-rows version {info.get('version')}, "
                             f"this build reads {STORE_VERSION}")
        time_dtype = np.dtype(info["time_dtype"]) if info.get("time_dtype") else None
        self.dtype = record_dtype(info["n_slots"], info["n_dense"], time_dtype)
        self.n = int(info["rows"])
        self.labelled = bool(info["labelled"])
        self._fd: int | None = os.open(self.directory / "rows.bin", os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size < self.n * self.dtype.itemsize:
            os.close(self._fd)
            self._fd = None
            raise ValueError(f"{self.directory}/rows.bin holds {size} bytes, fewer than the "
                             f"{self.n} records of {self.dtype.itemsize} bytes rows.json names")

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
            try:
                store = cls(d)
            except (OSError, ValueError):
                store = None  # a missing or truncated file: write it again
            if store is not None:
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

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.directory}: the encoded-rows store is closed")
        return self._fd

    def _pread(self, buf: np.ndarray, first: int) -> None:
        """Fill the record array ``buf`` with records ``first, first + 1, ...`` of the file."""
        view = memoryview(buf.view(np.uint8).reshape(-1))
        got = os.preadv(self._open_fd(), [view], first * self.dtype.itemsize)
        if got != len(view):
            raise OSError(f"{self.directory}/rows.bin: short read at record {first} "
                          f"({got} of {len(view)} bytes); was the file truncated?")

    def records(self, idx: np.ndarray) -> np.ndarray:
        """Records ``idx`` (in that order) as a structured array of their own. Reads sorted
        rows, one call per run of near rows; :meth:`take` and :meth:`tokens` call it a chunk
        of ``CHUNK_ROWS`` at a time."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty(len(idx), self.dtype)
        if len(idx) == 0:
            return out
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            bad = idx[(idx < 0) | (idx >= self.n)][0]
            raise IndexError(f"row {int(bad)} is out of range for {self.n} encoded rows")
        isz = self.dtype.itemsize
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        # Runs of sorted rows near enough to read in one call.
        gap = max(1, GAP_BYTES // isz)
        cut = np.flatnonzero(np.diff(rows) > gap) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [len(rows)]])
        long = ends - starts >= MIN_RUN
        alone = np.ones(len(rows), bool)
        for a, b in zip(starts[long].tolist(), ends[long].tolist(), strict=True):
            alone[a:b] = False
        flat = memoryview(out.view(np.uint8).reshape(-1))
        fd = self._open_fd()
        # A row of a short run goes straight into its place in ``out``, one call per row.
        for pos, row in zip(order[alone].tolist(), rows[alone].tolist(), strict=True):
            if os.preadv(fd, [flat[pos * isz:(pos + 1) * isz]], row * isz) != isz:
                raise OSError(f"{self.directory}/rows.bin: short read at record {row}")
        # Long runs: read spans of at most CHUNK_ROWS records (gaps included) into a buffer,
        # then pick the rows.
        for a, b in zip(starts[long].tolist(), ends[long].tolist(), strict=True):
            while a < b:
                first = int(rows[a])
                stop = a + int(np.searchsorted(rows[a:b], first + CHUNK_ROWS))
                span = np.empty(int(rows[stop - 1]) - first + 1, self.dtype)
                self._pread(span, first)
                out[order[a:stop]] = span[rows[a:stop] - first]
                a = stop
        return out

    def take(self, idx: np.ndarray) -> Encoded:
        """Rows ``idx`` (in that order) as an in-memory :class:`Encoded`."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(idx)
        has_time = "time" in self.dtype.names
        enc = Encoded(
            dense=np.empty((n, self.dtype["dense"].shape[0]), np.float32),
            tokens=np.empty((n, self.dtype["tokens"].shape[0]), np.int64),
            labels=np.empty(n, np.float32) if self.labelled else None,
            times=np.empty(n, self.dtype["time"]) if has_time else None,
        )
        for a in range(0, n, CHUNK_ROWS):
            rec = self.records(idx[a : a + CHUNK_ROWS])
            b = a + len(rec)
            enc.dense[a:b] = rec["dense"]
            enc.tokens[a:b] = rec["tokens"]
            if enc.labels is not None:
                enc.labels[a:b] = rec["label"]
            if enc.times is not None:
                enc.times[a:b] = rec["time"]
        return enc

    def tokens(self, idx: np.ndarray) -> np.ndarray:
        """The (len(idx), S) token matrix of rows ``idx``, read a chunk at a time (no record
        buffer of all of them)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.dtype["tokens"].shape[0]), np.int64)
        for a in range(0, len(idx), CHUNK_ROWS):
            out[a : a + CHUNK_ROWS] = self.records(idx[a : a + CHUNK_ROWS])["tokens"]
        return out

    def times(self) -> np.ndarray | None:
        """All rows' times (8 bytes per row in memory), or None without a time column."""
        if "time" not in self.dtype.names:
            return None
        out = np.empty(self.n, self.dtype["time"])
        buf = np.empty(min(CHUNK_ROWS, self.n), self.dtype)
        for a in range(0, self.n, CHUNK_ROWS):
            part = buf[: min(CHUNK_ROWS, self.n - a)]
            self._pread(part, a)
            out[a : a + len(part)] = part["time"]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        return self.store.tokens(self.idx[np.asarray(rows)])
