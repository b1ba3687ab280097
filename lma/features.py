"""Feature encoding (raw columns -> dense floats + tokens) and the persisted feature map.

Training, export and serving all go through :func:`encode_table`, so a value is turned into the
same numbers everywhere. This module does not import torch.

Bad values (a non-numeric dense value, a label other than 0/1, a malformed derived column) raise
:class:`EncodeError` naming the column and every 0-based row at fault in it.
:func:`encode_with_errors` instead returns all such errors, over all columns, together with an
encoding of every row (bad cells filled), so a reader can drop the bad rows in one pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lma.schema import CategoricalField, DenseField, Schema
from lma.tokens import PAD_TOKEN, hash_column

FEATURE_MAP_VERSION = 1

_NUMBER_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$"


@dataclass
class Encoded:
    """One encoded chunk of rows."""

    dense: np.ndarray  # (N, n_dense) float32, transformed
    tokens: np.ndarray  # (N, S) int64, S = schema.n_token_slots; 0 pads multi-valued fields
    labels: np.ndarray | None  # (N,) float32 in {0, 1}, None for unlabelled data
    line_numbers: np.ndarray | None = None  # (N,) int64, 1-based lines of the source file
    times: np.ndarray | None = None  # (N,) int64/float64 of schema.time_column, when present

    def __len__(self) -> int:
        return len(self.tokens)


class EncodeError(ValueError):
    """A value that cannot be encoded; carries the column and the 0-based rows at fault.

    ``values`` (when known) are the offending raw values, one per row, and ``problem`` the short
    description used by :meth:`reason`.
    """

    def __init__(
        self,
        column: str,
        rows: np.ndarray,
        message: str,
        *,
        values: list[Any] | None = None,
        problem: str | None = None,
    ):
        self.column = column
        self.rows = np.asarray(rows, dtype=np.int64)
        self.values = values
        self.problem = problem or message
        super().__init__(message)

    def reason(self, i: int) -> str:
        """Why row ``self.rows[i]`` is bad, e.g. ``column 'I5': non-numeric value 'abc'``."""
        if self.values is not None and i < len(self.values):
            return f"column '{self.column}': {self.problem} {self.values[i]!r}"
        return f"column '{self.column}': {self.problem}"


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _column(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        raise EncodeError(
            name,
            np.arange(table.num_rows),
            f"column '{name}' is missing from the table (columns: {table.column_names})",
        )
    col = table.column(name)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(arr.type, pa.DictionaryType):
        arr = arr.dictionary_decode()
    return arr


def _bad_values(arr: pa.Array, rows: np.ndarray, limit: int = 1000) -> list[Any]:
    """Raw values of ``rows`` (the first ``limit``), for error messages."""
    return arr.take(pa.array(rows[:limit], pa.int64())).to_pylist()


def _parse_float(name: str, arr: pa.Array, what: str) -> tuple[np.ndarray, EncodeError | None]:
    """Column -> float64 (NaN for missing: null, empty or 'nan'); rows that are not numbers or
    are infinite are reported (and NaN in the result)."""
    n = len(arr)
    if _is_text(arr.type):
        arr = pc.utf8_trim_whitespace(arr)
        arr = pc.if_else(pc.equal(pc.utf8_length(arr), 0), pa.scalar(None, arr.type), arr)
        bad = np.zeros(0, np.int64)
        try:
            num = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = pc.fill_null(pc.match_substring_regex(arr, _NUMBER_RE, ignore_case=True), True)
            ok_np = np.asarray(ok)
            bad = np.flatnonzero(~ok_np)
            cleaned = pc.if_else(ok, arr, pa.scalar(None, arr.type))
            try:
                num = pc.cast(cleaned, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                # Something the pattern accepts but the cast does not: find it value by value.
                vals = cleaned.to_pylist()
                out = np.full(n, np.nan)
                extra = []
                for i, v in enumerate(vals):
                    if v is None:
                        continue
                    try:
                        out[i] = float(v)
                    except ValueError:
                        extra.append(i)
                bad = np.union1d(bad, np.asarray(extra, np.int64))
                num = pa.array(out)
        values = np.asarray(num.to_numpy(zero_copy_only=False), dtype=np.float64)
    elif pa.types.is_null(arr.type):
        values, bad = np.full(n, np.nan), np.zeros(0, np.int64)
    else:
        try:
            num = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise EncodeError(
                name, np.arange(n), f"column '{name}': cannot read {arr.type} as a number: {e}"
            ) from None
        values = np.asarray(num.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = np.zeros(0, np.int64)
    inf = np.flatnonzero(np.isinf(values))
    if len(inf):
        bad = np.union1d(bad, inf)
    if len(bad) == 0:
        return values, None
    values = values.copy()  # to_numpy may hand back read-only memory
    values[bad] = np.nan
    raw = _bad_values(arr, bad)
    problem = f"non-numeric {what} value"
    err = EncodeError(
        name, bad, f"column '{name}': {problem} {raw[0]!r}", values=raw, problem=problem
    )
    return values, err


def raw_dense(schema: Schema, table: pa.Table) -> np.ndarray:
    """Dense columns before the transform: (N, n_dense) float64, NaN where missing or bad."""
    out = np.full((table.num_rows, len(schema.dense)), np.nan)
    for j, f in enumerate(schema.dense):
        out[:, j] = _parse_float(f.name, _column(table, f.name), "dense")[0]
    return out


def _derive(schema: Schema, table: pa.Table) -> tuple[pa.Table, list[EncodeError]]:
    errors: list[EncodeError] = []
    derive = schema.extra.get("derive", ())
    if "avazu_hour" in derive and "hour" in table.column_names:
        hour = _column(table, "hour")
        if not _is_text(hour.type):
            hour = pc.cast(hour, pa.string())
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(hour, r"^\d{8}$"), False))
        safe = pc.if_else(pa.array(ok), hour, pa.scalar("00010100", hour.type))
        h = np.asarray(pc.cast(safe, pa.int64()))
        yy, mm, dd, hh = h // 1_000_000, h // 10_000 % 100, h // 100 % 100, h % 100
        month_ok = (mm >= 1) & (mm <= 12)
        months = ((2000 + yy - 1970) * 12 + np.where(month_ok, mm - 1, 0)).astype("datetime64[M]")
        days = months.astype("datetime64[D]") + np.maximum(dd - 1, 0).astype("timedelta64[D]")
        day_ok = (dd >= 1) & (days.astype("datetime64[M]") == months)
        ok &= month_ok & day_ok & (hh < 24)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raw = _bad_values(hour, bad)
            problem = "expected YYMMDDHH, got"
            errors.append(
                EncodeError(
                    "hour", bad, f"column 'hour': {problem} {raw[0]!r}", values=raw, problem=problem
                )
            )
        # 1970-01-01 was a Thursday (weekday 3, Monday = 0 as in datetime.date.weekday()).
        weekday = (days.astype(np.int64) + 3) % 7
        weekday[~ok] = 0
        hod = pc.utf8_slice_codeunits(pc.if_else(pa.array(ok), hour, pa.scalar("00000000")), 6, 8)
        names = pa.array([str(i) for i in range(7)], pa.string())
        table = table.append_column("hour_of_day", pc.cast(hod, pa.string()))
        table = table.append_column("weekday", names.take(pa.array(weekday)))
    return table, errors


def derive_columns(schema: Schema, table: pa.Table) -> pa.Table:
    """Add the columns a schema derives from raw ones (Avazu: hour -> hour_of_day, weekday)."""
    table, errors = _derive(schema, table)
    if errors:
        raise errors[0]
    return table


def _dense_matrix(schema: Schema, table: pa.Table) -> tuple[np.ndarray, list[EncodeError]]:
    n = table.num_rows
    out = np.zeros((n, len(schema.dense)), dtype=np.float32)
    errors: list[EncodeError] = []
    for j, f in enumerate(schema.dense):
        v, err = _parse_float(f.name, _column(table, f.name), "dense")
        if err is not None:
            errors.append(err)
        out[:, j] = transform_dense(f, v)
    return out, errors


def transform_dense(f: DenseField, v: np.ndarray) -> np.ndarray:
    """The schema's dense transform of raw float64 values (NaN = missing): fill, clip, log1p."""
    v = np.where(np.isnan(v), f.fill, v)
    if f.clip_min is not None or f.clip_max is not None:
        v = np.clip(v, f.clip_min, f.clip_max)
    if f.transform == "log1p":
        v = np.log1p(np.maximum(v, 0.0))
    return v


def split_bag(f: CategoricalField, col: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Values of a multi-valued column: (non-empty items, their row, their position in the row).

    Empty items ("a||b", a trailing separator) are dropped; positions count kept items only.
    """
    if not _is_text(col.type):
        col = pc.cast(col, pa.string())
    lists = pc.split_pattern(col, pattern=f.separator)
    items = pc.list_flatten(lists)
    parent = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)
    keep = np.asarray(pc.greater(pc.utf8_length(items), 0))
    items = items.filter(pa.array(keep))
    parent = parent[keep]
    first = np.searchsorted(parent, parent, side="left")
    pos = np.arange(len(parent), dtype=np.int64) - first
    return items, parent, pos


def _token_matrix(schema: Schema, table: pa.Table) -> np.ndarray:
    n = table.num_rows
    out = np.full((n, schema.n_token_slots), PAD_TOKEN, dtype=np.int64)
    s = 0
    for f in schema.categorical:
        col = _column(table, f.name)
        if f.separator is None:
            out[:, s] = hash_column(f.name, col)
        else:
            items, parent, pos = split_bag(f, col)
            kept = pos < f.max_values
            # Rows without any value hold the missing token in their first slot.
            out[:, s] = hash_column(f.name, [None])[0]
            out[parent[kept], s + pos[kept]] = hash_column(f.name, items.filter(pa.array(kept)))
        s += f.width
    return out


def _labels(schema: Schema, table: pa.Table) -> tuple[np.ndarray | None, EncodeError | None]:
    if schema.label is None or schema.label not in table.column_names:
        return None, None
    arr = _column(table, schema.label)
    lab, err = _parse_float(schema.label, arr, "label")
    ok = np.isin(lab, (0.0, 1.0))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raw = _bad_values(arr, bad)
        problem = "label must be 0 or 1, got"
        err = EncodeError(
            schema.label,
            bad,
            f"label '{schema.label}' must be 0 or 1, got {raw[0]!r}",
            values=raw,
            problem=problem,
        )
    return np.where(ok, lab, 0.0).astype(np.float32), err


def _times(schema: Schema, table: pa.Table) -> tuple[np.ndarray | None, EncodeError | None]:
    """The time column as int64 (integers, timestamps in microseconds) or float64."""
    name = schema.time_column
    if name is None or name not in table.column_names:
        return None, None
    arr = _column(table, name)
    if _is_text(arr.type):
        arr = pc.utf8_trim_whitespace(arr)
        arr = pc.if_else(pc.equal(pc.utf8_length(arr), 0), pa.scalar(None, arr.type), arr)
    t: pa.Array | None = None
    targets = (pa.int64(), pa.timestamp("us")) if _is_text(arr.type) else (pa.int64(),)
    if pa.types.is_integer(arr.type) or _is_text(arr.type):
        for target in targets:
            try:
                t = pc.cast(arr, target)
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    elif pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        t = pc.cast(arr, pa.timestamp("us"))
    if t is not None:
        if pa.types.is_timestamp(t.type):
            t = pc.cast(t, pa.int64())
        values = np.asarray(t.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        err = None
        if t.null_count:
            bad = np.flatnonzero(np.asarray(t.is_null()))
            problem = "missing time value"
            err = EncodeError(name, bad, f"column '{name}': {problem}", problem=problem)
        return values, err
    fvalues, err = _parse_float(name, arr, "time")
    missing = np.isnan(fvalues)
    if missing.any():
        bad = np.flatnonzero(missing)
        raw = _bad_values(arr, bad)
        problem = "missing or non-numeric time value"
        err = EncodeError(
            name, bad, f"column '{name}': {problem} {raw[0]!r}", values=raw, problem=problem
        )
    return np.where(missing, 0.0, fvalues), err


def encode_with_errors(
    schema: Schema, table: pa.Table, line_numbers: np.ndarray | None = None
) -> tuple[Encoded, list[EncodeError]]:
    """Encode every row and collect the bad values of all columns instead of raising.

    Rows named by an error are encoded with their bad cells treated as missing; callers drop
    them (e.g. ``lma.data.take``) or raise. A column missing from the table still raises.
    """
    table, errors = _derive(schema, table)
    labels, err = _labels(schema, table)
    if err is not None:
        errors.append(err)
    dense, dense_errors = _dense_matrix(schema, table)
    errors.extend(dense_errors)
    times, err = _times(schema, table)
    if err is not None:
        errors.append(err)
    enc = Encoded(
        dense=dense,
        tokens=_token_matrix(schema, table),
        labels=labels,
        line_numbers=None if line_numbers is None else np.asarray(line_numbers, dtype=np.int64),
        times=times,
    )
    return enc, errors


def encode_table(
    schema: Schema, table: pa.Table, line_numbers: np.ndarray | None = None
) -> Encoded:
    """Encode a table of raw columns (strings or numbers) into model inputs.

    Raises :class:`EncodeError` for the bad value of the lowest row (with all bad rows of that
    column in ``rows``).
    """
    enc, errors = encode_with_errors(schema, table, line_numbers)
    if errors:
        raise min(errors, key=lambda e: int(e.rows.min()) if len(e.rows) else 0)
    return enc


def _merge_counts(
    tokens: list[np.ndarray], counts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts of equal tokens over several (token, count) arrays: sorted unique tokens."""
    t = np.concatenate(tokens)
    c = np.concatenate(counts)
    if len(t) == 0:
        return t.astype(np.int64), c.astype(np.int64)
    order = np.argsort(t, kind="stable")
    t, c = t[order], c[order]
    starts = np.flatnonzero(np.concatenate([[True], t[1:] != t[:-1]]))
    return t[starts], np.add.reduceat(c, starts).astype(np.int64)


def _npz_memmap(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed ``.npz`` (``np.savez``) as copy-on-write memory maps of the
    file, or None when a member is compressed or not a plain array (read it normally then)."""
    import zipfile

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            # The member's data follows its local header (30 bytes + name + extra field).
            f.seek(info.header_offset)
            local = f.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                return None
            name = info.filename[: -len(".npy")]
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="c", offset=f.tell(), shape=shape,
                                      order="F" if fortran else "C")
    return out


class FeatureMap:
    """Schema + per-field token counts from a streaming pass over the training rows.

    Saved as ``feature_map.json`` (schema, per-field sizes) and ``feature_map.npz`` (for field f:
    ``tokens_f`` sorted int64 token hashes, ``counts_f`` int64 counts). Full tables take their
    vocabulary from here (tokens with count >= min_count, plus one out-of-vocabulary row per field).
    """

    def __init__(
        self,
        schema: Schema,
        tokens: list[np.ndarray],
        counts: list[np.ndarray],
        n_rows: int,
        meta: dict[str, Any] | None = None,
    ):
        if len(tokens) != len(schema.categorical) or len(counts) != len(tokens):
            raise ValueError("feature map: one token/count array per categorical field expected")
        self.schema = schema
        self.tokens = [np.asarray(t, dtype=np.int64) for t in tokens]
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]
        self.n_rows = n_rows
        self.meta = dict(meta or {})

    @classmethod
    def build(cls, schema: Schema, chunks: Iterable[Encoded]) -> FeatureMap:
        """Count tokens per field over an iterable of :class:`Encoded` chunks (constant memory in rows).

        Per-chunk counts are buffered and merged into the running totals once the buffer is as
        large as the totals, so the cost stays O(total log total) rather than O(vocab x chunks).
        """
        slots = np.array(schema.slot_fields())
        cols = [np.flatnonzero(slots == f) for f in range(len(schema.categorical))]
        acc_t = [np.zeros(0, np.int64) for _ in schema.categorical]
        acc_c = [np.zeros(0, np.int64) for _ in schema.categorical]
        pend_t: list[list[np.ndarray]] = [[] for _ in schema.categorical]
        pend_c: list[list[np.ndarray]] = [[] for _ in schema.categorical]
        pend_n = [0] * len(schema.categorical)
        n_rows = 0
        for enc in chunks:
            n_rows += len(enc)
            for f, c in enumerate(cols):
                vals = enc.tokens[:, c[0]] if len(c) == 1 else enc.tokens[:, c].ravel()
                vals = vals[vals != PAD_TOKEN]
                u, k = np.unique(vals, return_counts=True)
                pend_t[f].append(u)
                pend_c[f].append(k.astype(np.int64))
                pend_n[f] += len(u)
                if pend_n[f] >= max(len(acc_t[f]), 1 << 16):
                    acc_t[f], acc_c[f] = _merge_counts(
                        [acc_t[f], *pend_t[f]], [acc_c[f], *pend_c[f]]
                    )
                    pend_t[f], pend_c[f], pend_n[f] = [], [], 0
        for f in range(len(cols)):
            if pend_t[f]:
                acc_t[f], acc_c[f] = _merge_counts([acc_t[f], *pend_t[f]], [acc_c[f], *pend_c[f]])
        return cls(schema, acc_t, acc_c, n_rows)

    def merged(self, other: FeatureMap) -> FeatureMap:
        """This map with ``other``'s tokens added (counts of equal tokens summed); the schemas'
        categorical fields must agree. ``meta["merged"]`` records ``other``'s meta."""
        names = [f.name for f in self.schema.categorical]
        if names != [f.name for f in other.schema.categorical]:
            raise ValueError("feature maps with different categorical fields cannot be merged: "
                             f"{names} vs {[f.name for f in other.schema.categorical]}")
        tokens, counts = [], []
        for f in range(len(names)):
            t, c = _merge_counts([self.tokens[f], other.tokens[f]],
                                 [self.counts[f], other.counts[f]])
            tokens.append(t)
            counts.append(c)
        meta = {**self.meta, "merged": {"n_rows": other.n_rows, **other.meta}}
        return FeatureMap(self.schema, tokens, counts, self.n_rows, meta)

    def vocab(self, min_count: int = 1) -> list[np.ndarray]:
        """Sorted token hashes with at least ``min_count`` occurrences, per field."""
        return [t[c >= min_count] for t, c in zip(self.tokens, self.counts, strict=True)]

    def vocab_sizes(self, min_count: int = 1) -> list[int]:
        return [len(v) for v in self.vocab(min_count)]

    def full_table_rows(self, min_count: int = 1) -> int:
        """Rows of full per-field tables: vocabulary plus one OOV row per field."""
        return sum(self.vocab_sizes(min_count)) + len(self.schema.categorical)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for i, (t, c) in enumerate(zip(self.tokens, self.counts, strict=True)):
            arrays[f"tokens_{i}"] = t
            arrays[f"counts_{i}"] = c
        np.savez(d / "feature_map.npz", **arrays)
        (d / "feature_map.json").write_text(
            json.dumps(
                {
                    "version": FEATURE_MAP_VERSION,
                    "schema": self.schema.to_dict(),
                    "n_rows": self.n_rows,
                    "field_sizes": {
                        f.name: len(t)
                        for f, t in zip(self.schema.categorical, self.tokens, strict=True)
                    },
                    "meta": self.meta,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> FeatureMap:
        """Read a saved map; ``mmap=True`` maps the token and count arrays from the file
        (copy-on-write) instead of reading them, so a caller that needs only the schema and
        sizes (exporting a checkpoint) holds none of the vocabulary in memory. A file saved
        over a mapped one must replace it (new inode), not be rewritten in place."""
        d = Path(directory)
        if mmap:
            info = json.loads((d / "feature_map.json").read_text())
            if info.get("version") == FEATURE_MAP_VERSION:
                arrays = _npz_memmap(d / "feature_map.npz")
                if arrays is not None:
                    schema = Schema.from_dict(info["schema"])
                    n = len(schema.categorical)
                    return cls(schema, [arrays[f"tokens_{i}"] for i in range(n)],
                               [arrays[f"counts_{i}"] for i in range(n)], info["n_rows"],
                               info.get("meta"))
        info = json.loads((d / "feature_map.json").read_text())
        if info.get("version") != FEATURE_MAP_VERSION:
            raise ValueError(
                f"{d}/feature_map.json has version {info.get('version')}, this build reads "
                f"version {FEATURE_MAP_VERSION}: re-run training or export with this version"
            )
        schema = Schema.from_dict(info["schema"])
        with np.load(d / "feature_map.npz") as z:
            n = len(schema.categorical)
            tokens = [z[f"tokens_{i}"] for i in range(n)]
            counts = [z[f"counts_{i}"] for i in range(n)]
        return cls(schema, tokens, counts, info["n_rows"], info.get("meta"))
