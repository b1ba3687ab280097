"""Data sources: the common streaming, encoding and bad-line handling of every reader.

A reader (CSV, Parquet, synthetic, in-memory) only produces raw pyarrow tables with the 1-based
line (or row) number of each row, plus the lines it could not parse at all. :class:`DataSource`
re-batches them into chunks of exactly ``chunk_rows`` rows, encodes each chunk with
:func:`lma.features.encode_with_errors`, and then either raises :class:`BadDataError` for the first
bad line (``on_error="fail"``) or drops exactly the bad rows and counts them (``"skip"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lma.features import Encoded, EncodeError, encode_with_errors
from lma.schema import Schema

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
MAX_EXAMPLES = 20


class BadDataError(ValueError):
    """A malformed line; the message names the source, the line number, the column and the problem."""

    def __init__(self, source: str, line: int, column: str | None, reason: str, unit: str = "line"):
        self.source = source
        self.line = int(line)
        self.column = column
        self.reason = reason
        hint = " (use on_error='skip' / --on-error skip to drop bad lines)"
        super().__init__(f"{source}: {unit} {self.line}: {reason}{hint}")


@dataclass
class BadLineReport:
    """Bad lines met while iterating: how many, and the first few (line number, reason)."""

    count: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)
    max_examples: int = MAX_EXAMPLES

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((int(line), reason))

    def to_dict(self) -> dict[str, object]:
        return {"count": self.count, "examples": [list(e) for e in self.examples]}

    def __str__(self) -> str:
        if not self.count:
            return "no bad lines"
        first = "; ".join(f"line {ln}: {r}" for ln, r in self.examples[:3])
        return f"{self.count} bad line(s), first: {first}"


@dataclass
class RawChunk:
    """What a reader yields: raw rows, their 1-based line numbers, and unparseable lines."""

    table: pa.Table
    lines: np.ndarray  # (N,) int64
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), ascending


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """Concatenate encoded chunks (row order kept). Optional arrays survive only if all parts have them."""
    if not parts:
        raise ValueError("concat_encoded: no parts to concatenate")
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        arrs = [getattr(p, name) for p in parts]
        if all(a is None for a in arrs):
            return None
        if any(a is None for a in arrs):
            if name == "labels":
                raise ValueError("concat_encoded: some parts have labels and some do not")
            return None
        return np.concatenate(arrs)

    return Encoded(
        dense=np.concatenate([p.dense for p in parts]),
        tokens=np.concatenate([p.tokens for p in parts]),
        labels=cat("labels"),
        line_numbers=cat("line_numbers"),
        times=cat("times"),
    )


def take(enc: Encoded, idx: np.ndarray) -> Encoded:
    """Rows ``idx`` (integer indices or a boolean mask) of an encoded set, as a new Encoded."""
    idx = np.asarray(idx)
    if idx.dtype == bool:
        if len(idx) != len(enc):
            raise ValueError(f"take: mask of length {len(idx)} for {len(enc)} rows")
        idx = np.flatnonzero(idx)

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[idx]

    return Encoded(
        dense=enc.dense[idx],
        tokens=enc.tokens[idx],
        labels=pick(enc.labels),
        line_numbers=pick(enc.line_numbers),
        times=pick(enc.times),
    )


def empty_encoded(schema: Schema, labelled: bool) -> Encoded:
    return Encoded(
        dense=np.zeros((0, len(schema.dense)), np.float32),
        tokens=np.zeros((0, schema.n_token_slots), np.int64),
        labels=np.zeros(0, np.float32) if labelled else None,
        line_numbers=np.zeros(0, np.int64),
        times=np.zeros(0, np.int64) if schema.time_column else None,
    )


class DataSource:
    """One opened dataset: stream it with :meth:`iter_chunks` or load it with :meth:`read_all`.

    ``errors`` is reset at the start of each pass and filled while iterating.
    Subclasses implement :meth:`_iter_raw`.
    """

    unit = "line"  # what the 1-based numbers count: file lines (CSV) or rows (Parquet, synthetic)

    def __init__(
        self,
        schema: Schema,
        name: str,
        *,
        on_error: str = "fail",
        chunk_rows: int = 65536,
        progress: bool = False,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.schema = schema
        self.name = name
        self.on_error = on_error
        self.chunk_rows = int(chunk_rows)
        self.progress = progress
        self.errors = BadLineReport()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def labelled(self) -> bool:
        return self.schema.label is not None

    # -- to implement -------------------------------------------------------------------------

    def _iter_raw(self) -> Iterator[RawChunk]:
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------

    def iter_chunks(self) -> Iterator[Encoded]:
        """Encoded chunks of ``chunk_rows`` rows (the last may be shorter), in file order."""
        for _, enc in self.iter_tables():
            yield enc

    def iter_tables(self) -> Iterator[tuple[pa.Table, Encoded]]:
        """Like :meth:`iter_chunks`, with each chunk's raw rows (bad rows removed) alongside."""
        self.errors = BadLineReport()
        for table, lines, bad in self._rebatch(self._iter_raw()):
            out = self._encode(table, lines, bad)
            if out is not None:
                yield out
        if self.errors.count:
            log.warning("%s: skipped %s", self.name, self.errors)

    def read_all(self) -> Encoded:
        """All rows in one :class:`Encoded` (concatenation of :meth:`iter_chunks`)."""
        parts = list(self.iter_chunks())
        if not parts:
            return empty_encoded(self.schema, self.labelled)
        return concat_encoded(parts)

    # -- internals ----------------------------------------------------------------------------

    def _rebatch(
        self, raw: Iterator[RawChunk]
    ) -> Iterator[tuple[pa.Table, np.ndarray, list[tuple[int, str]]]]:
        """Exactly ``chunk_rows`` rows per chunk, each with the unparseable lines up to its end."""
        tables: list[pa.Table] = []
        lines: list[np.ndarray] = []
        bad: list[tuple[int, str]] = []
        n = 0
        for rc in raw:
            if rc.table.num_rows:
                tables.append(rc.table)
                lines.append(np.asarray(rc.lines, dtype=np.int64))
                n += rc.table.num_rows
            bad.extend(rc.bad)
            while n >= self.chunk_rows:
                table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
                ln = np.concatenate(lines) if len(lines) > 1 else lines[0]
                k = self.chunk_rows
                last = int(ln[k - 1])
                now = [b for b in bad if b[0] <= last]
                bad = [b for b in bad if b[0] > last]
                yield table.slice(0, k), ln[:k], now
                rest = table.slice(k)
                tables, lines, n = (
                    ([rest], [ln[k:]], rest.num_rows) if rest.num_rows else ([], [], 0)
                )
        if n or bad:
            if tables:
                table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
                ln = np.concatenate(lines)
            else:
                table, ln = None, np.zeros(0, np.int64)
            yield table, ln, bad

    def _encode(
        self, table: pa.Table | None, lines: np.ndarray, bad: list[tuple[int, str]]
    ) -> tuple[pa.Table, Encoded] | None:
        errors: list[EncodeError] = []
        enc = None
        if table is not None and table.num_rows:
            enc, errors = encode_with_errors(self.schema, table, lines)
        if not bad and not errors:
            return (table, enc) if enc is not None else None

        # Every bad row once, with the first reason found for it.
        bad_rows = (
            np.unique(np.concatenate([e.rows for e in errors])) if errors else np.zeros(0, np.int64)
        )
        events = sorted(
            [(ln, None, r) for ln, r in bad] + [(int(lines[r]), int(r), None) for r in bad_rows],
            key=lambda e: e[0],
        )

        def reason_of(row: int) -> tuple[str | None, str]:
            for e in errors:
                i = int(np.searchsorted(e.rows, row))
                if i < len(e.rows) and e.rows[i] == row:
                    return e.column, e.reason(i)
            return None, "bad value"

        if self.on_error == "fail":
            line, row, reason = events[0]
            column = None
            if row is not None:
                column, reason = reason_of(row)
            raise BadDataError(self.name, line, column, reason or "bad line", self.unit)

        room = max(self.errors.max_examples - len(self.errors.examples), 0)
        for line, row, reason in events[:room]:
            if row is not None:
                reason = reason_of(row)[1]
            self.errors.add(line, reason or "bad line")
        self.errors.count += max(len(events) - room, 0)
        if enc is None:
            return None
        keep = np.ones(len(enc), dtype=bool)
        keep[bad_rows] = False
        if keep.all():
            return table, enc
        keep_idx = np.flatnonzero(keep)
        return table.take(pa.array(keep_idx)), take(enc, keep_idx)


def drop_blank_rows(table: pa.Table, lines: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """Remove rows whose every column is empty (blank lines of a text file)."""
    if table.num_rows == 0 or table.num_columns == 0:
        return table, lines
    first = table.column(0)
    if not (pa.types.is_string(first.type) or pa.types.is_large_string(first.type)):
        return table, lines
    cand = np.flatnonzero(np.asarray(pc.fill_null(pc.equal(pc.utf8_length(first), 0), True)))
    if len(cand) == 0:
        return table, lines
    sub = table.take(pa.array(cand))
    blank = np.ones(len(cand), dtype=bool)
    for col in sub.columns:
        blank &= np.asarray(pc.fill_null(pc.equal(pc.utf8_length(col), 0), True))
    if not blank.any():
        return table, lines
    keep = np.ones(table.num_rows, dtype=bool)
    keep[cand[blank]] = False
    idx = np.flatnonzero(keep)
    return table.take(pa.array(idx)), lines[idx]
