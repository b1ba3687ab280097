"""Fit the ``kaggle`` synthetic preset to Criteo Kaggle's distinct-values-versus-rows curve.

For each categorical field, a value support V_f and a Zipf exponent s_f are fitted so that the
generator's *expected* distinct values (exact under its model: cluster mixture, missing rate;
``lma.data.synthetic.expected_distinct``) equal

* at 45,840,617 rows: the published per-field counts of the full Kaggle training set
  (``KAGGLE_CARDINALITIES``, summing to 33,762,577), and
* at 10,000 rows: the distinct values of the real 10k-row sample in ``../shared/data``.

The support is capped at MAX_SUPPORT values (exact evaluation and value-set feature maps hold
a few arrays of that length); where the full-size count needs more at the skew the 10k point
asks for, the skew is lowered until the full-size count is met and the 10k count is only
approached (the largest fields: real Criteo's grow faster than any Zipf law of that support).

Prints the fitted constants (to paste into ``lma/data/synthetic.py``) and a Markdown table.

    python scripts/calibrate_synth.py [--seed 0] [--fields 0,1,...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from lma.data import data_root, open_source
from lma.data.stats import dataset_stats
from lma.data.synthetic import (
    KAGGLE_CARDINALITIES,
    KAGGLE_ROWS,
    N_CAT,
    SynthConfig,
    SyntheticGenerator,
    value_probabilities,
)

N_SAMPLE = 10_000
# Largest support tried: each evaluation holds a few float64 arrays of this length.
MAX_SUPPORT = 40_000_000
DIRECT_ABOVE = 5_000_000


def distinct_at(seed: int, f: int, card: int, s: float, rows: list[int]) -> list[float]:
    cards = [2] * N_CAT
    cards[f] = card
    zipf = [1.1] * N_CAT
    zipf[f] = s
    gen = SyntheticGenerator(SynthConfig(seed=seed, cardinalities=tuple(cards), zipf=tuple(zipf)))
    pe = (1.0 - gen.cat_missing[f]) * value_probabilities(gen, f)
    lp = np.log1p(-pe)
    return [float(-np.expm1(n * lp).sum()) for n in rows]


def solve(fn, lo: float, hi: float, target: float, increasing: bool, iters: int = 40,
          tol: float = 1e-4) -> float:
    """Illinois regula falsi for fn(x) = target on [lo, hi] (clamped to the ends)."""
    sign = 1.0 if increasing else -1.0
    flo, fhi = sign * (fn(lo) - target), sign * (fn(hi) - target)
    if flo >= 0:
        return lo
    if fhi <= 0:
        return hi
    side = 0
    for _ in range(iters):
        x = (lo * fhi - hi * flo) / (fhi - flo)
        fx = sign * (fn(x) - target)
        if abs(fx) <= tol * max(target, 1.0):
            return x
        if fx < 0:
            lo, flo = x, fx
            if side == -1:
                fhi /= 2
            side = -1
        else:
            hi, fhi = x, fx
            if side == 1:
                flo /= 2
            side = 1
    return x


def _log_hi(t_full: float) -> float:
    return math.log(min(max(t_full, 2) * 200, max(MAX_SUPPORT, t_full + 1)))


def fit_field(seed: int, f: int, t_small: float, t_full: float) -> tuple[int, float]:
    if t_small >= t_full - 0.5:
        # Every value already shows in 10k rows: the support is the count, skew irrelevant.
        return int(t_full), 1.1
    s, card = 1.0, int(t_full)
    if t_full > DIRECT_ABOVE:
        # These fields need more than MAX_SUPPORT values at any skew that meets the 10k point
        # (C3 measured: the support solve ends at the cap), so go there directly.
        card = MAX_SUPPORT
        s = solve(lambda x: distinct_at(seed, f, card, x, [KAGGLE_ROWS])[0], 0.05, 4.0,
                  t_full, False)
        return card, round(s, 4)
    for _ in range(4):
        # The support for the full-size count at this skew (log V, increasing)...
        lv = solve(lambda x, s=s: distinct_at(seed, f, int(round(math.exp(x))), s, [KAGGLE_ROWS])[0],
                   math.log(max(t_full, 2)), _log_hi(t_full), t_full, True)
        card = int(round(math.exp(lv)))
        if card >= 0.999 * MAX_SUPPORT:
            # Out of support: the full-size count fixes the skew at the largest support, and
            # the 10k-row count is only approached (reported beside the fit).
            card = MAX_SUPPORT
            s = solve(lambda x, card=card: distinct_at(seed, f, card, x, [KAGGLE_ROWS])[0], 0.05, s,
                      t_full, False)
            return card, round(s, 4)
        # ...then the skew for the 10k-row count at this support (decreasing in s).
        s_new = solve(lambda x, card=card: distinct_at(seed, f, card, x, [N_SAMPLE])[0], 0.05, 4.0,
                      t_small, False)
        if abs(s_new - s) < 1e-3:
            s = s_new
            break
        s = s_new
    lv = solve(lambda x, s=s: distinct_at(seed, f, int(round(math.exp(x))), s, [KAGGLE_ROWS])[0],
               math.log(max(t_full, 2)), _log_hi(t_full), t_full, True)
    return int(round(math.exp(lv))), round(s, 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fields", default=None, help="comma-separated 0-based fields (default: all)")
    args = ap.parse_args()
    sample = data_root() / "criteo" / "train_10k.tsv"
    if not sample.is_file():
        sys.exit(f"the real Criteo sample is needed: {sample} not found")
    stats = dataset_stats(open_source(f"criteo:{sample}"))
    real_small = [stats["categorical"][f"C{f + 1}"]["distinct"] for f in range(N_CAT)]
    fields = [int(x) for x in args.fields.split(",")] if args.fields else range(N_CAT)
    out = {}
    for f in fields:
        t0 = time.perf_counter()
        card, s = fit_field(args.seed, f, real_small[f], KAGGLE_CARDINALITIES[f])
        d_small, d_full = distinct_at(args.seed, f, card, s, [N_SAMPLE, KAGGLE_ROWS])
        out[f] = {"support": card, "zipf": s, "d_10k": d_small, "d_full": d_full,
                  "real_10k": real_small[f], "published": KAGGLE_CARDINALITIES[f]}
        print(json.dumps({"field": f"C{f + 1}", **out[f], "s": round(time.perf_counter() - t0, 1)}),
              flush=True)
    if len(out) == N_CAT:
        print("KAGGLE_SUPPORT =", tuple(out[f]["support"] for f in range(N_CAT)))
        print("KAGGLE_ZIPF =", tuple(out[f]["zipf"] for f in range(N_CAT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
