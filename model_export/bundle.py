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
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import lma
from lma import hashspec
from lma.bundle import (
    BUNDLE_FORMAT,
    FEATURE_FILES,
    HASHED_KINDS,
    INPUT_NAMES,
    MANIFEST,
    MARKER_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    PROGRAM_FILE,
    SAMPLE_FILE,
    STATE_FILE,
    Bundle,
    BundleError,
    load_bundle,
    sha256_file,
    write_marker,
)
from lma.jsonio import json_default

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 256

__all__ = [
    "BUNDLE_FORMAT", "DEFAULT_SAMPLE_ROWS", "FEATURE_FILES", "HASHED_KINDS", "INPUT_NAMES",
    "MANIFEST", "ONNX_FILE", "OUTPUT_NAMES", "PROGRAM_FILE", "SAMPLE_FILE", "STATE_FILE",
    "Bundle", "BundleError", "export_bundle", "library_versions", "load_bundle", "sha256_file",
]


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


def _component_bytes(model: Any) -> dict[str, int]:
    """Bytes of the eager model's tensors by component (see ``Bundle.component_bytes``)."""
    from lma.bundle import _MLP_MODULES

    out = {"embedding": 0, "key_lookup": 0, "mlp": 0, "other": 0}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        part = "embedding" if top == "embedding" else "mlp" if top in _MLP_MODULES else "other"
        out[part] += p.numel() * p.element_size()
    for name, b in model.named_buffers():
        part = "key_lookup" if name.split(".")[0] == "embedding" else "other"
        out[part] += b.numel() * b.element_size()
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
    stale = [MANIFEST, MARKER_FILE, ONNX_FILE, PROGRAM_FILE, SAMPLE_FILE, STATE_FILE, *FEATURE_FILES]
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
        "components": _component_bytes(model),
        "metrics": ck.metrics,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default))
    # The files were hashed just now: the first load trusts them instead of hashing again.
    write_marker(out, {f: info["sha256"] for f, info in files.items()})
    logger.info("bundle written to %s (%d files)", out, len(files) + 1)
    return out
