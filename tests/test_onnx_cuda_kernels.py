"""Every node of the exported models has an onnxruntime CUDA kernel for its types (static check).

The table is ``model_export/ort_cuda_kernels.json`` (from onnxruntime's docs/OperatorKernels.md);
on a GPU, ``scripts/gpu_ort_placement.py`` proves the same with ``disable_cpu_ep_fallback``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lma.embeddings import EMBEDDINGS, EmbeddingSpec, build_embedding
from lma.features import FeatureMap
from lma.model import DLRMConfig, build_dlrm, first_order_spec
from lma.ops import HashedGatherConfig
from lma.schema import CategoricalField, Schema
from model_export import cuda_kernels, onnx_op


def _fmap(sizes: tuple[int, ...] = (40, 300, 7), seed: int = 0) -> FeatureMap:
    rng = np.random.default_rng(seed)
    cats = tuple(CategoricalField(f"f{i}") for i in range(len(sizes)))
    schema = Schema(name="t", label="y", dense=(), categorical=cats)
    toks = [np.sort(rng.choice(2**62, n, replace=False)).astype(np.int64) + i for i, n in enumerate(sizes)]
    return FeatureMap(schema, toks, [rng.integers(1, 10, n) for n in sizes], n_rows=1000)


@pytest.mark.parametrize("mode", ["lma", "robez"])
@pytest.mark.parametrize("z,aligned", [(1, False), (4, True), (16, False)])
@pytest.mark.parametrize("indices_only", [False, True])
def test_hashed_gather_function_has_cuda_kernels(mode: str, z: int, aligned: bool,
                                                  indices_only: bool) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=4099, seed=2)
    model = onnx_op.standalone_model(cfg, indices_only=indices_only)
    assert cuda_kernels.cuda_problems(model) == []
    census = cuda_kernels.op_type_census(model)
    assert "BitShift" not in census and "BitwiseAnd" not in census


def _dlrm(kind: str, first_order: bool) -> torch.nn.Module:
    fmap = _fmap()
    dim = 8
    full = fmap.full_table_rows(1) * dim
    spec = EmbeddingSpec(kind=kind, dim=dim, n_params=full if kind == "full" else full // 4, seed=1,
                         options={"z": 2} if kind in ("lma", "robez") else {})
    state = {}
    if kind == "lma":
        rng = np.random.default_rng(3)
        train = np.stack([rng.choice(t, 400) for t in fmap.tokens], axis=1)
        state = EMBEDDINGS["lma"].prepare(spec, fmap, train)
    emb = build_embedding(spec, fmap, **state)
    fo = first_order_spec("hash", 64, 1, 1) if first_order else None
    cfg = DLRMConfig(n_dense=2, slot_fields=fmap.schema.slot_fields(), dim=dim,
                     bottom_mlp=[8, dim], top_mlp=[8], first_order=fo)
    return build_dlrm(cfg, emb, fmap).eval()


@pytest.mark.parametrize("kind", ["lma", "robez", "full", "hash", "qr"])
def test_exported_dlrm_has_cuda_kernels(tmp_path: Path, kind: str) -> None:
    model = _dlrm(kind, first_order=kind == "lma")
    dense = torch.randn(4, 2)
    tokens = torch.randint(-(2**62), 2**62, (4, 3))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        program = torch.export.export(model, (dense, tokens), dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path / "m.onnx"
    onnx_op.export_onnx(program, (dense, tokens), path, ["dense", "tokens"], ["logits"])
    problems = cuda_kernels.cuda_problems(onnx.load(str(path)))
    assert problems == [], "\n".join(problems)


def test_checker_flags_what_cuda_cannot_run() -> None:
    """The old function's ops: BitShift, BitwiseAnd, int64 MatMul, int64 ReduceSum, string Equal."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT64, [4])
    m = helper.make_tensor_value_info("m", TensorProto.INT64, [4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [4])
    nodes = [
        helper.make_node("BitShift", ["x", "sh"], ["y"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["y", "sh"], ["y2"]),
        helper.make_node("MatMul", ["m", "m"], ["mm"]),
        helper.make_node("ReduceSum", ["mm", "ax"], ["rs"], keepdims=0),
        helper.make_node("Equal", ["str", "str"], ["eq"]),
        helper.make_node("Add", ["rs", "x"], ["bad_mix"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([4, 4, 4, 4], np.uint64), "sh"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
        helper.make_tensor("str", TensorProto.STRING, [], [b"lma"]),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
            for n in ("y2", "rs", "eq", "bad_mix")]
    g = helper.make_graph(nodes, "g", [x, m, s], outs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", onnx_op.OPSET)])
    problems = cuda_kernels.cuda_problems(model)
    joined = "\n".join(problems)
    assert len(problems) == 6, joined
    for needle in ("op BitShift", "op BitwiseAnd", "MatMul", "inexact", "Equal", "bound to int64"):
        assert needle in joined, needle


def test_table_names_its_source() -> None:
    table = cuda_kernels.kernel_table()
    assert "OperatorKernels.md" in table["about"] and table["opset"] == onnx_op.OPSET
    assert "BitShift" not in table["ops"] and "int64" not in table["ops"]["MatMul"]["types"]["T"]


def test_gpu_placement_script_dry_run_on_cpu() -> None:
    """The GPU script's own logic, with the CPU EP as its target (on a GPU it targets CUDA)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "scripts" / "gpu_ort_placement.py"), "--ep", "CPUExecutionProvider"],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "ALL OK" in out.stdout and "FAIL" not in out.stdout
    skip = subprocess.run([sys.executable, str(repo / "scripts" / "gpu_ort_placement.py")],
                          capture_output=True, text=True, timeout=600, cwd=repo)
    assert skip.returncode == 0
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "SKIP" in skip.stdout
