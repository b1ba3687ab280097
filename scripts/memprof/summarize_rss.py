"""One markdown table row per run from ``rss_sample.py``'s samples and the run's metrics.json.

For each RUN (an ``lma train --out`` folder whose samples are in ``RUN.rss.tsv``, or
``--tsv-suffix``, or ``--samples-dir``), prints: rows in the store, rows trained, vocabulary, the trainer's peak RSS
(``peak_rss_bytes``, ru_maxrss), the sampled RSS over the epoch (median / max of the samples
between the end of the model build and the end of the training loop, placed on the sample
clock from the end of the run backwards using the phase times in metrics.json), the maximum
resident pages of the mapped store, the maximum private memory (RssAnon), train rows/s, test
AUC and the number of samples. Memory in MB (10^6 bytes). The tables of docs/RESULTS.md
"Peak memory against the row count" were made with it:

    python scripts/memprof/summarize_rss.py runs/streammem/fx-base-1m runs/streammem/fx-new-1m
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

MIB = 1.048576  # MiB -> MB


def summarize(run: Path, tsv: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    mapped_col = "mapped_MB" if rows and "mapped_MB" in rows[0] else "rows_bin_MB"
    s = [(float(r["t"]), float(r["VmRSS_MB"]) * MIB, float(r[mapped_col]) * MIB,
          float(r["RssAnon_MB"]) * MIB) for r in rows]
    if not s:
        raise ValueError(f"{tsv}: no samples")
    phases = ("load_seconds", "feature_map_seconds", "build_seconds", "train_seconds",
              "eval_seconds", "save_seconds")
    # The sampler starts before python does: align the phases to the end of the samples.
    offset = s[-1][0] - sum(float(m.get(k, 0.0)) for k in phases)
    t0 = offset + m["load_seconds"] + m["feature_map_seconds"] + m["build_seconds"]
    epoch = sorted(x[1] for x in s if t0 + 2 < x[0] < t0 + m["train_seconds"] - 1)
    ep = f"{epoch[len(epoch) // 2]:,.0f} / {epoch[-1]:,.0f}" if epoch else "-"
    cells = [run.name, f"{sum(m['rows'].values()):,}", f"{m['rows_trained_per_epoch']:,}",
             f"{m['vocabulary']:,}", f"{m['peak_rss_bytes'] / 1e6:,.0f}", ep,
             f"{max(x[2] for x in s):,.0f}", f"{max(x[3] for x in s):,.0f}",
             f"{m['train_rows_per_s']:,.0f}", f"{m['test_auc']:.4f}", str(len(s))]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tsv-suffix", default=".rss.tsv",
                    help="the samples of RUN are in RUN + this suffix")
    ap.add_argument("--samples-dir", type=Path, default=None,
                    help="look for the samples in this folder instead of beside RUN")
    args = ap.parse_args()
    print("| run | rows in the store | rows trained | vocabulary | peak RSS (MB) | RSS over the "
          "epoch, median / max (MB) | mapped store, max (MB) | RssAnon, max (MB) | train rows/s"
          " | test AUC | samples |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        tsv = Path(str(run) + args.tsv_suffix)
        if args.samples_dir is not None:
            tsv = args.samples_dir / tsv.name
        print(summarize(run, tsv))


if __name__ == "__main__":
    main()
