"""``lma features load`` / ``lma features get``: fill and inspect the Redis feature store.

Registered in the ``lma.commands`` entry-point group (``features = "service.features_cli:register"``).
Key layout: :mod:`service.feature_store`.

    lma features load --data avazu:train.csv --entity device_id --redis redis://localhost:6379/0
    lma features get --entity device_id=a99f214a --project avazu --redis redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_URL = "redis://localhost:6379/0"


def _url(args: argparse.Namespace) -> str:
    return args.redis or os.environ.get("REDIS_URL") or DEFAULT_URL


def cmd_load(args: argparse.Namespace) -> int:
    from lma.data import open_source
    from service.feature_store import load_features

    source = open_source(args.data, args.schema, on_error=args.on_error, progress=False)
    entity = [e.strip() for e in args.entity.split(",") if e.strip()]
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    summary = load_features(
        source,
        entity,
        _url(args),
        fields=fields,
        project=args.project,
        ttl_s=args.ttl,
        progress=not args.quiet,
    )
    d = summary.to_dict()
    print(
        f"wrote {summary.keys_written} key(s) under {summary.prefix}:* from {summary.rows} row(s) "
        f"in {summary.seconds:.1f} s ({summary.rows_without_entity} row(s) without an entity "
        f"value, {summary.bad_rows} bad row(s) skipped"
        + (f", TTL {summary.ttl_s} s" if summary.ttl_s else "")
        + ")",
        file=sys.stderr,
    )
    print(json.dumps(d))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from service.feature_store import entity_key, get_features

    entity: dict[str, str] = {}
    for part in args.entity:
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SystemExit(f"--entity expects FIELD=VALUE, got {part!r}")
        entity[name] = value
    got = get_features(_url(args), args.project, entity)
    if got is None:
        print(f"no features stored under {entity_key(args.project, entity)}", file=sys.stderr)
        return 1
    print(json.dumps(got, indent=2, sort_keys=True))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``features load`` and ``features get`` to the ``lma`` command line."""
    p = subparsers.add_parser("features", help="the Redis feature store: load and get")
    sub = p.add_subparsers(dest="features_command", required=True)

    lp = sub.add_parser("load", help="write each entity's latest feature values into Redis")
    lp.add_argument("--data", required=True, help="rows to load (a --data spec, e.g. avazu:PATH)")
    lp.add_argument("--schema", default=None, help="schema file for table:PATH data")
    lp.add_argument(
        "--entity", required=True, help="entity field(s), comma-separated (e.g. device_id)"
    )
    lp.add_argument(
        "--fields",
        default=None,
        help="fields to store, comma-separated (default: every feature column but the entity)",
    )
    lp.add_argument(
        "--redis", default=None, help=f"Redis URL (default: $REDIS_URL or {DEFAULT_URL})"
    )
    lp.add_argument("--project", default=None, help="key namespace (default: the schema's name)")
    lp.add_argument("--ttl", type=int, default=None, help="expire keys after S seconds")
    lp.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="bad data lines")
    lp.add_argument("--quiet", action="store_true", help="no progress bar")
    lp.set_defaults(func=cmd_load)

    gp = sub.add_parser("get", help="print one entity's stored features")
    gp.add_argument(
        "--entity", required=True, action="append", help="FIELD=VALUE (repeat for compound keys)"
    )
    gp.add_argument("--project", required=True, help="key namespace used by the load")
    gp.add_argument(
        "--redis", default=None, help=f"Redis URL (default: $REDIS_URL or {DEFAULT_URL})"
    )
    gp.set_defaults(func=cmd_get)
