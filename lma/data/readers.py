"""Readers for the ``--data`` spec forms: Criteo, Avazu, synthetic, and user CSV/Parquet tables.

CSV files are streamed with ``pyarrow.csv.open_csv`` (single-threaded, so that pyarrow reports
the line number of each malformed row), every column read as a string; Parquet files with
``ParquetFile.iter_batches``. Encoding and bad-line handling are shared (:mod:`lma.data.base`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from lma.data.base import DataSource, RawChunk, drop_blank_rows
from lma.schema import Schema, avazu_schema, criteo_schema

log = logging.getLogger(__name__)

SPEC_FORMS = (
    "criteo:PATH (Criteo Kaggle train TSV, 40 columns)",
    "criteo-test:PATH (Criteo Kaggle test TSV, 39 columns, no label)",
    "avazu:PATH (Avazu train CSV with header)",
    "synth:ROWS[:SEED][:PRESET][:KEY=VALUE...] (synthetic rows, Criteo schema; PRESET small | "
    "kaggle; keys zipf, cards, ctr, affinity, clusters, missing)",
    "table:PATH (CSV or Parquet described by a schema file)",
)
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
_PARQUET_SUFFIXES = {".parquet", ".pq", ".parq"}
_CSV_SUFFIXES = {".csv", ".tsv", ".txt"}


def source_columns(schema: Schema) -> list[str]:
    """The raw columns a schema reads (derived columns replaced by their sources)."""
    derived: set[str] = set()
    sources: list[str] = []
    if "avazu_hour" in schema.extra.get("derive", ()):
        derived = {"hour_of_day", "weekday"}
        sources = ["hour"]
    cols = ([schema.label] if schema.label else []) + schema.dense_names
    cols += [n for n in schema.categorical_names if n not in derived] + sources
    if schema.time_column:
        cols.append(schema.time_column)
    return list(dict.fromkeys(cols))


def _check_columns(name: str, schema: Schema, available: list[str], where: str) -> list[str]:
    needed = source_columns(schema)
    missing = [c for c in needed if c not in available]
    if missing:
        raise ValueError(
            f"{name}: column(s) {missing} of schema '{schema.name}' not found in {where} "
            f"(it has {len(available)} columns: {available[:50]})"
        )
    return needed


class CsvSource(DataSource):
    """A delimited text file (optionally .gz/.bz2/.zst/.lz4 compressed)."""

    def __init__(
        self,
        path: str | Path,
        schema: Schema,
        name: str | None = None,
        *,
        quote: bool = True,
        **kwargs: object,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        super().__init__(schema, name or f"table:{self.path}", **kwargs)  # type: ignore[arg-type]
        self.quote = quote
        self.compression = _COMPRESSION.get(self.path.suffix.lower())

    def _open(self) -> tuple[pa.NativeFile, pa.NativeFile]:
        raw = pa.OSFile(str(self.path), "rb")
        stream = pa.CompressedInputStream(raw, self.compression) if self.compression else raw
        return raw, stream

    def _header(self) -> list[str] | None:
        """Column names from the first line, or None for an empty file."""
        raw, stream = self._open()
        try:
            first = b""
            while not first.endswith(b"\n"):
                block = stream.read(1 << 16)
                if not block:
                    break
                first += block
                if b"\n" in first:
                    first = first[: first.index(b"\n") + 1]
                    break
        finally:
            raw.close()
        text = first.decode("utf-8-sig").rstrip("\r\n")
        if not text:
            return None
        quotechar = '"' if self.quote else None
        row = next(
            csv.reader(
                io.StringIO(text),
                delimiter=self.schema.delimiter,
                quotechar=quotechar,
                quoting=csv.QUOTE_MINIMAL if quotechar else csv.QUOTE_NONE,
            )
        )
        return [c.strip() for c in row]

    def _iter_raw(self) -> Iterator[RawChunk]:
        schema = self.schema
        header = schema.header
        if header:
            file_names = self._header()
            if file_names is None:
                return
            names = list(schema.column_names) if schema.column_names else file_names
            if len(names) != len(file_names):
                raise ValueError(
                    f"{self.name}: schema column_names has {len(names)} names, the header line "
                    f"has {len(file_names)}"
                )
        else:
            if self.path.stat().st_size == 0:
                return
            names = list(schema.column_names or ())
        needed = _check_columns(
            self.name, schema, names, "the header" if header else "column_names"
        )

        bad: list[tuple[int, str]] = []

        def on_invalid(row: pcsv.InvalidRow) -> str:
            text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
            number = row.number if row.number is not None else -1
            bad.append(
                (
                    number,
                    f"expected {row.expected_columns} columns, found {row.actual_columns}: "
                    f"{text!r}",
                )
            )
            return "skip"

        block = int(min(max(self.chunk_rows * 300, 1 << 20), 64 << 20))
        read_opts = pcsv.ReadOptions(
            use_threads=False,  # pyarrow gives line numbers of invalid rows only single-threaded
            block_size=block,
            column_names=names,
            skip_rows=1 if header else 0,
        )
        parse_opts = pcsv.ParseOptions(
            delimiter=schema.delimiter,
            quote_char='"' if self.quote else False,
            ignore_empty_lines=False,  # keep one row per physical line, so numbering is exact
            newlines_in_values=False,
            invalid_row_handler=on_invalid,
        )
        conv_opts = pcsv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            include_columns=needed,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        raw, stream = self._open()
        bar = tqdm(
            total=self.path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=self.name[-40:],
            disable=not self.progress,
            leave=False,
        )
        next_line = 2 if header else 1
        done = 0
        try:
            reader = pcsv.open_csv(
                stream, read_options=read_opts, parse_options=parse_opts, convert_options=conv_opts
            )
            for batch in reader:
                n = batch.num_rows
                pending = np.array([b[0] for b in bad if b[0] >= next_line], dtype=np.int64)
                pending.sort()
                # Line of the j-th good row: next_line + j + (bad lines before it).
                j = np.arange(n, dtype=np.int64)
                before = np.searchsorted(
                    pending - next_line - np.arange(len(pending)), j, side="right"
                )
                lines = next_line + j + before
                last = int(lines[-1]) if n else next_line - 1
                now = sorted(b for b in bad if b[0] <= last)
                bad[:] = [b for b in bad if b[0] > last]
                next_line = last + 1
                table, lines = drop_blank_rows(pa.Table.from_batches([batch]), lines)
                yield RawChunk(table, lines, now)
                pos = raw.tell()
                bar.update(pos - done)
                done = pos
            if bad:
                yield RawChunk(
                    pa.table({c: pa.array([], pa.string()) for c in needed}),
                    np.zeros(0, np.int64),
                    sorted(bad),
                )
        except pa.ArrowInvalid as e:
            raise ValueError(f"{self.name}: cannot parse as CSV: {e}") from None
        finally:
            bar.close()
            raw.close()


class ParquetSource(DataSource):
    """A Parquet file; numbers in errors are 1-based row numbers."""

    unit = "row"

    def __init__(self, path: str | Path, schema: Schema, name: str | None = None, **kwargs: object):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        super().__init__(schema, name or f"table:{self.path}", **kwargs)  # type: ignore[arg-type]

    def _iter_raw(self) -> Iterator[RawChunk]:
        pf = pq.ParquetFile(str(self.path))
        needed = _check_columns(self.name, self.schema, pf.schema_arrow.names, "the Parquet file")
        start = 1
        with tqdm(
            total=pf.metadata.num_rows,
            unit="rows",
            desc=self.name[-40:],
            disable=not self.progress,
            leave=False,
        ) as bar:
            for batch in pf.iter_batches(batch_size=self.chunk_rows, columns=needed):
                n = batch.num_rows
                yield RawChunk(
                    pa.Table.from_batches([batch]), np.arange(start, start + n, dtype=np.int64)
                )
                start += n
                bar.update(n)


class TableSource(DataSource):
    """An in-memory pyarrow table of raw columns (numbers in errors are 1-based row numbers)."""

    unit = "row"

    def __init__(self, table: pa.Table, schema: Schema, name: str = "memory", **kwargs: object):
        super().__init__(schema, name, **kwargs)  # type: ignore[arg-type]
        self.table = table

    def _iter_raw(self) -> Iterator[RawChunk]:
        _check_columns(self.name, self.schema, self.table.column_names, "the table")
        n = self.table.num_rows
        for s in range(0, n, self.chunk_rows):
            t = self.table.slice(s, self.chunk_rows)
            yield RawChunk(t, np.arange(s + 1, s + 1 + t.num_rows, dtype=np.int64))


def _parse_rows(text: str, spec: str) -> int:
    t = text.strip().lower().replace("_", "")
    mult = 1
    for suffix, m in (("k", 1_000), ("m", 1_000_000), ("g", 1_000_000_000)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"data spec {spec!r}: ROWS must be a number like 100000 or 1M") from None
    if value < 1 or value != int(value):
        raise ValueError(f"data spec {spec!r}: ROWS must be a positive whole number")
    return int(value)


_SYNTH_KEYS = {"zipf", "cards", "ctr", "affinity", "clusters", "missing"}


def parse_synth_spec(spec: str):
    """``synth:ROWS[:SEED][:PRESET][:KEY=VALUE...]`` -> :class:`SynthConfig`.

    Keys: ``zipf`` (the skew: one exponent, or 26 comma-separated), ``cards`` (26
    comma-separated cardinalities), ``ctr``, ``affinity``, ``clusters``, ``missing`` (0/1).
    """
    from lma.data.synthetic import PRESETS, SynthConfig

    parts = spec.partition(":")[2].split(":")
    rows = _parse_rows(parts[0], spec)
    kw: dict[str, object] = {"rows": rows}
    positional = [p for p in parts[1:] if "=" not in p]
    options = [p for p in parts[1:] if "=" in p]
    if len(positional) > 2 or parts[1 : 1 + len(positional)] != positional:
        raise ValueError(f"data spec {spec!r}: expected synth:ROWS[:SEED][:PRESET][:KEY=VALUE...]")
    for p in positional:
        if p.isdigit():
            if "seed" in kw or "preset" in kw:
                raise ValueError(f"data spec {spec!r}: SEED comes before PRESET, once")
            kw["seed"] = int(p)
        elif p in PRESETS:
            kw["preset"] = p
        else:
            raise ValueError(f"data spec {spec!r}: {p!r} is neither a SEED (integer) nor a "
                             f"PRESET ({' | '.join(sorted(PRESETS))})")
    for item in options:
        key, _, value = item.partition("=")
        if key not in _SYNTH_KEYS:
            raise ValueError(f"data spec {spec!r}: unknown key {key!r} (known: "
                             f"{', '.join(sorted(_SYNTH_KEYS))})")
        try:
            if key == "zipf":
                z = [float(x) for x in value.split(",")]
                kw["zipf"] = z[0] if len(z) == 1 else tuple(z)
            elif key == "cards":
                kw["cardinalities"] = tuple(_parse_rows(x, spec) for x in value.split(","))
            elif key in ("ctr", "affinity"):
                kw[key] = float(value)
            elif key == "clusters":
                kw["n_clusters"] = int(value)
            else:
                kw["missing"] = value.lower() not in ("0", "false", "no")
        except ValueError as e:
            raise ValueError(f"data spec {spec!r}: bad value for {key}: {e}") from None
    return SynthConfig(**kw)  # type: ignore[arg-type]


def open_source(
    spec: str,
    schema_path: str | None = None,
    *,
    on_error: str = "fail",
    chunk_rows: int = 65536,
    progress: bool = False,
) -> DataSource:
    """Open a dataset from a ``--data`` spec (see :data:`SPEC_FORMS`).

    ``schema_path`` (JSON or YAML) describes ``table:PATH`` data; for the built-in forms it
    replaces the built-in schema (e.g. to use a subset of the fields).
    """
    kinds = [f.split(":")[0] for f in SPEC_FORMS]
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in kinds or not rest:
        raise ValueError(f"unknown data spec {spec!r}; expected one of: " + "; ".join(SPEC_FORMS))
    user_schema = Schema.load(schema_path) if schema_path else None
    kw = {"on_error": on_error, "chunk_rows": chunk_rows, "progress": progress}
    if kind in ("criteo", "criteo-test"):
        schema = user_schema or criteo_schema(labelled=kind == "criteo")
        return CsvSource(rest, schema, f"{kind}:{rest}", quote=False, **kw)
    if kind == "avazu":
        return CsvSource(rest, user_schema or avazu_schema(), f"avazu:{rest}", **kw)
    if kind == "synth":
        from lma.data.synthetic import SyntheticSource

        src = SyntheticSource(parse_synth_spec(spec), name=spec, **kw)
        if user_schema is not None:
            src.schema = user_schema
        return src
    # table:PATH
    if user_schema is None:
        raise ValueError(f"data spec {spec!r}: table:PATH needs a schema file (--schema)")
    path = Path(rest)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    fmt = "parquet" if last in _PARQUET_SUFFIXES else "csv" if last in _CSV_SUFFIXES else None
    fmt = fmt or user_schema.format
    if fmt == "parquet":
        return ParquetSource(path, user_schema, spec, **kw)
    quote = bool(user_schema.extra.get("quote", True))
    return CsvSource(path, user_schema, spec, quote=quote, **kw)


def data_root() -> Path:
    """The shared real-data folder: ``$LMA_SHARED_DATA`` or ``../shared/data`` from the repo root."""
    env = os.environ.get("LMA_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
