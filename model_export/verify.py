"""Check that a bundle's engines agree: torch eager, the torch program (when the bundle has
one), onnxruntime.

On the bundle's own sample rows (or any ``--data`` rows) it compares the logits of every engine
with torch eager (tolerance 1e-5, relative above 1), and for lma / robez models the slot indices
of every lookup as computed by the numpy hash spec, the pure-torch reference, the op's native
backend, and the ONNX function stored in ``model.onnx`` itself (run on a memory that holds each
slot's own index, split in two float32-exact halves). For an LMA bundle in the hot serving form
the keys are the tokens (what ``HotGather`` hashes for cold tokens) and the ONNX function is the
``HotGather`` node's with no hot rows; its hot rows are checked through the logits.

A bundle with float16 tables (``lma export --dtype float16``) is checked twice: its engines
against each other as above (they read the same float16 rows, so 1e-5 holds), and its eager
logits on the sample against those of the float32 model it was exported from (saved at export
as ``reference_logits``) within ``FLOAT16_TOLERANCE``.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from lma import hashspec, ort_ops
from model_export.bundle import ONNX_FILE, Bundle

TOLERANCE = 1e-5
# float16 tables against their float32 model: rounding a table value to float16 moves it by at
# most 2^-11 of itself (4.9e-4); through the MLPs that measured at most 2.3e-4 in the logit on
# real Criteo rows (tests/test_fp16_export.py), so 5e-3 (relative above 1) leaves a 20x margin
# and still fails a wrong cast or a table read in the wrong type.
FLOAT16_TOLERANCE = 5e-3
_SPLIT = 1 << 12


@dataclass
class VerifyReport:
    rows: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    index_checks: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True

    def table(self) -> str:
        out = [
            f"rows: {self.rows}",
            "",
            "| engine | max abs diff logit vs eager | max abs diff prob | ms | ok |",
            "|---|---|---|---|---|",
        ]
        for ln in self.lines:
            out.append(
                f"| {ln['engine']} | {ln['max_logit_diff']:.3g} | {ln['max_prob_diff']:.3g} | "
                f"{ln['ms']:.1f} | {'yes' if ln['ok'] else 'NO'} |"
            )
        if self.index_checks:
            out += [
                "",
                "| lookup | mode | Z | slots compared | implementations | identical |",
                "|---|---|---|---|---|---|",
            ]
            for c in self.index_checks:
                out.append(
                    f"| {c['lookup']} | {c['mode']} | {c['z']} | {c['count']} | "
                    f"{', '.join(c['implementations'])} | {'yes' if c['ok'] else 'NO: ' + c['detail']} |"
                )
        out += ["", "result: " + ("OK" if self.ok else "MISMATCH")]
        return "\n".join(out)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _compare(engine: str, got: np.ndarray, ref: np.ndarray, ms: float,
             tolerance: float = TOLERANCE) -> dict[str, Any]:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    if got.shape != ref.shape:
        return {
            "engine": engine,
            "max_logit_diff": float("inf"),
            "max_prob_diff": float("inf"),
            "ms": ms,
            "ok": False,
        }
    d = np.abs(got - ref)
    ok = bool(np.all(np.isfinite(got)) and np.all(d <= tolerance * np.maximum(1.0, np.abs(ref))))
    return {
        "engine": engine,
        "max_logit_diff": float(d.max(initial=0.0)),
        "max_prob_diff": float(np.abs(_sigmoid(got) - _sigmoid(ref)).max(initial=0.0)),
        "ms": ms,
        "ok": ok,
    }


def _timed(fn: Any) -> tuple[Any, float]:
    """(result, ms of the second call): the first call warms caches and lazy loads up."""
    fn()
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


# Lookup nodes and the positions of their (memory, keys, A, B, W) inputs: HashedGather, and the
# hot serving form's HotGather(memory, hot, index, keys, A, B, W), whose cold path is checked.
LOOKUP_INPUTS = {"HashedGather": (0, 1, 2, 3, 4), "HotGather": (0, 3, 4, 5, 6)}


def _lookup_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    from model_export import onnx_op

    return [n for n in model.graph.node
            if n.domain == onnx_op.DOMAIN and n.op_type in LOOKUP_INPUTS]


def _lookup_inputs(node: onnx.NodeProto) -> list[str]:
    """Names of a lookup node's memory, keys, A, B and W inputs."""
    return [node.input[i] for i in LOOKUP_INPUTS[node.op_type]]


def _onnx_lookup_inputs(
    bundle: Bundle, dense: np.ndarray, tokens: np.ndarray
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Run model.onnx exposing the inputs of every HashedGather node (keys, A, B, W; the
    memory's size). The graph is changed without loading its external data, which onnxruntime
    reads from the bundle's folder, and the memory is never copied out."""
    import onnxruntime as ort

    path = bundle.file(ONNX_FILE)
    model = onnx.load(str(path), load_external_data=False)
    sizes = {i.name: int(np.prod(i.dims, dtype=np.int64)) for i in model.graph.initializer}
    nodes = _lookup_nodes(model)
    names: list[str] = []
    for n in nodes:
        ins = _lookup_inputs(n)
        for name in ins[int(ins[0] in sizes):]:
            if name not in names:
                names.append(name)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    # Loaded from bytes, the graph reads its external data from the bundle's folder.
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(path.parent.resolve()))
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    values = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"dense": dense, "tokens": tokens}),
            strict=True,
        )
    )
    del sess
    found = []
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        memory, keys, a, b, w = _lookup_inputs(n)
        found.append(
            {
                "node": n,
                "attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()},
                "memory_size": sizes[memory] if memory in sizes else int(values[memory].shape[0]),
                "keys": values[keys],
                "A": values[a],
                "B": values[b],
                "W": values[w],
            }
        )
    return onnx.load(str(path), load_external_data=False), found


def _onnx_function_indices(file_model: onnx.ModelProto, lookup: dict[str, Any]) -> np.ndarray:
    """Slot indices (N, dim) computed by the file's own HashedGather function (for a HotGather
    node: its own function with no hot rows and every token cold, i.e. its cold path)."""
    import onnxruntime as ort

    node = lookup["node"]
    m = int(lookup["memory_size"])
    dim = int(lookup["attrs"]["dim"])
    inputs = [
        helper.make_tensor_value_info("memory", TensorProto.FLOAT, [m]),
        helper.make_tensor_value_info("keys", TensorProto.INT64, None),
        helper.make_tensor_value_info("A", TensorProto.INT64, None),
        helper.make_tensor_value_info("B", TensorProto.INT64, None),
        helper.make_tensor_value_info("W", TensorProto.INT64, None),
    ]
    names = ["memory", "keys", "A", "B", "W"]
    extra: dict[str, np.ndarray] = {}
    if node.op_type == "HotGather":
        inputs += [helper.make_tensor_value_info("hot", TensorProto.FLOAT, [0, dim]),
                   helper.make_tensor_value_info("index", TensorProto.INT64, None)]
        names = ["memory", "hot", "index", "keys", "A", "B", "W"]
        extra = {"hot": np.zeros((0, dim), np.float32),
                 "index": np.full(lookup["keys"].shape, -1, np.int64)}
    probe = helper.make_node(node.op_type, names, ["y"], domain=node.domain)
    probe.attribute.extend(node.attribute)
    graph = helper.make_graph([probe], "probe", inputs, [helper.make_empty_tensor_value_info("y")])
    model = helper.make_model(
        graph, opset_imports=list(file_model.opset_import), functions=list(file_model.functions)
    )
    model.ir_version = file_model.ir_version
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"keys": lookup["keys"], "A": lookup["A"], "B": lookup["B"], "W": lookup["W"],
            **extra}
    # Each slot's index in two float32-exact halves, one memory-sized float32 array at a time
    # (no int64 index array: at the Kaggle vocabulary that alone would be 4x the memory).
    blocks = -(-m // _SPLIT)
    (hi,) = sess.run(None, {**feed, "memory": np.repeat(
        np.arange(blocks, dtype=np.float32), _SPLIT)[:m]})
    (lo,) = sess.run(None, {**feed, "memory": np.tile(
        np.arange(_SPLIT, dtype=np.float32), blocks)[:m]})
    idx = hi.astype(np.int64) * _SPLIT + lo.astype(np.int64)
    return idx.reshape(-1, dim)


def verify_bundle(
    bundle: Bundle, dense: np.ndarray | None = None, tokens: np.ndarray | None = None
) -> VerifyReport:
    """Compare the engines on ``dense``/``tokens`` (default: the bundle's sample rows)."""
    from lma.ops import slot_indices, slot_indices_torch

    sample = bundle.sample()
    export_logits = reference_logits = None
    if dense is None or tokens is None:
        dense, tokens, export_logits = sample["dense"], sample["tokens"], sample["logits"]
        reference_logits = sample.get("reference_logits")
    dense = np.ascontiguousarray(dense, dtype=np.float32)
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    n_dense = sample["dense"].shape[1]
    n_slots = sample["tokens"].shape[1]
    if dense.shape[1] != n_dense or tokens.shape[1] != n_slots:
        raise ValueError(
            f"rows have {dense.shape[1]} dense / {tokens.shape[1]} token columns; "
            f"the model expects {n_dense} / {n_slots}"
        )
    report = VerifyReport(rows=len(tokens))
    td, tt = torch.from_numpy(dense), torch.from_numpy(tokens)
    eager = bundle.eager_model()
    with torch.no_grad():
        ref, ms = _timed(lambda: eager(td, tt).numpy())
    report.lines.append(_compare("torch eager", ref, ref, ms))
    if export_logits is not None:
        report.lines.append(_compare("eager at export (sample.npz)", export_logits, ref, 0.0))
    if reference_logits is not None:
        dtype = (bundle.manifest.get("dtype") or {}).get("dtype", "?")
        report.lines.append(_compare(f"float32 model at export ({dtype} tables, tolerance "
                                     f"{FLOAT16_TOLERANCE:g})", ref, reference_logits, 0.0,
                                     FLOAT16_TOLERANCE))
    if bundle.program_path is not None:
        prog = bundle.program().module()
        with torch.no_grad():
            got, ms = _timed(lambda: prog(td, tt).numpy())
        report.lines.append(_compare("torch program (model.pt2)", got, ref, ms))
        del prog
    import onnxruntime as ort

    emb = eager.embedding
    if not hasattr(emb, "gather_config"):
        # Nothing below needs the eager model (no slot indices to compare): release its mapping
        # of the weights before onnxruntime maps them again. Two mappings of a multi-GB weights
        # file count twice in RSS (full tables at the Kaggle vocabulary: 2.08x the weights with
        # both, 0.97x without; docs/RESULTS.md).
        del emb
        eager = None
        bundle.release("eager")
        gc.collect()
    # A session of its own, released before the index checks open theirs: onnxruntime holds a
    # copy of the weights per session, and two at once would double the peak.
    sess = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    (got,), ms = _timed(lambda: sess.run(None, {"dense": dense, "tokens": tokens}))
    report.lines.append(_compare("onnxruntime (model.onnx)", got, ref, ms))
    sess = None
    # The same file with the ai.lma nodes on the native ops library (what CPU serving runs by
    # default), in a session of its own too; skipped where the library cannot be built.
    if ort_ops.mode() != "0" and ort_ops.library() is not None:
        so = ort.SessionOptions()
        ort_ops.add_to(so)
        sess = ort.InferenceSession(str(bundle.onnx_path), so, providers=["CPUExecutionProvider"])
        (got,), ms = _timed(lambda: sess.run(None, {"dense": dense, "tokens": tokens}))
        report.lines.append(_compare("onnxruntime + native ai.lma ops (lma.ort_ops)", got, ref, ms))
        sess = None

    if eager is not None:
        emb = eager.embedding
        cfg = emb.gather_config
        with torch.no_grad():
            keys = emb.resolve_keys(tt) if hasattr(emb, "resolve_keys") else tt
        flat = keys.reshape(-1)
        consts = emb.gather_constants()
        impls = {
            "numpy spec": hashspec.slot_indices(
                flat.numpy(), cfg.params(), cfg.m, cfg.z, cfg.mode, cfg.aligned
            ),
            "torch reference": slot_indices_torch(flat, consts, cfg).numpy(),
        }
        # Without native kernels here, the other implementations are still compared.
        with contextlib.suppress(RuntimeError):
            impls["C++ op"] = slot_indices(flat, consts, cfg, backend="cpp").numpy()
        file_model, lookups = _onnx_lookup_inputs(bundle, dense, tokens)
        for i, lk in enumerate(lookups):
            checks = dict(impls)
            detail = ""
            keys_same = np.array_equal(lk["keys"].reshape(-1), flat.numpy())
            if not keys_same:
                detail = "ONNX keys (after signature lookup) differ from torch's; "
            checks["ONNX function"] = _onnx_function_indices(file_model, lk)
            want = checks["numpy spec"]
            bad = [
                k for k, v in checks.items() if v.shape != want.shape or not np.array_equal(v, want)
            ]
            ok = keys_same and not bad
            report.index_checks.append(
                {
                    "lookup": i,
                    "mode": lk["attrs"].get("mode"),
                    "z": lk["attrs"].get("z"),
                    "count": int(want.size),
                    "implementations": list(checks),
                    "ok": ok,
                    "detail": detail + (f"differs: {', '.join(bad)}" if bad else ""),
                }
            )
        if not lookups:
            report.index_checks.append(
                {
                    "lookup": "-",
                    "mode": cfg.mode,
                    "z": cfg.z,
                    "count": 0,
                    "implementations": [],
                    "ok": False,
                    "detail": "model.onnx has no HashedGather or HotGather node",
                }
            )
    report.ok = all(ln["ok"] for ln in report.lines) and all(c["ok"] for c in report.index_checks)
    return report
