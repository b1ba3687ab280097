"""Will onnxruntime's CUDA EP run every node of a model? A static check against a kernel table.

onnxruntime places a node on the CUDA EP only if a CUDA kernel is registered for its op type,
version and the element types of its inputs and outputs; otherwise the node falls back to the
CPU with copies around it. :func:`cuda_problems` inlines the model's local functions (as
onnxruntime does for nodes no provider claims), infers every tensor's element type with onnx
shape inference, and checks each node against ``ort_cuda_kernels.json``: a table of the CUDA
kernels, written as data from onnxruntime's ``docs/OperatorKernels.md`` (its header names the
revision). It also refuses kernels known to be inexact for the integer arithmetic the hashes
need (``ReduceSum`` on int64 goes through floating point). The GPU-side proof is
``scripts/gpu_ort_placement.py`` (``session.disable_cpu_ep_fallback=1``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

TABLE_FILE = Path(__file__).with_name("ort_cuda_kernels.json")


@cache
def kernel_table() -> dict[str, Any]:
    return json.loads(TABLE_FILE.read_text())


def _elem_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def _types(model: onnx.ModelProto) -> dict[str, str]:
    g = model.graph
    out: dict[str, str] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = _elem_name(vi.type.tensor_type.elem_type)
    for init in g.initializer:
        out[init.name] = _elem_name(init.data_type)
    for node in g.node:  # Constant outputs carry their type in the attribute
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = _elem_name(a.t.data_type)
    return out


def inlined_with_types(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model with local functions inlined, and the element type of every tensor name."""
    from onnx import inliner, shape_inference

    flat = inliner.inline_local_functions(model)
    flat = shape_inference.infer_shapes(flat, data_prop=True)
    return flat, _types(flat)


def _check_node(node: onnx.NodeProto, types: dict[str, str]) -> str | None:
    table = kernel_table()
    if node.op_type in table["no_kernel_needed"]:
        return None
    where = f"{node.op_type} node {node.name or node.output[0]!r}"
    if node.domain not in ("", "ai.onnx"):
        return f"{where}: domain {node.domain!r} has no CUDA kernels (function not inlined?)"
    entry = table["ops"].get(node.op_type)
    if entry is None:
        return f"{where}: no CUDA kernel in the table for op {node.op_type}"
    bound: dict[str, str] = {}
    for kind, names, slots in (("input", node.input, entry["inputs"]),
                               ("output", node.output, entry["outputs"])):
        for i, name in enumerate(names):
            if not name:
                continue  # omitted optional input
            slot = slots[min(i, len(slots) - 1)] if slots[-1].endswith("*") else (
                slots[i] if i < len(slots) else None)
            if slot is None:
                return f"{where}: {kind} {i} not in the kernel's signature"
            t = types.get(name)
            if t is None:
                return f"{where}: element type of {kind} {name!r} unknown after shape inference"
            slot = slot.rstrip("*")
            if slot.startswith("tensor("):
                allowed = [slot[len("tensor("):-1]]
            else:
                allowed = entry["types"][slot]
                if bound.setdefault(slot, t) != t:
                    return f"{where}: {kind} {name!r} is {t} but {slot} is bound to {bound[slot]}"
            if t not in allowed:
                return f"{where}: no CUDA kernel for {kind} {name!r} of type {t} (allowed {allowed})"
    for t in set(bound.values()):
        why = table["inexact"].get(node.op_type, {}).get(t)
        if why:
            return f"{where}: CUDA kernel on {t} is inexact: {why}"
    return None


def cuda_problems(model: onnx.ModelProto) -> list[str]:
    """One line per node of the inlined model that onnxruntime's CUDA EP could not run exactly."""
    flat, types = inlined_with_types(model)
    problems = []
    for node in flat.graph.node:
        p = _check_node(node, types)
        if p:
            problems.append(p)
    return problems


def op_type_census(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> number of nodes in the inlined graph (for reports)."""
    flat, _ = inlined_with_types(model)
    out: dict[str, int] = {}
    for node in flat.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))
