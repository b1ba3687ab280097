"""Training throughput of each embedding kind (rows/s), data loading included and excluded.

    python scripts/bench_train.py [--data synth:200000:0] [--epochs 1] [--batch-size 1024]

Writes a markdown table to docs/bench/train_throughput.md (and prints it). Protocol of the peers'
numbers in ../shared/docs/LMA_NOTES.md: Adam, batch 1024, 2-core machine, data loading included.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lma.train import TrainConfig, load_splits, train_model

KINDS = [("full", 1.0, {}), ("hash", 16.0, {}), ("robez", 16.0, {"z": 16}),
         ("lma", 16.0, {}), ("lma", 16.0, {"z": 16, "aligned": True}), ("qr", 16.0, {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synth:200000:0")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="docs/bench/train_throughput.md")
    args = ap.parse_args()
    base = TrainConfig(data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                       threads=args.threads, progress=False, patience=args.epochs)
    t0 = time.perf_counter()
    splits, _ = load_splits(base)
    load_s = time.perf_counter() - t0
    n_train = len(splits.train)
    rows = []
    for kind, comp, opts in KINDS:
        cfg = TrainConfig(**{**base.__dict__, "embedding": kind, "compression": comp,
                             "options": opts})
        t1 = time.perf_counter()
        m = train_model(cfg, splits).metrics
        total = time.perf_counter() - t1 + load_s  # prepare + train + eval + loading the data
        rows.append((kind, comp, opts, m["train_rows_per_s"],
                     args.epochs * n_train / total, m["test_auc"], m["embedding_params"]))
    full_rate = rows[0][3]
    lines = [
        f"# Training throughput on {args.data}",
        "",
        f"Command: `python scripts/bench_train.py --data {args.data} --epochs {args.epochs} "
        f"--batch-size {args.batch_size}`; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Adam.",
        "",
        "| kind | compression | options | train rows/s | rows/s incl. loading, prep, eval "
        "| vs full | test AUC | embedding params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, comp, opts, rate, incl, auc, params in rows:
        lines.append(f"| {kind} | {comp:g}x | {opts or ''} | {rate:,.0f} | {incl:,.0f} | "
                     f"{rate / full_rate:.2f} | {auc:.4f} | {params:,} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
