"""Token hash v1: pinned values, vectorised == scalar reference on every input shape."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lma.tokens import PAD_TOKEN, hash_column, token_hash

# Token hash v1 is a persisted format (feature maps, exported models): these must never change.
PINNED = [
    ("C1", "68fd1e64", -8704596627221169232),
    ("C1", None, 7357854532819712262),
    ("C1", "", 7357854532819712262),
    ("C2", "68fd1e64", -8562749293039350240),
    ("site_id", "1fbe01fe", -7908465599758523076),
    ("hour_of_day", "00", -1402820228539866807),
    ("tags", "héllo wörld", -7382617516335152361),
    ("I", "x" * 100, 1191283268156053251),
]


@pytest.mark.parametrize(("field", "value", "expected"), PINNED)
def test_pinned_values(field: str, value: str | None, expected: int) -> None:
    assert token_hash(field, value) == expected
    assert hash_column(field, pa.array([value], pa.string()))[0] == expected
    assert hash_column(field, [value])[0] == expected


def _random_values(rng: np.random.Generator, n: int) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            out.append(None)
        elif r < 0.2:
            out.append("")
        elif r < 0.3:
            out.append("é✓" * int(rng.integers(1, 4)))
        else:
            k = int(rng.integers(1, 40))
            out.append("".join(chr(int(c)) for c in rng.integers(32, 127, k)))
    return out


def test_vectorised_matches_scalar_variable_length() -> None:
    vals = _random_values(np.random.default_rng(0), 3000)
    ref = np.array([token_hash("f", v) for v in vals], dtype=np.int64)
    arr = pa.array(vals, pa.string())
    np.testing.assert_array_equal(hash_column("f", arr), ref)
    np.testing.assert_array_equal(hash_column("f", pa.array(vals, pa.large_string())), ref)
    np.testing.assert_array_equal(hash_column("f", vals), ref)
    np.testing.assert_array_equal(hash_column("f", arr.slice(123, 1000)), ref[123:1123])
    chunked = pa.chunked_array([arr.slice(0, 10), arr.slice(10)])
    np.testing.assert_array_equal(hash_column("f", chunked), ref)
    np.testing.assert_array_equal(hash_column("f", arr.dictionary_encode()), ref)


@pytest.mark.parametrize("with_missing", ["none", "empty", "null"])
def test_vectorised_matches_scalar_fixed_width(with_missing: str) -> None:
    vals: list[str | None] = [f"{(i * 2654435761) % 2**32:08x}" for i in range(2000)]
    for i in range(0, 2000, 7):
        if with_missing == "empty":
            vals[i] = ""
        elif with_missing == "null":
            vals[i] = None
    ref = np.array([token_hash("C7", v) for v in vals], dtype=np.int64)
    arr = pa.array(vals, pa.string())
    np.testing.assert_array_equal(hash_column("C7", arr), ref)
    np.testing.assert_array_equal(hash_column("C7", arr.slice(5, 700)), ref[5:705])


def test_null_slots_holding_bytes() -> None:
    # A null entry whose offsets span bytes (legal in Arrow) must still hash as missing.
    data = b"aaaabbbbcccc"
    offsets = np.array([0, 4, 8, 12], dtype=np.int32)
    bitmap = np.packbits(np.array([1, 0, 1], dtype=bool), bitorder="little")
    arr = pa.StringArray.from_buffers(
        3, pa.py_buffer(offsets), pa.py_buffer(data), pa.py_buffer(bitmap), 1
    )
    expected = [token_hash("f", "aaaa"), token_hash("f", None), token_hash("f", "cccc")]
    assert hash_column("f", arr).tolist() == expected


def test_numbers_hash_as_their_text() -> None:
    got = hash_column("n", pa.array([1, None, 23], pa.int64()))
    assert got.tolist() == [token_hash("n", "1"), token_hash("n", None), token_hash("n", "23")]


def test_properties() -> None:
    assert hash_column("f", pa.array([], pa.string())).shape == (0,)
    # Field name and value are separated, so shifting bytes between them changes the token.
    assert token_hash("a", "bc") != token_hash("ab", "c")
    # Missing differs from every real value, including the separator-like ones.
    assert token_hash("a", None) != token_hash("a", "\x1e")
    vals = [f"v{i}" for i in range(20000)]
    toks = hash_column("f", vals)
    assert (toks != PAD_TOKEN).all()
    assert len(np.unique(toks)) == len(vals)
