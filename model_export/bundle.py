"""Exported model bundles: everything a server needs, in one folder, with a checked manifest.

Layout written by :func:`export_bundle` (bundle format 2; each byte once)::

    model.onnx            the graph (ONNX, opset 20, IR 10); its initializers are external data
                          in weights.safetensors. full / hash kinds use standard ops and the
                          ai.lma::KeyLookup function; lma / robez one ``ai.lma::HashedGather``
                          node per lookup, a model-local function (plain onnxruntime runs it)
    weights.safetensors   the state dict (safetensors layout), read memory-mapped by the torch
                          engines; model.onnx points into it, and its initializers without a
                          state-dict twin (key tables, folded constants) are stored here too
    feature_map.json      the schema (and per-field sizes) the model was trained with; no counts
    vocabulary.npz        only for kinds that need each field's vocabulary to rebuild (QR)
    embedding_state.npz   only for kinds with per-token state at serving (the LMA signature table
                          of a hash-form bundle; hot-form bundles have none)
    model.pt2             only with ``torch_program=True`` (``lma export --torch-program``): the
                          ``torch.export`` program; ``import lma.ops`` before loading
    sample.npz            rows for ``verify`` / warm-up (dense, tokens) and the eager logits;
                          with ``dtype="float16"`` also ``reference_logits``, those of the
                          float32 model the bundle was made from
    manifest.json         names, versions, config, inputs, sizes, metrics, sha256 of every file

``dtype="float16"`` (``lma export --dtype float16``) stores the embedding tables (full and
hashing-trick rows, the ROBE-Z / LMA memory, and the first-order term's scalars) as float16 in
weights.safetensors, half their bytes; the model still computes in float32: every lookup casts
its rows right after the gather (a ``Cast`` after the ``Gather`` / ``HashedGather`` node in ONNX,
``.float()`` after the index in torch; ``lma.embeddings.base.as_compute_dtype``). The manifest
records it under ``dtype``; ``lma verify`` compares such a bundle with its float32 model within
``model_export.verify.FLOAT16_TOLERANCE``.

An LMA model is exported in its hot serving form (``lma_serving="hot"``, ``lma export
--lma-serving hot``; :meth:`lma.embeddings.lma.LMAEmbedding.to_serving`), by default
(``auto``) when its hot rows take at most ``HOT_AUTO_MAX_SHARE`` of the memory's bytes: the
signed tokens' rows are computed once, here, through the model's own gather, and stored as
``embedding.hot``
with a token -> row key table (``embedding.hot_lookup``); serving copies those rows and hashes
only the other tokens (one ``lma::hot_embed``; ONNX ``ai.lma::KeyLookup`` then
``ai.lma::HotGather``). The export checks
that the hot form's logits on the sample equal the hash form's bit for bit. The signatures are
then folded into the rows, so such a bundle has no ``embedding_state.npz``; its embedding config
records ``serve: hot`` (and the manifest ``embedding.serving``), which rebuilds the eager model
in that form. ``lma_serving="hash"`` (and format 1) keeps the training form.

The hashes are computed once, here, and a verified-once marker is written beside the bundle
(``lma.bundle``), so the first load does not hash again. ``bundle_format=1`` writes the old
layout (model.onnx and model.pt2 each with all weights, feature_map.npz with the training
counts, embedding_state.npz always); the reader takes both.

The LMA signature lookup (token hash -> 64-bit signature, or the token hash itself for unsigned
tokens) and the full tables' token -> row lookup are done in-graph, so a server feeds raw token
hashes and needs nothing else. The reader (:func:`load_bundle`, :class:`Bundle`) lives in
:mod:`lma.bundle` and is re-exported here.
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
    FEATURE_JSON,
    HASHED_KINDS,
    INPUT_NAMES,
    MANIFEST,
    MARKER_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    PER_FIELD_VOCAB_KINDS,
    PROGRAM_FILE,
    SAMPLE_FILE,
    STATE_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleError,
    load_bundle,
    sha256_file,
    write_marker,
)
from lma.jsonio import json_default

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 256
# Storage types of the embedding tables (the model computes in float32 either way), and the
# kinds whose lookups cast their rows to float32 (QR multiplies its component rows first, so
# float16 storage would change its arithmetic: not offered).
TABLE_DTYPES = ("float32", "float16")
FLOAT16_KINDS = ("full", "hash", "robez", "lma")
LMA_SERVING_FORMS = ("auto", "hot", "hash")
# "auto" serves the hot form when its rows take at most this share of the memory's bytes: then
# they cost little and save the scattered reads of a memory too big for the caches (at the
# Criteo-Kaggle vocabulary 107k rows, 6.8 MB, against 135 MB: 0.69x the torch program's time at
# 1000 rows). On small vocabularies nearly every token is signed, the rows outgrow the memory
# several times over, and a memory that small is cache-resident anyway, so the hash form is as
# fast and keeps the compression (docs/RESULTS.md, "The LMA hot serving form").
HOT_AUTO_MAX_SHARE = 0.25

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
    nbytes: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        nbytes[top] = nbytes.get(top, 0) + p.numel() * p.element_size()
    out: dict[str, Any] = {k: {"count": v, "bytes": nbytes[k]} for k, v in sorted(groups.items())}
    out["embedding_state"] = {"bytes": int(emb.state_bytes())}
    total = sum(groups.values())
    out["total"] = {"count": total, "bytes": sum(nbytes.values()) + int(emb.state_bytes())}
    return out


def _store_tables_as(model: Any, dtype: str, kinds: dict[str, str]) -> list[str]:
    """Cast the embedding tables of ``model`` (every :class:`lma.embeddings.Embedding` module:
    the embedding and the first-order term) to ``dtype`` in place; returns the parameters cast.
    ``kinds``: module -> embedding kind, for the refusal of kinds without float16 support."""
    import torch

    from lma.embeddings.base import Embedding

    bad = {m: k for m, k in kinds.items() if k not in FLOAT16_KINDS}
    if bad:
        raise ValueError(f"--dtype {dtype}: supported for embedding kinds {FLOAT16_KINDS}; this "
                         f"model has {', '.join(f'{m}: {k}' for m, k in bad.items())}")
    target = getattr(torch, dtype)
    cast = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, Embedding):
            continue
        for p_name, p in mod.named_parameters():
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)
                cast.append(f"{mod_name}.{p_name}")
    return cast


def choose_lma_serving(embedding: Any) -> tuple[str, str]:
    """The serving form ``--lma-serving auto`` picks for an LMA embedding (hash form), and why:
    "hot" when its hot rows (one d-row per signed token, in the memory's dtype) would take at
    most ``HOT_AUTO_MAX_SHARE`` of the memory's bytes, else "hash"."""
    mem = embedding.memory
    hot_bytes = int(embedding.n_signed) * int(embedding.dim) * mem.element_size()
    mem_bytes = mem.numel() * mem.element_size()
    share = hot_bytes / max(mem_bytes, 1)
    why = (f"{embedding.n_signed} signed tokens' rows would take {hot_bytes / 1e6:.2f} MB, "
           f"{share:.0%} of the memory's {mem_bytes / 1e6:.2f} MB; hot at most "
           f"{HOT_AUTO_MAX_SHARE:.0%}")
    return ("hot" if share <= HOT_AUTO_MAX_SHARE else "hash"), why


def _to_hot_form(model: Any, dense: Any, tokens: Any, want: np.ndarray) -> None:
    """Convert the LMA embedding of ``model`` to its hot serving form, in place, and check that
    the model's logits on the sample rows stay bit for bit ``want`` (the hash form's)."""
    import torch

    model.embedding.to_serving("hot")
    with torch.no_grad():
        got = model(dense, tokens).float().numpy()
    if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
        bad = int(np.sum(got != want))
        diff = float(np.abs(got - want).max())
        raise RuntimeError(f"the LMA hot serving form changed {bad} of {len(want)} sample logits "
                           f"(max diff {diff:.3g}); export with lma_serving='hash'")


def _component_bytes(model: Any) -> dict[str, int]:
    """Bytes of the eager model's tensors by component (see ``Bundle.component_bytes``)."""
    from lma.bundle import _MLP_MODULES

    out = {"embedding": 0, "key_lookup": 0, "mlp": 0, "other": 0}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        part = "embedding" if top == "embedding" else "mlp" if top in _MLP_MODULES else "other"
        out[part] += p.numel() * p.element_size()
    for name, b in model.named_buffers():
        # The LMA hot form's precomputed rows are embedding values; its other buffers (the
        # token -> row table) are its key lookup.
        part = ("embedding" if name == "embedding.hot"
                else "key_lookup" if name.split(".")[0] == "embedding" else "other")
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
                # The ai.lma node types the graph uses (HashedGather, HotGather, KeyLookup).
                "op_types": sorted({n.op_type for n in custom}),
                "version": onnx_op.OP_VERSION,
                "implementation": "model-local ONNX function (standard ops)",
                "nodes": lookups,
            }
            if custom
            else None
        ),
        "functions": [f"{f.domain}::{f.name}" for f in m.functions],
    }


def _phase(what: str) -> None:
    """Log the process's peak resident memory so far (export memory is a stated target)."""
    import resource

    logger.info("export: %s (peak RSS so far %.0f MB)", what,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _same_bytes(path: Path, offset: int, twin: np.ndarray, chunk: int = 16 << 20) -> bool:
    """Whether ``path`` holds ``twin``'s bytes at ``offset``; read in chunks, so comparing a
    multi-GB table costs no more memory than one chunk."""
    flat = twin.reshape(-1).view(np.uint8)
    buf = bytearray(chunk)
    with open(path, "rb") as f:
        f.seek(offset)
        for s in range(0, len(flat), chunk):
            n = f.readinto(memoryview(buf)[: min(chunk, len(flat) - s)])
            if n != min(chunk, len(flat) - s) or buf[:n] != flat[s : s + n].tobytes():
                return False
    return True


def _share_weights(out: Path, model: Any) -> dict[str, Any]:
    """Write the model's state dict to ``weights.safetensors`` and point ``model.onnx``'s
    initializers into it where they hold the same bytes, so each weight is stored once; ONNX
    initializers with no state-dict twin (folded constants, lookup tables) are appended to the
    same file (``onnx::<name>``) or, when small, stay inside ``model.onnx``."""
    import onnx
    from onnx import numpy_helper

    from lma import tensorfile

    onnx_path = out / ONNX_FILE
    m = onnx.load(str(onnx_path), load_external_data=False)
    sd = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = dict(sd)
    target: dict[str, str] = {}  # initializer -> tensor name in the weights file
    data_files: set[str] = set()
    for init in m.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        shape = tuple(int(d) for d in init.dims)
        twin = sd.get(init.name)
        if twin is not None and (twin.dtype != dtype or twin.shape != shape):
            twin = None
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            data_files.add(ext["location"])
            where = (out / ext["location"], int(ext.get("offset", 0)))
            if twin is not None and _same_bytes(*where, twin):
                target[init.name] = init.name
            else:
                target[init.name] = f"onnx::{init.name}"
                tensors[target[init.name]] = np.fromfile(where[0], dtype=dtype,
                                                         count=int(np.prod(shape, dtype=np.int64)),
                                                         offset=where[1]).reshape(shape)
            continue
        arr = numpy_helper.to_array(init)
        if twin is not None and np.array_equal(twin.view(np.uint8),
                                               np.ascontiguousarray(arr).view(np.uint8)):
            target[init.name] = init.name
        elif arr.nbytes >= 1 << 16:
            target[init.name] = f"onnx::{init.name}"
            tensors[target[init.name]] = arr
    refs = tensorfile.write(out / WEIGHTS_FILE, tensors, {"format": "pt", "written_by": "lma"})
    for init in m.graph.initializer:
        if init.name not in target:
            continue
        offset, length = refs[target[init.name]]
        init.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data", "uint64_data"):
            init.ClearField(f)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            e = init.external_data.add()
            e.key, e.value = k, v
    onnx.save_model(m, str(onnx_path))
    for f in data_files:
        (out / f).unlink(missing_ok=True)
    onnx.checker.check_model(str(onnx_path))
    shared = sorted(k for k, v in target.items() if v == k)
    return {
        "file": WEIGHTS_FILE,
        "format": "safetensors",
        "state_dict": sorted(sd),
        "onnx_shares": shared,
        "onnx_only": sorted(v for v in target.values() if v != "" and v.startswith("onnx::")),
    }


def _vocabulary_needs(model_config: dict[str, Any], emb_cfg: dict[str, Any]) -> list[int]:
    """min_count of every table that needs the per-field vocabulary to be rebuilt (QR)."""
    return [int(emb_cfg.get("min_count", 1))] if emb_cfg["kind"] in PER_FIELD_VOCAB_KINDS else []


def _write_vocabulary(out: Path, fmap: Any, min_counts: list[int]) -> dict[str, Any]:
    lo, hi = min(min_counts), max(min_counts)
    arrays = {}
    for i, (t, c) in enumerate(zip(fmap.tokens, fmap.counts, strict=True)):
        keep = c >= lo
        arrays[f"tokens_{i}"] = t[keep]
        if hi > 1:  # counts above the highest threshold make no difference
            arrays[f"counts_{i}"] = np.minimum(c[keep], hi).astype(np.uint16)
    np.savez(out / VOCAB_FILE, **arrays)
    return {"file": VOCAB_FILE, "min_count": lo, "counts_clipped_at": hi if hi > 1 else None}


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
    torch_program: bool = False,
    bundle_format: int = BUNDLE_FORMAT,
    dtype: str = "float32",
    lma_serving: str | None = None,
) -> Path:
    """Write the bundle of a training checkpoint (see the module docstring); returns ``out_dir``.

    ``torch_program`` also writes ``model.pt2`` (the ``program`` engine). ``bundle_format=1``
    writes the old layout (for tools that still need it; the reader takes both). ``dtype``: the
    storage type of the embedding tables, ``float32`` or ``float16`` (format 2 only; compute
    stays float32, see the module docstring). ``lma_serving``: the serving form of an LMA
    model: "hot", "hash", or "auto" (the default for format 2: hot when the hot rows would take
    at most ``HOT_AUTO_MAX_SHARE`` of the memory's bytes, see :func:`choose_lma_serving`); format
    1 writes the hash form only. Ignored for other kinds."""
    import torch

    from lma.checkpoint import load_checkpoint
    from model_export import onnx_op

    if bundle_format not in (1, 2):
        raise ValueError(f"bundle_format must be 1 or 2, got {bundle_format!r}")
    if dtype not in TABLE_DTYPES:
        raise ValueError(f"dtype must be one of {TABLE_DTYPES}, got {dtype!r}")
    if dtype != "float32" and bundle_format != 2:
        raise ValueError(f"dtype {dtype} needs bundle format 2")
    if lma_serving is None or (lma_serving == "auto" and bundle_format == 1):
        lma_serving = "auto" if bundle_format == 2 else "hash"
    if lma_serving not in LMA_SERVING_FORMS:
        raise ValueError(f"lma_serving must be one of {LMA_SERVING_FORMS}, got {lma_serving!r}")
    if lma_serving == "hot" and bundle_format != 2:
        raise ValueError("the LMA hot serving form needs bundle format 2 (use lma_serving='hash' "
                         "with bundle format 1)")
    ck_dir = Path(checkpoint_dir)
    out = Path(out_dir)
    ck = load_checkpoint(ck_dir)
    _phase("checkpoint loaded")
    model = ck.model.eval()
    kind = str(ck.config["embedding_config"]["kind"])
    out.mkdir(parents=True, exist_ok=True)
    stale = [MANIFEST, MARKER_FILE, ONNX_FILE, ONNX_FILE + ".data", PROGRAM_FILE, SAMPLE_FILE,
             STATE_FILE, WEIGHTS_FILE, VOCAB_FILE, *FEATURE_FILES]
    for f in stale:
        (out / f).unlink(missing_ok=True)

    dense, tokens, origin = _sample_rows(ck, data, schema, sample_rows, seed)
    td, tt = torch.from_numpy(dense), torch.from_numpy(tokens)
    with torch.no_grad():
        logits = model(td, tt).float().numpy()
    sample_extra: dict[str, np.ndarray] = {}
    tables: dict[str, Any] = {"dtype": "float32", "compute": "float32", "cast": []}
    if dtype != "float32":
        kinds = {"embedding": kind}
        fo = ck.config["model_config"].get("first_order")
        if fo:
            kinds["first_order"] = str(fo.get("kind"))
        tables = {"dtype": dtype, "compute": "float32",
                  "cast": _store_tables_as(model, dtype, kinds)}
        sample_extra["reference_logits"] = logits
        with torch.no_grad():
            logits = model(td, tt).float().numpy()
        _phase(f"tables cast to {dtype} ({', '.join(tables['cast'])})")
    serving = None
    emb_cfg = dict(ck.config["embedding_config"])
    if kind == "lma":
        serving = lma_serving
        if serving == "auto":
            serving, why = choose_lma_serving(model.embedding)
            logger.info("export: LMA serving form %s (--lma-serving auto: %s)", serving, why)
        if serving == "hot":
            _to_hot_form(model, td, tt, logits)
            emb_cfg["options"] = {**emb_cfg.get("options", {}), "serve": "hot"}
            _phase(f"LMA hot serving form: {int(model.embedding.hot.shape[0])} hot rows")

    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    dyn = ({0: batch}, {0: batch})
    args = (td[:8] if len(td) >= 8 else td, tt[:8] if len(tt) >= 8 else tt)
    with torch.no_grad():
        program = torch.export.export(model, args, dynamic_shapes=dyn)
    _phase("torch.export done")
    if torch_program or bundle_format == 1:
        torch.export.save(program, str(out / PROGRAM_FILE))
    extra: dict[str, Any] = {}
    if bundle_format == 1:
        onnx_op.export_onnx(program, args, out / ONNX_FILE, INPUT_NAMES, OUTPUT_NAMES)
        for f in FEATURE_FILES:
            shutil.copyfile(ck_dir / f, out / f)
        state = ck_dir / STATE_FILE
        if state.exists():
            shutil.copyfile(state, out / STATE_FILE)
        else:
            np.savez(out / STATE_FILE)
    else:
        onnx_op.export_onnx(program, args, out / ONNX_FILE, INPUT_NAMES, OUTPUT_NAMES,
                            external_data=True)
        del program
        _phase("ONNX written")
        extra["weights"] = _share_weights(out, model)
        _phase("weights shared")
        shutil.copyfile(ck_dir / FEATURE_JSON, out / FEATURE_JSON)
        needs = _vocabulary_needs(ck.config["model_config"], ck.config["embedding_config"])
        extra["vocabulary"] = _write_vocabulary(out, ck.feature_map, needs) if needs else None
        state_arrays = model.embedding.extra_state_arrays()
        if state_arrays:
            np.savez(out / STATE_FILE, **state_arrays)
    np.savez(out / SAMPLE_FILE, dense=dense, tokens=tokens, logits=logits, **sample_extra)

    schema_obj = ck.feature_map.schema
    files = {}
    for f in sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST):
        files[f] = {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
    manifest = {
        "bundle_format": bundle_format,
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
            "signature_lookup": ("in-graph" if serving == "hash"
                                 else "folded into the hot rows" if serving == "hot" else None),
            # LMA: "hot" (signed tokens' rows precomputed, the others hashed) or "hash", and
            # what was asked for ("auto": chosen by choose_lma_serving).
            "serving": serving,
            "serving_requested": lma_serving if kind == "lma" else None,
        },
        "hash_spec_version": hashspec.SPEC_VERSION if kind in HASHED_KINDS else None,
        # Storage type of the embedding tables (``cast``: the parameters stored in ``dtype``);
        # the model computes in ``compute`` (rows are cast after each lookup).
        "dtype": tables,
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
        } if (out / PROGRAM_FILE).exists() else None,
        **extra,
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
