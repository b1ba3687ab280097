"""Bundles at scale: build an UNTRAINED checkpoint at the full Criteo Kaggle vocabulary, then time
opening its bundle.

    python scripts/bundle_scale.py build --kind full --out /tmp/lma-scale/ck_full
    python scripts/bundle_scale.py build --kind lma --compression 16 --out /tmp/lma-scale/ck_lma
    lma export /tmp/lma-scale/ck_full --out /tmp/lma-scale/b_full
    python scripts/bundle_scale.py open /tmp/lma-scale/b_full
    python scripts/bundle_scale.py open /tmp/lma-scale/b_full --engine eager

``build`` makes a feature map of random 64-bit token hashes with the per-field cardinalities of
Criteo Kaggle (33,762,577 values; ``--scale`` shrinks them), or takes the feature map of
``--vocab DIR`` (a checkpoint or ``lma data synth --feature-map`` folder), builds the model through
``lma.train.build_model`` (LMA signatures from synthetic rows drawn from that vocabulary with a
skewed distribution) and saves it with ``lma.checkpoint.save_checkpoint``. The weights are the
initial ones: nothing is trained, so the numbers are about memory, bytes and time only.

``open`` prints, as JSON: bytes by file, ``load_bundle`` time without and with the verified-once
marker, ``Predictor.open`` time, and the median time of 1000 rows from the sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


def build(args: argparse.Namespace) -> None:
    from lma.checkpoint import save_checkpoint
    from lma.data.synthetic import KAGGLE_CARDINALITIES
    from lma.features import FeatureMap
    from lma.schema import criteo_schema
    from lma.train import TrainConfig, build_model

    rng = np.random.default_rng(args.seed)
    if args.vocab:
        src = FeatureMap.load(args.vocab, mmap=True)
        tokens = src.tokens
        sizes = [len(t) for t in tokens]
        fmap = FeatureMap(src.schema, tokens, src.counts, n_rows=src.n_rows,
                          meta={"untrained": True, "origin": f"vocabulary of {args.vocab}"})
    else:
        schema = criteo_schema()
        sizes = [max(1, int(round(c * args.scale))) for c in KAGGLE_CARDINALITIES]
        tokens, counts = [], []
        for n in sizes:
            t = np.unique(rng.integers(1, np.iinfo(np.int64).max, size=n, dtype=np.int64))
            tokens.append(t)
            counts.append(np.ones(len(t), np.int64))
        fmap = FeatureMap(schema, tokens, counts, n_rows=0,
                          meta={"untrained": True,
                                "origin": "random token hashes at Kaggle cardinalities"})
    # Signature rows: each field's values drawn with a power law, so frequent values recur.
    rows = args.signature_rows
    train_tokens = np.empty((rows, len(sizes)), np.int64)
    for f, t in enumerate(tokens):
        train_tokens[:, f] = t[(len(t) * rng.random(rows) ** 4).astype(np.int64)]
    cfg = TrainConfig(data="untrained", embedding=args.kind, compression=args.compression,
                      options={"z": args.z} if args.z else {}, progress=False)
    t0 = time.perf_counter()
    model = build_model(cfg, fmap, train_tokens)
    built = time.perf_counter() - t0
    save_checkpoint(args.out, model, fmap, {"untrained": True},
                    train_config={"embedding": args.kind, "compression": args.compression})
    print(json.dumps({"vocabulary": int(sum(len(t) for t in tokens)), "build_s": round(built, 2),
                      "params": int(sum(p.numel() for p in model.parameters()))}))


def open_bundle(args: argparse.Namespace) -> None:
    from lma.bundle import load_bundle, marker_path
    from lma.predictor import Predictor

    d = Path(args.bundle)
    out: dict[str, object] = {}
    b = load_bundle(d, trust_marker=False)
    out["files"] = b.file_bytes()
    out["total_bytes"] = sum(b.file_bytes().values())
    for f in (marker_path(d), ):
        if f is not None and f.exists():
            f.unlink()
    t0 = time.perf_counter()
    load_bundle(d, workers=1)
    out["load_bundle_hash_all_1_thread_s"] = round(time.perf_counter() - t0, 2)
    m = marker_path(d)
    if m is not None and m.exists():
        m.unlink()
    t0 = time.perf_counter()
    load_bundle(d)
    out["load_bundle_hash_all_parallel_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    load_bundle(d)
    out["load_bundle_with_marker_s"] = round(time.perf_counter() - t0, 3)
    p = Predictor.open(d, args.engine, intra_op_threads=args.threads)
    out["predictor_open_s"] = round(p.open_seconds, 2)
    out["warmup_s"] = round(p.warmup(rows=1000), 3)
    s = b.sample()
    idx = np.arange(1000) % len(s["tokens"])
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        p.logits(s["dense"][idx], s["tokens"][idx])
        times.append(time.perf_counter() - t0)
    out["ms_1000_rows_median"] = round(1e3 * float(np.median(times)), 2)
    out["engine"] = args.engine
    import resource

    out["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--kind", default="full")
    b.add_argument("--compression", type=float, default=1.0)
    b.add_argument("--z", type=int, default=0)
    b.add_argument("--scale", type=float, default=1.0, help="fraction of the Kaggle cardinalities")
    b.add_argument("--vocab", help="take the feature map of this folder instead")
    b.add_argument("--signature-rows", type=int, default=125_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    b.set_defaults(func=build)
    o = sub.add_parser("open")
    o.add_argument("bundle")
    o.add_argument("--engine", default="onnx")
    o.add_argument("--threads", type=int, default=1)
    o.set_defaults(func=open_bundle)
    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
