"""The ``ai.lma`` ops as an onnxruntime custom-op library for its CPU provider.

Exported models carry ``ai.lma::KeyLookup``, ``HashedGather`` and ``HotGather`` as model-local
functions of standard ONNX ops, which every execution provider runs. On the CPU provider those
functions cost more than the C++ kernels the torch program runs (docs/RESULTS.md, "onnxruntime
with the native ops"); a session that registers this library (:func:`register`) resolves the
``ai.lma`` nodes to the same C++ kernels (``lma/ops/csrc/ort_ops.cpp`` over
``lma_kernels.h``), with identical outputs. The model files do not change: a session without the
library, or on another provider, runs the functions as before.

The library is compiled with the system C++ compiler on first use into :func:`build_dir`
(``LMA_ORT_OPS_DIR``, else ``<repo>/.cache/ort_ops`` or ``~/.cache/lma/ort_ops``), named by a
digest of its sources and flags, or ahead of time with ``python -m lma.ort_ops`` (the serving
images do that, so that a read-only file system without a compiler finds it built). Nothing
here imports torch.

``LMA_ORT_NATIVE_OPS``: ``auto`` (default: use the library on CPU sessions where it builds, else
the functions, with one logged warning), ``1`` (required: fail where it cannot be used) or ``0``
(never). ``LMA_DISABLE_NATIVE_OPS=1`` (which also turns off the torch extension) means ``0``.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lma import hashspec

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "ops" / "csrc"
SOURCE = CSRC / "ort_ops.cpp"
HEADERS = [CSRC / "lma_kernels.h"]
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
MODE_ENV = "LMA_ORT_NATIVE_OPS"
DIR_ENV = "LMA_ORT_OPS_DIR"
DISABLE_ENV = "LMA_DISABLE_NATIVE_OPS"
MODES = ("auto", "1", "0")
MIN_ORT = (1, 16)  # custom ops with status-returning kernels (C API version 16)

_lock = threading.Lock()
_path: Path | None = None
_error: str | None = None
_tried = False


def mode() -> str:
    """The ``LMA_ORT_NATIVE_OPS`` mode (``auto``, ``1`` or ``0``); unknown values are refused."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return "0"
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    value = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(value, value)
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected auto, 1 or 0")
    return value


def build_dir() -> Path:
    """``LMA_ORT_OPS_DIR``, else ``.cache/ort_ops`` of a source checkout, else the user's cache
    (``$XDG_CACHE_HOME`` or ``~/.cache``, ``lma/ort_ops``) for an installed package."""
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / ".cache" / "ort_ops"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lma" / "ort_ops"


def _digest() -> str:
    h = hashlib.sha256()
    for p in [SOURCE, *HEADERS]:
        h.update(p.read_bytes())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def library_file() -> Path:
    """Where the library of the current sources is (or will be) compiled."""
    return build_dir() / f"liblma_ort_ops-{_digest()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the library if this version of it is not there yet; return its path (raises
    where it cannot be compiled). Concurrent builders wait for each other (a lock file), and
    the library appears under its final name only once complete."""
    target = library_file()
    if target.is_file():
        return target
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    out = target.parent
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".so.part")
        os.close(fd)
        cmd = [cxx, *FLAGS, f"-I{CSRC}", str(SOURCE), "-o", tmp]
        t0 = time.perf_counter()
        logger.info("compiling the onnxruntime LMA ops: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if verbose or proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
        if proc.returncode:
            os.unlink(tmp)
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} failed ({cxx} exited {proc.returncode}): "
                               f"{last}")
        os.replace(tmp, target)
        logger.info("onnxruntime LMA ops built in %.1fs: %s", time.perf_counter() - t0, target)
    return target


def _check_library(path: Path) -> None:
    """The library's own version marker against what this package computes."""
    lib = ctypes.CDLL(str(path))
    fn = lib.lma_ort_ops_versions
    fn.restype = ctypes.c_int64
    got = int(fn())  # key table version * 100 + hash spec version
    want = hashspec.KEY_TABLE_VERSION * 100 + hashspec.SPEC_VERSION
    if got != want:
        raise RuntimeError(f"{path} computes key table v{got // 100} / hash spec {got % 100}, "
                           f"this package v{hashspec.KEY_TABLE_VERSION} / {hashspec.SPEC_VERSION}")


def _ort_version_ok() -> bool:
    import onnxruntime as ort

    parts = ort.__version__.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= MIN_ORT
    except (IndexError, ValueError):
        return False


def library() -> Path | None:
    """The built library, or None where it cannot be (compiler missing, build failed, runtime
    too old); the reason is in :func:`unavailable_reason` and logged once."""
    global _path, _error, _tried
    if _tried:
        return _path
    with _lock:
        if not _tried:
            try:
                if not _ort_version_ok():
                    raise RuntimeError(f"onnxruntime older than {MIN_ORT[0]}.{MIN_ORT[1]}")
                path = build()
                _check_library(path)
                _path = path
            except Exception as exc:  # noqa: BLE001 - any failure means the function form
                _error = f"{type(exc).__name__}: {exc}"
                _path = None
            _tried = True
    return _path


def unavailable_reason() -> str | None:
    return _error


def wanted(providers: list[Any]) -> bool:
    """Whether a session on ``providers`` should use the library: the mode allows it and every
    provider is the CPU one (on CUDA the ai.lma nodes run as functions on the device; the
    library's CPU kernels there would copy every lookup's inputs to the host)."""
    return mode() != "0" and not names_other_than_cpu(providers)


# Marks session options that carry the library: onnxruntime refuses a second registration of the
# ai.lma domain on the same options ("Domain already set in registry").
_MARK = "lma.ort_ops.registered"


def add_to(session_options: Any) -> None:
    """Register the library on ``session_options`` (once: options that already carry it are left
    as they are); raises where it is unavailable."""
    try:
        if session_options.get_session_config_entry(_MARK) == "1":
            return
    except Exception:  # noqa: BLE001 - onnxruntime raises for an entry never set
        pass
    path = library()
    if path is None:
        raise RuntimeError(f"the onnxruntime LMA ops are unavailable: {_error}")
    session_options.register_custom_ops_library(str(path))
    session_options.add_session_config_entry(_MARK, "1")


def register(session_options: Any, providers: list[Any]) -> bool:
    """Register the library on ``session_options`` for a session on ``providers`` where
    :func:`wanted`; True when registered. In mode ``auto`` a library that cannot be built or
    loaded leaves the functions in place (one warning); in mode ``1`` that raises."""
    if not wanted(providers):
        if mode() == "1" and names_other_than_cpu(providers):
            raise RuntimeError(f"{MODE_ENV}=1 but the session is on {providers}: the native ops "
                               "run on the CPU provider only")
        return False
    if library() is not None:
        try:
            add_to(session_options)
            return True
        except Exception as exc:  # noqa: BLE001
            global _error
            _error = f"{type(exc).__name__}: {exc}"
    if mode() == "1":
        raise RuntimeError(f"{MODE_ENV}=1 but the onnxruntime LMA ops are unavailable: {_error}")
    _warn_once()
    return False


def names_other_than_cpu(providers: list[Any]) -> list[str]:
    """The providers' names (a provider may be given as ``(name, options)``) but the CPU one."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    return [n for n in names if n != "CPUExecutionProvider"]


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("onnxruntime LMA ops unavailable (%s); the ai.lma nodes run as their ONNX "
                       "functions (slower on the CPU)", (_error or "?").splitlines()[0][:300])


def main(argv: list[str] | None = None) -> int:
    """``python -m lma.ort_ops``: build the library ahead of time and check that onnxruntime
    loads it; exit 1 where it cannot (serving then runs the functions)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        path = build(verbose=args.verbose)
        _check_library(path)
        import onnxruntime as ort

        ort.SessionOptions().register_custom_ops_library(str(path))
    except Exception as exc:  # noqa: BLE001
        logger.error("the onnxruntime LMA ops are unavailable: %s", exc)
        return 1
    logger.info("onnxruntime LMA ops ready: %s (%.1fs)", path, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
