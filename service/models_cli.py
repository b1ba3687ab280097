"""``lma models publish`` / ``lma models notify``: put a new version where servers find it, and
tell every replica to reload.

Registered in the ``lma.commands`` entry-point group (``models = "service.models_cli:register"``).

    lma models publish bundles/lma16 --repository repo/ --name ctr --channel lma:reload:v1
    lma models notify ctr --channel lma:reload:v1 --redis redis://localhost:6379/0

``publish`` copies the bundle under a hidden name inside ``REPOSITORY/NAME/`` and renames it to
the next version number (or ``--version``) in one step, so no server sees half a folder; with a
channel it then publishes the reload message (:mod:`service.pubsub`). ``notify`` only publishes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

DEFAULT_URL = "redis://localhost:6379/0"


def next_version(model_dir: Path) -> str:
    nums = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir.is_dir() else []
    return str(max(nums, default=0) + 1)


def publish_bundle(bundle: Path, repository: Path, name: str | None = None,
                   version: str | None = None) -> tuple[str, str, Path]:
    """Copy ``bundle`` in as ``repository/NAME/VERSION`` (one rename); (name, version, folder)."""
    from lma.bundle import load_bundle

    # Refuse here what every server would refuse (checksums, versions), before anyone reloads.
    b = load_bundle(bundle)
    name = name or str(b.manifest.get("model", {}).get("name") or bundle.name)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    if not version.isdigit():
        raise SystemExit(f"--version must be a number (a version folder), got {version!r}")
    dest = model_dir / version
    if dest.exists():
        raise SystemExit(f"{dest} exists: versions are never overwritten; publish a new one")
    tmp = model_dir / f".incoming-{version}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(bundle, tmp)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return name, version, dest


def _notify(args: argparse.Namespace, name: str) -> dict:
    from service.pubsub import publish

    channel = args.channel or os.environ.get("LMA_SERVE_RELOAD_CHANNEL")
    if not channel:
        return {}
    url = args.redis or os.environ.get("REDIS_URL") or DEFAULT_URL
    n = publish(url, channel, name, origin="lma-models-cli")
    return {"channel": channel, "receivers": n}


def cmd_publish(args: argparse.Namespace) -> int:
    name, version, dest = publish_bundle(Path(args.bundle), Path(args.repository), args.name,
                                         args.version)
    out = {"model": name, "version": version, "path": str(dest)}
    sent = _notify(args, name)
    if sent:
        out["broadcast"] = sent
        print(f"published {name} version {version} at {dest}; reload message on "
              f"{sent['channel']!r} reached {sent['receivers']} subscriber(s)", file=sys.stderr)
    else:
        print(f"published {name} version {version} at {dest} (no channel: servers pick it up "
              "by their folder watch or an admin reload)", file=sys.stderr)
    print(json.dumps(out))
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    if not (args.channel or os.environ.get("LMA_SERVE_RELOAD_CHANNEL")):
        raise SystemExit("notify needs --channel (or $LMA_SERVE_RELOAD_CHANNEL)")
    sent = _notify(args, args.name)
    print(json.dumps({"model": args.name, "broadcast": sent}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models publish`` and ``models notify`` to the ``lma`` command line."""
    p = subparsers.add_parser("models", help="publish model versions and ask servers to reload")
    sub = p.add_subparsers(dest="models_command", required=True)

    def redis_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--channel", default=None,
                       help="reload channel (default: $LMA_SERVE_RELOAD_CHANNEL; none: no message)")
        q.add_argument("--redis", default=None,
                       help=f"Redis URL (default: $REDIS_URL or {DEFAULT_URL})")

    pp = sub.add_parser("publish", help="copy a bundle in as the next version folder, then "
                        "publish a reload message")
    pp.add_argument("bundle", help="bundle folder (from lma export)")
    pp.add_argument("--repository", required=True, help="model repository the servers read")
    pp.add_argument("--name", default=None, help="model name (default: the manifest's)")
    pp.add_argument("--version", default=None, help="version number (default: the next one)")
    redis_args(pp)
    pp.set_defaults(func=cmd_publish)

    np_ = sub.add_parser("notify", help="publish a reload message for a model")
    np_.add_argument("name", help="model name")
    redis_args(np_)
    np_.set_defaults(func=cmd_notify)
