"""encode_records / encode_columns == encode_table on the same rows; per-cell errors; the seeded
multi-field hash == token hash v1."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from lma.data import open_source
from lma.features import encode_table
from lma.records import (
    RecordEncoder,
    canonical_text,
    encode_columns,
    encode_records,
    encoder_for,
)
from lma.schema import Schema, avazu_schema, criteo_schema
from lma.tokens import field_seed, hash_column, hash_seeded, token_hash

# -- the seeded hash ---------------------------------------------------------------------------


def _values(rng: np.random.Generator, n: int, max_len: int) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(None)
        elif r < 0.15:
            out.append("")
        elif r < 0.3:
            out.append("é✓ü漢" * int(rng.integers(1, 5)))
        else:
            k = int(rng.integers(1, max_len + 1))
            out.append("".join(chr(int(c)) for c in rng.integers(32, 127, k)))
    return out


@pytest.mark.parametrize("max_len", [1, 8, 48, 49, 300])
@pytest.mark.parametrize("n", [1, 7, 40, 2000])
def test_hash_seeded_matches_scalar(n: int, max_len: int) -> None:
    rng = np.random.default_rng(n * 1000 + max_len)
    vals = _values(rng, n, max_len)
    fields = [f"f{int(i)}" for i in rng.integers(0, 5, n)]
    ref = np.array([token_hash(f, v) for f, v in zip(fields, vals, strict=True)], dtype=np.int64)
    seeds = np.array([field_seed(f) for f in fields], dtype=np.uint64)
    missing = np.array([token_hash(f, None) for f in fields], dtype=np.int64)
    got = hash_seeded(pa.array(vals, pa.string()), seeds, missing)
    np.testing.assert_array_equal(got, ref)


def test_hash_seeded_long_values_many_and_few() -> None:
    few = ["x" * 5000, "y" * 49, "z"]
    many = [("ab" * k)[:k] for k in range(40, 200)]
    for vals in (few, many, few + many):
        ref = [token_hash("L", v) for v in vals]
        assert hash_column("L", vals).tolist() == ref
        assert hash_column("L", pa.array(vals, pa.large_string())).tolist() == ref


def test_hash_column_fixed_width_and_sliced() -> None:
    vals = [f"{(i * 2654435761) % 2**32:08x}" if i % 5 else "" for i in range(3000)]
    arr = pa.array(vals, pa.string())
    ref = [token_hash("C3", v) for v in vals]
    assert hash_column("C3", arr).tolist() == ref
    assert hash_column("C3", arr.slice(17, 900)).tolist() == ref[17:917]


@pytest.mark.parametrize("max_values", [1, 16, 10**6])
def test_padded_and_sorted_paths_agree(monkeypatch: pytest.MonkeyPatch, max_values: int) -> None:
    import lma.tokens as tokens

    monkeypatch.setattr(tokens, "_PAD_MAX_VALUES", max_values)
    vals = _values(np.random.default_rng(3), 500, 60)
    assert hash_column("b", vals).tolist() == [token_hash("b", v) for v in vals]


# -- canonical text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("5", "5"),
        (5, "5"),
        (5.0, "5"),
        (-1, "-1"),
        (-1.0, "-1"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        (2.0**53, "9007199254740992"),
        (10**30, "1" + "0" * 30),
        (" 5 ", " 5 "),
        ("", ""),
        (None, None),
        (b"ab", "ab"),
        (np.int64(7), "7"),
        (np.float32(3.0), "3"),
    ],
)
def test_canonical_text(value: object, text: str | None) -> None:
    assert canonical_text(value) == text


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, 2.0**53 + 2, True, False, {"a": 1}, [1], b"\xff"]
)
def test_canonical_text_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        canonical_text(value)


# -- against encode_table on the real rows -----------------------------------------------------


def _as_json_numbers(row: dict[str, str], numeric: set[str]) -> dict[str, object]:
    """The row as a client would send it: numbers as JSON numbers where the text round-trips,
    empty cells left out."""
    out: dict[str, object] = {}
    for k, v in row.items():
        if v == "":
            continue
        if k in numeric or (v.lstrip("-").isdigit() and str(int(v)) == v):
            try:
                out[k] = int(v) if str(int(v)) == v else float(v)
            except ValueError:
                out[k] = v
        else:
            out[k] = v
    return out


def _rows_and_expected(spec: str):
    """(raw table, encode_table's encoding) chunks, as the real reader gives them."""
    yield from open_source(spec, chunk_rows=4096).iter_tables()


def _check_equal(schema: Schema, records: list, table_enc) -> None:
    got = encode_records(schema, records)
    assert got.errors == []
    assert got.unknown == []
    np.testing.assert_array_equal(got.tokens, table_enc.tokens)
    np.testing.assert_array_equal(got.dense, table_enc.dense)


@pytest.mark.parametrize("form", ["strings", "numbers", "floats", "json"])
def test_criteo_rows_encode_like_encode_table(shared_data, form: str) -> None:
    path = shared_data / "criteo" / "train_10k.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    schema = criteo_schema()
    dense = set(schema.dense_names)
    n = 0
    for table, enc in _rows_and_expected(f"criteo:{path}"):
        rows = table.to_pylist()
        if form == "numbers":
            rows = [_as_json_numbers(r, dense) for r in rows]
        elif form == "floats":
            rows = [
                {k: (float(v) if isinstance(v, int) else v) for k, v in r.items()}
                for r in (_as_json_numbers(r, dense) for r in rows)
            ]
        elif form == "json":
            rows = json.loads(json.dumps([_as_json_numbers(r, dense) for r in rows]))
        _check_equal(schema, rows, enc)
        # Columnar form: one list per field.
        cols = {k: [r.get(k) for r in rows] for k in table.column_names}
        got = encode_columns(schema, cols)
        assert got.errors == []
        np.testing.assert_array_equal(got.tokens, enc.tokens)
        np.testing.assert_array_equal(got.dense, enc.dense)
        n += len(rows)
    assert n == 10_000


@pytest.mark.parametrize("form", ["strings", "numbers", "json"])
def test_avazu_rows_encode_like_encode_table(shared_data, form: str) -> None:
    path = shared_data / "avazu" / "train_9999.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    schema = avazu_schema()
    n = 0
    for table, enc in _rows_and_expected(f"avazu:{path}"):
        rows = table.to_pylist()
        if form in ("numbers", "json"):
            rows = [_as_json_numbers(r, set()) for r in rows]
            assert any(isinstance(r.get("C14"), int) for r in rows)
            assert any(isinstance(r.get("hour"), int) for r in rows)
        if form == "json":
            rows = json.loads(json.dumps(rows))
        _check_equal(schema, rows, enc)
        cols = {k: [r.get(k) for r in rows] for k in table.column_names}
        got = encode_columns(schema, cols)
        assert got.errors == []
        np.testing.assert_array_equal(got.tokens, enc.tokens)
        # Numeric tensors (the v2 route's INT64 inputs) for the integer columns.
        ints = {
            k: np.array([int(v) for v in table.column(k).to_pylist()], dtype=np.int64)
            for k in ("C1", "banner_pos", "C14", "C20", "hour")
        }
        got = encode_columns(schema, {**cols, **ints})
        assert got.errors == []
        np.testing.assert_array_equal(got.tokens, enc.tokens)
        n += len(rows)
    assert n == 9999


def test_avazu_derived_given_directly_and_bad_hour() -> None:
    schema = avazu_schema()
    base = {"C1": "1005", "site_id": "1fbe01fe"}
    table = pa.table(
        {k: pa.array([v], pa.string()) for k, v in {**base, "hour": "14102100"}.items()}
        | {
            k: pa.array(["x"], pa.string())
            for k in schema.categorical_names
            if k not in (*base, "hour_of_day", "weekday")
        }
    )
    full = {k: table.column(k)[0].as_py() for k in table.column_names}
    ref = encode_table(schema, table)
    direct = {k: v for k, v in full.items() if k != "hour"} | {"hour_of_day": "00", "weekday": 1}
    got = encode_records(schema, [full, direct, {**full, "hour": "14133100"}, {**full, "hour": 7}])
    np.testing.assert_array_equal(got.tokens[0], ref.tokens[0])
    np.testing.assert_array_equal(got.tokens[1], ref.tokens[0])  # 2014-10-21 was a Tuesday
    assert [(e.row, e.field) for e in got.errors] == [(2, "hour"), (3, "hour")]
    assert "YYMMDDHH" in got.errors[0].reason
    hod = schema.categorical_names.index("hour_of_day")
    assert got.tokens[2, hod] == token_hash("hour_of_day", None)


# -- per-cell rules ----------------------------------------------------------------------------


def _small_schema() -> Schema:
    return Schema.from_dict(
        {
            "name": "t",
            "label": "y",
            "dense": [
                {"name": "d", "transform": "log1p", "clip_min": 0},
                {"name": "e", "fill": 2.5, "clip_max": 10},
                "f",
            ],
            "categorical": ["c", {"name": "tags", "separator": "|", "max_values": 3}, "k"],
            "drop": ["id"],
            "time_column": "ts",
        }
    )


def _table_of(schema: Schema, rows: list[dict[str, str]]) -> pa.Table:
    names = schema.dense_names + schema.categorical_names
    return pa.table({k: pa.array([r.get(k, "") for r in rows], pa.string()) for k in names})


def test_missing_keys_null_and_ignored_keys() -> None:
    s = _small_schema()
    rows = [
        {"d": "3", "e": "1.5", "f": "-2", "c": "a", "tags": "x|y", "k": "z"},
        {},
        {"d": "", "c": "", "tags": "", "k": "q"},
        {"d": "7", "tags": "a||b|c|d", "f": "1e3"},
    ]
    ref = encode_table(s, _table_of(s, rows))
    json_rows = [
        {"d": 3, "e": 1.5, "f": -2, "c": "a", "tags": ["x", "y"], "k": "z", "y": 1, "id": 9},
        {"ts": 5},
        {"d": None, "c": None, "tags": None, "k": "q"},
        {"d": 7.0, "tags": ["a", "", None, "b", "c", "d"], "f": 1000},
    ]
    got = encode_records(s, json_rows)
    assert got.errors == [] and got.unknown == []
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.dense, ref.dense)
    again = encode_records(s, rows)
    np.testing.assert_array_equal(again.tokens, ref.tokens)
    np.testing.assert_array_equal(again.dense, ref.dense)


def test_dense_text_like_training_text() -> None:
    s = _small_schema()
    texts = [" 7 ", "nan", "NaN", "+3.5", ".5", "1.", "-0", "1e-3", "2E2", ""]
    rows = [{"f": t} for t in texts]
    ref = encode_table(s, _table_of(s, rows))
    got = encode_records(s, rows)
    assert got.errors == []
    np.testing.assert_array_equal(got.dense, ref.dense)


BAD = [
    ({"d": "abc"}, "d", "non-numeric"),
    ({"d": "1_000"}, "d", "non-numeric"),
    ({"d": "inf"}, "d", "non-numeric"),
    ({"d": "٣"}, "d", "non-numeric"),
    ({"d": math.nan}, "d", "not a number"),
    ({"d": math.inf}, "d", "not a number"),
    ({"d": 10**400}, "d", "too large"),
    ({"f": 1e300}, "f", "overflows float32"),
    ({"d": True}, "d", "boolean"),
    ({"d": [1]}, "d", "array"),
    ({"d": {"v": 1}}, "d", "object"),
    ({"c": {"v": 1}}, "c", "object"),
    ({"c": ["a"]}, "c", "array"),
    ({"c": True}, "c", "boolean"),
    ({"c": math.nan}, "c", "category"),
    ({"c": 2.0**60}, "c", "2**53"),
    ({"c": "\ud800"}, "c", "Unicode"),
    ({"c": "x" * 5000}, "c", "longer than"),
    ({"tags": [["a"]]}, "tags", "items"),
    ({"tags": {"a": 1}}, "tags", "object"),
    ({"tags": ["x" * 5000]}, "tags", "longer than"),
]


@pytest.mark.parametrize(("cell", "field", "reason"), BAD)
def test_bad_cell_fails_only_its_cell(cell: dict, field: str, reason: str) -> None:
    s = _small_schema()
    good = {"d": "3", "e": "1", "f": "2", "c": "a", "tags": "x|y", "k": "z"}
    rows = [good, {**good, **cell}, good]
    got = encode_records(s, rows)
    assert [(e.row, e.field) for e in got.errors] == [(1, field)], got.errors
    assert reason in got.errors[0].reason
    assert got.bad_rows == [1]
    # The bad cell is encoded as missing, everything else as usual.
    expected_row = {**good, field: ""}
    ref = encode_table(s, _table_of(s, [good, expected_row]))
    np.testing.assert_array_equal(got.tokens[[0, 1, 2]], ref.tokens[[0, 1, 0]])
    np.testing.assert_array_equal(got.dense[[0, 1, 2]], ref.dense[[0, 1, 0]])
    # Columnar entry point: the same error at the same place.
    cols = {k: [r.get(k) for r in rows] for k in good}
    got_c = encode_columns(s, cols)
    assert [(e.row, e.field) for e in got_c.errors] == [(1, field)], got_c.errors
    np.testing.assert_array_equal(got_c.tokens, got.tokens)
    np.testing.assert_array_equal(got_c.dense, got.dense)


def test_records_that_are_not_objects_and_unknown_fields() -> None:
    s = _small_schema()
    got = encode_records(s, [{"c": "a"}, [1, 2], "x", {"c": "a", "zz": 1, "aa": 2}])
    assert [(e.row, e.field) for e in got.errors] == [(1, None), (2, None)]
    assert got.unknown == [(3, "aa"), (3, "zz")]
    np.testing.assert_array_equal(got.tokens[3], got.tokens[0])
    as_errors = encode_records(s, [{"c": "a", "zz": 1}], on_unknown="error")
    assert [(e.row, e.field, e.reason) for e in as_errors.errors] == [(0, "zz", "unknown field")]
    assert encode_records(s, [{"c": "a", "zz": 1}], on_unknown="ignore").unknown == []
    cols = encode_columns(s, {"c": ["a"], "zz": [1]})
    assert cols.unknown == [(0, "zz")]


def test_empty_and_column_shapes() -> None:
    s = _small_schema()
    got = encode_records(s, [])
    assert got.tokens.shape == (0, s.n_token_slots) and got.dense.shape == (0, 3)
    with pytest.raises(ValueError, match="values"):
        encode_columns(s, {"c": ["a", "b"], "d": [1]})
    num = encode_columns(
        s,
        {
            "c": np.array([5, 6]),
            "k": np.array([5.0, 0.5]),
            "d": np.array([1, 2], np.int32),
            "e": pa.array([1.5, None]),
            "f": np.array([b"3", b" 4"], dtype=object),
        },
    )
    ref = encode_records(
        s, [{"c": "5", "k": "5", "d": 1, "e": 1.5, "f": 3}, {"c": "6", "k": "0.5", "d": 2, "f": 4}]
    )
    assert num.errors == []
    np.testing.assert_array_equal(num.tokens, ref.tokens)
    np.testing.assert_array_equal(num.dense, ref.dense)
    bad = encode_columns(s, {"c": np.array([np.nan, 1.0]), "d": np.array([np.inf, 1.0])})
    assert [(e.row, e.field) for e in bad.errors] == [(0, "c"), (0, "d")]


def test_encoder_cache_and_options() -> None:
    s = criteo_schema()
    assert encoder_for(s) is encoder_for(s)
    assert encoder_for(criteo_schema()) is not encoder_for(s)
    unlimited = RecordEncoder(s, max_value_bytes=None)
    got = unlimited.encode([{"C1": "x" * 10_000}])
    assert got.errors == []
    assert got.tokens[0, 0] == token_hash("C1", "x" * 10_000)


def test_number_columns_in_records() -> None:
    s = _small_schema()
    rows = [
        {"c": 5.0, "k": 7, "tags": [1, 2.5]},
        {"c": None, "k": "x"},
        {"c": 0.5, "k": 2**70},
        {"c": 1e-05, "k": -3},
    ]
    text = [
        {"c": "5", "k": "7", "tags": "1|2.5"},
        {"k": "x"},
        {"c": "0.5", "k": str(2**70)},
        {"c": "1e-05", "k": "-3"},
    ]
    got = encode_records(s, rows)
    assert got.errors == []
    np.testing.assert_array_equal(got.tokens, encode_records(s, text).tokens)
    ref = encode_table(s, _table_of(s, text))
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    cols = encode_columns(s, {k: [r.get(k) for r in rows] for k in ("c", "k", "tags")})
    np.testing.assert_array_equal(cols.tokens, ref.tokens)


def test_avazu_hour_rules_match_training() -> None:
    from lma.features import encode_with_errors

    schema = avazu_schema()
    hours = [
        "14102100",
        "16022923",
        "14022900",
        "14102124",
        "14100000",
        "14130100",
        "14003100",
        "1410210",
        "141021000",
        "１４102100",
        "14-02100",
        "abcdefgh",
        "00010100",
        "99123123",
    ]
    others = {k: ["x"] * len(hours) for k in schema.categorical_names}
    del others["hour_of_day"], others["weekday"]
    table = pa.table(
        {"hour": pa.array(hours, pa.string())}
        | {k: pa.array(v, pa.string()) for k, v in others.items()}
    )
    ref, ref_errors = encode_with_errors(schema, table)
    bad_ref = sorted({int(r) for e in ref_errors for r in e.rows})
    for got in (
        encode_records(schema, table.to_pylist()),
        encode_columns(schema, {k: table.column(k).to_pylist() for k in table.column_names}),
    ):
        assert [e.row for e in got.errors] == bad_ref
        assert all(e.field == "hour" and "YYMMDDHH" in e.reason for e in got.errors)
        good = [i for i in range(len(hours)) if i not in bad_ref]
        np.testing.assert_array_equal(got.tokens[good], ref.tokens[good])


def test_encoder_cache_forgets_dropped_schemas() -> None:
    import gc

    from lma import records

    s = criteo_schema()
    encoder_for(s)
    key = id(s)
    assert key in records._ENCODERS
    del s
    gc.collect()
    assert key not in records._ENCODERS
