"""``lma`` subcommands of the export package: export, verify, predict, bench.

Wired into the ``lma`` console script through the entry point group ``lma.commands``::

    [project.entry-points."lma.commands"]
    export = "model_export.cli:register"
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

import numpy as np

from lma.cli import DATA_HELP, run_command

logger = logging.getLogger(__name__)


def cmd_export(args: argparse.Namespace) -> int:
    from model_export.bundle import export_bundle, load_bundle

    out = export_bundle(
        args.checkpoint,
        args.out,
        name=args.name,
        version=args.version,
        data=args.data,
        schema=args.schema,
        sample_rows=args.sample_rows,
        torch_program=args.torch_program,
        bundle_format=args.bundle_format,
        dtype=args.dtype,
        lma_serving=args.lma_serving,
    )
    b = load_bundle(out)
    m = b.manifest
    sys.stdout.write(
        f"exported {m['model']['name']} v{m['model']['version']} ({m['embedding']['kind']}) to {out}\n"
    )
    for name, info in m["files"].items():
        sys.stdout.write(f"  {name:22s} {info['bytes']:>12,d} B  sha256 {info['sha256'][:16]}\n")
    return 0


def _read_rows(
    spec: str, schema: str | None, on_error: str = "fail"
) -> tuple[np.ndarray, np.ndarray]:
    from lma.data import open_source

    data = open_source(spec, schema, on_error=on_error).read_all()
    return np.ascontiguousarray(data.dense, np.float32), np.ascontiguousarray(data.tokens, np.int64)


def cmd_verify(args: argparse.Namespace) -> int:
    from model_export.bundle import load_bundle
    from model_export.verify import verify_bundle

    b = load_bundle(args.bundle)
    dense = tokens = None
    if args.data:
        dense, tokens = _read_rows(args.data, args.schema)
        if args.rows:
            dense, tokens = dense[: args.rows], tokens[: args.rows]
    report = verify_bundle(b, dense, tokens)
    sys.stdout.write(report.table() + "\n")
    return 0 if report.ok else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """One line per scored row, in input order: the probability (``%.8g``), or, with ids
    (``--ids yes``, the default under ``--on-error skip``), ``ID<TAB>probability`` where ID is
    the row's 1-based line in a text file or its 1-based row in Parquet / synthetic data, so
    that rows dropped as bad (or blank lines) leave no doubt which output belongs to which row."""
    from lma.bundle import DEFAULT_WEIGHTS
    from lma.data import open_source
    from lma.predictor import Predictor

    pred = Predictor.open(args.bundle, engine=args.engine, intra_op_threads=args.threads,
                          weights=args.weights or DEFAULT_WEIGHTS)
    src = open_source(args.data, args.schema, on_error=args.on_error)
    pred.check_schema(src.schema)
    ids = args.ids == "yes" or (args.ids == "auto" and args.on_error == "skip")
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    n = 0
    try:
        if ids:
            out.write(f"# {src.unit}\tprobability\n")
        for enc in src.iter_chunks():
            probs = pred.predict(enc.dense, enc.tokens)
            if ids:
                lines = enc.line_numbers
                if lines is None:
                    lines = np.arange(n + 1, n + 1 + len(probs))
                out.write("".join(f"{ln}\t{p:.8g}\n" for ln, p in zip(lines, probs, strict=True)))
            else:
                out.write("".join(f"{p:.8g}\n" for p in probs))
            n += len(probs)
    finally:
        if args.out:
            out.close()
    if args.out:
        logger.info("wrote %d probabilities to %s", n, args.out)
    return 0


def cmd_bench_op(args: argparse.Namespace) -> int:
    from model_export.bench import main_bench_op

    return main_bench_op(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export``, ``verify``, ``predict`` and ``bench`` to the ``lma`` command line."""
    p = subparsers.add_parser(
        "export", help="write a serving bundle (ONNX + torch program + manifest)"
    )
    p.add_argument("checkpoint", help="checkpoint folder written by `lma train --out`")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument(
        "--name", default=None, help="model name (default: the checkpoint folder's name)"
    )
    p.add_argument("--version", default="1", help="model version recorded in the manifest")
    p.add_argument(
        "--data", default=None, help="rows to save as the verification sample; " + DATA_HELP
    )
    p.add_argument("--schema", default=None, help="schema file for table:PATH data")
    p.add_argument("--sample-rows", type=int, default=256, help="rows in the saved sample")
    p.add_argument(
        "--torch-program",
        action="store_true",
        help="also write model.pt2 (torch.export program, for the `program` engine); the "
        "onnx and eager engines read weights.safetensors and need no program",
    )
    p.add_argument(
        "--bundle-format",
        type=int,
        choices=[1, 2],
        default=2,
        help="2 (default): each byte once; 1: the old layout (weights in model.onnx and "
        "model.pt2, training counts), for readers that need it",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage type of the embedding tables (full and hashing-trick rows, LMA / ROBE-Z "
        "memory): float16 halves their bytes; the model computes in float32 either way (kinds "
        "full, hash, robez, lma; `lma verify` compares with the float32 model)",
    )
    p.add_argument(
        "--lma-serving",
        choices=["auto", "hot", "hash"],
        default=None,
        help="serving form of an LMA model. hot: the signed tokens' rows are computed once at "
        "export (bit for bit the rows the hash form reads) and copied at serving; only the "
        "other tokens are hashed, and the bundle holds no signatures. hash: token -> "
        "signature -> hashed blocks at serving, as in training (the only form of "
        "--bundle-format 1). auto (default with format 2): hot when the hot rows take at "
        "most 25%% of the memory's bytes (large vocabularies), else hash",
    )
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "verify", help="check torch eager, torch program and onnxruntime agree"
    )
    p.add_argument("bundle", help="bundle folder written by `lma export`")
    p.add_argument(
        "--data", default=None, help="rows to check (default: the bundle's sample); " + DATA_HELP
    )
    p.add_argument("--schema", default=None, help="schema file for table:PATH data")
    p.add_argument("--rows", type=int, default=None, help="use only the first ROWS rows of --data")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("predict", help="offline batch scoring: one probability per line")
    p.add_argument("bundle", help="bundle folder written by `lma export`")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--schema", default=None, help="schema file for table:PATH data")
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument(
        "--engine",
        choices=["onnx", "program", "eager"],
        default="onnx",
        help="which of the bundle's models scores (default: onnxruntime)",
    )
    p.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="malformed lines: stop (fail) or skip them (their rows get no output line; "
        "with skip, each output line starts with the row's input line number, see --ids)",
    )
    p.add_argument(
        "--ids",
        choices=["auto", "yes", "no"],
        default="auto",
        help="write ID<TAB>probability lines (ID: 1-based input line of text files, row of "
        "Parquet/synthetic data) after a '# line<TAB>probability' header; auto: with "
        "--on-error skip only (default)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the engine")
    p.add_argument("--weights", choices=["private", "mmap"], default=None,
                   help="map the weights from weights.safetensors (mmap, the default) or read "
                        "them into this process's memory (private)")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    b = bsub.add_parser("op", help="latency of the hashed-gather lookup per implementation")
    b.add_argument("--quick", action="store_true", help="a few sizes only (about a minute)")
    b.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default 1,64,512,4096)"
    )
    b.add_argument("--zs", default=None, help="comma-separated Z values (default 1,4,16)")
    b.add_argument("--log2m", default=None, help="comma-separated log2(M) (default 16,18,...,26)")
    b.add_argument(
        "--impls",
        default=None,
        help="comma-separated subset of torch,cpp,compile,onnx,full (default all)",
    )
    b.add_argument(
        "--no-full-table", action="store_true", help="skip the 2.16 GB full-table baseline"
    )
    b.add_argument(
        "--full-rows", type=int, default=33_762_577, help="rows of the full-table baseline"
    )
    b.add_argument(
        "--repeats", type=int, default=0, help="timed runs per point (default: adaptive)"
    )
    b.add_argument("--threads", type=int, default=0, help="torch / ORT threads (default: all)")
    b.add_argument("--out", default="docs/bench", help="folder for the markdown table and the PNG")
    b.set_defaults(func=cmd_bench_op)
    # More benchmarks come from other packages through the ``lma.bench`` entry-point group
    # (each: register(bench_subparsers)); loadtest adds ``serve``.
    for ep in entry_points(group="lma.bench"):
        try:
            ep.load()(bsub)
        except Exception as e:  # a broken plugin must not take `lma bench op` down
            logger.warning("could not load lma bench command %r: %s", ep.name, e)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m model_export.cli``) with the same subcommands."""
    parser = argparse.ArgumentParser(prog="lma-export")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
