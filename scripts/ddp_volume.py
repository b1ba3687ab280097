"""Data-parallel bytes per worker and per step: measured runs against the formula, and the formula
extrapolated to another vocabulary.

Reads the ``metrics.json`` that rank 0 of `torchrun ... lma.cli train --ddp --out DIR` writes
(its ``ddp`` entry: model, buffer and optimizer bytes, and each rank's gradient-sync counters),
prints one Markdown row per run, the formula's prediction beside what was measured, and, with
``--vocab N``, the formula for full tables at a vocabulary of N tokens (the compressed kinds
run at that budget directly, with ``--budget-bytes``).

    python scripts/ddp_volume.py RUN_DIR [RUN_DIR ...] [--vocab 33748837] [--dim 16]

The formula (W ranks, per rank and step; ring all-reduce and all-gather, as gloo and NCCL run):

- dense all-reduce payload: 4 bytes x every trainable float outside the sparse parameters (the
  MLPs, and tables below the sparse threshold); a ring sends 2 (W - 1) / W of it.
- sparse all-gather payload: for each sparse parameter, the largest rank's count of coalesced
  entries x (4 bytes of int32 index + 4 bytes x the entry's width: d for a table row, 1 for a
  shared-memory slot); each rank sends its own (W - 1) times.
- full tables hold 4 d (V + F) bytes of rows (F fields' OOV rows) plus a key table and the sorted
  vocabulary; LMA and ROBE-Z hold M = d (V + F) / compression floats; row-wise Adagrad keeps one
  float per table row or memory slot, Adam two per dense float.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MB = 1e6


def _row(name: str, m: dict, world: int) -> dict:
    ddp = m["ddp"]
    ranks = ddp["ranks"]
    s = [r["sync"] for r in ranks]
    per = lambda k: max(x[k + "_per_step"] or 0 for x in s)  # noqa: E731
    dense, sparse_sent = per("dense_bytes"), per("sparse_sent_bytes")
    wire = [x["wire_bytes_per_step"] for x in s]
    widths = [1 if len(shape) == 1 else shape[1] for shape in ddp["sparse_parameters"]]
    # The formula's sparse bytes from the measured entry counts (one sparse parameter per model).
    width = widths[0] if widths else 0
    predicted_sparse = [x["sparse_entries_per_step"] * (4 + 4 * width) for x in s]
    predicted_wire = 2 * (world - 1) / world * dense + (world - 1) * sparse_sent
    return {
        "run": name,
        "embedding": m["embedding"],
        "compression": m["compression"],
        "vocabulary": m["vocabulary"],
        "embedding_params": m["embedding_params"],
        "dense_gradient_floats": ddp["dense_gradient_floats"],
        "worker_model_mb": (ddp["parameter_bytes"] + ddp["buffer_bytes"]) / MB,
        "worker_params_mb": ddp["parameter_bytes"] / MB,
        "worker_buffers_mb": ddp["buffer_bytes"] / MB,
        "worker_optimizer_mb": ddp["optimizer_state_bytes"] / MB,
        "peak_rss_mb": [r["peak_rss_bytes"] / MB for r in ranks],
        "steps": s[0]["steps"],
        "dense_mb_per_step": dense / MB,
        "dense_formula_mb": 4 * ddp["dense_gradient_floats"] / MB,
        "sparse_entries_per_step": [x["sparse_entries_per_step"] for x in s],
        "sparse_mb_per_step": [x["sparse_bytes_per_step"] / MB for x in s],
        "sparse_formula_mb": [p / MB for p in predicted_sparse],
        "sparse_sent_mb_per_step": sparse_sent / MB,
        "wire_mb_per_step": [None if w is None else w / MB for w in wire],
        "wire_formula_mb": predicted_wire / MB,
        "sync_ms_per_step": [1e3 * x["seconds"] / max(x["steps"], 1) for x in s],
        "dense_alternative_mb": 4 * (m["embedding_params"]) / MB,
    }


def _extrapolate(rows: list[dict], vocab: int, dim: int, fields: int, world: int) -> list[dict]:
    """The formula for full tables at ``vocab`` tokens (the compressed kinds run at the Kaggle
    budget directly, with ``--budget-bytes``), with the entries per step and the MLP floats as
    measured: which rows a batch touches depends on the rows, not on the vocabulary size."""
    out = []
    for r in rows:
        if r["embedding"] != "full":
            continue
        mlp = r["dense_gradient_floats"]
        full_rows = vocab + fields
        params = dim * full_rows
        # Sorted vocabulary + key table: bytes per vocabulary token as measured.
        buffers = r["worker_buffers_mb"] * MB / max(r["vocabulary"], 1) * vocab
        entries = max(r["sparse_entries_per_step"])
        sparse = entries * (4 + 4 * dim)
        dense = 4 * mlp
        out.append({
            "embedding": r["embedding"], "vocabulary": vocab, "embedding_params": params,
            "worker_model_mb": (4 * params + 4 * mlp + buffers) / MB,
            "worker_buffers_mb": buffers / MB,
            "optimizer_rowwise_mb": (4 * full_rows + 8 * mlp) / MB,
            "optimizer_adam_mb": (8 * params + 8 * mlp) / MB,
            "dense_mb_per_step": dense / MB, "sparse_mb_per_step": sparse / MB,
            "wire_mb_per_step": (2 * (world - 1) / world * dense + (world - 1) * sparse) / MB,
            "dense_alternative_mb": 4 * params / MB,
        })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="--out folders of `lma train --ddp` runs")
    ap.add_argument("--vocab", type=int, help="extrapolate the formula to this many tokens")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--fields", type=int, default=26)
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = ap.parse_args()
    rows = []
    for d in args.runs:
        m = json.loads((Path(d) / "metrics.json").read_text())
        rows.append(_row(Path(d).name, m, int(m["world_size"])))
    world = int(json.loads((Path(args.runs[0]) / "metrics.json").read_text())["world_size"])
    extra = _extrapolate(rows, args.vocab, args.dim, args.fields, world) if args.vocab else []
    if args.json:
        print(json.dumps({"measured": rows, "extrapolated": extra}, indent=1))
        return 0
    f = lambda x: f"{x:,.2f}"  # noqa: E731
    fl = lambda xs: " / ".join("-" if x is None else f(x) for x in xs)  # noqa: E731
    print("| run | kind | embedding floats | vocabulary | worker model MB (params + buffers) | optimizer MB | peak RSS "
          "MB per rank | dense all-reduce MB/step (formula) | sparse entries/step per rank | "
          "sparse MB/step per rank (formula) | socket MB/step per rank (formula) | sync ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['embedding']} | {r['embedding_params']:,} | {r['vocabulary']:,} | "
              f"{f(r['worker_model_mb'])} ({f(r['worker_params_mb'])} + "
              f"{f(r['worker_buffers_mb'])}) | {f(r['worker_optimizer_mb'])} | "
              f"{fl(r['peak_rss_mb'])} | {f(r['dense_mb_per_step'])} "
              f"({f(r['dense_formula_mb'])}) | {fl(r['sparse_entries_per_step'])} | "
              f"{fl(r['sparse_mb_per_step'])} ({fl(r['sparse_formula_mb'])}) | "
              f"{fl(r['wire_mb_per_step'])} ({f(r['wire_formula_mb'])}) | "
              f"{fl(r['sync_ms_per_step'])} |")
    if extra:
        print()
        print(f"Full tables at {args.vocab:,} tokens by the formula (d = {args.dim}, {world} "
              "ranks; entries per step as measured):")
        print()
        print("| kind | embedding floats | worker model MB (of it buffers) | optimizer MB: row-wise "
              "/ Adam | dense all-reduce MB/step | sparse MB/step per rank | socket MB/step per "
              "rank | a dense all-reduce of the table instead, MB/step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in extra:
            print(f"| {r['embedding']} | {r['embedding_params']:,} | {f(r['worker_model_mb'])} "
                  f"({f(r['worker_buffers_mb'])}) | {f(r['optimizer_rowwise_mb'])} / "
                  f"{f(r['optimizer_adam_mb'])} | {f(r['dense_mb_per_step'])} | "
                  f"{f(r['sparse_mb_per_step'])} | {f(r['wire_mb_per_step'])} | "
                  f"{f(r['dense_alternative_mb'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
