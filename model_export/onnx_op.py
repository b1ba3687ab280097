"""ONNX form of ``lma::hashed_gather``: one ``ai.lma::HashedGather`` node per lookup, implemented by
a model-local ONNX function made of standard ops, so plain onnxruntime runs it.

Node:  out = ai.lma.HashedGather(memory (M,) float, keys (...) int64, A (nb,2,4) int64,
                                 B (nb,2) int64, W (16,nb) int64)        -> (..., dim) float
Attributes: dim, z, t (sub-keys per LMA block key; 0 if unknown), b (sub-key bits, 4),
            mode ("lma" | "robez"), aligned (0 | 1), spec_version (1).

Function body (hash spec v1, ``lma/hashspec.py``), written so that onnxruntime's CUDA EP has a
kernel for every node and type (no integer MatMul, no BitShift / bitwise ops, no integer
ReduceSum; ``tests/test_onnx_cuda_kernels.py`` checks this against a table of the CUDA kernels):
every 16-bit limb the spec hashes is a linear function of the key's 16 nibbles, ``u_i[c] = sum_p
nib[p] L[p, c, i]`` with ``L[p, c, i] = (W[p, c] div 2^16i) mod 2^16``. W is the spec's nibble
weights for lma (one power of 16 per chosen position, block keys < 2^32) and ``16^p`` for robez
(the key is its own block key; the exporter passes it, see :func:`lift_weights`), so one body
serves both modes. Hence ``x[n, j, c] = B[c, j] + sum_p nib[n, p] G[p, j, c]`` with
``G[p, j, c] = sum_i L[p, c, i] A[c, j, i] < 2^43`` (constants only; ORT folds them), and since
only ``x mod P`` matters, G is reduced mod P first, so x < 2^39.

Per key, in passes that onnxruntime's CPU provider does fast (MatMul / Gemm against constant
matrices instead of broadcasting Add / Div, which it does element by element, and no integer Mod
over wide tensors): the two 32-bit halves from one uint64 division; ``f = floor(halves @ D)``,
``D[h, 8h + q] = 16^-q`` (one non-zero term per output, division by a power of two: exact);
nibbles ``f @ N16`` (``nib_q = f_q - 16 f_q+1``, exact); ``x = Gemm(nib, G mod P, B)`` and the
quotient ``floor(Gemm(nib, (G mod P) / P, (B + 1/2) / P))``, which is exactly ``floor(x / P)``:
``(x + 1/2) / P`` lies at least ``1 / 2P ~ 2^-32`` from an integer and the Gemm's rounding error
is below ``2^-40`` for x < 2^39; ``h = x - q P`` is exact in double. Then, in int64,
``H = h_0 P + h_1``, ``s = H mod n``, and one more Gemm expands the block starts to all Z
indices of each block (times Z when aligned, plus 0..Z-1), cast to int64 for a ``GatherElements``
on the flat index (faster in ORT than ``Gather`` of scalars). Every term and partial sum of the
other double MatMuls is exactly representable (integers below 2^53, or a half divided by a power
of two), and the quotient's error bound holds for any summation order, so the result is exact on
any BLAS (and not subject to TF32, which applies to float32 only).

Two more functions live here: ``ai.lma::HotGather`` (``lma::hot_gather``, the LMA hot serving
form: precomputed rows for the signed tokens, and this HashedGather function, called as a nested
function, on the other tokens only; see :func:`_hot_body`) and ``ai.lma::KeyLookup``
(``lma::key_lookup``, token -> value over a key table; see :func:`_key_lookup_body`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lma import hashspec
from model_export.onnx_spec import DOMAIN, INDICES_OP_TYPE, OP_TYPE, OP_VERSION

logger = logging.getLogger(__name__)

__all__ = ["DOMAIN", "INDICES_OP_TYPE", "OP_TYPE", "OP_VERSION"]

OPSET = 20  # accepted by onnxruntime >= 1.17 (incl. 1.20) and the newest
IR_VERSION = 10
ATTRIBUTES = ("dim", "z", "t", "b", "mode", "aligned", "spec_version")


def _const_i64(
    name: str, values: Sequence[int] | int, shape: Sequence[int] | None = None
) -> onnx.NodeProto:
    arr = np.asarray(values, dtype=np.int64)
    if shape is not None:
        arr = arr.reshape(shape)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def robez_lift_weights(n_blocks: int) -> np.ndarray:
    """W (16, n_blocks) int64 for ``robez`` nodes: W[p, c] = 16^p, so the limbs the function derives
    from W are the key's own 16-bit limbs (the key is its own block key)."""
    col = np.array([16**p for p in range(hashspec.NIBBLES)], dtype=np.int64)
    return np.repeat(col[:, None], n_blocks, axis=1)


def lift_weights(w: np.ndarray, mode: str) -> np.ndarray:
    """The W a ``HashedGather`` node takes: the spec's nibble weights (lma) or 16^p (robez)."""
    w = np.asarray(w, dtype=np.int64)
    return w if mode == "lma" else robez_lift_weights(w.shape[1])


def _key_halves() -> list[onnx.NodeProto]:
    """``keys`` -> ``kf`` (N,) int64 and ``halves`` (N, 2) double: the low and high 32 bits of
    each key's two's-complement bits, from one uint64 division (needs constants cm1 and ax_1)."""
    n = helper.make_node
    c2p32 = numpy_helper.from_array(np.asarray(1 << 32, np.uint64), "c2p32u")
    return [
        n("Reshape", ["keys", "cm1"], ["kf"]),
        n("Cast", ["kf"], ["ku"], to=TensorProto.UINT64),
        n("Constant", [], ["c2p32u"], value=c2p32),
        n("Div", ["ku", "c2p32u"], ["k_hi"]),
        n("Mul", ["k_hi", "c2p32u"], ["k_hi_sh"]),
        n("Sub", ["ku", "k_hi_sh"], ["k_lo"]),
        n("Unsqueeze", ["k_lo", "ax_1"], ["k_lo2"]),
        n("Unsqueeze", ["k_hi", "ax_1"], ["k_hi2"]),
        n("Concat", ["k_lo2", "k_hi2"], ["halves_u"], axis=1),  # each < 2^32
        n("Cast", ["halves_u"], ["halves"], to=TensorProto.DOUBLE),
    ]


def _body(with_values: bool) -> list[onnx.NodeProto]:
    """Nodes of the function; inputs memory, keys, A, B, W; output ``out`` or ``idx``.

    Per key (N keys, nb blocks) the work is a few passes over (N, 16) and (N, nb) tensors,
    written to avoid the ops onnxruntime's CPU provider is slow at (broadcasts other than by a
    scalar or a row, integer Mod over wide tensors): broadcasts are MatMul / Gemm with 0/1 or
    power-of-two matrices (exact: one non-zero term per output), and the reduction mod P is done
    in double from an exact quotient (see the module docstring).
    """
    n = helper.make_node
    ref = helper.make_attribute_ref
    dbl = TensorProto.DOUBLE
    i64 = TensorProto.INT64

    def const_attr(out: str, attr: str) -> onnx.NodeProto:
        node = n("Constant", [], [out])
        node.attribute.append(ref("value_int", onnx.AttributeProto.INT))
        node.attribute[-1].ref_attr_name = attr
        return node

    def const(name: str, values: Any, dtype: Any) -> onnx.NodeProto:
        arr = np.asarray(values, dtype=dtype)
        return n("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    nodes: list[onnx.NodeProto] = [
        const_attr("z_c", "z"),
        const_attr("al_c", "aligned"),
        const_attr("dim_c", "dim"),
        _const_i64("c0", 0),
        _const_i64("c1", 1),
        _const_i64("cm1", [-1]),
        _const_i64("ax_last", [-1]),
        _const_i64("ax_0", [0]),
        _const_i64("ax_1", [1]),
        # ---- constants; they depend on initializers and attributes only (ORT folds them) ----
        # G (16, 2 nb) as before, then reduced mod P (fmod of doubles is exact): Gx[:, j nb + c]
        _const_i64("limb_div", [1, 1 << 16, 1 << 32, 1 << 48]),
        _const_i64("c65536", 65536),
        n("Unsqueeze", ["W", "ax_last"], ["w3"]),  # (16, nb, 1)
        n("Div", ["w3", "limb_div"], ["w_sh"]),  # W >= 0: Div is a logical shift
        n("Mod", ["w_sh", "c65536"], ["lift"]),  # (16, nb, 4): limb i of block c per nibble
        n("Cast", ["lift"], ["lift_d"], to=dbl),
        n("Transpose", ["lift_d"], ["lift_t"], perm=[1, 0, 2]),  # (nb, 16, 4)
        n("Cast", ["A"], ["a_d"], to=dbl),
        n("Transpose", ["a_d"], ["a_t"], perm=[0, 2, 1]),  # (nb, 4, 2)
        n("MatMul", ["lift_t", "a_t"], ["g_c"]),  # (nb, 16, 2), entries < 2^43: exact
        n("Transpose", ["g_c"], ["g_t"], perm=[1, 2, 0]),  # (16, 2, nb)
        _const_i64("shape_16m1", [16, -1]),
        n("Reshape", ["g_t", "shape_16m1"], ["G"]),  # (16, 2 nb): column j * nb + c
        const("cPd", float(hashspec.P), np.float64),
        n("Mod", ["G", "cPd"], ["Gx"], fmod=1),  # < P
        n("Transpose", ["B"], ["bt"], perm=[1, 0]),  # (2, nb)
        n("Reshape", ["bt", "cm1"], ["B2"]),  # (2 nb,)
        n("Cast", ["B2"], ["Bx"], to=dbl),
        # Gq, Bq: (Gx, Bx + 1/2) / P, for the quotient floor(x / P) (see the module docstring)
        const("inv_p", 1.0 / hashspec.P, np.float64),
        const("c_half", 0.5, np.float64),
        n("Mul", ["Gx", "inv_p"], ["Gq"]),
        n("Add", ["Bx", "c_half"], ["Bh"]),
        n("Mul", ["Bh", "inv_p"], ["Bq"]),
        # D (2, 16): column 8 h + q divides half h by 16^q; N16 (16, 16): nibble = f_q - 16 f_q+1
        const("D", _nibble_division(), np.float64),
        const("N16", _nibble_difference(), np.float64),
        # E (nb, dim): start of block c -> columns c Z .. c Z + Z - 1 (times Z when aligned);
        # iota (dim,): 0 .. Z - 1 per block
        n("Range", ["c0", "dim_c", "c1"], ["cols"]),  # (dim,)
        n("Div", ["cols", "z_c"], ["col_blk"]),
        n("Mod", ["cols", "z_c"], ["col_off"]),
        n("Div", ["dim_c", "z_c"], ["nb_c"]),
        n("Range", ["c0", "nb_c", "c1"], ["blks"]),  # (nb,)
        n("Unsqueeze", ["blks", "ax_last"], ["blks2"]),
        n("Equal", ["blks2", "col_blk"], ["e_b"]),  # (nb, dim)
        n("Cast", ["e_b"], ["e_1"], to=dbl),
        n("Cast", ["al_c"], ["al_b"], to=TensorProto.BOOL),
        n("Where", ["al_b", "z_c", "c1"], ["stride"]),
        n("Cast", ["stride"], ["stride_d"], to=dbl),
        n("Mul", ["e_1", "stride_d"], ["E"]),
        n("Cast", ["col_off"], ["iota"], to=dbl),
        # ---- number of starts ----
        n("Shape", ["memory"], ["m_shape"]),
        n("Squeeze", ["m_shape"], ["m_c"]),
        n("Div", ["m_c", "z_c"], ["n_al"]),
        n("Sub", ["m_c", "z_c"], ["m_mz"]),
        n("Add", ["m_mz", "c1"], ["n_un"]),
        n("Where", ["al_b", "n_al", "n_un"], ["n_starts"]),
        # ---- per key: 16 nibbles from one uint64 division and two exact double MatMuls ----
        *_key_halves(),  # kf (N,), halves (N, 2)
        n("MatMul", ["halves", "D"], ["f_q"]),  # (N, 16): half >> 4q, before the floor
        n("Floor", ["f_q"], ["f"]),
        n("MatMul", ["f", "N16"], ["nib"]),  # (N, 16) nibble p at column p; exact (2 terms)
        # x = B + nib G (mod P), x < 2^39 exact; q = floor(x / P) exactly; h = x - q P
        n("Gemm", ["nib", "Gx", "Bx"], ["x"]),  # (N, 2 nb)
        n("Gemm", ["nib", "Gq", "Bq"], ["xq"]),
        n("Floor", ["xq"], ["q"]),
        n("Mul", ["q", "cPd"], ["qp"]),
        n("Sub", ["x", "qp"], ["h_d"]),
        n("Cast", ["h_d"], ["h"], to=i64),
        n("Split", ["h"], ["h0", "h1"], axis=1, num_outputs=2),  # (N, nb) each
        _const_i64("cP", hashspec.P),
        n("Mul", ["h0", "cP"], ["h0p"]),
        n("Add", ["h0p", "h1"], ["H"]),  # < 2^62
        n("Mod", ["H", "n_starts"], ["s0"]),  # (N, nb) start / stride
        n("Cast", ["s0"], ["s0_d"], to=dbl),
        n("Gemm", ["s0_d", "E", "iota"], ["idx_d"]),  # (N, dim) < M: exact
        n("Cast", ["idx_d"], ["idx2"], to=i64),
    ]
    if with_values:
        nodes += [
            n("Reshape", ["idx2", "cm1"], ["idx_flat"]),
            n("GatherElements", ["memory", "idx_flat"], ["vals"], axis=0),
            n("Shape", ["keys"], ["k_shape"]),
            n("Unsqueeze", ["dim_c", "ax_0"], ["dim_1"]),
            n("Concat", ["k_shape", "dim_1"], ["out_shape"], axis=0),
            n("Reshape", ["vals", "out_shape"], ["out"]),
        ]
    else:
        nodes += [n("Identity", ["idx2"], ["idx"])]  # (N, dim)
    return nodes


def _nibble_division() -> np.ndarray:
    """D (2, 16) with D[h, 8 h + q] = 16^-q: ``halves @ D`` holds half_h / 16^q (exact)."""
    d = np.zeros((2, hashspec.NIBBLES), dtype=np.float64)
    for h in range(2):
        for q in range(8):
            d[h, 8 * h + q] = 16.0 ** -q
    return d


def _nibble_difference() -> np.ndarray:
    """N16 (16, 16): nibble p = f_p - 16 f_{p+1} within each 32-bit half (f_8 of a half is 0)."""
    m = np.eye(hashspec.NIBBLES, dtype=np.float64)
    for p in range(hashspec.NIBBLES):
        if p % 8 != 7:
            m[p + 1, p] = -16.0
    return m


def function_proto(indices_only: bool = False) -> onnx.FunctionProto:
    """The model-local function implementing ``ai.lma::HashedGather`` (or the indices probe)."""
    return helper.make_function(
        DOMAIN,
        INDICES_OP_TYPE if indices_only else OP_TYPE,
        inputs=["memory", "keys", "A", "B", "W"],
        outputs=["idx" if indices_only else "out"],
        nodes=_body(with_values=not indices_only),
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=list(ATTRIBUTES),
        doc_string=__doc__,
    )


def node_attributes(dim: int, z: int, mode: str, aligned: bool, t: int = 0) -> dict[str, Any]:
    """Attribute values of one ``HashedGather`` node."""
    return {
        "dim": int(dim),
        "z": int(z),
        "t": int(t),
        "b": hashspec.SUBKEY_BITS,
        "mode": str(mode),
        "aligned": int(bool(aligned)),
        "spec_version": hashspec.SPEC_VERSION,
    }


def subkeys_from_w(w: np.ndarray) -> int:
    """T recovered from W: each column of W sums to sum_{t<T} 16^t; 0 if not of that form."""
    w = np.asarray(w, dtype=np.int64)
    if w.ndim != 2 or w.shape[0] != hashspec.NIBBLES or w.shape[1] == 0:
        return 0
    sums = set(w.sum(axis=0).tolist())
    for t in range(1, 9):
        if sums == {sum(16**i for i in range(t))}:
            return t
    return 0


# ---------------------------------------------------------------- standalone models (tests, bench)


def standalone_model(
    config: Any,
    memory: np.ndarray | None = None,
    indices_only: bool = False,
    memory_as_input: bool = False,
) -> onnx.ModelProto:
    """A model with one HashedGather node: keys (batch, S) int64 -> (batch, S, dim) (or the
    (N, dim) slot indices). ``config`` is a :class:`lma.ops.HashedGatherConfig`; the memory and
    the constants are initializers (or ``memory`` is a graph input with ``memory_as_input``); a
    float16 ``memory`` stays float16 (so does the output), any other becomes float32."""
    p = config.params()
    inits = [
        numpy_helper.from_array(p.A, "A"),
        numpy_helper.from_array(p.B, "B"),
        numpy_helper.from_array(lift_weights(p.nibble_weights, config.mode), "W"),
    ]
    inputs = [helper.make_tensor_value_info("keys", TensorProto.INT64, ["batch", "slots"])]
    elem = TensorProto.FLOAT
    if memory_as_input:
        inputs.insert(0, helper.make_tensor_value_info("memory", elem, [config.m]))
    else:
        mem = np.zeros(config.m, np.float32) if memory is None else np.asarray(memory)
        if mem.dtype != np.float16:
            mem = mem.astype(np.float32)
        inits.insert(0, numpy_helper.from_array(mem, "memory"))
        elem = helper.np_dtype_to_tensor_dtype(mem.dtype)
    op = INDICES_OP_TYPE if indices_only else OP_TYPE
    t = config.n_subkeys if config.mode == "lma" else 0
    attrs = node_attributes(config.dim, config.z, config.mode, config.aligned, t)
    node = helper.make_node(op, ["memory", "keys", "A", "B", "W"], ["y"], domain=DOMAIN, **attrs)
    if indices_only:
        out = helper.make_tensor_value_info("y", TensorProto.INT64, ["n", config.dim])
    else:
        out = helper.make_tensor_value_info("y", elem, ["batch", "slots", config.dim])
    graph = helper.make_graph([node], "hashed_gather", inputs, [out], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)],
        functions=[function_proto(indices_only)],
        producer_name="lma-ctr",
    )
    model.ir_version = IR_VERSION
    return model


# ---------------------------------------------------------------- hot gather (serving form)

HOT_OP_TYPE = "HotGather"
HOT_INPUTS = ("memory", "hot", "index", "keys", "A", "B", "W")


def _hot_body() -> list[onnx.NodeProto]:
    """Nodes of ``ai.lma::HotGather(memory, hot, index, keys, A, B, W) -> out`` (the ONNX form of
    ``lma::hot_gather``): ``out[i] = hot[index[i]]`` where ``index[i] >= 0``, else the
    ``HashedGather`` of ``keys[i]``, bit for bit.

    The hot rows are one row ``Gather`` (cold entries read row 0 and are overwritten). The table
    gathered from is ``hot`` with one row appended, so that the gather is valid for H = 0 too;
    when ``hot`` and ``memory`` are initializers (every exported model) onnxruntime folds that
    Concat once at session start, and it costs nothing per call. The cold path runs on the cold
    entries alone: their positions from one ``NonZero``, their keys by a 1-d ``GatherElements``
    (a ``Gather`` of scalars is the slow kernel in onnxruntime's CPU provider), the
    ``HashedGather`` function itself on that subset (a nested function call, so there is one
    copy of its body), and one ``ScatterND`` of its rows into the hot result. Every op has a
    CUDA kernel for its types (tests/test_onnx_cuda_kernels.py)."""
    n = helper.make_node
    ref = helper.make_attribute_ref

    dim_c = n("Constant", [], ["dim_c"])
    dim_c.attribute.append(ref("value_int", onnx.AttributeProto.INT))
    dim_c.attribute[-1].ref_attr_name = "dim"
    call = n(OP_TYPE, ["memory", "cold_keys", "A", "B", "W"], ["cold_vals"], domain=DOMAIN)
    for name in ATTRIBUTES:
        kind = onnx.AttributeProto.STRING if name == "mode" else onnx.AttributeProto.INT
        call.attribute.append(ref(name, kind))
    return [
        dim_c,
        _const_i64("c0", 0),
        _const_i64("c0_1", [0]),
        _const_i64("c1_1", [1]),
        _const_i64("cm1", [-1]),
        _const_i64("shape_11", [1, 1]),
        n("Unsqueeze", ["dim_c", "c0_1"], ["dim_1"]),
        # ---- hot + one row (memory[0], never output): a constant when hot and memory are ----
        n("Slice", ["memory", "c0_1", "c1_1"], ["m_first"]),
        n("Reshape", ["m_first", "shape_11"], ["m_first2"]),
        n("Concat", ["c1_1", "dim_1"], ["row_shape"], axis=0),
        n("Expand", ["m_first2", "row_shape"], ["pad_row"]),
        n("Concat", ["hot", "pad_row"], ["hot_pad"], axis=0),  # (H + 1, dim)
        # ---- every entry's hot row (cold ones read row 0) ----
        n("Reshape", ["index", "cm1"], ["idx_f"]),  # (N,)
        n("Max", ["idx_f", "c0"], ["idx_safe"]),
        n("Gather", ["hot_pad", "idx_safe"], ["base"], axis=0),  # (N, dim)
        # ---- the cold entries only ----
        n("Less", ["idx_f", "c0"], ["is_cold"]),
        n("NonZero", ["is_cold"], ["cold_nz"]),  # (1, nc)
        n("Reshape", ["cold_nz", "cm1"], ["cold_pos"]),  # (nc,)
        n("Transpose", ["cold_nz"], ["cold_pos2"], perm=[1, 0]),  # (nc, 1): ScatterND indices
        n("Reshape", ["keys", "cm1"], ["kf"]),
        n("GatherElements", ["kf", "cold_pos"], ["cold_keys"], axis=0),  # (nc,)
        call,  # (nc, dim)
        n("ScatterND", ["base", "cold_pos2", "cold_vals"], ["merged"]),  # (N, dim)
        n("Shape", ["index"], ["i_shape"]),
        n("Concat", ["i_shape", "dim_1"], ["out_shape"], axis=0),
        n("Reshape", ["merged", "out_shape"], ["out"]),
    ]


def hot_function_proto() -> onnx.FunctionProto:
    """The model-local function implementing ``ai.lma::HotGather``; it calls the
    ``HashedGather`` function, which the model must hold too (:func:`finalize` adds both)."""
    return helper.make_function(
        DOMAIN,
        HOT_OP_TYPE,
        inputs=list(HOT_INPUTS),
        outputs=["out"],
        nodes=_hot_body(),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)],
        attributes=list(ATTRIBUTES),
        doc_string=_hot_body.__doc__,
    )


def hot_standalone_model(
    config: Any,
    memory: np.ndarray,
    hot: np.ndarray,
    as_inputs: bool = False,
) -> onnx.ModelProto:
    """A model with one HotGather node: index and keys (batch, S) int64 -> (batch, S, dim).
    ``memory`` (M,) and ``hot`` (H, dim) share a dtype (float32 or float16) and are initializers,
    or graph inputs with ``as_inputs``; ``config`` is a :class:`lma.ops.HashedGatherConfig`."""
    memory, hot = np.asarray(memory), np.asarray(hot)
    if memory.dtype != hot.dtype or hot.ndim != 2 or hot.shape[1] != config.dim:
        raise ValueError(f"need hot (H, {config.dim}) of the memory's dtype {memory.dtype}, "
                         f"got {hot.shape} {hot.dtype}")
    elem = helper.np_dtype_to_tensor_dtype(memory.dtype)
    p = config.params()
    inits = [
        numpy_helper.from_array(p.A, "A"),
        numpy_helper.from_array(p.B, "B"),
        numpy_helper.from_array(lift_weights(p.nibble_weights, config.mode), "W"),
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "slots"])
              for name in ("index", "keys")]
    if as_inputs:
        inputs = [helper.make_tensor_value_info("memory", elem, [config.m]),
                  helper.make_tensor_value_info("hot", elem, ["h", config.dim]), *inputs]
    else:
        inits = [numpy_helper.from_array(memory, "memory"), numpy_helper.from_array(hot, "hot"),
                 *inits]
    t = config.n_subkeys if config.mode == "lma" else 0
    attrs = node_attributes(config.dim, config.z, config.mode, config.aligned, t)
    node = helper.make_node(HOT_OP_TYPE, list(HOT_INPUTS), ["y"], domain=DOMAIN, **attrs)
    out = helper.make_tensor_value_info("y", elem, ["batch", "slots", config.dim])
    graph = helper.make_graph([node], "hot_gather", inputs, [out], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)],
        functions=[hot_function_proto(), function_proto()],
        producer_name="lma-ctr",
    )
    model.ir_version = IR_VERSION
    return model


# ---------------------------------------------------------------- key lookup (key tables)

KEY_LOOKUP_OP_TYPE = "KeyLookup"
# spec_version: the hash spec of the bundle (bundles check it on every ai.lma node; key tables do
# not use its constants); table_version: the key table layout and slot choice
# (lma/hashspec.py); v1 functions took (keys, default, slots, values, A, B).
KEY_LOOKUP_ATTRIBUTES = ("spec_version", "table_version")


def key_lookup_attributes() -> dict[str, int]:
    return {"spec_version": hashspec.SPEC_VERSION, "table_version": hashspec.KEY_TABLE_VERSION}


def _key_lookup_body() -> list[onnx.NodeProto]:
    """Nodes of ``ai.lma::KeyLookup(keys, default, table) -> out`` (key table v3, hashspec "Key
    tables"): M, G and A from the table's first elements; per key the product y = u * A, its two
    32-bit halves from one uint64 division, its group, base and step with three uint64
    remainders, its displacement
    with a GatherElements of one int64 from the flat table, its slot, and the slot's key and
    value (side by side) with two more; Equal and Where then pick the value or the default. Every
    tensor is (N,) against scalars (onnxruntime's CPU kernels broadcast anything else element by
    element), and every op has a CUDA kernel for its types (tests/test_onnx_cuda_kernels.py)."""
    n = helper.make_node
    i64 = TensorProto.INT64
    u64 = TensorProto.UINT64

    def const(name: str, values: Any, dtype: Any) -> onnx.NodeProto:
        return n("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype), name))

    meta, row = hashspec.META_ROWS, hashspec.ROW
    return [
        const("cm1", [-1], np.int64),
        const("c1u", 1, np.uint64),
        const("c2p32u", 1 << 32, np.uint64),
        const("meta_off", meta, np.uint64),
        const("row_u", row, np.uint64),
        const("i0", 0, np.int64),
        const("i1", 1, np.int64),
        const("i2", 2, np.int64),
        # the table's own header: M, G, A (flat elements 0, 1, 2), as uint64 scalars
        n("Reshape", ["table", "cm1"], ["tf"]),
        n("Gather", ["tf", "i0"], ["m_i"], axis=0),
        n("Gather", ["tf", "i1"], ["g_i"], axis=0),
        n("Gather", ["tf", "i2"], ["a_i"], axis=0),
        n("Cast", ["m_i"], ["m_u"], to=u64),
        n("Cast", ["g_i"], ["g_u"], to=u64),
        n("Cast", ["a_i"], ["a_u"], to=u64),  # the same bits: A is stored in its int64 form
        n("Sub", ["m_u", "c1u"], ["m1_u"]),
        n("Add", ["m_u", "meta_off"], ["m_meta"]),
        n("Mul", ["m_meta", "row_u"], ["disp_off"]),  # flat index of disp[0]
        # per key: y = u * A (wraps mod 2^64), its halves, group, base, step (uint64)
        n("Reshape", ["keys", "cm1"], ["kf"]),
        n("Cast", ["kf"], ["ku"], to=u64),
        n("Mul", ["ku", "a_u"], ["y"]),
        n("Div", ["y", "c2p32u"], ["y_hi"]),
        n("Mul", ["y_hi", "c2p32u"], ["y_hi_sh"]),
        n("Sub", ["y", "y_hi_sh"], ["y_lo"]),
        n("Mod", ["y_hi", "g_u"], ["grp"]),
        n("Mod", ["y_lo", "m_u"], ["s0"]),
        n("Mod", ["y_hi", "m1_u"], ["s1_0"]),
        n("Add", ["s1_0", "c1u"], ["s1"]),
        # the group's displacement, then the slot
        n("Add", ["grp", "disp_off"], ["disp_at_u"]),
        n("Cast", ["disp_at_u"], ["disp_at"], to=i64),
        # onnxruntime's CPU GatherElements on a 1-d tensor is ~4x faster per index than its
        # Gather (which divides twice per index), on this table and at 33.7M keys alike
        n("GatherElements", ["tf", "disp_at"], ["disp"], axis=0),
        n("Cast", ["disp"], ["disp_u"], to=u64),
        n("Mul", ["disp_u", "s1"], ["step"]),
        n("Add", ["s0", "step"], ["pos"]),
        n("Mod", ["pos", "m_u"], ["slot"]),
        n("Add", ["slot", "meta_off"], ["slot_row_u"]),
        n("Mul", ["slot_row_u", "row_u"], ["key_at_u"]),  # flat index of the slot's key
        n("Cast", ["key_at_u"], ["key_at"], to=i64),
        n("Add", ["key_at", "i1"], ["val_at"]),  # and of its value, beside it
        n("GatherElements", ["tf", "key_at"], ["pk"], axis=0),
        n("GatherElements", ["tf", "val_at"], ["pv"], axis=0),
        n("Shape", ["keys"], ["k_shape"]),
        n("Reshape", ["pk", "k_shape"], ["pk_k"]),
        n("Reshape", ["pv", "k_shape"], ["pv_k"]),
        n("Equal", ["pk_k", "keys"], ["hit"]),
        n("Where", ["hit", "pv_k", "default"], ["out"]),
    ]


def key_lookup_function() -> onnx.FunctionProto:
    """The model-local function implementing ``ai.lma::KeyLookup``."""
    return helper.make_function(
        DOMAIN,
        KEY_LOOKUP_OP_TYPE,
        inputs=["keys", "default", "table"],
        outputs=["out"],
        nodes=_key_lookup_body(),
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=list(KEY_LOOKUP_ATTRIBUTES),
        doc_string=_key_lookup_body.__doc__,
    )


def key_lookup_model(table: Any, default_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """A model with one KeyLookup node over ``table`` (a ``hashspec.KeyTable``): inputs keys
    (batch, slots) int64 and default (broadcastable) int64, output (batch, slots) int64."""
    inits = [numpy_helper.from_array(table.rows, "table")]
    inputs = [
        helper.make_tensor_value_info("keys", TensorProto.INT64, ["batch", "slots_dim"]),
        helper.make_tensor_value_info("default", TensorProto.INT64,
                                      list(default_shape) if default_shape is not None else ["batch", "slots_dim"]),
    ]
    node = helper.make_node(KEY_LOOKUP_OP_TYPE, ["keys", "default", "table"],
                            ["y"], domain=DOMAIN, **key_lookup_attributes())
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "slots_dim"])
    graph = helper.make_graph([node], "key_lookup", inputs, [out], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)],
        functions=[key_lookup_function()],
        producer_name="lma-ctr",
    )
    model.ir_version = IR_VERSION
    return model


# ---------------------------------------------------------------- torch.onnx.export (dynamo)

_schema_registered = False


def register_schema() -> None:
    """Register the ``ai.lma::HashedGather`` schema with onnx, so onnxscript can record the node."""
    global _schema_registered
    if _schema_registered:
        return
    try:
        onnx.defs.get_schema(OP_TYPE, OP_VERSION, DOMAIN)
        _schema_registered = True
        return
    except onnx.defs.SchemaError:
        pass
    fp = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    at = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Hashed gather of LMA / ROBE-Z embeddings (hash spec v1); see model_export/onnx_op.py",
        inputs=[
            fp("memory", "T"),
            fp("keys", "tensor(int64)"),
            fp("A", "tensor(int64)"),
            fp("B", "tensor(int64)"),
            fp("W", "tensor(int64)"),
        ],
        outputs=[fp("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "float")],
        attributes=[
            attr("dim", at.INT, "embedding dimension"),
            attr("z", at.INT, "block size Z"),
            attr("t", at.INT, "sub-keys per LMA block key (0: unknown)"),
            attr("b", at.INT, "bits per sub-key"),
            attr("mode", at.STRING, "lma | robez"),
            attr("aligned", at.INT, "blocks at multiples of Z"),
            attr("spec_version", at.INT, "hash spec version"),
        ],
    )
    onnx.defs.register_schema(schema)
    onnx.defs.register_schema(onnx.defs.OpSchema(
        HOT_OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Hot rows where index >= 0, else the HashedGather of the key; see model_export/onnx_op.py",
        inputs=[fp("memory", "T"), fp("hot", "T"), fp("index", "tensor(int64)"),
                fp("keys", "tensor(int64)"), fp("A", "tensor(int64)"), fp("B", "tensor(int64)"),
                fp("W", "tensor(int64)")],
        outputs=[fp("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "float")],
        attributes=[attr(a.name, a.type, a.description) for a in schema.attributes.values()],
    ))
    onnx.defs.register_schema(onnx.defs.OpSchema(
        KEY_LOOKUP_OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "Key table lookup (lma/hashspec.py, key tables); see model_export/onnx_op.py",
        inputs=[fp("keys", "tensor(int64)"), fp("default", "tensor(int64)"),
                fp("table", "tensor(int64)")],
        outputs=[fp("out", "tensor(int64)")],
        attributes=[attr("spec_version", at.INT, "hash spec version of the bundle"),
                    attr("table_version", at.INT, "key table layout version")],
    ))
    _schema_registered = True


def _node_weights(nibble_w: Any, dim: int, z: int, mode: str) -> tuple[Any, int]:
    """(W, t) for a lookup node: the signature weights and their sub-key count for lma; for
    robez, which ignores the signature weights, the identity lift and t = 0."""
    if mode != "lma":
        from onnxscript import opset20 as op

        return op.Constant(value=numpy_helper.from_array(robez_lift_weights(dim // z))), 0
    const = getattr(nibble_w, "const_value", None)
    if const is None:
        return nibble_w, 0
    try:
        return nibble_w, subkeys_from_w(const.numpy())
    except Exception:  # noqa: BLE001 - t is informative only
        return nibble_w, 0


def _translate_hashed_gather(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    """Translation of ``lma::hashed_gather`` for the dynamo exporter: one custom-domain node."""
    from onnxscript import values

    nibble_w, t = _node_weights(nibble_w, dim, z, mode)
    opset = values.Opset(DOMAIN, OP_VERSION)
    return opset.HashedGather(
        memory, keys, coef_a, coef_b, nibble_w, **node_attributes(dim, z, mode, aligned, t)
    )


def _translate_hot_gather(memory, hot, index, keys, coef_a, coef_b, nibble_w, dim, z, mode,  # noqa: ANN001, ANN202
                          aligned):
    """Translation of ``lma::hot_gather``: one ``ai.lma::HotGather`` node (its function and the
    HashedGather function it calls are attached by :func:`finalize`)."""
    from onnxscript import values

    nibble_w, t = _node_weights(nibble_w, dim, z, mode)
    opset = values.Opset(DOMAIN, OP_VERSION)
    return opset.HotGather(memory, hot, index, keys, coef_a, coef_b, nibble_w,
                           **node_attributes(dim, z, mode, aligned, t))


def _translate_hot_embed(memory, hot, table, tokens, coef_a, coef_b, nibble_w, dim, z, mode,  # noqa: ANN001, ANN202
                         aligned):
    """Translation of ``lma::hot_embed``: the ``ai.lma::KeyLookup`` node (token -> hot row, -1
    where absent) feeding the ``ai.lma::HotGather`` node, as the unfused ops would export."""
    from onnxscript import opset20 as op
    from onnxscript import values

    opset = values.Opset(DOMAIN, OP_VERSION)
    none = op.Constant(value=numpy_helper.from_array(np.array(-1, np.int64)))
    index = opset.KeyLookup(tokens, none, table, **key_lookup_attributes())
    nibble_w, t = _node_weights(nibble_w, dim, z, mode)
    return opset.HotGather(memory, hot, index, tokens, coef_a, coef_b, nibble_w,
                           **node_attributes(dim, z, mode, aligned, t))


def _translate_searchsorted(
    sorted_sequence, self, out_int32=False, right=False, side=None, sorter=None
):  # noqa: ANN001, ANN202
    """``aten::searchsorted`` (1-d sorted sequence) as an unrolled binary search.

    onnxscript's torch_lib has no searchsorted; the vocabularies (full tables) and signature
    tables (lma) look tokens up with it. ceil(log2(n + 1)) steps of Gather + Less + Where over the
    queries; exact (left: first i with seq[i] >= x; right: first i with seq[i] > x).
    """
    from onnxscript import opset20 as op

    if sorter is not None:
        raise NotImplementedError("searchsorted with a sorter has no ONNX translation here")
    right = bool(right) or side == "right"
    shape = sorted_sequence.shape
    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
        raise NotImplementedError(
            "searchsorted export needs a 1-d sorted sequence of static length"
        )
    n = int(shape[0])
    zero = op.Constant(value=numpy_helper.from_array(np.array(0, np.int64)))
    lo = op.Mul(op.CastLike(self, zero), zero)  # zeros like the queries, int64
    if n > 0:
        one = op.Constant(value=numpy_helper.from_array(np.array(1, np.int64)))
        hi = op.Add(lo, op.Constant(value=numpy_helper.from_array(np.array(n, np.int64))))
        last = op.Constant(value=numpy_helper.from_array(np.array(n - 1, np.int64)))
        for _ in range(int(np.ceil(np.log2(n + 1)))):
            mid = op.Div(
                op.Add(lo, hi), op.Constant(value=numpy_helper.from_array(np.array(2, np.int64)))
            )
            v = op.Gather(sorted_sequence, op.Min(mid, last))
            go = op.LessOrEqual(v, self) if right else op.Less(v, self)
            go = op.And(go, op.Less(lo, hi))
            lo = op.Where(go, op.Add(mid, one), lo)
            hi = op.Where(go, hi, mid)
    if out_int32:
        return op.Cast(lo, to=TensorProto.INT32)
    return lo


def _translate_key_lookup(keys, default, table):  # noqa: ANN001, ANN202
    """Translation of ``lma::key_lookup``: one ``ai.lma::KeyLookup`` node (function attached by
    :func:`finalize`)."""
    from onnxscript import values as ov

    opset = ov.Opset(DOMAIN, OP_VERSION)
    return opset.KeyLookup(keys, default, table, **key_lookup_attributes())


def _translate_dot_interaction(vecs, pairs, prefix=None):  # noqa: ANN001, ANN202
    """Translation of ``lma::dot_interaction`` with standard ops (its composed form, which
    every execution provider runs): [prefix, vecs] -> MatMul with its transpose -> the flat
    positions ``pairs`` by one GatherElements -> behind the prefix."""
    from onnxscript import opset20 as op

    def const(a: Any) -> Any:
        return op.Constant(value=numpy_helper.from_array(np.asarray(a, dtype=np.int64)))

    v = vecs if prefix is None else op.Concat(op.Unsqueeze(prefix, const([1])), vecs, axis=1)
    gram = op.MatMul(v, op.Transpose(v, perm=[0, 2, 1]))  # (B, n, n)
    flat = op.Reshape(gram, const([0, -1]))  # (B, n * n)
    rows = op.Shape(flat, start=0, end=1)
    index = op.Expand(op.Unsqueeze(pairs, const([0])),
                      op.Concat(rows, op.Shape(pairs), axis=0))  # (B, P)
    dots = op.GatherElements(flat, index, axis=1)
    return dots if prefix is None else op.Concat(prefix, dots, axis=1)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    import lma.ops  # noqa: F401  (registers torch.ops.lma.*)
    import lma.ops.interaction  # noqa: F401

    register_schema()
    return {
        torch.ops.lma.hashed_gather.default: _translate_hashed_gather,
        torch.ops.lma.hot_gather.default: _translate_hot_gather,
        torch.ops.lma.hot_embed.default: _translate_hot_embed,
        torch.ops.lma.key_lookup.default: _translate_key_lookup,
        torch.ops.lma.dot_interaction.default: _translate_dot_interaction,
        torch.ops.aten.searchsorted.Tensor: _translate_searchsorted,
    }


# Lookup ops with a hash spec: the position of their W input (finalize sets t from it).
_W_INPUT = {OP_TYPE: 4, HOT_OP_TYPE: 6}


def _functions_for(used: set[str]) -> list[onnx.FunctionProto]:
    """The model-local functions a graph using the ``ai.lma`` op types ``used`` needs (a
    HotGather node calls the HashedGather function)."""
    out = []
    if HOT_OP_TYPE in used:
        out.append(hot_function_proto())
    if used & {OP_TYPE, HOT_OP_TYPE}:
        out.append(function_proto())
    if KEY_LOOKUP_OP_TYPE in used:
        out.append(key_lookup_function())
    return out


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the model-local functions, fix opset imports and the IR version; check the model."""
    used = {nd.op_type for nd in model.graph.node if nd.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for fn in _functions_for(used):
        if (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if used and DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    inits = {i.name: i for i in model.graph.initializer}
    for nd in model.graph.node:
        w_at = _W_INPUT.get(nd.op_type) if nd.domain == DOMAIN else None
        if w_at is None or len(nd.input) <= w_at:
            continue
        t_attr = next((a for a in nd.attribute if a.name == "t"), None)
        mode = next((a.s for a in nd.attribute if a.name == "mode"), b"")
        if t_attr is not None and t_attr.i == 0 and mode == b"lma" and nd.input[w_at] in inits:
            t_attr.i = subkeys_from_w(numpy_helper.to_array(inits[nd.input[w_at]]))
    if model.ir_version > IR_VERSION:
        model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to ``<file>.data`` (protobuf caps at 2 GB)


def _finalize_ir(model: Any) -> None:
    """:func:`finalize` on an ``onnx_ir`` model (used for models too large for one protobuf)."""
    import onnx_ir as ir

    used = {n.op_type for n in model.graph if n.domain == DOMAIN}
    for proto in _functions_for(used):
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[DOMAIN] = OP_VERSION
    for node in model.graph:
        w_at = _W_INPUT.get(node.op_type) if node.domain == DOMAIN else None
        if w_at is None:
            continue
        w = node.inputs[w_at] if len(node.inputs) > w_at else None
        t = node.attributes.get("t")
        mode = node.attributes.get("mode")
        if mode is None or mode.value != "lma":
            continue  # t means sub-keys of a signature: lma only (robez nodes keep 0)
        if w is not None and w.const_value is not None and (t is None or t.value == 0):
            node.attributes["t"] = ir.AttrInt64("t", subkeys_from_w(w.const_value.numpy()))
    model.ir_version = min(model.ir_version, IR_VERSION)


def export_onnx(
    module: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple[Any, ...],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any = None,
    external_data: bool | None = None,
) -> onnx.ModelProto:
    """Export ``module`` with the dynamo exporter, lma ops as ``ai.lma::HashedGather`` nodes.

    Writes one self-contained file at ``path``; when the weights exceed ``EXTERNAL_DATA_BYTES``
    (or ``external_data=True``) they go to ``<path>.data`` next to it. Returns the model proto
    (without the external weights in that case).
    """
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=translation_table(),
        opset_version=OPSET,
        optimize=True,
        verify=False,
        report=False,
        verbose=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        weights = sum(
            v.const_value.nbytes
            for v in program.model.graph.initializers.values()
            if v.const_value is not None
        )
        external_data = weights > EXTERNAL_DATA_BYTES
    if not external_data:
        model = finalize(program.model_proto)
        onnx.save_model(model, str(path))
        return model
    _finalize_ir(program.model)
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path))
    return onnx.load(str(path), load_external_data=False)
