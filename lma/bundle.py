"""Reading exported model bundles: the contract between offline (export) and online (serving).

A bundle is a folder written by ``model_export.bundle.export_bundle`` (see its docstring for the
layout). This module opens and checks one; it imports neither torch nor onnx nor onnxruntime, so
a serving-only install (core + onnxruntime) can use it. The torch-only views of a bundle (the
torch program, the eager model) import torch when called.

:func:`load_bundle` checks the manifest's format and versions and every file's checksum, and
fails with a :class:`BundleError` naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lma import hashspec
from lma.schema import Schema

logger = logging.getLogger(__name__)

# 2: each byte once (weights.safetensors shared by ONNX and torch; no training counts; the torch
# program optional). 1: model.onnx and model.pt2 each with the weights, feature_map.npz counts.
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"
SAMPLE_FILE = "sample.npz"
STATE_FILE = "embedding_state.npz"
FEATURE_JSON = "feature_map.json"
FEATURE_FILES = (FEATURE_JSON, "feature_map.npz")
WEIGHTS_FILE = "weights.safetensors"
VOCAB_FILE = "vocabulary.npz"
# Kinds whose rebuild needs each field's own vocabulary (format 2 keeps it in vocabulary.npz);
# full tables need only their key table, which their weights hold (older bundles: the sorted
# vocabulary ``.vocab`` it is built from).
PER_FIELD_VOCAB_KINDS = ("qr",)
INPUT_NAMES = ("dense", "tokens")
OUTPUT_NAMES = ("logits",)
HASHED_KINDS = ("lma", "robez")
# The verified-once marker: beside the bundle, or under the user cache dir when the bundle's
# folder is read-only (see marker_path).
MARKER_FILE = ".lma-verified.json"
MARKER_VERSION = 1

# The custom ONNX op a bundle may use. model_export.onnx_spec names the same op for the writer;
# tests/test_bundle.py checks the two agree (the core cannot import model_export).
CUSTOM_OP_DOMAIN = "ai.lma"
CUSTOM_OP_TYPE = "HashedGather"
CUSTOM_OP_VERSION = 1

# Where a server holds a format 2 bundle's weights: "mmap", memory-mapped from
# weights.safetensors (page-cache pages, shared by every process serving the bundle, resident
# once touched), or "private", read into each process's own memory (the whole weights resident
# per process, in transparent huge pages where the kernel has them). mmap is the default: in the
# measurement (docs/RESULTS.md, "Weights in private memory or memory-mapped") private was no
# faster beyond this machine's noise, since this kernel maps page-cache large folios with huge
# pages too, and it costs the whole weights per worker.
WEIGHT_MODES = ("private", "mmap")
DEFAULT_WEIGHTS: Literal["private", "mmap"] = "mmap"

# Top-level DLRM modules whose parameters are MLP weights (component_bytes).
_MLP_MODULES = ("bottom", "top", "wide", "linear")


class BundleError(ValueError):
    """A bundle that cannot be used: missing or modified file, unknown version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A checked bundle folder."""

    path: Path
    manifest: dict[str, Any]
    # What load_bundle checked: {"verified": [...], "trusted": [...], "seconds": s, "marker": p}
    verification: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["model"]["version"])

    @property
    def kind(self) -> str:
        return str(self.manifest["embedding"]["kind"])

    @property
    def lma_serving(self) -> str | None:
        """An LMA bundle's serving form: "hot" (the signed tokens' rows precomputed at export,
        the others hashed; no signatures in the bundle) or "hash" (token -> signature -> hashed
        blocks, as in training; every bundle written before the hot form); None for other kinds.
        The embedding config's ``serve`` option carries it, so the eager model is rebuilt in
        that form."""
        if self.kind != "lma":
            return None
        emb = self.manifest["embedding"]
        options = (emb.get("config") or {}).get("options") or {}
        return str(emb.get("serving") or options.get("serve") or "hash")

    @property
    def format(self) -> int:
        return int(self.manifest["bundle_format"])

    @property
    def onnx_path(self) -> Path:
        return self.file(ONNX_FILE)

    @property
    def program_path(self) -> Path | None:
        """The torch program's file, or None when the bundle was exported without one."""
        return self.file(PROGRAM_FILE) if PROGRAM_FILE in self.manifest.get("files", {}) else None

    @cached_property
    def schema(self) -> Schema:
        """The schema the model was trained with, from the small JSON (no vocabulary is read)."""
        f = self.file(FEATURE_JSON)
        try:
            info = json.loads(f.read_text())
            return Schema.from_dict(info["schema"])
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{f}: cannot read the schema ({exc})") from exc

    @property
    def n_dense(self) -> int:
        return int(self._input("dense")["shape"][1])

    @property
    def n_token_slots(self) -> int:
        return int(self._input("tokens")["shape"][1])

    def _input(self, name: str) -> dict[str, Any]:
        for i in self.manifest["inputs"]:
            if i["name"] == name:
                return i
        raise BundleError(f"{self.file(MANIFEST)}: no input named {name!r}")

    def sample(self) -> dict[str, np.ndarray]:
        """The rows saved at export: dense (N, n_dense), tokens (N, S), logits (N,)."""
        with np.load(self.file(SAMPLE_FILE), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def component_bytes(self) -> dict[str, int]:
        """Bytes a server holds by component: ``embedding`` (shared memory or tables; for the
        LMA hot form also its precomputed rows),
        ``key_lookup`` (the embedding's key table: token -> row for full tables, token ->
        signature for LMA, token -> hot row for the LMA hot form; bundles written before key tables were stored count the sorted
        vocabulary as well; 0 for kinds that need neither), ``mlp`` (bottom, top and wide layers), ``other`` (first-order term, dense
        statistics, ...), and ``total``."""
        comp = self.manifest.get("components")
        if isinstance(comp, dict):
            out = {k: int(v) for k, v in comp.items()}
        else:
            # Format 1 manifests list float parameters by top-level module only.
            params = self.manifest.get("parameters", {})
            out = {"embedding": 0, "key_lookup": 0, "mlp": 0, "other": 0}
            for top, info in params.items():
                if top in ("total", "embedding_state"):
                    continue
                b = int(info.get("bytes", 0))
                if top == "embedding":
                    out["embedding"] += b
                elif top in _MLP_MODULES:
                    out["mlp"] += b
                else:
                    out["other"] += b
            out["key_lookup"] = int(params.get("embedding_state", {}).get("bytes", 0))
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return out

    def file_bytes(self) -> dict[str, int]:
        """Bytes of each file of the bundle, as the manifest lists them (plus the manifest)."""
        out = {n: int(i["bytes"]) for n, i in self.manifest.get("files", {}).items()}
        out[MANIFEST] = self.file(MANIFEST).stat().st_size
        return out

    def feature_map(self) -> Any:
        """A :class:`lma.features.FeatureMap` of the bundle: format 1 bundles carry the training
        counts; format 2 bundles the schema and, for kinds that need it, the vocabulary
        (``vocabulary.npz``, counts only where a threshold above 1 needs them), else no tokens."""
        from lma.features import FeatureMap

        if self.format == 1:
            return FeatureMap.load(self.path)
        info = json.loads(self.file(FEATURE_JSON).read_text())
        n = len(self.schema.categorical)
        tokens = [np.zeros(0, np.int64) for _ in range(n)]
        counts: list[Any] = [np.zeros(0, np.int64) for _ in range(n)]
        vocab = self.manifest.get("vocabulary")
        if vocab:
            with np.load(self.file(vocab["file"]), allow_pickle=False) as z:
                for i in range(n):
                    tokens[i] = z[f"tokens_{i}"]
                    c = z.get(f"counts_{i}")
                    # A broadcast view: no memory for "every token counts once".
                    counts[i] = (np.broadcast_to(np.int64(int(vocab.get("min_count", 1))),
                                                 tokens[i].shape) if c is None else c)
        return FeatureMap(self.schema, tokens, counts, int(info.get("n_rows", 0)),
                          info.get("meta"))

    def weights(self, private: bool = False) -> dict[str, np.ndarray]:
        """The state dict of a format 2 bundle as copy-on-write memory maps of
        ``weights.safetensors`` (nothing is read until used), or with ``private`` read into
        the process's own memory (see :data:`WEIGHT_MODES`)."""
        if self.format == 1:
            raise BundleError(f"{self.path}: a format 1 bundle keeps its weights in {PROGRAM_FILE}")
        info = self.manifest.get("weights") or {}
        return self._read_weights(info.get("state_dict"), private)

    def onnx_initializers(self, private: bool = True) -> dict[str, np.ndarray]:
        """The arrays that ``model.onnx``'s external initializers point to in
        ``weights.safetensors``, by initializer name (format 2): what ``add_initializer`` gives
        onnxruntime so that it reads none of them itself."""
        info = self.manifest.get("weights") or {}
        if self.format == 1 or "onnx_shares" not in info:
            raise BundleError(f"{self.path}: a format {self.format} bundle's model.onnx does not "
                              f"point into {WEIGHTS_FILE}")
        names = {n: n for n in info["onnx_shares"]}
        names.update({t.removeprefix("onnx::"): t for t in info.get("onnx_only", [])})
        arrays = self._read_weights(sorted(set(names.values())), private)
        return {init: arrays[t] for init, t in names.items()}

    def _read_weights(self, names: list[str] | None, private: bool) -> dict[str, np.ndarray]:
        from lma import tensorfile

        f = self.file((self.manifest.get("weights") or {}).get("file", WEIGHTS_FILE))
        try:
            return tensorfile.read(f, names, private=private)
        except OSError as exc:
            raise BundleError(f"{f}: cannot read the weights ({exc})") from exc
        except tensorfile.TensorFileError as exc:
            raise BundleError(str(exc)) from exc

    # Torch-side views: they import torch (and lma.ops) only when called.

    def onnx_session(self, providers: list[str] | None = None) -> Any:
        import onnxruntime as ort

        key = f"ort:{providers}"
        with self._lock:
            if key not in self._cache:
                self._cache[key] = ort.InferenceSession(
                    str(self.onnx_path), providers=providers or ["CPUExecutionProvider"]
                )
            return self._cache[key]

    def program(self) -> Any:
        """The ``torch.export`` program (an ``ExportedProgram``)."""
        import torch

        import lma.ops  # noqa: F401  (registers lma::hashed_gather before loading)

        path = self.program_path
        if path is None:
            raise BundleError(f"{self.path}: the bundle has no torch program ({PROGRAM_FILE}); "
                              "re-export it with `lma export --torch-program`, or use the onnx "
                              "or eager engine")
        with self._lock:
            if "program" not in self._cache:
                self._cache["program"] = torch.export.load(str(path))
            return self._cache["program"]

    def release(self, *what: str) -> None:
        """Drop cached engines (``"eager"``, ``"program"``, ``"ort"``; all without arguments), so
        the weights they map or hold are released once the caller drops its own references."""
        with self._lock:
            for key in list(self._cache):
                if not what or key.split(":", 1)[0] in what:
                    del self._cache[key]

    def eager_model(self, weights: str = "mmap") -> Any:
        """The DLRM rebuilt in eager torch from the manifest's config, the feature map, the
        per-token state and the saved weights (eval mode), which it holds memory-mapped
        (``weights="mmap"``) or in its own memory (``"private"``; see :data:`WEIGHT_MODES`)."""
        check_weights_mode(weights)
        key = f"eager:{weights}"
        with self._lock:
            if key not in self._cache:
                self._cache[key] = _eager_model(self, private=weights == "private")
            return self._cache[key]


def _check_manifest(mf: Path, manifest: dict[str, Any]) -> None:
    fmt = manifest.get("bundle_format")
    if fmt not in READABLE_FORMATS:
        raise BundleError(
            f"{mf}: bundle_format {fmt!r} is not supported (this build reads "
            f"{', '.join(map(str, READABLE_FORMATS))}); re-export the model with this version"
        )
    kind = manifest.get("embedding", {}).get("kind")
    spec = manifest.get("hash_spec_version")
    if kind in HASHED_KINDS and spec != hashspec.SPEC_VERSION:
        raise BundleError(
            f"{mf}: hash_spec_version {spec!r} does not match this build's hash spec "
            f"v{hashspec.SPEC_VERSION}; the slot indices would differ, so the bundle is refused"
        )
    custom = (manifest.get("onnx") or {}).get("custom_op")
    if custom:
        if custom.get("domain") != CUSTOM_OP_DOMAIN or custom.get("version") != CUSTOM_OP_VERSION:
            raise BundleError(
                f"{mf}: custom op {custom.get('domain')} v{custom.get('version')} is not "
                f"{CUSTOM_OP_DOMAIN} v{CUSTOM_OP_VERSION}"
            )
        for node in custom.get("nodes", []):
            table = node.get("table_version")
            if table is not None and table != hashspec.KEY_TABLE_VERSION:
                raise BundleError(
                    f"{mf}: a {node.get('op_type', CUSTOM_OP_TYPE)} node has table_version "
                    f"{table!r}, this build reads key tables v{hashspec.KEY_TABLE_VERSION} (a "
                    "different layout); re-export the model with this version"
                )
            if node.get("spec_version") != hashspec.SPEC_VERSION:
                raise BundleError(
                    f"{mf}: a {node.get('op_type', CUSTOM_OP_TYPE)} node has spec_version "
                    f"{node.get('spec_version')!r}, this build implements v{hashspec.SPEC_VERSION}"
                )
    files = manifest.get("files")
    if not isinstance(files, dict) or ONNX_FILE not in files:
        raise BundleError(f"{mf}: the file list is missing or has no {ONNX_FILE}")
    if fmt == 2 and WEIGHTS_FILE not in files:
        raise BundleError(f"{mf}: a format 2 bundle lists {WEIGHTS_FILE}; this one does not")


def _cache_dir() -> Path:
    base = os.environ.get("LMA_CACHE_DIR")
    if base:
        return Path(base) / "verified"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lma" / "verified"


def _cache_marker(d: Path) -> Path:
    return _cache_dir() / (hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:32] + ".json")


def marker_path(path: str | Path) -> Path:
    """Where the verified-once marker of bundle ``path`` is written: ``<bundle>/.lma-verified.json``
    when the folder is writable (or already holds one), else a file named after the bundle's
    resolved path under ``$LMA_CACHE_DIR/verified`` (default ``~/.cache/lma/verified``)."""
    d = Path(path).resolve()
    local = d / MARKER_FILE
    return local if local.exists() or os.access(d, os.W_OK) else _cache_marker(d)


def _stat_key(st: os.stat_result) -> list[int]:
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


def _read_markers(d: Path, manifest_sha: str) -> tuple[list[Path], dict[str, list[Any]]]:
    """Entries of the markers (beside the bundle and in the cache dir) written for this very
    manifest: file name -> [(sha256, stat key), ...]."""
    found: list[Path] = []
    entries: dict[str, list[Any]] = {}
    for p in dict.fromkeys([Path(d).resolve() / MARKER_FILE, _cache_marker(Path(d))]):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if (not isinstance(m, dict) or m.get("version") != MARKER_VERSION
                or m.get("manifest_sha256") != manifest_sha or not isinstance(m.get("files"), dict)):
            continue
        found.append(p)
        for name, e in m["files"].items():
            if isinstance(e, dict):
                entries.setdefault(name, []).append((e.get("sha256"), e.get("stat")))
    return found, entries


def write_marker(path: str | Path, files: dict[str, str]) -> Path | None:
    """Record that the files of bundle ``path`` had the given sha256 (name -> hex digest) at
    their current size, mtime and inode. Returns the marker's path, or None when neither the
    bundle's folder nor the cache dir can be written (the next load then hashes again)."""
    d = Path(path)
    entries = {name: {"sha256": digest, "stat": _stat_key((d / name).stat())}
               for name, digest in files.items()}
    payload = json.dumps({"version": MARKER_VERSION, "manifest_sha256": sha256_file(d / MANIFEST),
                          "bundle": str(d.resolve()), "written": time.time(),
                          "files": entries}, indent=1)
    for target in dict.fromkeys([marker_path(d), _cache_marker(d)]):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(payload)
            os.replace(tmp, target)
            return target
        except OSError as exc:
            logger.debug("cannot write the verified-once marker %s (%s)", target, exc)
    logger.warning("%s: cannot write a verified-once marker; the next load hashes again", d)
    return None


def _verify_files(d: Path, files: dict[str, Any], trust_marker: bool,
                  workers: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    markers, marked = (_read_markers(d, sha256_file(d / MANIFEST)) if trust_marker
                       else ([], {}))
    trusted, todo = [], []
    for name, info in files.items():
        f = d / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in {MANIFEST} but missing")
        st = f.stat()
        if "bytes" in info and int(info["bytes"]) != st.st_size:
            raise BundleError(
                f"{f}: {st.st_size} bytes, the manifest says {info['bytes']}: the file was "
                "changed after export"
            )
        if (info.get("sha256"), _stat_key(st)) in marked.get(name, []):
            trusted.append(name)
        else:
            todo.append(name)
    n = max(1, min(len(todo), workers or min(4, os.cpu_count() or 1)))
    # hashlib releases the GIL on large blocks, so threads hash several files at once.
    with ThreadPoolExecutor(max_workers=n) as pool:
        digests = dict(zip(todo, pool.map(lambda name: sha256_file(d / name), todo), strict=True))
    for name in todo:
        want = str(files[name].get("sha256"))
        if digests[name] != want:
            raise BundleError(
                f"{d / name}: sha256 {digests[name][:16]}... does not match the manifest's "
                f"{want[:16]}...: the file was changed after export"
            )
    written = write_marker(d, {k: str(v["sha256"]) for k, v in files.items()}) if todo else None
    secs = time.perf_counter() - t0
    where = ", ".join(map(str, markers)) or "none"
    if todo:
        logger.info("%s: verified sha256 of %s in %.2f s%s", d, ", ".join(todo), secs,
                    f"; trusted {', '.join(trusted)} (unchanged since verified; marker {where})"
                    if trusted else "")
    else:
        logger.info("%s: trusted sha256 of %s: size, mtime and inode unchanged since they were "
                    "verified (marker %s; load_bundle(trust_marker=False) re-hashes)",
                    d, ", ".join(trusted), where)
    return {"verified": todo, "trusted": trusted, "seconds": secs,
            "marker": str(written) if written else (str(markers[0]) if markers else None)}


def load_bundle(path: str | Path | Bundle, verify_checksums: bool = True, *,
                trust_marker: bool = True, workers: int | None = None) -> Bundle:
    """Open a bundle folder, checking the format, the versions and every file's sha256.

    A file whose size, mtime and inode are those recorded in a verified-once marker when its
    sha256 last matched this manifest is trusted without re-hashing (``trust_marker=False``
    hashes everything); the others are hashed, on up to ``workers`` threads (default: up to 4),
    and the marker is updated. The log names the files verified and those trusted, and
    ``Bundle.verification`` records them. An already loaded :class:`Bundle` is returned as is.

    Needs neither torch nor onnx nor onnxruntime."""
    if isinstance(path, Bundle):
        return path
    d = Path(path)
    mf = d / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{d}: not a bundle ({MANIFEST} is missing)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mf}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf}: expected a JSON object")
    _check_manifest(mf, manifest)
    if verify_checksums:
        verification = _verify_files(d, manifest["files"], trust_marker, workers)
    else:
        logger.warning("%s: checksums NOT verified (verify_checksums=False)", d)
        verification = {"verified": [], "trusted": [], "seconds": 0.0, "marker": None,
                        "skipped": sorted(manifest["files"])}
    return Bundle(path=d, manifest=manifest, verification=verification)


def check_weights_mode(weights: str) -> str:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    return weights


def _eager_model(bundle: Bundle, private: bool = False) -> Any:
    import torch

    from lma.rebuild import rebuild_model

    model_cfg = bundle.manifest["model"]["config"]
    emb_cfg = bundle.manifest["embedding"]["config"]
    state = bundle.file(STATE_FILE)
    if bundle.format == 1:
        model = rebuild_model(model_cfg, emb_cfg, bundle.feature_map(), state)
        sd = bundle.program().state_dict
        missing, unexpected = model.load_state_dict(dict(sd), strict=False)
        if missing or unexpected:
            raise BundleError(
                f"{bundle.file(PROGRAM_FILE)}: weights do not fit the model config "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return model.eval()
    arrays = bundle.weights(private=private)
    weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
    fmap = bundle.feature_map()
    if not bundle.manifest.get("vocabulary"):
        fmap = _vocabulary_sizes(bundle, fmap, arrays)
    try:
        model = rebuild_model(model_cfg, emb_cfg, fmap, state, weights=weights)
    except ValueError as exc:
        raise BundleError(f"{bundle.file(WEIGHTS_FILE)}: {exc}") from exc
    return model.eval()


def _vocabulary_sizes(bundle: Bundle, fmap: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A feature map that gives each full table of the model (embedding, first-order term) its
    vocabulary's size and nothing else: full tables built to receive their weights need only
    that, since the weights hold their key table (or, in bundles written before key tables were
    stored, the sorted vocabulary it is built from). The sizes come from the tables' row counts
    (vocabulary + one OOV row per field); the tokens are zero-byte placeholders, and the map is
    flagged so that nothing builds a vocabulary from them."""
    from lma.embeddings.tables import SIZES_ONLY
    from lma.features import FeatureMap

    configs = {"embedding": bundle.manifest["embedding"]["config"]}
    fo = bundle.manifest["model"]["config"].get("first_order")
    if fo:
        configs["first_order"] = fo
    n_fields = len(fmap.schema.categorical)
    need: dict[int, int] = {}  # min_count -> vocabulary size
    for t, cfg in configs.items():
        if cfg.get("kind") != "full":
            continue
        w = arrays.get(f"{t}.table.weight")
        if w is None:
            raise BundleError(f"{bundle.file(WEIGHTS_FILE)}: no {t}.table.weight")
        m, n = int(cfg.get("min_count", 1)), int(w.shape[0]) - n_fields
        if need.setdefault(m, n) != n:
            raise BundleError(f"{bundle.file(WEIGHTS_FILE)}: full tables with min_count {m} "
                              f"have {need[m]} and {n} tokens")
    if not need:
        return fmap
    # Field k holds the tokens counted exactly at the k-th highest threshold, so a table with
    # threshold m counts every token of fields whose threshold is >= m.
    tokens = [np.zeros(0, np.int64) for _ in range(n_fields)]
    counts = [np.zeros(0, np.int64) for _ in range(n_fields)]
    done = 0
    for k, (m, n) in enumerate(sorted(need.items(), reverse=True)):
        if n < done or k >= n_fields:
            raise BundleError(f"{bundle.file(WEIGHTS_FILE)}: the full tables' vocabulary sizes "
                              f"{need} do not nest by min_count")
        tokens[k] = np.broadcast_to(np.int64(0), (n - done,))
        counts[k] = np.broadcast_to(np.int64(m), (n - done,))
        done = n
    return FeatureMap(fmap.schema, tokens, counts, fmap.n_rows, {**fmap.meta, SIZES_ONLY: True})
