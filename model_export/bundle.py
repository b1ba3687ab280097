"""Exported model bundles: everything a server needs, in one folder, with a checked manifest.

Layout written by :func:`export_bundle`::

    model.onnx            the whole model (ONNX, opset 20, IR 10). full / hash kinds use standard
                          ops only; lma / robez have one ``ai.lma::HashedGather`` node per lookup,
                          implemented by a model-local function (plain onnxruntime runs it)
    model.pt2             the torch program (``torch.export``); ``import lma.ops`` before loading
    feature_map.json/.npz the schema and vocabulary counts the model was trained with
    embedding_state.npz   per-token state (the LMA signature table; empty for other kinds)
    sample.npz            rows for ``verify`` (dense, tokens) and the eager logits at export
    manifest.json         names, versions, config, inputs, sizes, metrics, sha256 of every file

The LMA signature lookup (token hash -> 64-bit signature, or the token hash itself for unsigned
tokens) is done in-graph: the sorted signature table is part of both model files (an exact binary
search, ``searchsorted``, then a select), so a server feeds raw token hashes and needs nothing
else; ``embedding_state.npz`` carries the same table for tools and audits. Full tables look up
their vocabulary the same way.

:func:`load_bundle` checks the manifest's format and versions and every file's checksum, and
fails with a message naming the file at fault.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import lma
from lma import hashspec
from lma.jsonio import json_default

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"
SAMPLE_FILE = "sample.npz"
STATE_FILE = "embedding_state.npz"
FEATURE_FILES = ("feature_map.json", "feature_map.npz")
INPUT_NAMES = ("dense", "tokens")
OUTPUT_NAMES = ("logits",)
DEFAULT_SAMPLE_ROWS = 256
HASHED_KINDS = ("lma", "robez")


class BundleError(ValueError):
    """A bundle that cannot be used: missing or modified file, unknown version."""


@dataclass
class Bundle:
    """A checked bundle folder."""

    path: Path
    manifest: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def kind(self) -> str:
        return str(self.manifest["embedding"]["kind"])

    def sample(self) -> dict[str, np.ndarray]:
        """The rows saved at export: dense (N, n_dense), tokens (N, S), logits (N,)."""
        with np.load(self.file(SAMPLE_FILE), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def onnx_session(self, providers: list[str] | None = None) -> Any:
        import onnxruntime as ort

        key = f"ort:{providers}"
        if key not in self._cache:
            self._cache[key] = ort.InferenceSession(
                str(self.file(ONNX_FILE)), providers=providers or ["CPUExecutionProvider"]
            )
        return self._cache[key]

    def program(self) -> Any:
        """The ``torch.export`` program (an ``ExportedProgram``)."""
        import torch

        import lma.ops  # noqa: F401  (registers lma::hashed_gather before loading)

        if "program" not in self._cache:
            self._cache["program"] = torch.export.load(str(self.file(PROGRAM_FILE)))
        return self._cache["program"]

    def eager_model(self) -> Any:
        """The DLRM rebuilt in eager torch from the manifest's config, the feature map, the
        per-token state and the program's weights (eval mode)."""
        if "eager" not in self._cache:
            self._cache["eager"] = _eager_model(self)
        return self._cache["eager"]

    def feature_map(self) -> Any:
        from lma.features import FeatureMap

        return FeatureMap.load(self.path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "lma": lma.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------- export


def _sample_rows(
    ck: Any, data: str | None, schema: str | None, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(dense, tokens, origin): rows of ``data`` if given, else of the training data when it can
    still be opened, else rows synthesised from the feature map (seen and unseen tokens)."""
    specs: list[tuple[str, str | None]] = []
    if data:
        specs.append((data, schema))
    else:
        tc = ck.config.get("train_config", {}) or {}
        if tc.get("data"):
            specs.append((str(tc["data"]), tc.get("schema")))
    from lma.data import open_source

    n_dense = len(ck.feature_map.schema.dense)
    n_slots = ck.feature_map.schema.n_token_slots
    for spec, sch in specs:
        try:
            src = open_source(spec, sch)
            got_d, got_t, rows = [], [], 0
            for enc in src.iter_chunks():
                got_d.append(enc.dense)
                got_t.append(enc.tokens)
                rows += len(enc)
                if rows >= n:
                    break
            dense = np.concatenate(got_d)[:n].astype(np.float32)
            tokens = np.concatenate(got_t)[:n].astype(np.int64)
            if dense.shape[1] != n_dense or tokens.shape[1] != n_slots:
                raise ValueError(
                    f"{spec}: rows have {dense.shape[1]} dense / {tokens.shape[1]} "
                    f"token columns, the model expects {n_dense} / {n_slots}"
                )
            if len(tokens):
                return np.ascontiguousarray(dense), np.ascontiguousarray(tokens), spec
        except Exception as exc:  # noqa: BLE001 - a sample can always be synthesised
            if data:
                raise
            logger.warning("sample rows: cannot read %s (%s); synthesising rows", spec, exc)
    rng = np.random.default_rng(seed)
    fmap = ck.feature_map
    slot_fields = fmap.schema.slot_fields()
    tokens = rng.integers(-(1 << 63), (1 << 63) - 1, size=(n, n_slots), dtype=np.int64)
    for s, f in enumerate(slot_fields):
        vocab = fmap.tokens[f]
        if len(vocab):
            seen = rng.random(n) < 0.9
            tokens[seen, s] = vocab[rng.integers(0, len(vocab), size=int(seen.sum()))]
    tokens[tokens == 0] = 1
    dense = np.abs(rng.standard_normal((n, n_dense))).astype(np.float32)
    return dense, tokens, "synthesised from the feature map"


def _param_breakdown(model: Any) -> dict[str, Any]:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        groups[top] = groups.get(top, 0) + p.numel()
    emb = model.embedding
    out: dict[str, Any] = {k: {"count": v, "bytes": 4 * v} for k, v in sorted(groups.items())}
    out["embedding_state"] = {"bytes": int(emb.state_bytes())}
    total = sum(groups.values())
    out["total"] = {"count": total, "bytes": 4 * total + int(emb.state_bytes())}
    return out


def _onnx_summary(path: Path) -> dict[str, Any]:
    import onnx

    from model_export import onnx_op

    m = onnx.load(str(path), load_external_data=False)
    custom = [n for n in m.graph.node if n.domain == onnx_op.DOMAIN]
    lookups = []
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        lookups.append({"op_type": n.op_type,
                        **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}})
    return {
        "file": ONNX_FILE,
        "ir_version": int(m.ir_version),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in m.opset_import},
        "custom_op": (
            {
                "domain": onnx_op.DOMAIN,
                "op_type": onnx_op.OP_TYPE,
                "version": onnx_op.OP_VERSION,
                "implementation": "model-local ONNX function (standard ops)",
                "nodes": lookups,
            }
            if custom
            else None
        ),
        "functions": [f"{f.domain}::{f.name}" for f in m.functions],
    }


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    data: str | None = None,
    schema: str | None = None,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> Path:
    """Write the bundle of a training checkpoint (see the module docstring); returns ``out_dir``."""
    import torch

    from lma.checkpoint import load_checkpoint
    from model_export import onnx_op

    ck_dir = Path(checkpoint_dir)
    out = Path(out_dir)
    ck = load_checkpoint(ck_dir)
    model = ck.model.eval()
    kind = str(ck.config["embedding_config"]["kind"])
    out.mkdir(parents=True, exist_ok=True)
    stale = [MANIFEST, ONNX_FILE, PROGRAM_FILE, SAMPLE_FILE, STATE_FILE, *FEATURE_FILES]
    for f in stale:
        (out / f).unlink(missing_ok=True)

    dense, tokens, origin = _sample_rows(ck, data, schema, sample_rows, seed)
    td, tt = torch.from_numpy(dense), torch.from_numpy(tokens)
    with torch.no_grad():
        logits = model(td, tt).float().numpy()

    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    dyn = ({0: batch}, {0: batch})
    args = (td[:8] if len(td) >= 8 else td, tt[:8] if len(tt) >= 8 else tt)
    with torch.no_grad():
        program = torch.export.export(model, args, dynamic_shapes=dyn)
    torch.export.save(program, str(out / PROGRAM_FILE))
    onnx_op.export_onnx(program, args, out / ONNX_FILE, INPUT_NAMES, OUTPUT_NAMES)

    for f in FEATURE_FILES:
        shutil.copyfile(ck_dir / f, out / f)
    state = ck_dir / STATE_FILE
    if state.exists():
        shutil.copyfile(state, out / STATE_FILE)
    else:
        np.savez(out / STATE_FILE)
    np.savez(out / SAMPLE_FILE, dense=dense, tokens=tokens, logits=logits)

    schema_obj = ck.feature_map.schema
    emb_cfg = ck.config["embedding_config"]
    files = {}
    for f in sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST):
        files[f] = {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "model": {
            "name": name or ck_dir.resolve().name,
            "version": str(version),
            "architecture": "DLRM",
            "config": ck.config["model_config"],
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source_checkpoint": str(ck_dir.resolve()),
        "embedding": {
            "kind": kind,
            "config": emb_cfg,
            "signature_lookup": "in-graph" if kind == "lma" else None,
        },
        "hash_spec_version": hashspec.SPEC_VERSION if kind in HASHED_KINDS else None,
        "inputs": [
            {"name": "dense", "dtype": "float32", "shape": ["batch", len(schema_obj.dense)]},
            {
                "name": "tokens",
                "dtype": "int64",
                "shape": ["batch", schema_obj.n_token_slots],
                "meaning": "token hash v1 per slot (lma.tokens); 0 pads multi-valued fields",
            },
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch"],
                "meaning": "click log-odds; probability = sigmoid(logits)",
            }
        ],
        "onnx": _onnx_summary(out / ONNX_FILE),
        "torch_program": {
            "file": PROGRAM_FILE,
            "requires": "import lma.ops (registers lma::hashed_gather)",
        },
        "sample": {"file": SAMPLE_FILE, "rows": len(tokens), "origin": origin},
        "library_versions": library_versions(),
        "training_versions": ck.config.get("versions", {}),
        "parameters": _param_breakdown(model),
        "metrics": ck.metrics,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default))
    logger.info("bundle written to %s (%d files)", out, len(files) + 1)
    return out




# ---------------------------------------------------------------- load


def load_bundle(path: str | Path, verify_checksums: bool = True) -> Bundle:
    """Open a bundle folder, checking the format, the versions and every file's sha256.

    Needs neither torch nor onnx: a serving-only install (the ``serve`` extra) opens bundles and
    runs them with onnxruntime."""
    from model_export import onnx_spec

    d = Path(path)
    mf = d / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{d}: not a bundle ({MANIFEST} is missing)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mf}: not valid JSON ({exc})") from exc
    fmt = manifest.get("bundle_format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(
            f"{mf}: bundle_format {fmt!r} is not supported (this build reads {BUNDLE_FORMAT})"
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
        if custom.get("domain") != onnx_spec.DOMAIN or custom.get("version") != onnx_spec.OP_VERSION:
            raise BundleError(
                f"{mf}: custom op {custom.get('domain')} v{custom.get('version')} is not "
                f"{onnx_spec.DOMAIN} v{onnx_spec.OP_VERSION}"
            )
        for node in custom.get("nodes", []):
            if node.get("spec_version") != hashspec.SPEC_VERSION:
                raise BundleError(
                    f"{mf}: a {onnx_spec.OP_TYPE} node has spec_version {node.get('spec_version')!r}, "
                    f"this build implements v{hashspec.SPEC_VERSION}"
                )
    files = manifest.get("files")
    if not isinstance(files, dict) or ONNX_FILE not in files:
        raise BundleError(f"{mf}: the file list is missing or has no {ONNX_FILE}")
    if verify_checksums:
        for name, info in files.items():
            f = d / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in {MANIFEST} but missing")
            got = sha256_file(f)
            if got != info.get("sha256"):
                raise BundleError(
                    f"{f}: sha256 {got[:16]}... does not match the manifest's "
                    f"{str(info.get('sha256'))[:16]}...: the file was changed after export"
                )
    return Bundle(path=d, manifest=manifest)


def _eager_model(bundle: Bundle) -> Any:
    from lma.checkpoint import rebuild_model
    from lma.features import FeatureMap

    model = rebuild_model(bundle.manifest["model"]["config"],
                          bundle.manifest["embedding"]["config"],
                          FeatureMap.load(bundle.path), bundle.file(STATE_FILE))
    sd = bundle.program().state_dict
    missing, unexpected = model.load_state_dict(dict(sd), strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{bundle.file(PROGRAM_FILE)}: weights do not fit the model config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()
