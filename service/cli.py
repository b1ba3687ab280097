"""``lma serve MODEL...``: the prediction service under uvicorn.

Registered in the ``lma.commands`` entry-point group. Every option is also an ``LMA_SERVE_*``
environment variable (:mod:`service.settings`); options given here are passed to the workers
through those variables, so ``--workers N`` processes all read the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

# (option, settings field, type, help)
_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--backend", "backend", str, "onnxruntime (default) or torch"),
    ("--device", "device", str, "cpu (default), cuda, cuda:N or auto"),
    ("--host", "host", str, "address to bind (default 127.0.0.1; 0.0.0.0 for all)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--workers", "workers", int, "worker processes, each loading every model (default 1)"),
    ("--threads", "threads", int, "intra-op threads per model (default 0: the library's)"),
    ("--weights", "weights", str, "mmap (default: mapped from weights.safetensors, pages shared "
                                  "by workers) or private (read into each worker's memory)"),
    ("--max-batch-rows", "max_batch_rows", int, "rows per model call (default 1024)"),
    ("--max-wait-ms", "max_wait_ms", float, "how long a batch waits for more rows (default 0: batches form from requests that arrive while the model is busy)"),
    ("--max-queue-rows", "max_queue_rows", int, "rows waiting per model before 503 (default 65536)"),
    ("--timeout-ms", "timeout_ms", float, "default request deadline, 504 past it (default 1000)"),
    ("--max-body-bytes", "max_body_bytes", int, "request body limit (default 16 MiB)"),
    ("--max-rows", "max_rows", int, "rows per request (default 10000)"),
]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.registry import ModelRegistry
    from service.settings import ServeSettings

    if args.models:
        os.environ["LMA_SERVE_MODELS"] = ",".join(args.models)
    for _, field, _, _ in _OPTIONS:
        value = getattr(args, field)
        if value is not None:
            os.environ[f"LMA_SERVE_{field.upper()}"] = str(value)
    if args.ignore_unknown:
        os.environ["LMA_SERVE_IGNORE_UNKNOWN"] = "1"
    settings = ServeSettings()
    # Fail here, with the path at fault, rather than in every worker.
    sources = ModelRegistry(settings).discover_all()
    for s in sources:
        logger.info("model %s version %s from %s", s.name, s.version, s.path)
    uvicorn.run("service.main:app", host=settings.host, port=settings.port,
                workers=settings.workers, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve bundles over HTTP (KServe v1 / TF Serving and Open Inference Protocol)")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="bundle folder or model repository (one folder per model, numbered "
                        "versions inside); default: $LMA_SERVE_MODELS")
    for opt, field, typ, help_ in _OPTIONS:
        p.add_argument(opt, dest=field, type=typ, default=None, help=help_)
    p.add_argument("--ignore-unknown", action="store_true",
                   help="ignore unknown field names instead of answering 422")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)
