"""Distinct values against rows for a synthetic preset, next to Criteo Kaggle's published counts.

Expected counts are exact under the generator's model (``expected_distinct``, no rows made);
``--measure N`` also generates N rows and counts them (``lma data stats`` would give the same).

    python scripts/synth_curve.py [--preset kaggle] [--seed 0] [--measure 1000000]
"""

from __future__ import annotations

import argparse
import sys

from lma.data import data_root, open_source
from lma.data.stats import dataset_stats
from lma.data.synthetic import (
    KAGGLE_CARDINALITIES,
    KAGGLE_ROWS,
    N_CAT,
    SynthConfig,
    expected_distinct,
)

CURVE_ROWS = (10_000, 1_000_000, 4_000_000, 20_000_000, KAGGLE_ROWS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="kaggle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", type=int, default=0, help="also generate this many rows and count")
    args = ap.parse_args()
    cfg = SynthConfig(seed=args.seed, preset=args.preset)
    exp = {n: expected_distinct(cfg, n) for n in CURVE_ROWS}
    real = None
    sample = data_root() / "criteo" / "train_10k.tsv"
    if sample.is_file():
        st = dataset_stats(open_source(f"criteo:{sample}"))
        real = [st["categorical"][f"C{f + 1}"]["distinct"] for f in range(N_CAT)]
    meas = e_meas = None
    if args.measure:
        e_meas = expected_distinct(cfg, args.measure)
        st = dataset_stats(open_source(f"synth:{args.measure}:{args.seed}:{args.preset}"))
        meas = [st["categorical"][f"C{f + 1}"]["distinct"] for f in range(N_CAT)]
    head = ["field", "support", "zipf", "real 10k", "synth 10k", "published 45.8M", "synth 45.8M"]
    if meas:
        head += [f"synth {args.measure:,} expected", "measured"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    cards, zipf = cfg.field_cardinalities, cfg.field_zipf
    for f in range(N_CAT):
        row = [f"C{f + 1}", f"{cards[f]:,}", f"{zipf[f]:.3f}", f"{real[f]:,}" if real else "-",
               f"{exp[10_000][f]:,.0f}", f"{KAGGLE_CARDINALITIES[f]:,}",
               f"{exp[KAGGLE_ROWS][f]:,.0f}"]
        if meas:
            row += [f"{e_meas[f]:,.0f}", f"{meas[f]:,}"]
        print("| " + " | ".join(row) + " |")
    tot = ["total", f"{sum(cards):,}", "", f"{sum(real):,}" if real else "-",
           f"{sum(exp[10_000]):,.0f}", f"{sum(KAGGLE_CARDINALITIES):,}",
           f"{sum(exp[KAGGLE_ROWS]):,.0f}"]
    if meas:
        tot += [f"{sum(e_meas):,.0f}", f"{sum(meas):,}"]
    print("| " + " | ".join(tot) + " |")
    print()
    print("| rows | " + " | ".join(f"{n:,}" for n in CURVE_ROWS) + " |")
    print("|---|" + "---|" * len(CURVE_ROWS))
    print("| expected distinct (all fields) | "
          + " | ".join(f"{sum(exp[n]):,.0f}" for n in CURVE_ROWS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
