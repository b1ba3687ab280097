"""Feature encoding (raw columns -> dense floats + tokens) and the persisted feature map.

Training, export and serving all go through :func:`encode_table`, so a value is turned into the
same numbers everywhere. This module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lma.schema import Schema
from lma.tokens import PAD_TOKEN, hash_column

FEATURE_MAP_VERSION = 1


@dataclass
class Encoded:
    """One encoded chunk of rows."""

    dense: np.ndarray  # (N, n_dense) float32, transformed
    tokens: np.ndarray  # (N, S) int64, S = schema.n_token_slots; 0 pads multi-valued fields
    labels: np.ndarray | None  # (N,) float32 in {0, 1}, None for unlabelled data
    line_numbers: np.ndarray | None = None  # (N,) int64, 1-based lines of the source file

    def __len__(self) -> int:
        return len(self.tokens)


class EncodeError(ValueError):
    """A value that cannot be encoded; carries the column and the 0-based rows at fault."""

    def __init__(self, column: str, rows: np.ndarray, message: str):
        self.column = column
        self.rows = np.asarray(rows, dtype=np.int64)
        super().__init__(message)


def derive_columns(schema: Schema, table: pa.Table) -> pa.Table:
    """Add the columns a schema derives from raw ones (Avazu: hour -> hour_of_day, weekday)."""
    if "avazu_hour" in schema.extra.get("derive", ()) and "hour" in table.column_names:
        raw = pc.cast(table.column("hour"), pa.string()).to_numpy(zero_copy_only=False)
        raw = np.array(["" if v is None else str(v) for v in raw], dtype=object)
        ok = np.array([len(v) == 8 and v.isdigit() for v in raw], dtype=bool)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise EncodeError("hour", bad, f"column 'hour': expected YYMMDDHH, got {raw[bad[0]]!r}")
        hod = np.array([v[6:8] for v in raw], dtype=object)
        # The weekday is a pure function of the date, computed per distinct day.
        days = {v[:6] for v in raw}
        wd = {d: str(date(2000 + int(d[:2]), int(d[2:4]), int(d[4:6])).weekday()) for d in days}
        weekday = np.array([wd[v[:6]] for v in raw], dtype=object)
        table = table.append_column("hour_of_day", pa.array(hod, pa.string()))
        table = table.append_column("weekday", pa.array(weekday, pa.string()))
    return table


def _dense_matrix(schema: Schema, table: pa.Table) -> np.ndarray:
    n = table.num_rows
    out = np.zeros((n, len(schema.dense)), dtype=np.float32)
    for j, f in enumerate(schema.dense):
        if f.name not in table.column_names:
            raise EncodeError(f.name, np.arange(min(n, 1)), f"missing dense column '{f.name}'")
        col = table.column(f.name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = pc.utf8_trim_whitespace(col)
            empty = pc.equal(pc.utf8_length(col), 0)
            col = pc.if_else(empty, pa.scalar(None, col.type), col)
            try:
                col = pc.cast(col, pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                numeric = pc.match_substring_regex(
                    col, r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$"
                )
                bad = np.flatnonzero(~np.asarray(pc.fill_null(numeric, True)))
                raise EncodeError(
                    f.name, bad, f"column '{f.name}': non-numeric value {col[int(bad[0])].as_py()!r}"
                ) from None
        v = np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        v = np.where(np.isnan(v), f.fill, v)
        if f.clip_min is not None or f.clip_max is not None:
            v = np.clip(v, f.clip_min, f.clip_max)
        if f.transform == "log1p":
            v = np.log1p(np.maximum(v, 0.0))
        out[:, j] = v
    return out


def _token_matrix(schema: Schema, table: pa.Table) -> np.ndarray:
    n = table.num_rows
    out = np.full((n, schema.n_token_slots), PAD_TOKEN, dtype=np.int64)
    s = 0
    for f in schema.categorical:
        if f.name not in table.column_names:
            raise EncodeError(f.name, np.arange(min(n, 1)), f"missing categorical column '{f.name}'")
        col = table.column(f.name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pc.cast(col, pa.string())
        if f.separator is None:
            out[:, s] = hash_column(f.name, col)
        else:
            lists = pc.split_pattern(col, pattern=f.separator)
            for k in range(f.max_values):
                # Cells with fewer than k + 1 values keep the padding token in slot k.
                has = np.asarray(pc.fill_null(pc.greater(pc.list_value_length(lists), k), False))
                item = pc.list_element(pc.if_else(pa.array(has), lists, pa.scalar(["x"])), k)
                if k == 0:
                    out[:, s] = hash_column(f.name, item)  # empty/null cell -> missing token
                else:
                    out[has, s + k] = hash_column(f.name, item)[has]
        s += f.width
    return out


def encode_table(schema: Schema, table: pa.Table, line_numbers: np.ndarray | None = None) -> Encoded:
    """Encode a table of raw columns (strings or numbers) into model inputs."""
    table = derive_columns(schema, table)
    labels = None
    if schema.label is not None and schema.label in table.column_names:
        lab = pc.cast(table.column(schema.label), pa.float64()).to_numpy(zero_copy_only=False)
        lab = np.asarray(lab, dtype=np.float64)
        bad = np.flatnonzero(~np.isin(lab, (0.0, 1.0)))
        if len(bad):
            raise EncodeError(schema.label, bad, f"label '{schema.label}' must be 0 or 1")
        labels = lab.astype(np.float32)
    return Encoded(
        dense=_dense_matrix(schema, table),
        tokens=_token_matrix(schema, table),
        labels=labels,
        line_numbers=line_numbers,
    )


class FeatureMap:
    """Schema + per-field token counts from a streaming pass over the training rows.

    Saved as ``feature_map.json`` (schema, per-field sizes) and ``feature_map.npz`` (for field f:
    ``tokens_f`` sorted int64 token hashes, ``counts_f`` int64 counts). Full tables take their
    vocabulary from here (tokens with count >= min_count, plus one out-of-vocabulary row per field).
    """

    def __init__(self, schema: Schema, tokens: list[np.ndarray], counts: list[np.ndarray],
                 n_rows: int, meta: dict[str, Any] | None = None):
        if len(tokens) != len(schema.categorical) or len(counts) != len(tokens):
            raise ValueError("feature map: one token/count array per categorical field expected")
        self.schema = schema
        self.tokens = [np.asarray(t, dtype=np.int64) for t in tokens]
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]
        self.n_rows = n_rows
        self.meta = dict(meta or {})

    @classmethod
    def build(cls, schema: Schema, chunks) -> FeatureMap:
        """Count tokens per field over an iterable of :class:`Encoded` chunks (constant memory in rows)."""
        slot_fields = np.array(schema.slot_fields())
        acc: list[dict[str, np.ndarray]] = [
            {"t": np.zeros(0, np.int64), "c": np.zeros(0, np.int64)} for _ in schema.categorical
        ]
        n_rows = 0
        for enc in chunks:
            n_rows += len(enc)
            for f in range(len(schema.categorical)):
                vals = enc.tokens[:, slot_fields == f].ravel()
                vals = vals[vals != PAD_TOKEN]
                u, c = np.unique(vals, return_counts=True)
                t_all = np.concatenate([acc[f]["t"], u])
                c_all = np.concatenate([acc[f]["c"], c])
                u2, inv = np.unique(t_all, return_inverse=True)
                acc[f] = {"t": u2, "c": np.bincount(inv, weights=c_all).astype(np.int64)}
        return cls(schema, [a["t"] for a in acc], [a["c"] for a in acc], n_rows)

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
                    "field_sizes": {f.name: len(t) for f, t in zip(self.schema.categorical, self.tokens, strict=True)},
                    "meta": self.meta,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, directory: str | Path) -> FeatureMap:
        d = Path(directory)
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
