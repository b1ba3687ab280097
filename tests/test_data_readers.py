"""Readers: real Criteo/Avazu rows, malformed lines, chunking, user tables, splits, stats."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from lma.data import (
    BadDataError,
    concat_encoded,
    open_source,
    random_split,
    take,
    time_split,
)
from lma.data.stats import dataset_stats
from lma.data.synthetic import SynthConfig, write_tsv
from lma.features import transform_dense
from lma.schema import avazu_schema, criteo_schema
from lma.tokens import PAD_TOKEN, token_hash


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _raw_rows(path: Path, delimiter: str, skip_header: bool = False) -> list[list[str]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE))
    return rows[1:] if skip_header else rows


def _assert_encodes_raw(enc, schema, rows: list[list[str]], names: list[str], idx) -> None:
    """Row idx[k] of ``enc`` holds exactly the raw values of ``rows[k]`` (no column shift)."""
    col = {n: i for i, n in enumerate(names)}
    for k, i in enumerate(idx):
        raw = rows[k]
        want = [token_hash(f.name, raw[col[f.name]]) for f in schema.categorical]
        assert enc.tokens[i].tolist() == want
        for j, f in enumerate(schema.dense):
            v = raw[col[f.name]]
            x = transform_dense(f, np.array([float(v) if v else np.nan]))[0]
            assert enc.dense[i, j] == pytest.approx(x, rel=1e-6)


# ------------------------------------------------------------------ real data


def test_criteo_train_real_rows(shared_data: Path) -> None:
    path = _need(shared_data / "criteo" / "train_10k.tsv")
    src = open_source(f"criteo:{path}")
    enc = src.read_all()
    assert len(enc) == 10000 and src.errors.count == 0
    assert enc.dense.shape == (10000, 13) and enc.tokens.shape == (10000, 26)
    assert enc.labels is not None and set(np.unique(enc.labels)) == {0.0, 1.0}
    assert enc.labels.mean() == pytest.approx(0.2182, abs=1e-4)
    np.testing.assert_array_equal(enc.line_numbers, np.arange(1, 10001))
    rows = _raw_rows(path, "\t")
    assert all(len(r) == 40 for r in rows)
    schema = criteo_schema()
    idx = list(range(0, 10000, 97))
    _assert_encodes_raw(enc, schema, [rows[i] for i in idx], list(schema.column_names), idx)
    np.testing.assert_array_equal(enc.labels[idx], [float(rows[i][0]) for i in idx])
    # Missing cells: the per-field missing token (C22 is ~82% empty in this sample).
    c22 = np.array([r[14 + 21] == "" for r in rows])  # label, I1..I13, then C1 at 14
    assert c22.mean() == pytest.approx(0.82, abs=0.01)
    assert (enc.tokens[c22, 21] == token_hash("C22", None)).all()
    assert (enc.tokens[~c22, 21] != token_hash("C22", None)).all()
    # Negative counts are clipped to 0 before log1p.
    i2 = np.array([float(r[2]) for r in rows])
    assert (i2 < 0).any() and (enc.dense[i2 < 0, 1] == 0).all()


def test_criteo_test_unlabelled(shared_data: Path) -> None:
    path = _need(shared_data / "criteo" / "test_10k_unlabeled.tsv")
    enc = open_source(f"criteo-test:{path}").read_all()
    assert len(enc) == 10000 and enc.labels is None
    assert enc.tokens.shape == (10000, 26) and enc.dense.shape == (10000, 13)
    rows = _raw_rows(path, "\t")
    assert all(len(r) == 39 for r in rows)
    schema = criteo_schema(labelled=False)
    idx = list(range(0, 10000, 211))
    _assert_encodes_raw(enc, schema, [rows[i] for i in idx], list(schema.column_names), idx)


def test_avazu_real_rows(shared_data: Path) -> None:
    path = _need(shared_data / "avazu" / "train_9999.csv")
    src = open_source(f"avazu:{path}")
    enc = src.read_all()
    assert len(enc) == 9999 and src.errors.count == 0
    assert enc.tokens.shape == (9999, 23) and enc.dense.shape == (9999, 0)
    assert enc.labels.mean() == pytest.approx(0.1706, abs=1e-4)
    np.testing.assert_array_equal(enc.line_numbers, np.arange(2, 10001))  # line 1 is the header
    assert (enc.times == 14102100).all()
    # All rows are from 2014-10-21 (a Tuesday) 00h: hour_of_day '00', weekday '1'.
    assert (enc.tokens[:, 0] == token_hash("hour_of_day", "00")).all()
    assert (enc.tokens[:, 1] == token_hash("weekday", "1")).all()
    rows = _raw_rows(path, ",")
    header, rows = rows[0], rows[1:]
    schema = avazu_schema()
    col = {n: i for i, n in enumerate(header)}
    for i in range(0, 9999, 101):
        want = [token_hash(n, rows[i][col[n]]) for n in schema.categorical_names[2:]]
        assert enc.tokens[i, 2:].tolist() == want
    assert enc.labels[:50].tolist() == [float(r[col["click"]]) for r in rows[:50]]
    # 'id' is dropped: no token of any field equals the id token.
    ids = {token_hash(n, rows[0][col["id"]]) for n in schema.categorical_names}
    assert not ids & set(enc.tokens[0].tolist())


@pytest.mark.parametrize("spec", ["criteo:criteo/train_10k.tsv", "avazu:avazu/train_9999.csv"])
def test_chunking_invariance_real(shared_data: Path, spec: str) -> None:
    kind, rel = spec.split(":")
    path = _need(shared_data / rel)
    big = open_source(f"{kind}:{path}").read_all()
    chunks = list(open_source(f"{kind}:{path}", chunk_rows=1000).iter_chunks())
    assert [len(c) for c in chunks[:-1]] == [1000] * (len(chunks) - 1)
    small = concat_encoded(chunks)
    for name in ("dense", "tokens", "labels", "line_numbers", "times"):
        a, b = getattr(big, name), getattr(small, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_stats_real(shared_data: Path) -> None:
    path = _need(shared_data / "criteo" / "train_10k.tsv")
    st = dataset_stats(open_source(f"criteo:{path}"))
    assert st["rows"] == 10000 and st["label_rate"] == pytest.approx(0.2182)
    assert st["categorical"]["C3"]["distinct"] == 5520
    assert st["categorical"]["C9"]["distinct"] == 3
    assert st["categorical"]["C22"]["missing_rate"] == pytest.approx(0.82, abs=0.01)
    assert st["dense"]["I12"]["missing_rate"] == pytest.approx(0.77, abs=0.01)
    assert st["dense"]["I2"]["min"] < 0
    json.dumps(st)  # serialisable for `lma data stats`


# ------------------------------------------------------------------ malformed lines


@pytest.fixture(scope="module")
def clean_tsv(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("clean") / "clean.tsv"
    write_tsv(SynthConfig(rows=60, seed=3), path)
    return path, path.read_text().splitlines()


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text(end.join(lines) + end)
    return path


def _corrupt(lines: list[str]) -> tuple[list[str], dict[int, str]]:
    """Damage some lines; returns the new lines and {1-based line: expected reason fragment}."""
    out = list(lines)
    cells = out[4].split("\t")
    out[4] = "\t".join(cells[:-1])  # line 5: 39 columns
    cells = out[9].split("\t")
    cells[3] = "12x"  # line 10: I3 non-numeric
    out[9] = "\t".join(cells)
    out[14] = "2" + out[14][1:]  # line 15: label 2
    out[19] = out[19] + "\textra"  # line 20: 41 columns
    cells = out[29].split("\t")
    cells[13] = "abc"  # line 30: I13 non-numeric
    out[29] = "\t".join(cells)
    return out, {
        5: "expected 40 columns, found 39",
        10: "column 'I3': non-numeric dense value '12x'",
        15: "column 'label': label must be 0 or 1, got '2'",
        20: "expected 40 columns, found 41",
        30: "column 'I13'",
    }


def test_fail_mode_names_first_bad_line(clean_tsv, tmp_path: Path) -> None:
    _, lines = clean_tsv
    bad, _ = _corrupt(lines)
    path = _write(tmp_path / "bad.tsv", bad)
    with pytest.raises(BadDataError) as ei:
        open_source(f"criteo:{path}").read_all()
    assert ei.value.line == 5 and "line 5" in str(ei.value) and "39" in str(ei.value)
    # Only a bad dense value: the error names its line and column.
    only = list(lines)
    cells = only[9].split("\t")
    cells[3] = "12x"
    only[9] = "\t".join(cells)
    path = _write(tmp_path / "bad2.tsv", only)
    for chunk_rows in (4, 65536):
        with pytest.raises(BadDataError, match=r"line 10: column 'I3': non-numeric") as ei:
            open_source(f"criteo:{path}", chunk_rows=chunk_rows).read_all()
        assert ei.value.column == "I3"


@pytest.mark.parametrize("chunk_rows", [1, 7, 65536])
def test_skip_mode_drops_only_bad_rows(clean_tsv, tmp_path: Path, chunk_rows: int) -> None:
    clean_path, lines = clean_tsv
    bad, expected = _corrupt(lines)
    # Blank lines are ignored (not counted), CRLF endings are fine, numbering stays exact.
    bad.insert(40, "")
    path = _write(tmp_path / "bad.tsv", bad, end="\r\n")
    src = open_source(f"criteo:{path}", on_error="skip", chunk_rows=chunk_rows)
    enc = src.read_all()
    assert src.errors.count == len(expected)
    assert [ln for ln, _ in src.errors.examples] == sorted(expected)
    for ln, reason in src.errors.examples:
        assert expected[ln] in reason
    # Surviving rows: their own line numbers and exactly their own values (no column shift).
    clean = open_source(f"criteo:{clean_path}").read_all()
    good_old = [i for i in range(60) if i + 1 not in expected]  # 0-based rows in the clean file
    want_lines = [i + 1 if i < 40 else i + 2 for i in good_old]  # the blank line is line 41
    np.testing.assert_array_equal(enc.line_numbers, want_lines)
    np.testing.assert_array_equal(enc.tokens, clean.tokens[good_old])
    np.testing.assert_array_equal(enc.dense, clean.dense[good_old])
    np.testing.assert_array_equal(enc.labels, clean.labels[good_old])


def test_bad_first_and_last_lines(clean_tsv, tmp_path: Path) -> None:
    _, lines = clean_tsv
    bad = ["1\t2\t3", *lines[1:]]
    cells = bad[-1].split("\t")
    cells[1] = "zz"  # last line: I1 non-numeric
    bad[-1] = "\t".join(cells)
    path = tmp_path / "edge.tsv"
    path.write_text("\n".join(bad))  # no final newline
    src = open_source(f"criteo:{path}", on_error="skip")
    enc = src.read_all()
    assert [ln for ln, _ in src.errors.examples] == [1, 60]
    assert "found 3" in src.errors.examples[0][1] and "'zz'" in src.errors.examples[1][1]
    assert len(enc) == 58 and enc.line_numbers[0] == 2 and enc.line_numbers[-1] == 59


def test_error_examples_are_capped(tmp_path: Path) -> None:
    lines = [f"0\t{'x' if i % 2 else '1'}" + "\t" * 38 for i in range(200)]
    src = open_source(
        f"criteo:{_write(tmp_path / 'many.tsv', lines)}", on_error="skip", chunk_rows=16
    )
    enc = src.read_all()
    assert len(enc) == 100 and src.errors.count == 100
    assert len(src.errors.examples) == 20 and src.errors.examples[0][0] == 2
    st = dataset_stats(open_source(f"criteo:{tmp_path / 'many.tsv'}", on_error="skip"))
    assert st["bad_lines"]["count"] == 100 and st["rows"] == 100


def test_gzip_input(clean_tsv, tmp_path: Path) -> None:
    path, _ = clean_tsv
    gz = tmp_path / "clean.tsv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    a = open_source(f"criteo:{path}").read_all()
    b = open_source(f"criteo:{gz}").read_all()
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)


# ------------------------------------------------------------------ user tables


USER_SCHEMA = {
    "name": "shop",
    "label": "clicked",
    "dense": [{"name": "price", "transform": "log1p", "clip_min": 0}, "score"],
    "categorical": ["user", "item", {"name": "tags", "separator": ";", "max_values": 2}],
    "time_column": "ts",
}
USER_ROWS = {
    "ts": ["3", "1", "2", "5", "4"],
    "clicked": ["1", "0", "0", "1", "0"],
    "price": ["10", "", "3.5", "-1", "0"],
    "score": ["0.5", "1", "", "2", "-3"],
    "user": ["u1", "u2", "", "u1", "u3"],
    "item": ["i1", "i1", "i2", "", "i3"],
    "tags": ["a;b;c", "", "b", "c;a", "a"],
    "unused": ["x", "y", "z", "w", "v"],
}


def _user_schema_file(tmp_path: Path, **patch) -> Path:
    p = tmp_path / "schema.json"
    p.write_text(json.dumps({**USER_SCHEMA, **patch}))
    return p


def _check_user(enc) -> None:
    assert len(enc) == 5 and enc.tokens.shape == (5, 4)
    assert enc.labels.tolist() == [1, 0, 0, 1, 0]
    assert enc.tokens[:, 0].tolist() == [token_hash("user", v) for v in USER_ROWS["user"]]
    assert enc.tokens[:, 1].tolist() == [token_hash("item", v) for v in USER_ROWS["item"]]
    assert enc.tokens[0, 2:].tolist() == [token_hash("tags", "a"), token_hash("tags", "b")]
    assert enc.tokens[1, 2:].tolist() == [token_hash("tags", None), PAD_TOKEN]
    np.testing.assert_allclose(enc.dense[:, 0], np.log1p([10, 0, 3.5, 0, 0]), rtol=1e-6)
    np.testing.assert_allclose(enc.dense[:, 1], [0.5, 1, 0, 2, -3])
    assert enc.times.tolist() == [3, 1, 2, 5, 4]


def test_table_csv_with_json_schema(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pcsv.write_csv(pa.table(USER_ROWS), path)
    src = open_source(f"table:{path}", str(_user_schema_file(tmp_path)))
    enc = src.read_all()
    _check_user(enc)
    np.testing.assert_array_equal(enc.line_numbers, [2, 3, 4, 5, 6])
    tr, va, te = time_split(enc.times, (0.6, 0.2, 0.2))
    assert enc.times[tr].tolist() == [1, 2, 3] and enc.times[te].tolist() == [5]


def test_table_csv_without_header(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    names = list(USER_ROWS)
    rows = ["|".join(USER_ROWS[n][i] for n in names) for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    schema = _user_schema_file(tmp_path, header=False, column_names=names, delimiter="|")
    enc = open_source(f"table:{path}", str(schema)).read_all()
    _check_user(enc)
    np.testing.assert_array_equal(enc.line_numbers, [1, 2, 3, 4, 5])


def test_table_parquet_with_json_schema(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    t = pa.table(USER_ROWS)
    # Typed Parquet columns: numbers stay numbers, empty strings become nulls.
    t = t.set_column(0, "ts", pa.array([3, 1, 2, 5, 4], pa.int64()))
    t = t.set_column(2, "price", pa.array([10, None, 3.5, -1, 0], pa.float64()))
    t = t.set_column(4, "user", pa.array(["u1", "u2", None, "u1", "u3"]))
    pq.write_table(t, path, row_group_size=2)
    src = open_source(f"table:{path}", str(_user_schema_file(tmp_path)), chunk_rows=3)
    enc = src.read_all()
    _check_user(enc)
    np.testing.assert_array_equal(enc.line_numbers, [1, 2, 3, 4, 5])
    # A bad value in Parquet is reported by row number.
    t2 = t.set_column(1, "clicked", pa.array(["1", "0", "7", "1", "0"]))
    pq.write_table(t2, tmp_path / "bad.parquet")
    with pytest.raises(BadDataError, match=r"row 3: column 'clicked'"):
        open_source(
            f"table:{tmp_path / 'bad.parquet'}", str(_user_schema_file(tmp_path))
        ).read_all()
    src = open_source(
        f"table:{tmp_path / 'bad.parquet'}", str(_user_schema_file(tmp_path)), on_error="skip"
    )
    assert len(src.read_all()) == 4 and src.errors.examples[0][0] == 3


def test_table_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    rows = {k: v for k, v in USER_ROWS.items() if k != "item"}
    pcsv.write_csv(pa.table(rows), path)
    with pytest.raises(ValueError, match=r"\['item'\]"):
        open_source(f"table:{path}", str(_user_schema_file(tmp_path))).read_all()


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="criteo:PATH.*synth:ROWS"):
        open_source("parquet:/x")
    with pytest.raises(ValueError, match="unknown data spec"):
        open_source("no-colon")
    with pytest.raises(ValueError, match="schema file"):
        open_source(f"table:{tmp_path / 'x.csv'}")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        open_source(f"criteo:{tmp_path / 'nope.tsv'}")
    with pytest.raises(ValueError, match="ROWS"):
        open_source("synth:lots")
    with pytest.raises(ValueError, match="on_error"):
        open_source("synth:10", on_error="ignore")
    assert len(open_source("synth:2k:5").read_all()) == 2000


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tsv"
    path.write_text("")
    enc = open_source(f"criteo:{path}").read_all()
    assert len(enc) == 0 and enc.tokens.shape == (0, 26) and enc.labels.shape == (0,)


# ------------------------------------------------------------------ helpers and splits


def test_take_and_concat() -> None:
    enc = open_source("synth:50:1").read_all()
    a, b = take(enc, np.arange(20)), take(enc, np.arange(20, 50))
    both = concat_encoded([a, b])
    np.testing.assert_array_equal(both.tokens, enc.tokens)
    np.testing.assert_array_equal(both.line_numbers, np.arange(1, 51))
    mask = enc.labels == 1
    np.testing.assert_array_equal(take(enc, mask).tokens, enc.tokens[mask])
    with pytest.raises(ValueError):
        concat_encoded([])


def test_random_split_protocol() -> None:
    for n in (0, 1, 9, 10, 1001, 12345):
        tr, va, te = random_split(n, seed=7)
        perm = np.random.default_rng(7).permutation(n)
        np.testing.assert_array_equal(np.concatenate([tr, va, te]), perm)
        assert len(tr) == int(n * 0.8) and len(va) == int(n * 0.9) - int(n * 0.8)
    tr, va, te = random_split(1000, 0, (0.5, 0.25, 0.25))
    assert (len(tr), len(va), len(te)) == (500, 250, 250)
    assert not np.array_equal(random_split(1000, 1)[0], random_split(1000, 2)[0])
    with pytest.raises(ValueError):
        random_split(10, 0, (0.5, 0.5, 0.5))


def test_time_split_stable_order() -> None:
    times = np.array([5, 1, 3, 3, 2, 1, 4, 5, 3, 2])
    tr, va, te = time_split(times, (0.6, 0.2, 0.2))
    assert tr.tolist() == [1, 5, 4, 9, 2, 3]  # ties keep file order
    assert va.tolist() == [8, 6] and te.tolist() == [0, 7]
    assert times[tr].max() <= times[va].min() and times[va].max() <= times[te].min()


def test_header_csv_bad_lines_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text(
        "id,click,hour,C1\n"
        "1,0,14102100,a\n"  # line 2
        "2,1,14102100\n"  # line 3: 3 columns
        "\n"  # line 4: blank, ignored
        "3,1,14102101,b\n"  # line 5
        "4,x,14102102,c\n"  # line 6: bad label
        "5,0,14102103,d,e\n"  # line 7: 5 columns
        "6,1,14102104,f\n"  # line 8
    )
    schema = tmp_path / "h.json"
    schema.write_text(json.dumps({
        "name": "h", "label": "click", "categorical": ["C1", "hour_of_day", "weekday"],
        "time_column": "hour", "extra": {"derive": ["avazu_hour"]},
    }))  # fmt: skip
    for chunk_rows in (1, 2, 100):
        src = open_source(f"table:{path}", str(schema), on_error="skip", chunk_rows=chunk_rows)
        enc = src.read_all()
        assert enc.line_numbers.tolist() == [2, 5, 8]
        assert enc.times.tolist() == [14102100, 14102101, 14102104]
        assert enc.tokens[:, 0].tolist() == [token_hash("C1", v) for v in "abf"]
        assert [ln for ln, _ in src.errors.examples] == [3, 6, 7]
    with pytest.raises(BadDataError, match="line 3: expected 4 columns, found 3"):
        open_source(f"table:{path}", str(schema)).read_all()


def test_stats_multi_valued_truncation(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pcsv.write_csv(pa.table(USER_ROWS), path)
    st = dataset_stats(open_source(f"table:{path}", str(_user_schema_file(tmp_path))))
    assert st["rows"] == 5 and st["label_rate"] == pytest.approx(0.4)
    assert st["categorical"]["tags"] == {
        "distinct": 3, "missing_rate": 0.2, "max_values": 2, "rows_truncated": 1,
    }  # fmt: skip
    assert st["categorical"]["user"] == {"distinct": 3, "missing_rate": 0.2}
    assert st["dense"]["price"] == {"min": -1.0, "max": 10.0, "missing_rate": 0.2}
