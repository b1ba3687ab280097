"""Synthetic CTR data with the Criteo schema: learnable, heavy-tailed, deterministic, fast.

Generative model (all constants derive from ``SynthConfig.seed``):

* each row draws a latent cluster ``z`` (``n_clusters``, mildly skewed weights);
* categorical field ``f`` (cardinality ``V_f``): with probability ``affinity`` the value's rank
  comes from a cluster-specific Zipf(``zipf``) distribution (the rank is shifted by a per
  (field, cluster) offset), otherwise from the field's global one. Fields of a
  ``linked_groups`` entry (like Criteo's C3/C12/C16/C21) share their rank draw with probability
  ``link``, so their values co-occur almost one to one. The value id is rendered as
  an 8-hex-digit string through a per-field bijection of 32-bit integers, so each field has
  exactly ``V_f`` possible values. Cells are empty with a per-field missing rate like Criteo's;
* dense ``I1..I13`` are non-negative counts, log-normal with a cluster-dependent mean (``I2``
  is sometimes -1, as in Criteo), missing at Criteo-like rates;
* ``label ~ Bernoulli(sigmoid(b + cluster effect + token effects of a few fields + dense
  effect))``, with ``b`` calibrated so the click rate is about ``ctr``.

Rows are made in fixed blocks of ``BLOCK_ROWS``; block ``k`` depends only on (seed, k), so row
``i`` is the same whatever the total row count or the reader's ``chunk_rows``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from tqdm import tqdm

from lma.data.base import DataSource, RawChunk
from lma.schema import criteo_schema

log = logging.getLogger(__name__)

BLOCK_ROWS = 4096
N_DENSE = 13
N_CAT = 26

# Distinct values per field of the full Criteo Kaggle training set (45,840,617 rows), C1..C26;
# they sum to 33,762,577.
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
# A quick-demo preset with the same shape: small fields as in Criteo, large ones capped.
SMALL_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 50000, 20000, 305, 24, 5000, 633, 3, 10000, 3000, 40000, 3194,
    27, 5000, 30000, 10, 3000, 2173, 4, 30000, 18, 15, 10000, 105, 10000,
)  # fmt: skip
# The ``kaggle`` preset: per-field value supports and Zipf exponents fitted so that, with the
# generator's cluster mixture and missing rates, the expected distinct values of each field at
# 45,840,617 rows equal KAGGLE_CARDINALITIES and at 10,000 rows the distinct values of the real
# 10k-row Criteo sample (scripts/calibrate_synth.py; table in docs/RESULTS.md).
# C3, C12, C16 and C21 reach their counts only at the 40M-value cap with a flatter skew than the
# 10k point asks for (their 10k counts come out 13-28% high); fields whose 10k count is below
# what any exponent up to 4 allows take 4.0.
KAGGLE_SUPPORT: tuple[int, ...] = (
    1741, 583, 40000000, 5358875, 307, 24, 12517, 1068, 3, 93145, 5683, 40000000, 3194,
    27, 14992, 40000000, 10, 5652, 2173, 4, 40000000, 18, 15, 296422, 105, 144048,
)  # fmt: skip
KAGGLE_ZIPF: tuple[float, ...] | None = (
    3.2164, 2.1083, 1.0422, 1.2247, 4.0, 4.0, 1.2024, 4.0, 1.1, 1.3136, 1.3304, 1.0752, 1.3336,
    4.0, 1.4121, 1.1464, 4.0, 1.6285, 1.8444, 4.0, 1.1062, 4.0, 4.0, 1.3719, 4.0, 1.3116,
)  # fmt: skip
PRESETS: dict[str, tuple[int, ...]] = {"small": SMALL_CARDINALITIES, "kaggle": KAGGLE_SUPPORT}
PRESET_ZIPF: dict[str, tuple[float, ...] | None] = {"small": None, "kaggle": KAGGLE_ZIPF}
KAGGLE_ROWS = 45_840_617

# Missing rates of the real Criteo sample (I1..I13, C1..C26).
CRITEO_DENSE_MISSING = (0.45, 0.0, 0.2, 0.2, 0.05, 0.25, 0.05, 0.0, 0.05, 0.45, 0.05, 0.77, 0.2)
CRITEO_CAT_MISSING = (
    0.0, 0.0, 0.04, 0.04, 0.0, 0.13, 0.0, 0.0, 0.0, 0.0, 0.0, 0.04, 0.0,
    0.0, 0.0, 0.04, 0.0, 0.0, 0.45, 0.45, 0.04, 0.82, 0.0, 0.04, 0.45, 0.45,
)  # fmt: skip
# Mean and spread of log1p(I_j) in the real sample.
_DENSE_MU = (0.8, 2.1, 2.25, 1.73, 7.2, 3.6, 1.5, 2.1, 3.6, 0.4, 0.85, 0.3, 1.9)
_DENSE_SD = (1.0, 2.1, 1.3, 1.0, 2.9, 1.8, 1.4, 1.2, 1.7, 0.4, 0.75, 0.6, 1.05)

_MASK32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic data settings. ``cardinalities`` (26 ints) overrides ``preset``."""

    rows: int = 100_000
    seed: int = 0
    preset: str = "small"
    cardinalities: tuple[int, ...] | None = None
    # Exponent of the value-frequency power law (the skew): one for every field, or 26; None:
    # the preset's (the calibrated exponents of ``kaggle``, else 1.1).
    zipf: float | tuple[float, ...] | None = None
    n_clusters: int = 16
    affinity: float = 0.7  # probability that a value follows the row's cluster
    ctr: float = 0.22  # target click rate
    cluster_scale: float = 1.0  # std of the per-cluster logit effect
    token_scale: float = 0.8  # std of the per-value logit effects of the effect fields
    n_effect_fields: int = 6
    missing: bool = True  # Criteo-like missing cells
    # Groups of fields (0-based) describing one entity, like Criteo's C3/C12/C16/C21: with
    # probability ``link`` a field takes the value rank drawn for the group's first field.
    linked_groups: tuple[tuple[int, ...], ...] = ((2, 11, 15, 20), (3, 9, 23, 25), (6, 10, 14, 17))
    link: float = 0.8

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"SynthConfig.rows must be >= 0, got {self.rows}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0, got {self.seed}")
        if self.cardinalities is None and self.preset not in PRESETS:
            raise ValueError(
                f"SynthConfig.preset must be one of {sorted(PRESETS)}, got {self.preset!r}"
            )
        cards = self.field_cardinalities
        if len(cards) != N_CAT or min(cards) < 1 or max(cards) >= 2**32:
            raise ValueError(f"SynthConfig.cardinalities: {N_CAT} values in [1, 2^32) expected")
        z = self.field_zipf
        if len(z) != N_CAT or min(z) <= 0:
            raise ValueError(f"SynthConfig.zipf must be > 0 (one value or {N_CAT})")
        if self.n_clusters < 1:
            raise ValueError("SynthConfig.n_clusters must be >= 1")
        if not 0.0 < self.ctr < 1.0:
            raise ValueError("SynthConfig.ctr must be in (0, 1)")
        if not 0.0 <= self.affinity <= 1.0:
            raise ValueError("SynthConfig.affinity must be in [0, 1]")
        if not 0.0 <= self.link <= 1.0:
            raise ValueError("SynthConfig.link must be in [0, 1]")
        if any(not 0 <= f < N_CAT for g in self.linked_groups for f in g):
            raise ValueError(f"SynthConfig.linked_groups: field indices must be in [0, {N_CAT})")

    @property
    def field_cardinalities(self) -> tuple[int, ...]:
        return tuple(int(c) for c in (self.cardinalities or PRESETS[self.preset]))

    @property
    def field_zipf(self) -> tuple[float, ...]:
        """The Zipf exponent of each field."""
        z = self.zipf
        if z is None:
            preset = PRESET_ZIPF.get(self.preset) if self.cardinalities is None else None
            z = preset if preset is not None else 1.1
        if isinstance(z, int | float):
            return (float(z),) * N_CAT
        return tuple(float(x) for x in z)

    @property
    def uniform_zipf(self) -> float | None:
        """The exponent when every field has the same one (the generator's scalar path)."""
        z = set(self.field_zipf)
        return z.pop() if len(z) == 1 else None


def _mix32(x: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A bijection of 32-bit integers (per key): distinct ids stay distinct."""
    x = (x + key) & _MASK32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _MASK32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _MASK32
    x ^= x >> np.uint64(16)
    return x


def _uniform_hash(x: np.ndarray, key: int) -> np.ndarray:
    """Deterministic pseudo-uniform values in [-sqrt(3), sqrt(3)) (unit variance) from ids."""
    h = _mix32(x.astype(np.uint64), np.uint64(key & 0xFFFFFFFF))
    h = _mix32(h, np.uint64((key >> 32) & 0xFFFFFFFF))
    return (h.astype(np.float64) / 2**32 - 0.5) * (2 * math.sqrt(3.0))


def _hex_columns(values: np.ndarray, present: np.ndarray) -> list[pa.Array]:
    """One string array per column of ``values`` (n, F) uint32: 8 lowercase hex digits, null
    where not ``present``. Each array is built from buffers (no Python loop over values)."""
    n, nf = values.shape
    # Big-endian bytes of each value, then two ASCII hex digits per byte.
    by = np.ascontiguousarray(values.T).astype(">u4").view(np.uint8).reshape(nf, n, 4)
    digits = np.empty((nf, n, 8), np.uint8)
    digits[:, :, 0::2] = by >> 4
    digits[:, :, 1::2] = by & 15
    digits += ord("0")
    digits += (digits > ord("9")) * np.uint8(ord("a") - ord("9") - 1)
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    out = []
    for f in range(nf):
        valid = present[:, f]
        nulls = n - int(valid.sum())
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
        out.append(pa.StringArray.from_buffers(n, offsets, pa.py_buffer(digits[f]), bitmap, nulls))
    return out


@dataclass
class _Block:
    cluster: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n, 26) int64 value ids, -1 = missing
    dense: np.ndarray  # (n, 13) float64 raw counts, NaN = missing
    u_label: np.ndarray  # (n,) uniform for the Bernoulli draw


class SyntheticGenerator:
    """Makes rows of a :class:`SynthConfig` as raw pyarrow tables (Criteo column layout)."""

    def __init__(self, config: SynthConfig):
        self.config = config
        c = config
        rng = np.random.default_rng([c.seed, 0])
        self.cards = np.array(c.field_cardinalities, dtype=np.int64)
        k = c.n_clusters
        w = 1.0 / np.sqrt(np.arange(1, k + 1))
        self.cluster_cdf = np.cumsum(rng.permutation(w / w.sum()))
        self.cluster_cdf[-1] = 1.0
        # Rank offsets: one per (cluster, field), and one for the global (cluster-free) draw.
        self.shift = (rng.random((k + 1, N_CAT)) * self.cards).astype(np.int64)
        self.keys = rng.integers(0, 2**32, N_CAT, dtype=np.uint64)
        self.cluster_effect = rng.normal(0.0, c.cluster_scale, k)
        # Token effects on the fields with enough values to matter.
        eligible = np.flatnonzero(self.cards >= 10)
        n_eff = min(c.n_effect_fields, len(eligible))
        self.effect_fields = np.sort(rng.choice(eligible, n_eff, replace=False))
        self.effect_keys = [int(x) for x in rng.integers(0, 2**62, n_eff, dtype=np.int64)]
        self.dense_shift = rng.normal(0.0, 0.5, (k, N_DENSE)) * np.array(_DENSE_SD)
        self.dense_weight = rng.normal(0.0, 0.25, N_DENSE) / np.array(_DENSE_SD)
        self.cat_missing = np.array(CRITEO_CAT_MISSING if c.missing else (0.0,) * N_CAT)
        self.dense_missing = np.array(CRITEO_DENSE_MISSING if c.missing else (0.0,) * N_DENSE)
        vmax = (self.cards + 1).astype(np.float64)
        self._zipf_scalar = c.uniform_zipf
        self.zipf = np.array(c.field_zipf)
        self._log_field = np.abs(self.zipf - 1.0) < 1e-9
        s = np.where(self._log_field, 0.5, self.zipf)  # placeholder exponent where log is used
        self._pow_hi = np.where(self._log_field, np.log(vmax), vmax ** (1.0 - s) - 1.0)
        self.schema = criteo_schema(labelled=True)

    # -- one block ----------------------------------------------------------------------------

    def _draw(self, rng: np.random.Generator, n: int) -> _Block:
        c = self.config
        cluster = np.searchsorted(self.cluster_cdf, rng.random(n), side="right")
        cluster = np.minimum(cluster, c.n_clusters - 1)
        u = rng.random((n, N_CAT))
        follow = rng.random((n, N_CAT)) < c.affinity
        for group in c.linked_groups:
            g = list(group)
            linked = rng.random((n, len(g))) < c.link
            u[:, g] = np.where(linked, u[:, g[:1]], u[:, g])
            follow[:, g] = np.where(linked, follow[:, g[:1]], follow[:, g])
        s = self._zipf_scalar
        if s is not None and abs(s - 1.0) < 1e-9:
            x = np.exp(u * self._pow_hi)
        elif s is not None:
            x = (u * self._pow_hi + 1.0) ** (1.0 / (1.0 - s))
        else:
            e = np.where(self._log_field, 1.0, 1.0 / (1.0 - np.where(self._log_field, 0.5, self.zipf)))
            x = np.where(self._log_field, np.exp(u * self._pow_hi),
                         np.maximum(u * self._pow_hi + 1.0, 0.0) ** e)
        rank = np.minimum(x.astype(np.int64) - 1, self.cards - 1)
        row_shift = np.where(follow, self.shift[cluster], self.shift[c.n_clusters])
        ids = (rank + row_shift) % self.cards
        ids[rng.random((n, N_CAT)) < self.cat_missing] = -1
        z = rng.standard_normal((n, N_DENSE))
        logv = np.array(_DENSE_MU) + self.dense_shift[cluster] + z * np.array(_DENSE_SD)
        dense = np.round(np.expm1(np.maximum(logv, 0.0)))
        dense[:, 1] = np.where(rng.random(n) < 0.1, -1.0, dense[:, 1])  # I2 has -1s in Criteo
        dense[rng.random((n, N_DENSE)) < self.dense_missing] = np.nan
        return _Block(cluster, ids, dense, rng.random(n))

    def _logit_without_bias(self, b: _Block) -> np.ndarray:
        out = self.cluster_effect[b.cluster].copy()
        scale = self.config.token_scale
        for f, key in zip(self.effect_fields, self.effect_keys, strict=True):
            ids = b.ids[:, f]
            eff = _uniform_hash(np.maximum(ids, 0), key) * scale
            out += np.where(ids >= 0, eff, 0.0)
        logd = np.log1p(np.maximum(np.nan_to_num(b.dense, nan=0.0), 0.0))
        out += (logd - np.array(_DENSE_MU)) @ self.dense_weight
        return out

    @cached_property
    def bias(self) -> float:
        """Intercept giving a click rate of about ``config.ctr`` (bisection on a fixed sample)."""
        b = self._draw(np.random.default_rng([self.config.seed, 2]), 32768)
        z = self._logit_without_bias(b)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < self.config.ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def block(self, k: int) -> pa.Table:
        """Rows ``[k * BLOCK_ROWS, (k + 1) * BLOCK_ROWS)`` as a raw table."""
        b = self._draw(np.random.default_rng([self.config.seed, 1, k]), BLOCK_ROWS)
        p = 1.0 / (1.0 + np.exp(-(self.bias + self._logit_without_bias(b))))
        label = (b.u_label < p).astype(np.int64)
        cols: dict[str, pa.Array] = {"label": pa.array(label)}
        for j in range(N_DENSE):
            v = b.dense[:, j]
            miss = np.isnan(v)
            cols[f"I{j + 1}"] = pa.array(np.nan_to_num(v).astype(np.int64), mask=miss)
        vals = _mix32(np.maximum(b.ids, 0).astype(np.uint64), self.keys[None, :])
        for f, arr in enumerate(_hex_columns(vals, b.ids >= 0)):
            cols[f"C{f + 1}"] = arr
        return pa.table(cols)

    def tables(self, rows: int, start: int = 0) -> Iterator[tuple[pa.Table, int]]:
        """Raw tables covering rows ``[start, start + rows)``, with the first row index of each."""
        end = start + rows
        pos = start
        while pos < end:
            k = pos // BLOCK_ROWS
            t = self.block(k)
            lo = pos - k * BLOCK_ROWS
            hi = min(BLOCK_ROWS, end - k * BLOCK_ROWS)
            yield t.slice(lo, hi - lo), pos
            pos += hi - lo


class SyntheticSource(DataSource):
    """``synth:ROWS[:SEED][:PRESET][:KEY=VALUE...]``: synthetic rows with the Criteo schema
    (numbers are 1-based rows)."""

    unit = "row"

    def __init__(self, config: SynthConfig, name: str | None = None, **kwargs: object):
        self.config = config
        self.generator = SyntheticGenerator(config)
        super().__init__(
            self.generator.schema, name or f"synth:{config.rows}:{config.seed}", **kwargs
        )  # type: ignore[arg-type]

    def _iter_raw(self) -> Iterator[RawChunk]:
        with tqdm(
            total=self.config.rows,
            unit="rows",
            desc=self.name[-40:],
            disable=not self.progress,
            leave=False,
        ) as bar:
            for table, start in self.generator.tables(self.config.rows):
                n = table.num_rows
                yield RawChunk(table, np.arange(start + 1, start + 1 + n, dtype=np.int64))
                bar.update(n)


def synth_table(config: SynthConfig) -> pa.Table:
    """All ``config.rows`` raw rows in one table (for small sizes)."""
    parts = [t for t, _ in SyntheticGenerator(config).tables(config.rows)]
    if not parts:
        return SyntheticGenerator(config).block(0).slice(0, 0)
    return pa.concat_tables(parts)


def write_tsv(config: SynthConfig, out: str | Path, *, progress: bool = False) -> int:
    """Write ``config.rows`` rows as a Criteo Kaggle train TSV (readable as ``criteo:OUT``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = SyntheticGenerator(config)
    n = 0
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with (
        pa.OSFile(str(out), "wb") as sink,
        tqdm(total=config.rows, unit="rows", desc=str(out)[-40:], disable=not progress) as bar,
    ):
        writer = None
        for table, _ in gen.tables(config.rows):
            if writer is None:
                writer = pcsv.CSVWriter(sink, table.schema, write_options=opts)
            writer.write_table(table)
            n += table.num_rows
            bar.update(table.num_rows)
        if writer is not None:
            writer.close()
    log.info("wrote %d synthetic rows to %s", n, out)
    return n


# -- the value distribution, without generating rows ---------------------------------------------


def _rank_probabilities(card: int, s: float) -> np.ndarray:
    """P(rank = r), r < ``card``, of the generator's inverse-CDF Zipf draw (``_draw``)."""
    x = np.arange(1, card + 2, dtype=np.float64)
    cdf = np.log(x) if abs(s - 1.0) < 1e-9 else x ** (1.0 - s)
    q = np.diff(cdf)
    return q / q.sum()


def value_probabilities(gen: SyntheticGenerator, f: int) -> np.ndarray:
    """(V_f,) float64: probability of each value id of field ``f`` in a non-missing cell.

    The cluster mixture exactly as ``_draw`` makes it: with probability ``affinity`` the rank
    is shifted by the row's cluster offset, else by the global one (linked fields share draws
    across fields, which leaves each field's own distribution unchanged).
    """
    c = gen.config
    card = int(gen.cards[f])
    q = _rank_probabilities(card, float(gen.zipf[f]))
    weights = np.diff(np.concatenate([[0.0], gen.cluster_cdf]))
    coefs = np.concatenate([c.affinity * weights, [1.0 - c.affinity]])
    p = np.zeros(card)
    for coef, sh in zip(coefs, gen.shift[:, f] % card, strict=True):
        if coef == 0.0:
            continue
        sh = int(sh)
        # value id = (rank + sh) mod V
        p[sh:] += coef * q[: card - sh]
        p[:sh] += coef * q[card - sh :]
    return p


def expected_distinct(config: SynthConfig, rows: int) -> list[float]:
    """Expected distinct (non-missing) values of each field in ``rows`` rows (exact under the
    generator's model, no rows generated)."""
    gen = SyntheticGenerator(config)
    out = []
    for f in range(N_CAT):
        pe = (1.0 - gen.cat_missing[f]) * value_probabilities(gen, f)
        out.append(float(-np.expm1(rows * np.log1p(-pe)).sum()))
    return out


def value_set_feature_map(config: SynthConfig, rows: int, *, seed: int = 0):
    """A :class:`lma.features.FeatureMap` of the tokens ``rows`` rows of ``config`` would hold,
    drawn without generating rows: each value's count is drawn from its Binomial(rows, p) (the
    per-value marginal of the generator), values drawn 0 times are left out, and the missing
    token of fields with missing cells is counted the same way.

    For footprint and latency work at full scale (a model built on it is untrained, and must be
    labelled so). The draws are independent of the rows that ``synth:`` would generate: the
    vocabulary has the right size and count distribution, not the same tokens as a given
    run's rows.
    """
    from lma.features import FeatureMap
    from lma.tokens import hash_column, token_hash

    gen = SyntheticGenerator(config)
    rng = np.random.default_rng([config.seed, 7, seed])
    tokens, counts = [], []
    for f in range(N_CAT):
        m = float(gen.cat_missing[f])
        pe = (1.0 - m) * value_probabilities(gen, f)
        k = rng.binomial(rows, pe)
        ids = np.flatnonzero(k)
        vals = _mix32(ids.astype(np.uint64), gen.keys[f : f + 1])[:, None]
        hexes = _hex_columns(vals, np.ones_like(vals, dtype=bool))[0]
        toks = hash_column(f"C{f + 1}", hexes)
        cnt = k[ids].astype(np.int64)
        if m > 0:
            toks = np.append(toks, token_hash(f"C{f + 1}", None))
            cnt = np.append(cnt, rng.binomial(rows, m))
        order = np.argsort(toks)
        toks, cnt = toks[order], cnt[order]
        if len(toks) > 1 and not (toks[1:] > toks[:-1]).all():  # np.diff would overflow
            raise ValueError(f"C{f + 1}: token hash collision in the value set")
        tokens.append(toks)
        counts.append(cnt)
    meta = {"synthetic_value_set": True, "untrained": True, "rows_drawn": int(rows),
            "synth": {"preset": config.preset, "seed": config.seed,
                      "cardinalities": list(config.field_cardinalities),
                      "zipf": list(config.field_zipf)},
            "note": "counts drawn per value, no rows generated: a model on this map is untrained"}
    return FeatureMap(gen.schema, tokens, counts, int(rows), meta)
