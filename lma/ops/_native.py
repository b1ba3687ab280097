"""Build, cache and load the C++ CPU kernels of the hashed gather (``csrc/hashed_gather.cpp``).

The extension is compiled with ``torch.utils.cpp_extension.load`` into ``<repo>/.cache/torch_ext``
(override with ``LMA_TORCH_EXT_DIR``) on first use, or ahead of time by ``python -m lma.ops.build``.
With ``LMA_TORCH_EXT_PREBUILT=1`` the already compiled module is imported from that folder as it
is, without torch's JIT builder, which writes a lock file there and needs ninja and a compiler:
this is how the serving images run it on a read-only file system.
Where no compiler is available, or ``LMA_DISABLE_NATIVE_OPS=1`` is set, :func:`native_module`
returns ``None`` and the callers fall back to the pure-torch reference (with one logged warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

EXT_NAME = "lma_hashed_gather_cpu"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "hashed_gather.cpp", CSRC / "interaction.cpp"]
HEADERS = [CSRC / "lma_kernels.h"]  # torch's JIT builder hashes the sources only
DISABLE_ENV = "LMA_DISABLE_NATIVE_OPS"
PREBUILT_ENV = "LMA_TORCH_EXT_PREBUILT"

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_error: str | None = None


def native_disabled() -> bool:
    """True when ``LMA_DISABLE_NATIVE_OPS`` asks for the pure-torch fallback."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def prebuilt_only() -> bool:
    """True when ``LMA_TORCH_EXT_PREBUILT`` asks to import the compiled module without building."""
    return os.environ.get(PREBUILT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def build_dir() -> Path:
    """Folder of the compiled extension (repo ``.cache/torch_ext`` unless ``LMA_TORCH_EXT_DIR``)."""
    env = os.environ.get("LMA_TORCH_EXT_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo / ".cache" / "torch_ext"


def _compiler_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def build(verbose: bool = False) -> ModuleType:
    """Compile (if sources changed) and import the extension; raises on failure."""
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    # the headers' digest as a define: editing one changes the flags, so the module is rebuilt
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:16]
    flags = ["-O3", "-fopenmp", "-std=c++17", f"-DLMA_HEADERS_DIGEST={digest}"]
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(s) for s in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(out),
        verbose=verbose,
    )


def load_prebuilt() -> ModuleType:
    """Import ``<build_dir>/<EXT_NAME>.so`` as compiled; raises if it is missing or broken."""
    import importlib.util

    import torch  # noqa: F401 - the extension links against libtorch, which importing torch loads

    path = build_dir() / f"{EXT_NAME}.so"
    if not path.is_file():
        raise RuntimeError(
            f"{PREBUILT_ENV}=1 but {path} does not exist (build it with python -m lma.ops.build)"
        )
    spec = importlib.util.spec_from_file_location(EXT_NAME, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_module() -> ModuleType | None:
    """The loaded extension, or ``None`` (disabled, no compiler, or the build failed)."""
    global _module, _tried, _error
    if native_disabled():
        return None
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            if prebuilt_only():
                _module = load_prebuilt()
            else:
                if not _compiler_available():
                    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
                _module = build()
        except Exception as exc:  # noqa: BLE001 - any build failure means fallback
            _error = f"{type(exc).__name__}: {exc}"
            _module = None
            logger.warning(
                "LMA native CPU kernels unavailable (%s); using the slower pure-torch hashed gather",
                _error.splitlines()[0][:300],
            )
        _tried = True
    return _module


def native_error() -> str | None:
    """Why the last load failed (None if it worked or was not tried)."""
    return _error


def reset() -> None:
    """Forget the load result (tests use this after toggling ``LMA_DISABLE_NATIVE_OPS``)."""
    global _module, _tried, _error
    with _lock:
        _module, _tried, _error = None, False, None
