"""The lma command line: train, evaluate, sweep, export and serve CTR models with LMA embeddings.

Core subcommands live here (data, train, evaluate, sweep); packages outside the core add theirs
(export, verify, predict, bench) through the ``lma.commands`` entry-point group: each entry point
is a function ``register(subparsers)``. The core never imports them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from importlib.metadata import entry_points
from typing import Any

DATA_HELP = (
    "data source: criteo:PATH | criteo-test:PATH | avazu:PATH | "
    "synth:ROWS[:SEED][:PRESET][:KEY=VALUE...] (PRESET small | kaggle; keys zipf, cards, ctr, "
    "affinity, clusters, missing) | table:PATH (with --schema FILE)"
)

def _json_safe(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_json_safe(v) for v in o]
    return o

def _version() -> str:
    from lma import __version__

    return __version__

def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_json_safe(obj), indent=2, default=str) + "\n")

def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help=DATA_HELP)
    p.add_argument("--schema", default=None, help="schema file (JSON/YAML) for table:PATH data")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="malformed lines: stop with the line number (fail) or count and skip them")

def _kv_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]

# ---------------------------------------------------------------- data

def cmd_data_synth(args: argparse.Namespace) -> int:
    from lma.data.synthetic import SynthConfig, value_set_feature_map, write_tsv

    kw: dict[str, Any] = {"rows": args.rows, "seed": args.seed, "preset": args.preset}
    if args.zipf:
        z = [float(x) for x in args.zipf.split(",")]
        kw["zipf"] = z[0] if len(z) == 1 else tuple(z)
    if args.cardinalities:
        kw["cardinalities"] = tuple(_ints(args.cardinalities))
    cfg = SynthConfig(**kw)
    info = {"preset": cfg.preset, "seed": cfg.seed, "cardinalities": list(cfg.field_cardinalities),
            "zipf": list(cfg.field_zipf)}
    if args.feature_map:
        fmap = value_set_feature_map(cfg, args.rows)
        fmap.save(args.out)
        print_json({"rows_drawn": args.rows, "out": args.out, "tokens": sum(fmap.vocab_sizes()),
                    **info, "note": "feature map drawn from the generator's value set, no rows "
                                    "generated: models built on it are untrained"})
        return 0
    n = write_tsv(cfg, args.out, progress=not args.quiet)
    print_json({"rows": n, "out": args.out, **info, "note": "synthetic data (Criteo schema)"})
    return 0

def cmd_data_stats(args: argparse.Namespace) -> int:
    from lma.data import open_source
    from lma.data.stats import dataset_stats

    src = open_source(args.data, args.schema, on_error=args.on_error, progress=not args.quiet)
    print_json(dataset_stats(src))
    return 0

# ---------------------------------------------------------------- train / evaluate

def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.add_argument("--embedding", default="full",
                   help="embedding kind: full | hash | robez | lma | qr")
    p.add_argument("--compression", type=float, default=1.0,
                   help="embedding params = full-table params / X (1 = full size)")
    p.add_argument("--budget-bytes", type=int, default=None,
                   help="embedding memory in fp32 bytes (instead of --compression)")
    add_model_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cpu | cuda[:N] | auto: where the model and its embedding memory live")
    p.add_argument("--split", choices=["random", "time"], default="random")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="embedding option, e.g. z=16, aligned=true, t=8 (repeatable)")
    p.add_argument("--fractions", default="0.8,0.1,0.1",
                   help="train,val,test fractions of the split (default 0.8,0.1,0.1)")
    p.add_argument("--out", default=None, help="checkpoint folder (metrics.json goes there)")
    g = p.add_argument_group(
        "out of core", "for data larger than memory: one streaming pass encodes the rows to a "
        "file, the feature map and signatures come from it, and training reads each batch "
        "from it; peak memory does not grow with the row count (beyond 8 bytes of split and "
        "epoch index per row)")
    g.add_argument("--stream", action="store_true", help="train from encoded rows on disk")
    g.add_argument("--work-dir", default=None,
                   help="folder for the encoded rows and a spilled best state (default: a "
                        "temporary folder, removed at the end; ~264 bytes per Criteo row); rows "
                        "already encoded there from the same source are reused")
    g.add_argument("--epoch-rows", type=int, default=None,
                   help="train on at most this many (shuffled) training rows per epoch")
    g.add_argument("--ddp", action="store_true",
                   help="data parallel over the processes of `torchrun --nproc_per_node N -m "
                        "lma.cli train --ddp ...` (gloo on CPU): every rank trains its share of "
                        "each --batch-size batch; rank 0 writes --out and prints the metrics")
    g.add_argument("--vocab-from", default=None, metavar="DIR",
                   help="add the tokens and counts of this feature map (a folder with "
                        "feature_map.json/.npz, e.g. from `lma data synth --feature-map`) to the "
                        "training rows': a vocabulary of more rows than are trained on")

def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model and optimisation options shared by ``lma train`` and ``lma sweep`` (the TrainConfig
    fields of :func:`model_kwargs`)."""
    p.add_argument("--dim", type=int, default=16, help="embedding dimension d")
    p.add_argument("--bottom-mlp", type=_ints, default=[64, 32], help="hidden sizes, e.g. 64,32")
    p.add_argument("--top-mlp", type=_ints, default=[64, 32], help="hidden sizes, e.g. 64,32")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--interaction", choices=["dot", "dot-cat", "dot-wide"], default="dot",
                   help="dot: DLRM's pairwise dots; dot-cat: the top MLP also sees the field vectors")
    p.add_argument("--standardize-dense", action="store_true",
                   help="standardise dense features with the training rows' mean/std (in the model)")
    p.add_argument("--optimizer", choices=["adam", "adagrad", "sgd", "rowwise"], default="adam",
                   help="adam: Adam (SparseAdam for sparse tables, two state floats per float); "
                        "rowwise: Adam, with row-wise Adagrad (one state float per table row; "
                        "per float of a shared memory) for sparse tables; adagrad; sgd")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sparse-lr", type=float, default=None,
                   help="learning rate of tables trained with sparse gradients (default: --lr; "
                        "0.1 with --optimizer rowwise)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=2,
                   help="stop after this many epochs without a better validation AUC")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--min-count", type=int, default=1,
                   help="full-table vocabulary threshold (tokens seen fewer times share the OOV row)")
    g = p.add_argument_group(
        "first-order term",
        "a scalar weight per token and a linear dense term added to DLRM's logit (a logistic "
        "regression inside the model); trained alone first (wide warm-up), then jointly")
    g.add_argument("--first-order", action="store_true", help="add the first-order term")
    g.add_argument("--first-order-min-count", type=int, default=1,
                   help="vocabulary threshold of its scalar table (full tables; other kinds hash "
                        "tokens into n_params/dim scalars)")
    g.add_argument("--first-order-l2", type=float, default=1e-3,
                   help="L2 (weight decay) of the scalar table")
    g.add_argument("--first-order-lr", type=float, default=None,
                   help="learning rate of the first-order term (default: --lr)")
    g.add_argument("--warmup-epochs", type=int, default=50,
                   help="most epochs of the first-order warm-up (early-stopped; 0 = none)")

def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields that :func:`add_model_args` parses."""
    return {
        "dim": args.dim, "bottom_mlp": args.bottom_mlp, "top_mlp": args.top_mlp,
        "dropout": args.dropout, "interaction": args.interaction,
        "standardize": args.standardize_dense, "optimizer": args.optimizer, "lr": args.lr,
        "sparse_lr": args.sparse_lr,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "epochs": args.epochs,
        "patience": args.patience, "threads": args.threads, "min_count": args.min_count,
        "first_order": args.first_order, "first_order_min_count": args.first_order_min_count,
        "first_order_l2": args.first_order_l2, "first_order_lr": args.first_order_lr,
        "warmup_epochs": args.warmup_epochs,
    }

def train_config_from_args(args: argparse.Namespace):
    from lma.train import TrainConfig

    return TrainConfig(
        data=args.data, schema=args.schema, embedding=args.embedding,
        compression=args.compression, budget_bytes=args.budget_bytes, seed=args.seed,
        split=args.split, options=_kv_options(args.option), on_error=args.on_error,
        device=args.device, out=args.out, progress=not args.quiet, stream=args.stream,
        work_dir=args.work_dir, epoch_rows=args.epoch_rows, fractions=_fractions(args.fractions),
        vocab_from=args.vocab_from, ddp=args.ddp,
        **model_kwargs(args),
    )


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--fractions: expected three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"--fractions: three fractions >= 0 summing to 1 expected, got {text!r}")
    return f  # type: ignore[return-value]

def cmd_train(args: argparse.Namespace) -> int:
    from lma.train import train_model

    result = train_model(train_config_from_args(args))
    if result.rank == 0:
        print_json(result.metrics)
    return 0

def cmd_evaluate(args: argparse.Namespace) -> int:
    from lma.checkpoint import load_checkpoint
    from lma.data import open_source, take
    from lma.train import evaluate, split_rows

    ck = load_checkpoint(args.checkpoint)
    src = open_source(args.data, args.schema, on_error=args.on_error, progress=not args.quiet)
    data = src.read_all()
    kind = None
    if args.split != "all":
        # The checkpoint's own split (kind, fractions, seed), so that "test" means the rows
        # training held out.
        tc = ck.config.get("train_config", {})
        kind = tc.get("split", "random")
        seed = tc.get("seed", 0) if args.seed is None else args.seed
        fractions = tuple(tc.get("fractions", (0.8, 0.1, 0.1)))
        parts = dict(zip(("train", "val", "test"),
                         split_rows(kind, len(data), seed, fractions, data.times, args.data),
                         strict=True))
        data = take(data, parts[args.split])

    res = evaluate(ck.model, data)
    print_json({"auc": res["auc"], "logloss": res["logloss"], "rows": res["rows"],
                "split": args.split, "split_kind": kind, "checkpoint": str(args.checkpoint)})
    return 0

# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lma", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lma {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="write synthetic Criteo-schema rows as a Criteo TSV "
                                      "(or their feature map, with --feature-map)")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small",
                   help="cardinalities and skew preset: small | kaggle (fitted to Criteo "
                        "Kaggle's distinct values at 10k and 45.8M rows)")
    p.add_argument("--zipf", default=None,
                   help="skew: the Zipf exponent of value frequencies, one or 26 comma-separated "
                        "(default: the preset's)")
    p.add_argument("--cardinalities", default=None,
                   help="26 comma-separated value supports (default: the preset's)")
    p.add_argument("--feature-map", action="store_true",
                   help="write a feature map (feature_map.json/.npz in --out) of the tokens ROWS "
                        "rows would hold, drawn from the value distribution without generating "
                        "rows (for footprint and latency work; models on it are untrained)")
    p.add_argument("--out", required=True, help="output .tsv path (a folder with --feature-map)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("stats", help="rows, label rate, per-field cardinality and missing rates")
    add_data_args(p)
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("train", help="train a DLRM model and write a checkpoint + metrics.json")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="AUC and logloss of a checkpoint on a data source")
    p.add_argument("checkpoint", help="checkpoint folder written by `lma train --out`")
    add_data_args(p)
    p.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                   help="evaluate on this part of the checkpoint's own train/val/test split "
                        "(random or time, its fractions; default: all rows)")
    p.add_argument("--seed", type=int, default=None,
                   help="random-split seed (default: the training seed)")
    p.set_defaults(func=cmd_evaluate)

    try:
        from lma.sweep import register_cli as register_sweep
    except ImportError:
        register_sweep = None
    if register_sweep is not None:
        register_sweep(sub)

    for ep in entry_points(group="lma.commands"):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plugin must not take the core commands down
            logging.getLogger(__name__).warning("could not load lma command %r: %s", ep.name, e)
    return parser

def run_command(args: argparse.Namespace, verbose: bool = False) -> int:
    """Set up logging and run a parsed subcommand; user errors become one line and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript"):  # per-initializer INFO lines from the ONNX exporter
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"lma {args.command}: error: {e}\n")
        return 2

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, verbose=args.verbose)

if __name__ == "__main__":
    sys.exit(main())
