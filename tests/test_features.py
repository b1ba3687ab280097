"""Schema and feature encoding: dense transforms, bad values, multi-valued fields, Avazu hour,
time column, FeatureMap counts and persistence."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pyarrow as pa
import pytest

from lma.features import (
    EncodeError,
    FeatureMap,
    derive_columns,
    encode_table,
    encode_with_errors,
)
from lma.schema import (
    CategoricalField,
    DenseField,
    Schema,
    avazu_schema,
    criteo_schema,
)
from lma.tokens import PAD_TOKEN, token_hash


def _schema(**kw) -> Schema:
    base = {
        "name": "t",
        "label": "y",
        "dense": [{"name": "d", "transform": "log1p", "clip_min": 0}, "e"],
        "categorical": ["c", {"name": "tags", "separator": "|", "max_values": 3}],
    }
    base.update(kw)
    return Schema.from_dict(base)


def _table(**cols) -> pa.Table:
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def test_dense_transform_missing_negative_and_clip() -> None:
    s = _schema(
        dense=[
            {"name": "d", "transform": "log1p", "clip_min": 0, "fill": 2.0},
            {"name": "e", "clip_max": 10.0},
        ]
    )
    t = _table(
        y=["0", "1", "0", "1"],
        d=["5", "", "-3", " 7 "],
        e=["1.5", "nan", "20", "-4"],
        c=["a"] * 4,
        tags=["x"] * 4,
    )
    enc = encode_table(s, t)
    np.testing.assert_allclose(enc.dense[:, 0], np.log1p([5, 2, 0, 7]).astype(np.float32))
    np.testing.assert_allclose(enc.dense[:, 1], [1.5, 0.0, 10.0, -4.0])
    assert enc.dense.dtype == np.float32 and enc.labels.tolist() == [0, 1, 0, 1]


def test_numeric_arrow_columns() -> None:
    s = _schema()
    t = pa.table(
        {
            "y": pa.array([1, 0]),
            "d": pa.array([3, None]),
            "e": pa.array([0.5, 2.0]),
            "c": pa.array([7, None]),
            "tags": pa.array(["a|b", None]),
        }
    )
    enc = encode_table(s, t)
    np.testing.assert_allclose(enc.dense, [[np.log1p(3), 0.5], [0.0, 2.0]], rtol=1e-6)
    assert enc.tokens[0, 0] == token_hash("c", "7")
    assert enc.tokens[1, 0] == token_hash("c", None)


def test_bad_values_name_column_and_all_rows() -> None:
    s = _schema()
    t = _table(
        y=["0", "1", "2", "1", ""],
        d=["1", "x", "2", "3e", "4"],
        e=["1", "2", "inf", "3", "4"],
        c=["a"] * 5,
        tags=["t"] * 5,
    )
    with pytest.raises(EncodeError) as ei:
        encode_table(s, t)
    # The lowest bad row is row 1 (dense 'd' = 'x').
    assert ei.value.column == "d" and ei.value.rows.tolist() == [1, 3]
    assert "'x'" in str(ei.value)
    enc, errors = encode_with_errors(s, t)
    by_col = {e.column: e.rows.tolist() for e in errors}
    assert by_col == {"y": [2, 4], "d": [1, 3], "e": [2]}
    assert len(enc) == 5  # every row encoded; callers drop the bad ones
    lab = next(e for e in errors if e.column == "y")
    assert lab.reason(0) == "column 'y': label must be 0 or 1, got '2'"


def test_missing_column_raises() -> None:
    s = _schema()
    with pytest.raises(EncodeError, match="'tags' is missing"):
        encode_table(s, _table(y=["0"], d=["1"], e=["1"], c=["a"]))


def test_multi_valued_field() -> None:
    s = _schema()
    t = _table(
        y=["0"] * 6,
        d=["1"] * 6,
        e=["1"] * 6,
        c=["a"] * 6,
        tags=["a|b|c|d", "a", "", "x||y|", "|", "q|q"],
    )
    t = t.set_column(4, "tags", pa.array(["a|b|c|d", "a", None, "x||y|", "|", "q|q"]))
    enc = encode_table(s, t)
    assert s.n_token_slots == 4 and enc.tokens.shape == (6, 4)
    h = lambda v: token_hash("tags", v)  # noqa: E731
    miss = token_hash("tags", None)
    bags = enc.tokens[:, 1:]
    assert bags[0].tolist() == [h("a"), h("b"), h("c")]  # truncated to max_values
    assert bags[1].tolist() == [h("a"), PAD_TOKEN, PAD_TOKEN]
    assert bags[2].tolist() == [miss, PAD_TOKEN, PAD_TOKEN]  # null cell
    assert bags[3].tolist() == [h("x"), h("y"), PAD_TOKEN]  # empty items dropped
    assert bags[4].tolist() == [miss, PAD_TOKEN, PAD_TOKEN]
    assert bags[5].tolist() == [h("q"), h("q"), PAD_TOKEN]
    assert s.slot_fields() == [0, 1, 1, 1]


def test_avazu_hour_derivation_matches_datetime() -> None:
    s = avazu_schema()
    hours = ["14102100", "14102923", "16022912", "99123105", "00010100"]
    cols = {
        n: ["x"] * len(hours) for n in s.categorical_names if n not in ("hour_of_day", "weekday")
    }
    t = _table(id=["1"] * len(hours), click=["0", "1", "0", "1", "0"], hour=hours, **cols)
    out = derive_columns(s, t)
    wd = [str(datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday()) for h in hours]
    assert out.column("weekday").to_pylist() == wd
    assert out.column("hour_of_day").to_pylist() == [h[6:] for h in hours]
    enc = encode_table(s, t)
    assert enc.tokens[:, 0].tolist() == [token_hash("hour_of_day", h[6:]) for h in hours]
    assert enc.tokens[:, 1].tolist() == [token_hash("weekday", w) for w in wd]
    assert enc.times.tolist() == [int(h) for h in hours]  # time column 'hour'


def test_avazu_bad_hours() -> None:
    s = avazu_schema()
    hours = ["14102100", "14133100", "1410210", "14022900", "14102124", "abcdefgh"]
    cols = {
        n: ["x"] * len(hours) for n in s.categorical_names if n not in ("hour_of_day", "weekday")
    }
    t = _table(click=["0"] * len(hours), hour=hours, **cols)
    _, errors = encode_with_errors(s, t)
    hour_err = next(e for e in errors if e.column == "hour")
    assert hour_err.rows.tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(EncodeError, match="YYMMDDHH"):
        derive_columns(s, t)


def test_time_column_kinds() -> None:
    base = {"name": "t", "label": None, "categorical": ["c"], "time_column": "ts"}
    s = Schema.from_dict(base)
    enc = encode_table(s, _table(c=["a", "b"], ts=["2024-01-02 00:00:00", "2024-01-01 12:00:00"]))
    assert enc.times[0] > enc.times[1]
    enc = encode_table(s, _table(c=["a", "b"], ts=["1.5", "0.25"]))
    assert enc.times.tolist() == [1.5, 0.25]
    enc, errors = encode_with_errors(s, _table(c=["a", "b", "c"], ts=["3", "", "1"]))
    assert [(e.column, e.rows.tolist()) for e in errors] == [("ts", [1])]


def test_feature_map_build_matches_unique_and_roundtrips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    s = _schema()
    n = 5000
    t = _table(
        y=["0"] * n,
        d=["1"] * n,
        e=["1"] * n,
        c=[f"v{int(x)}" for x in rng.zipf(1.5, n) % 500],
        tags=[
            "|".join(f"t{int(x)}" for x in rng.integers(0, 50, int(k)))
            for k in rng.integers(0, 5, n)
        ],
    )
    whole = encode_table(s, t)
    parts = [encode_table(s, t.slice(i, 333)) for i in range(0, n, 333)]
    fm = FeatureMap.build(s, parts)
    assert fm.n_rows == n
    for f, cols in ((0, [0]), (1, [1, 2, 3])):
        vals = whole.tokens[:, cols].ravel()
        u, c = np.unique(vals[vals != PAD_TOKEN], return_counts=True)
        np.testing.assert_array_equal(fm.tokens[f], u)
        np.testing.assert_array_equal(fm.counts[f], c)
    fm.save(tmp_path)
    back = FeatureMap.load(tmp_path)
    assert back.schema == s and back.n_rows == n
    assert back.vocab_sizes(2) == fm.vocab_sizes(2)
    assert fm.full_table_rows() == sum(len(x) for x in fm.tokens) + 2


def test_schema_roundtrip_and_files(tmp_path) -> None:
    for s in (criteo_schema(), criteo_schema(False), avazu_schema(), _schema()):
        assert Schema.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    p = tmp_path / "s.json"
    _schema().save(p)
    assert Schema.load(p) == _schema()
    y = tmp_path / "s.yaml"
    y.write_text(
        "name: t\nlabel: y\ndense: [d]\ncategorical:\n  - c\n  - {name: tags, separator: '|', max_values: 2}\n"
    )
    ys = Schema.load(y)
    assert ys.categorical[1] == CategoricalField("tags", "|", 2) and ys.dense == (DenseField("d"),)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"format": "xlsx"}, "format"),
        ({"dense": ["c"]}, "more than once"),
        ({"categorical": []}, "at least one"),
        ({"categorical": [{"name": "c", "sepparator": "|"}]}, "unknown keys"),
        ({"colour": 1}, "unknown keys"),
        ({"header": False}, "column_names"),
        ({"dense": [{"name": "d", "transform": "sqrt"}]}, "transform"),
        ({"categorical": [{"name": "c", "separator": "|", "max_values": 0}]}, "max_values"),
    ],
)
def test_schema_validation(patch: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _schema(**patch)


def test_schema_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        Schema.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Schema.load(bad)
