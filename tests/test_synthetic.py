"""Synthetic Criteo-schema data: determinism, chunking, cardinalities, CTR, learnability."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lma.data import concat_encoded, open_source
from lma.data.synthetic import (
    BLOCK_ROWS,
    KAGGLE_CARDINALITIES,
    SynthConfig,
    SyntheticGenerator,
    SyntheticSource,
    synth_table,
    write_tsv,
)
from lma.tokens import token_hash


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.line_numbers, b.line_numbers)


def test_deterministic_and_seed_dependent() -> None:
    a = open_source("synth:3000:11").read_all()
    b = open_source("synth:3000:11").read_all()
    c = open_source("synth:3000:12").read_all()
    _same(a, b)
    assert (a.tokens != c.tokens).mean() > 0.5
    assert a.tokens.shape == (3000, 26) and a.dense.shape == (3000, 13)


def test_independent_of_chunk_rows_and_total_rows() -> None:
    n = 2 * BLOCK_ROWS + 123
    ref = open_source(f"synth:{n}:4").read_all()
    for chunk_rows in (1000, BLOCK_ROWS + 1):
        chunks = list(open_source(f"synth:{n}:4", chunk_rows=chunk_rows).iter_chunks())
        assert all(len(c) == chunk_rows for c in chunks[:-1])
        _same(concat_encoded(chunks), ref)
    # Row i does not depend on how many rows are asked for.
    shorter = open_source(f"synth:{BLOCK_ROWS + 7}:4").read_all()
    np.testing.assert_array_equal(shorter.tokens, ref.tokens[: BLOCK_ROWS + 7])
    np.testing.assert_array_equal(shorter.labels, ref.labels[: BLOCK_ROWS + 7])


def test_raw_values_look_like_criteo() -> None:
    t = synth_table(SynthConfig(rows=2000, seed=1))
    assert t.column_names == ["label"] + [f"I{i}" for i in range(1, 14)] + [
        f"C{i}" for i in range(1, 27)
    ]
    hexes = [v for v in t.column("C3").to_pylist() if v is not None]
    assert hexes and all(re.fullmatch(r"[0-9a-f]{8}", v) for v in hexes)
    c22 = t.column("C22")
    assert 0.7 < c22.null_count / len(c22) < 0.9  # Criteo-like missing rate
    i2 = np.array(t.column("I2").to_pylist(), dtype=float)
    assert (i2 < 0).any() and np.nanmin(i2) >= -1
    # Encoded through the same path: missing cells are the missing token.
    enc = open_source("synth:2000:1").read_all()
    miss = np.array([v is None for v in c22.to_pylist()])
    assert (enc.tokens[miss, 21] == token_hash("C22", None)).all()
    assert enc.tokens[~miss, 21].tolist() == [token_hash("C22", v) for v in c22.to_pylist() if v]


def test_cardinalities_and_presets() -> None:
    cards = (2, 3, 5, 7, 11, 13) + (50,) * 20
    enc = SyntheticSource(
        SynthConfig(rows=5000, seed=2, cardinalities=cards, missing=False)
    ).read_all()
    distinct = [len(np.unique(enc.tokens[:, f])) for f in range(26)]
    assert distinct[:6] == [2, 3, 5, 7, 11, 13]  # small fields: every value appears
    assert all(d <= 50 for d in distinct[6:])
    assert sum(KAGGLE_CARDINALITIES) == 33_762_577 and max(KAGGLE_CARDINALITIES) == 10_131_227
    kag = SyntheticSource(SynthConfig(rows=500, preset="kaggle")).read_all()
    assert kag.tokens.shape == (500, 26)
    with pytest.raises(ValueError, match="preset"):
        SynthConfig(preset="huge")
    with pytest.raises(ValueError, match="cardinalities"):
        SynthConfig(cardinalities=(10,) * 25)


def test_zipf_head_heavy() -> None:
    enc = open_source("synth:20000:3").read_all()
    _, counts = np.unique(enc.tokens[:, 2], return_counts=True)  # C3: 50k possible values
    counts = np.sort(counts)[::-1]
    assert counts[:10].sum() > 0.05 * counts.sum()  # a heavy head
    assert (counts == 1).sum() > 1000  # and a long tail of rare values


def test_click_rate_and_learnability() -> None:
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    enc = open_source("synth:6000:5").read_all()
    assert 0.19 < enc.labels.mean() < 0.25
    n = len(enc)
    _, col = np.unique(enc.tokens, return_inverse=True)  # one-hot column per distinct token
    col = col.ravel()
    x = sparse.csr_matrix((np.ones(col.size), (np.repeat(np.arange(n), 26), col)))
    model = LogisticRegression(C=0.3, solver="liblinear").fit(x[:5000], enc.labels[:5000])
    auc = roc_auc_score(enc.labels[5000:], model.predict_proba(x[5000:])[:, 1])
    assert auc > 0.63, auc


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    _, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    joint = ia.astype(np.int64).ravel() * len(ub) + ib.ravel()
    uj, cj = np.unique(joint, return_counts=True)
    pa_, pb, pj = np.bincount(ia.ravel()) / len(a), np.bincount(ib.ravel()) / len(b), cj / len(a)
    return float((pj * np.log(pj / (pa_[uj // len(ub)] * pb[uj % len(ub)]))).sum())


def test_fields_co_occur_non_randomly() -> None:
    """Tokens of different fields are dependent (latent cluster, linked entity fields); the
    same columns paired at random are not (their MI is the finite-sample bias)."""
    enc = open_source("synth:20000:6").read_all()
    rng = np.random.default_rng(0)

    def excess(f: int, g: int) -> tuple[float, float]:
        a, b = enc.tokens[:, f], enc.tokens[:, g]
        return _mutual_information(a, b), _mutual_information(a, rng.permutation(b))

    real, shuffled = excess(2, 11)  # C3, C12: a linked pair of large fields
    assert real - shuffled > 0.5, (real, shuffled)
    real, shuffled = excess(5, 13)  # C6, C14: small fields linked only through the cluster
    assert real > 1.5 * shuffled, (real, shuffled)
    independent = SyntheticSource(
        SynthConfig(rows=20000, seed=6, n_clusters=1, linked_groups=())
    ).read_all()
    a, b = independent.tokens[:, 2], independent.tokens[:, 11]
    assert _mutual_information(a, b) < 1.1 * _mutual_information(a, rng.permutation(b))


def test_write_tsv_reads_back_as_criteo(tmp_path: Path) -> None:
    cfg = SynthConfig(rows=1500, seed=9)
    out = tmp_path / "synth.tsv"
    assert write_tsv(cfg, out) == 1500
    lines = out.read_text().splitlines()
    assert len(lines) == 1500 and all(line.count("\t") == 39 for line in lines)
    _same(open_source(f"criteo:{out}").read_all(), SyntheticSource(cfg).read_all())


def test_bias_calibration_tracks_target() -> None:
    gen = SyntheticGenerator(SynthConfig(seed=1, ctr=0.05))
    labels = np.concatenate([gen.block(k).column("label").to_numpy() for k in range(3)])
    assert 0.03 < labels.mean() < 0.07


def test_synth_spec_takes_preset_and_skew() -> None:
    from lma.data.readers import parse_synth_spec

    c = parse_synth_spec("synth:1k:3:kaggle")
    assert (c.rows, c.seed, c.preset) == (1000, 3, "kaggle")
    c = parse_synth_spec("synth:500:kaggle:zipf=0.7:ctr=0.1")
    assert c.seed == 0 and c.preset == "kaggle" and c.field_zipf == (0.7,) * 26 and c.ctr == 0.1
    cards = ",".join(["7"] * 26)
    c = parse_synth_spec(f"synth:100:1:cards={cards}:missing=0")
    assert c.field_cardinalities == (7,) * 26 and not c.missing
    for bad in ("synth:100:kaggle:1", "synth:100:nope", "synth:100:1:foo=2", "synth:100:zipf=x"):
        with pytest.raises(ValueError, match="synth:100"):
            parse_synth_spec(bad)
    # A skew changes the rows; the default stays the reference generator.
    flat = open_source("synth:3000:1:small:zipf=0.5").read_all()
    ref = open_source("synth:3000:1").read_all()
    assert len(np.unique(flat.tokens[:, 2])) > len(np.unique(ref.tokens[:, 2]))


def test_expected_distinct_matches_generated_rows() -> None:
    from lma.data.synthetic import expected_distinct

    # Per-field skews (the kaggle preset's path) on the small supports, to stay fast.
    zipf = tuple(0.6 + 0.1 * (f % 10) for f in range(26))
    cfg = SynthConfig(rows=40_000, seed=5, preset="small", zipf=zipf)
    enc = SyntheticSource(cfg).read_all()
    want = expected_distinct(cfg, cfg.rows)
    for f in range(26):
        col = enc.tokens[:, f]
        got = len(np.unique(col[col != token_hash(f"C{f + 1}", None)]))
        # A sum of independent indicators: the spread is below sqrt(expected).
        assert abs(got - want[f]) <= 4 * np.sqrt(want[f]) + 2, (f, got, want[f])


def test_value_set_feature_map_without_rows(tmp_path) -> None:
    from lma.data.synthetic import expected_distinct, value_set_feature_map
    from lma.features import FeatureMap

    cfg = SynthConfig(seed=2, preset="small")
    fmap = value_set_feature_map(cfg, 2_000_000)
    want = expected_distinct(cfg, 2_000_000)
    sizes = fmap.vocab_sizes()
    for f in range(26):
        miss = 1 if cfg.missing and SyntheticGenerator(cfg).cat_missing[f] > 0 else 0
        assert abs(sizes[f] - miss - want[f]) <= 4 * np.sqrt(want[f]) + 2
    assert fmap.meta["untrained"] and fmap.n_rows == 2_000_000
    # Its tokens are the tokens rows of this generator get.
    enc = SyntheticSource(SynthConfig(rows=3000, seed=2)).read_all()
    for f in (0, 2, 21):
        assert np.isin(enc.tokens[:, f], fmap.tokens[f]).mean() > 0.95
    fmap.save(tmp_path)
    assert FeatureMap.load(tmp_path).meta["untrained"]


def test_cli_data_synth_skew_and_feature_map(tmp_path, capsys) -> None:
    import json

    from lma.cli import main

    out = tmp_path / "s.tsv"
    assert main(["-q", "data", "synth", "--rows", "50", "--zipf", "0.8", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["zipf"] == [0.8] * 26 and len(out.read_text().splitlines()) == 50
    fm = tmp_path / "fm"
    assert main(["-q", "data", "synth", "--rows", "100000", "--feature-map", "--out", str(fm)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] > 1000 and "untrained" in info["note"]
    assert (fm / "feature_map.npz").exists()
