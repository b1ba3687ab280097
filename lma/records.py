"""Request encoding: JSON records (or columns) -> the model inputs :func:`encode_table` gives.

A serving request carries raw feature values as parsed JSON: a list of objects keyed by field
name (:func:`encode_records`) or one sequence per field (:func:`encode_columns`, the shape of the
Open Inference Protocol's per-field tensors). Both give ``dense`` (N, n_dense) float32 and
``tokens`` (N, S) int64 equal, row for row, to :func:`lma.features.encode_table` on a table of
the training files' text holding the same values, plus the problems found, each naming its row
and field. A bad value fails its own cell only: the cell is encoded as missing, the error is
reported, and every other cell and row is encoded normally (the caller decides whether a row with
errors is answered).

Rules, per value (``row`` and ``field`` are named in every error):

- A key absent from a record, or ``null``, is a missing value for that row only.
- Categorical fields (the token is the hash of the text the training files held):
  strings are used verbatim (no trimming; ``""`` is missing, as an empty CSV cell);
  integers become their decimal text (``5`` -> ``5``, ``-1`` -> ``-1``);
  floats with an integral value of magnitude <= 2**53 become integer text (``5.0`` -> ``5``,
  ``-0.0`` -> ``0``), other finite floats Python's shortest round-trip ``repr`` (``0.5`` ->
  ``0.5``, ``1e-05`` -> ``1e-05``). Criteo's and Avazu's categorical columns are hex strings and
  integers, never fractions, so JSON ``5``, ``5.0`` and ``"5"`` all hash like the CSV text ``5``.
  Errors: NaN and infinities; integral floats beyond 2**53 (their digits may already be lost:
  send such ids as strings or integers); booleans (no training file spells them one way: send
  the text yours held); objects and arrays in single-valued fields; strings longer than
  ``max_value_bytes`` UTF-8 bytes; strings that are not valid Unicode.
- Multi-valued (bag) fields take the separator-joined string the training files held, or an array
  of values (each canonicalised as above, ``null`` items skipped), which is read as its items
  joined by the separator: both split exactly like the training text, empty items dropped, at most
  ``max_values`` kept.
- Dense fields: JSON numbers are taken as they are; strings are parsed as the training text was
  (surrounding whitespace trimmed, empty or ``nan`` is missing). Errors: strings that are not
  numbers, NaN and infinite numbers (JSON has neither; send ``null`` for missing), integers too
  large for a float, booleans, objects and arrays, and values whose transformed value overflows
  float32 (which ``encode_table`` would let through as ``inf``).
- Derived columns: Avazu's ``hour`` (YYMMDDHH, as a string or a number) gives ``hour_of_day`` and
  ``weekday`` as in training; a malformed hour is an error on ``hour``. Without ``hour`` a record
  may give ``hour_of_day`` and ``weekday`` directly (e.g. from a feature store).
- The label, the time column and the schema's dropped columns are accepted and ignored. Any other
  key is unknown: reported in ``unknown`` (``on_unknown="report"``, the default), reported as an
  error (``"error"``), or not looked for (``"ignore"``).

:class:`RecordEncoder` precomputes everything per schema (field seeds, missing tokens, dense
transforms) and hashes all single-valued categorical cells of a request in one vectorised pass;
:func:`encoder_for` caches one per schema object.
"""

from __future__ import annotations

import datetime
import math
import operator
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, cycle, repeat
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lma.features import split_bag, transform_dense
from lma.schema import CategoricalField, Schema
from lma.tokens import PAD_TOKEN, field_seed, hash_column, hash_seeded, token_hash

OnUnknown = Literal["report", "error", "ignore"]

DEFAULT_MAX_VALUE_BYTES = 4096
_EXACT_FLOAT_INT = 2.0**53
# The training text's number syntax (as lma.features reads dense columns), ASCII digits only.
_NUMBER = re.compile(
    r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE | re.ASCII
)
_NONE = type(None)
_TEXT_TYPES = frozenset({str, _NONE})
_NUMBER_TYPES = frozenset({int, float, _NONE})
_INT_TYPES = frozenset({int, _NONE})
_STR_INT_TYPES = frozenset({str, int, _NONE})
_FLOAT_TYPES = frozenset({float, _NONE})
_DICT_ONLY = frozenset({dict})


@dataclass(frozen=True)
class RecordError:
    """A value that could not be encoded: its 0-based row, its field (None: the whole record)."""

    row: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass
class EncodedRecords:
    dense: np.ndarray  # (N, n_dense) float32
    tokens: np.ndarray  # (N, S) int64
    errors: list[RecordError] = field(default_factory=list)
    unknown: list[tuple[int, str]] = field(default_factory=list)  # (row, key) not in the schema

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def bad_rows(self) -> list[int]:
        """Rows with at least one error, ascending."""
        return sorted({e.row for e in self.errors})


class _Bad(Exception):
    """A value that cannot be encoded; the message is the reason."""


def _describe(v: Any) -> str:
    if isinstance(v, Mapping):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "an array"
    return f"a {type(v).__name__}"


def _canon_float(v: float) -> str:
    if not math.isfinite(v):
        raise _Bad(f"{v!r} is not a category value")
    if v.is_integer():
        if abs(v) > _EXACT_FLOAT_INT:
            raise _Bad(
                f"integral float {v!r} is beyond 2**53 and may have lost digits; "
                "send it as a string or an integer"
            )
        return str(int(v))
    return repr(v)


def canonical_text(v: Any) -> str | None:
    """The training-file text of one categorical value (None: missing); raises ValueError."""
    try:
        return _canon(v)
    except _Bad as e:
        raise ValueError(str(e)) from None


def _canon(v: Any) -> str | None:
    t = type(v)
    if t is str:
        return v
    if v is None:
        return None
    if t is int:
        try:
            return str(v)
        except ValueError:  # beyond Python's int -> str digit limit
            raise _Bad("integer has too many digits") from None
    if t is float:
        return _canon_float(v)
    if t is bool or isinstance(v, np.bool_):
        raise _Bad("a boolean is not a category value; send the text the training data held")
    if isinstance(v, np.integer):
        return str(int(v))
    if isinstance(v, np.floating):
        return _canon_float(float(v))
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("value is not valid UTF-8") from None
    if isinstance(v, str):
        return str(v)
    raise _Bad(f"expected a single value (string or number), got {_describe(v)}")


def _dense_value(v: Any) -> float:
    """Raw float of one dense value (NaN: missing), before the transform."""
    t = type(v)
    if v is None:
        return math.nan
    if (
        t is float
        or t is int
        or (isinstance(v, (np.integer, np.floating)) and not isinstance(v, np.bool_))
    ):
        try:
            x = float(v)
        except OverflowError:
            raise _Bad("number is too large") from None
        if not math.isfinite(x):
            raise _Bad(f"{v!r} is not a number; send null for a missing value")
        return x
    if t is bool or isinstance(v, np.bool_):
        raise _Bad("a boolean is not a number; send 0 or 1")
    if isinstance(v, (bytes, np.bytes_)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("value is not valid UTF-8") from None
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return math.nan
        if _NUMBER.fullmatch(s) is None:
            raise _Bad(f"non-numeric value {v[:40]!r}")
        x = float(s)
        if math.isinf(x):
            raise _Bad(f"non-numeric value {v[:40]!r}")
        return x
    raise _Bad(f"expected a number, got {_describe(v)}")


class RecordEncoder:
    """Everything :func:`encode_records` needs for one schema, computed once."""

    def __init__(self, schema: Schema, *, max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES):
        self._schema: Schema | None = schema
        self._schema_ref: weakref.ref | None = None
        self.max_value_bytes = max_value_bytes
        derive = "avazu_hour" in schema.extra.get("derive", ())
        derived = {"hour_of_day", "weekday"} if derive else set()
        self._source = "hour" if derive else None
        slot = 0
        self._single: list[tuple[int, CategoricalField]] = []
        self._bags: list[tuple[int, CategoricalField]] = []
        self._derived: list[tuple[int, CategoricalField]] = []
        for f in schema.categorical:
            if f.name in derived:
                self._derived.append((slot, f))
            elif f.separator is None:
                self._single.append((slot, f))
            else:
                self._bags.append((slot, f))
            slot += f.width
        self.n_slots = slot
        self._cat_names = tuple(f.name for _, f in self._single)
        self._cat_slots = np.array([s for s, _ in self._single], dtype=np.int64)
        self._cat_contiguous = bool(
            len(self._cat_slots) and (self._cat_slots == np.arange(len(self._cat_slots))).all()
        )
        self._seeds = np.array([field_seed(n) for n in self._cat_names], dtype=np.uint64)
        self._missing = np.array([token_hash(n, None) for n in self._cat_names], dtype=np.int64)
        self._dense_names = tuple(f.name for f in schema.dense)
        d = schema.dense
        self._fill = np.array([f.fill for f in d], dtype=np.float64)
        self._lo = np.array([-np.inf if f.clip_min is None else f.clip_min for f in d])
        self._hi = np.array([np.inf if f.clip_max is None else f.clip_max for f in d])
        self._clip = any(f.clip_min is not None or f.clip_max is not None for f in d)
        self._log = np.array([f.transform == "log1p" for f in d], dtype=bool)
        self._dense_missing = np.array(
            [transform_dense(f, np.array([np.nan]))[0] for f in d], dtype=np.float32
        )
        ignored = [schema.label, schema.time_column, self._source, *schema.drop]
        self.known = frozenset(
            [n for n in ignored if n]
            + list(self._cat_names)
            + list(self._dense_names)
            + [f.name for _, f in self._bags + self._derived]
        )
        self._tile_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._hour_cache: dict[str, tuple[str, str]] = {}

    @property
    def schema(self) -> Schema:
        if self._schema is not None:
            return self._schema
        schema = self._schema_ref() if self._schema_ref is not None else None
        if schema is None:
            raise RuntimeError("the schema of this cached encoder is gone")
        return schema

    # -- records ----------------------------------------------------------------------------

    def encode(self, records: Sequence[Any], *, on_unknown: OnUnknown = "report") -> EncodedRecords:
        """Encode a list of records (dicts keyed by field name); see the module rules."""
        n = len(records)
        errors: list[RecordError] = []
        unknown: list[tuple[int, str]] = []
        recs = records if type(records) is list else list(records)
        if not _DICT_ONLY.issuperset(set(map(type, records))):
            fixed: list[dict] = []
            for i, r in enumerate(records):
                if isinstance(r, Mapping):
                    fixed.append(dict(r))
                else:
                    errors.append(RecordError(i, None, f"expected an object, got {_describe(r)}"))
                    fixed.append({})
            recs = fixed
        known = self.known
        if on_unknown != "ignore" and not all(map(known.issuperset, recs)):
            for i, r in enumerate(recs):
                if not known.issuperset(r):
                    unknown.extend((i, k) for k in sorted(r.keys() - known))
            if on_unknown == "error":
                errors.extend(RecordError(i, k, "unknown field") for i, k in unknown)
                unknown = []

        tokens = np.empty((n, self.n_slots), dtype=np.int64)
        if self._cat_names:
            tok = self._hash_flat(_flat(recs, self._cat_names), n, errors, row_major=True)
            if self._cat_contiguous:
                tokens[:, : len(self._cat_names)] = tok
            else:
                tokens[:, self._cat_slots] = tok
        if self._bags or self._derived:
            for slot, f in self._bags:
                self._bag_column(f, slot, [r.get(f.name) for r in recs], tokens, errors)
            if self._derived:
                self._derive_records(recs, tokens, errors)

        if self._dense_names:
            dense = self._dense_flat(_flat(recs, self._dense_names), n, errors, True)
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        errors.sort(key=lambda e: (e.row, e.field or ""))
        return EncodedRecords(dense, tokens, errors, unknown)

    # -- columns ----------------------------------------------------------------------------

    def encode_columns(
        self,
        columns: Mapping[str, Any],
        n_rows: int | None = None,
        *,
        on_unknown: OnUnknown = "report",
    ) -> EncodedRecords:
        """Encode one sequence (list, numpy array or pyarrow array) per field name.

        All columns must have ``n_rows`` values (or the same length when ``n_rows`` is None); a
        field without a column is missing in every row. Raises ValueError for length mismatches.
        """
        lengths = {k: len(v) for k, v in columns.items()}
        if n_rows is None:
            n_rows = next(iter(lengths.values()), 0)
        wrong = {k: ln for k, ln in lengths.items() if ln != n_rows}
        if wrong:
            raise ValueError(f"columns must all have {n_rows} values, got {wrong}")
        n = n_rows
        errors: list[RecordError] = []
        unknown: list[tuple[int, str]] = []
        if on_unknown != "ignore":
            extra = sorted(set(columns) - self.known)
            if on_unknown == "error":
                errors.extend(RecordError(0, k, "unknown field") for k in extra)
            else:
                unknown = [(0, k) for k in extra]
        tokens = np.empty((n, self.n_slots), dtype=np.int64)
        if self._cat_names:
            cols = [columns.get(name) for name in self._cat_names]
            if all(c is None or type(c) is list for c in cols):
                flat = list(chain.from_iterable([None] * n if c is None else c for c in cols))
                tok = self._hash_flat(flat, n, errors, row_major=False)
            else:
                parts = [self._text_column(c, n, j, errors) for j, c in enumerate(cols)]
                arr = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
                tok = self._hash_cells(arr, n, errors, row_major=False)
            tokens[:, self._cat_slots] = tok
        for slot, f in self._bags:
            col = columns.get(f.name)
            self._bag_column(f, slot, [None] * n if col is None else _to_list(col), tokens, errors)
        if self._derived:
            src = columns.get(self._source) if self._source else None
            direct = {f.name: columns.get(f.name) for _, f in self._derived}
            self._derive(
                [None] * n if src is None else _to_list(src),
                {k: [None] * n if v is None else _to_list(v) for k, v in direct.items()},
                tokens,
                errors,
            )
        dcols = [columns.get(name) for name in self._dense_names]
        if self._dense_names and all(c is None or type(c) is list for c in dcols):
            # Lists (JSON data, BYTES tensors): one pass over all dense cells, field-major.
            flat = list(chain.from_iterable([None] * n if c is None else c for c in dcols))
            dense = self._dense_flat(flat, n, errors, row_major=False)
        elif self._dense_names:
            raw = np.empty((n, len(self._dense_names)), dtype=np.float64)
            bad = np.zeros(raw.shape, dtype=bool)
            for j, name in enumerate(self._dense_names):
                col = columns.get(name)
                num = _numeric_column(col, n)
                if num is not None:
                    raw[:, j] = num
                    continue
                r, b = self._dense_raw(_to_list(col), n, (name,), errors, row_major=False)
                raw[:, j], bad[:, j] = r, b
            dense = self._dense_from_raw(raw, bad, errors)
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        errors.sort(key=lambda e: (e.row, e.field or ""))
        return EncodedRecords(dense, tokens, errors, unknown)

    # -- internals ----------------------------------------------------------------------------

    def _where(self, k: int, n: int, row_major: bool, names: Sequence[str]) -> tuple[int, str]:
        m = len(names)
        return (k // m, names[k % m]) if row_major else (k % n, names[k // n])

    def _hash_flat(
        self, flat: list[Any], n: int, errors: list[RecordError], row_major: bool
    ) -> np.ndarray:
        """Tokens (n, C) of the flat single-valued categorical cells (row- or field-major)."""
        c = len(self._cat_names)
        try:
            # Arrow takes only str/bytes/None here; anything else sends us column by column.
            arr = pa.array(flat, pa.string())
        except (pa.ArrowException, UnicodeError):
            arr = _str_or_int(flat)
            if arr is not None:
                return self._hash_cells(arr, n, errors, row_major)
            if n * c <= 512:
                # Few cells: canonicalising each costs less than a column-by-column pass.
                return self._hash_cells(
                    pa.array(self._canon_all(flat, n, errors, row_major), pa.string()),
                    n,
                    errors,
                    row_major,
                )
            if row_major:
                cols = [flat[j::c] for j in range(c)]
            else:
                cols = [flat[j * n : (j + 1) * n] for j in range(c)]
            parts = [self._text_column(col, n, j, errors) for j, col in enumerate(cols)]
            arr = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
            row_major = False
        return self._hash_cells(arr, n, errors, row_major)

    def _hash_cells(
        self, arr: pa.Array, n: int, errors: list[RecordError], row_major: bool
    ) -> np.ndarray:
        c = len(self._cat_names)
        arr = self._check_lengths(arr, n, errors, row_major)
        if row_major:
            cached = self._tile_cache.get(n)
            if cached is None:
                cached = (np.tile(self._seeds, n), np.tile(self._missing, n))
                if n <= 4096 and len(self._tile_cache) < 64:
                    self._tile_cache[n] = cached
            return hash_seeded(arr, cached[0], cached[1]).reshape(n, c)
        tok = hash_seeded(arr, np.repeat(self._seeds, n), np.repeat(self._missing, n))
        return tok.reshape(c, n).T

    def _canon_all(
        self, flat: list[Any], n: int, errors: list[RecordError], row_major: bool
    ) -> list[str | None]:
        names = self._cat_names
        for k, v in enumerate(flat):
            try:
                if type(v) is str:
                    v.encode("utf-8")
                    continue
                flat[k] = _canon(v)
                if flat[k] is not None:
                    flat[k].encode("utf-8")
            except _Bad as e:
                flat[k] = None
                row, name = self._where(k, n, row_major, names)
                errors.append(RecordError(row, name, str(e)))
            except UnicodeError:
                flat[k] = None
                row, name = self._where(k, n, row_major, names)
                errors.append(RecordError(row, name, "value is not valid Unicode"))
        return flat

    def _check_lengths(
        self, arr: pa.Array, n: int, errors: list[RecordError], row_major: bool
    ) -> pa.Array:
        limit = self.max_value_bytes
        if limit is None or len(arr) == 0:
            return arr
        off = np.frombuffer(arr.buffers()[1], dtype=np.int32)[
            arr.offset : arr.offset + len(arr) + 1
        ]
        if int(off[-1] - off[0]) <= limit:
            return arr
        too_long = np.flatnonzero(np.diff(off) > limit)
        if len(too_long) == 0:
            return arr
        for k in too_long.tolist():
            row, name = self._where(k, n, row_major, self._cat_names)
            errors.append(RecordError(row, name, f"value is longer than {limit} bytes"))
        mask = np.zeros(len(arr), dtype=bool)
        mask[too_long] = True
        return pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), arr)

    def _text_column(self, col: Any, n: int, j: int, errors: list[RecordError]) -> pa.Array:
        """One categorical column as a string array of canonical text (bad cells null)."""
        name = self._cat_names[j]
        if col is None:
            return pa.nulls(n, pa.string())
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if isinstance(col, np.ndarray):
            col = pa.array(col) if col.dtype.kind in "iuf" else col.tolist()
        if isinstance(col, pa.Array):
            t = col.type
            if pa.types.is_string(t):
                return col
            if pa.types.is_large_string(t) or pa.types.is_integer(t):
                return col.cast(pa.string())
            if pa.types.is_floating(t):
                return self._float_text(col, name, errors)
            if pa.types.is_null(t):
                return pa.nulls(n, pa.string())
            col = col.to_pylist()
        vals = list(col)
        types = set(map(type, vals))
        try:
            if _TEXT_TYPES.issuperset(types):
                return pa.array(vals, pa.string())
            if _INT_TYPES.issuperset(types):
                return pa.array(vals, pa.int64()).cast(pa.string())
            if _FLOAT_TYPES.issuperset(types):
                return self._float_text(pa.array(vals, pa.float64()), name, errors)
        except (pa.ArrowException, OverflowError, UnicodeError):
            pass  # e.g. integers beyond int64, surrogates: value by value below
        for k, v in enumerate(vals):
            try:
                vals[k] = _canon(v)
                if vals[k] is not None:
                    vals[k].encode("utf-8")
            except _Bad as e:
                vals[k] = None
                errors.append(RecordError(k, name, str(e)))
            except UnicodeError:
                vals[k] = None
                errors.append(RecordError(k, name, "value is not valid Unicode"))
        return pa.array(vals, pa.string())

    def _float_text(self, col: pa.Array, name: str, errors: list[RecordError]) -> pa.Array:
        """Canonical text of a float column: integer text where integral, else repr."""
        v = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        null = np.asarray(col.is_null()) if col.null_count else np.zeros(len(v), dtype=bool)
        integral = np.isfinite(v) & (v == np.trunc(v)) & (np.abs(v) <= _EXACT_FLOAT_INT)
        ints = np.where(integral, v, 0).astype(np.int64)
        text = pa.array(ints, mask=~integral).cast(pa.string())
        other = np.flatnonzero(~integral & ~null)
        if len(other) == 0:
            return text
        out = text.to_pylist()
        for k in other.tolist():
            try:
                out[k] = _canon_float(float(v[k]))
            except _Bad as e:
                errors.append(RecordError(k, name, str(e)))
        return pa.array(out, pa.string())

    def _bag_column(
        self,
        f: CategoricalField,
        slot: int,
        col: list[Any],
        tokens: np.ndarray,
        errors: list[RecordError],
    ) -> None:
        sep = f.separator
        assert sep is not None
        text: list[str | None] = []
        for i, v in enumerate(col):
            try:
                if isinstance(v, (list, tuple)):
                    items = []
                    for item in v:
                        if isinstance(item, (list, tuple, Mapping)):
                            raise _Bad(
                                f"items of a multi-valued field must be values, got {_describe(item)}"
                            )
                        c = _canon(item)
                        if c is not None:
                            items.append(c)
                    text.append(sep.join(items))
                else:
                    text.append(_canon(v))
            except _Bad as e:
                text.append(None)
                errors.append(RecordError(i, f.name, str(e)))
        n = len(col)
        try:
            arr = pa.array(text, pa.string())
        except UnicodeError:
            for i, t in enumerate(text):
                try:
                    if t is not None:
                        t.encode("utf-8")
                except UnicodeError:
                    text[i] = None
                    errors.append(RecordError(i, f.name, "value is not valid Unicode"))
            arr = pa.array(text, pa.string())
        tokens[:, slot : slot + f.width] = PAD_TOKEN
        tokens[:, slot] = token_hash(f.name, None)
        if n == 0:
            return
        items, parent, pos = split_bag(f, arr)
        kept = pos < f.max_values
        limit = self.max_value_bytes
        if limit is not None and len(items):
            lens = np.asarray(pc.binary_length(items))
            for k in np.flatnonzero(lens > limit).tolist():
                errors.append(
                    RecordError(int(parent[k]), f.name, f"an item is longer than {limit} bytes")
                )
            kept &= lens <= limit
        tokens[parent[kept], slot + pos[kept]] = hash_column(f.name, items.filter(pa.array(kept)))

    def _derive_records(
        self, records: Sequence[Any], tokens: np.ndarray, errors: list[RecordError]
    ) -> None:
        src = self._source
        maps = [r if isinstance(r, Mapping) else {} for r in records]
        hours = [r.get(src) for r in maps] if src else [None] * len(maps)
        direct: dict[str, list[Any]] = {}
        if any(h is None for h in hours):
            direct = {f.name: [r.get(f.name) for r in maps] for _, f in self._derived}
        self._derive(hours, direct, tokens, errors)

    def _derive(
        self,
        hours: list[Any],
        direct: dict[str, list[Any]],
        tokens: np.ndarray,
        errors: list[RecordError],
    ) -> None:
        """Derived fields: from the source where a row has one, else as given directly."""
        n = len(hours)
        src = self._source or ""
        values: dict[str, list[str | None]] = {f.name: [None] * n for _, f in self._derived}
        for name, col in direct.items():
            for i, v in enumerate(col):
                if v is None or hours[i] is not None:
                    continue
                try:
                    values[name][i] = _canon(v)
                except _Bad as e:
                    errors.append(RecordError(i, name, str(e)))
        derived = self._hour_cache
        hod, wd = values.get("hour_of_day"), values.get("weekday")
        for i, h in enumerate(hours):
            if h is None:
                continue
            try:
                t = h if type(h) is str else _canon(h)
                if not t:
                    continue
                got = derived.get(t)
                if got is None:
                    got = _avazu_hour(t)
                    if len(derived) >= 4096:
                        derived.clear()
                    derived[t] = got
            except _Bad as e:
                errors.append(RecordError(i, src, str(e)))
                continue
            if hod is not None:
                hod[i] = got[0]
            if wd is not None:
                wd[i] = got[1]
        flat = list(chain.from_iterable(values[f.name] for _, f in self._derived))
        arr = pa.array(flat, pa.string())
        seeds = np.repeat([field_seed(f.name) for _, f in self._derived], n).astype(np.uint64)
        missing = np.repeat([token_hash(f.name, None) for _, f in self._derived], n)
        tok = hash_seeded(arr, seeds, missing.astype(np.int64)).reshape(len(self._derived), n)
        for k, (slot, _) in enumerate(self._derived):
            tokens[:, slot] = tok[k]

    def _dense_flat(
        self, flat: list[Any], n: int, errors: list[RecordError], row_major: bool
    ) -> np.ndarray:
        d = len(self._dense_names)
        raw, bad = self._dense_raw(flat, n, self._dense_names, errors, row_major)
        return self._shape_dense(raw, bad, n, d, errors, row_major)

    def _dense_raw(
        self,
        flat: list[Any],
        n: int,
        names: Sequence[str],
        errors: list[RecordError],
        row_major: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw float64 of flat dense cells (NaN: missing or bad) and the mask of bad ones."""
        raw: np.ndarray | None = None
        bad = np.zeros(len(flat), dtype=bool)
        types = set(map(type, flat))
        if _NUMBER_TYPES.issuperset(types):
            try:
                raw = pa.array(flat, pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                raw = None
        elif _TEXT_TYPES.issuperset(types):
            raw = _parse_text(flat)
            if raw is not None:
                # Text 'nan' is missing (as in the training files), text 'inf' is not a number.
                inf = np.isinf(raw)
                if inf.any():
                    raw = raw.copy()
                    for k in np.flatnonzero(inf).tolist():
                        bad[k] = True
                        raw[k] = np.nan
                        row, name = self._where(k, n, row_major, names)
                        errors.append(RecordError(row, name, f"non-numeric value {flat[k]!r}"))
                return raw, bad
        if raw is None:
            raw = np.empty(len(flat), dtype=np.float64)
            for k, v in enumerate(flat):
                try:
                    raw[k] = _dense_value(v)
                except _Bad as e:
                    raw[k] = np.nan
                    bad[k] = True
                    row, name = self._where(k, n, row_major, names)
                    errors.append(RecordError(row, name, str(e)))
            return raw, bad
        # Arrow keeps NaN and inf as numbers (None became null = NaN): those are errors.
        nonfinite = ~np.isfinite(raw)
        if nonfinite.any():
            for k in np.flatnonzero(nonfinite).tolist():
                if flat[k] is not None:
                    bad[k] = True
                    row, name = self._where(k, n, row_major, names)
                    errors.append(
                        RecordError(
                            row, name, f"{flat[k]!r} is not a number; send null for a missing value"
                        )
                    )
            raw = raw.copy()
            raw[bad] = np.nan
        return raw, bad

    def _shape_dense(
        self,
        raw: np.ndarray,
        bad: np.ndarray,
        n: int,
        d: int,
        errors: list[RecordError],
        row_major: bool,
    ) -> np.ndarray:
        if row_major:
            raw, bad = raw.reshape(n, d), bad.reshape(n, d)
        else:
            raw, bad = raw.reshape(d, n).T, bad.reshape(d, n).T
        return self._dense_from_raw(raw, bad, errors)

    def _dense_from_raw(
        self, raw: np.ndarray, bad: np.ndarray, errors: list[RecordError]
    ) -> np.ndarray:
        """The schema's dense transforms on raw (n, D) float64 (NaN: missing), as
        :func:`lma.features.transform_dense` computes them, column by column."""
        v = np.where(np.isnan(raw), self._fill, raw)
        if self._clip:
            v = np.clip(v, self._lo, self._hi)
        if self._log.all():
            v = np.log1p(np.maximum(v, 0.0))
        elif self._log.any():
            v[:, self._log] = np.log1p(np.maximum(v[:, self._log], 0.0))
        with np.errstate(over="ignore"):
            out = v.astype(np.float32)
        if not np.isfinite(out).all():
            for i, j in zip(*np.nonzero(~np.isfinite(out) & ~bad), strict=True):
                errors.append(
                    RecordError(int(i), self._dense_names[j], f"{raw[i, j]!r} overflows float32")
                )
            out[~np.isfinite(out)] = np.broadcast_to(self._dense_missing, out.shape)[
                ~np.isfinite(out)
            ]
        return out


def _avazu_hour(t: str) -> tuple[str, str]:
    """Avazu's ``hour`` text (YYMMDDHH) -> (hour_of_day, weekday) text, as lma.features derives
    them (weekday: Monday = 0)."""
    if len(t) != 8 or not t.isascii() or not t.isdigit():
        raise _Bad(f"expected YYMMDDHH, got {t[:40]!r}")
    try:
        day = datetime.date(2000 + int(t[:2]), int(t[2:4]), int(t[4:6]))
    except ValueError:
        raise _Bad(f"expected YYMMDDHH, got {t!r}") from None
    if int(t[6:]) >= 24:
        raise _Bad(f"expected YYMMDDHH, got {t!r}")
    return t[6:], str(day.weekday())


def _str_or_int(flat: list[Any]) -> pa.Array | None:
    """Cells that are all str, int or None as a string array (ints as decimal text), without a
    Python step per value; None for anything else."""
    if not _STR_INT_TYPES.issuperset(set(map(type, flat))):
        return None
    try:
        null = np.fromiter(map(operator.is_, flat, repeat(None)), dtype=bool, count=len(flat))
        return pa.array(list(map(str, flat)), pa.string(), mask=null)
    except (pa.ArrowException, UnicodeError, ValueError):  # surrogates, > 4300-digit ints
        return None


def _parse_text(flat: list[str | None]) -> np.ndarray | None:
    """Dense text cells parsed as lma.features parses the training text (NaN: missing), or None
    when Arrow cannot parse them all (the caller then goes value by value)."""
    try:
        arr = pa.array(flat, pa.string())
        arr = pc.utf8_trim_whitespace(arr)
        arr = pc.if_else(pc.equal(pc.utf8_length(arr), 0), pa.scalar(None, pa.string()), arr)
        num = pc.cast(arr, pa.float64())
    except (pa.ArrowException, UnicodeError):
        return None
    return np.asarray(num.to_numpy(zero_copy_only=False), dtype=np.float64)


def _flat(records: list[dict], names: tuple[str, ...]) -> list[Any]:
    """``[r.get(k) for r in records for k in names]`` (row-major) without a Python step per
    value."""
    m = len(names)
    return list(map(dict.get, chain.from_iterable(map(repeat, records, repeat(m))), cycle(names)))


def _to_list(col: Any) -> list[Any]:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_pylist()
    if isinstance(col, np.ndarray):
        return col.tolist()
    return list(col)


def _numeric_column(col: Any, n: int) -> np.ndarray | None:
    """A dense column as float64 (NaN: missing) when it is numeric already, else None."""
    if col is None:
        return np.full(n, np.nan)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        t = col.type
        if (pa.types.is_integer(t) or pa.types.is_floating(t)) and not col.null_count:
            col = np.asarray(col.to_numpy(zero_copy_only=False))
        else:
            return None
    if isinstance(col, np.ndarray) and col.dtype.kind in "iuf":
        a = col.astype(np.float64)
        return a if np.isfinite(a).all() else None
    return None


_ENCODERS: dict[int, tuple[weakref.ref, RecordEncoder]] = {}


def encoder_for(schema: Schema) -> RecordEncoder:
    """The cached :class:`RecordEncoder` (default settings) of a schema object."""
    hit = _ENCODERS.get(id(schema))
    if hit is not None and hit[0]() is schema:
        return hit[1]
    enc = RecordEncoder(schema)
    key = id(schema)

    def forget(ref: weakref.ref, cache: dict = _ENCODERS) -> None:
        # Only this schema's entry: a later schema may reuse the id. ``cache`` is bound now, as
        # module globals may already be gone when this runs at interpreter exit.
        entry = cache.get(key)
        if entry is not None and entry[0] is ref:
            del cache[key]

    # The cache must not keep the schema alive: the encoder holds it weakly from here on.
    enc._schema_ref = weakref.ref(schema, forget)
    enc._schema = None
    _ENCODERS[key] = (enc._schema_ref, enc)
    return enc


def encode_records(
    schema: Schema, records: Sequence[Any], *, on_unknown: OnUnknown = "report"
) -> EncodedRecords:
    """Encode parsed JSON records like :func:`lma.features.encode_table` (see the module rules)."""
    return encoder_for(schema).encode(records, on_unknown=on_unknown)


def encode_columns(
    schema: Schema,
    columns: Mapping[str, Any],
    n_rows: int | None = None,
    *,
    on_unknown: OnUnknown = "report",
) -> EncodedRecords:
    """Encode one sequence per field (see :meth:`RecordEncoder.encode_columns`)."""
    return encoder_for(schema).encode_columns(columns, n_rows, on_unknown=on_unknown)
