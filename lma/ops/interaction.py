"""DLRM's dot interaction as one operator: ``lma::dot_interaction``.

    lma::dot_interaction(vecs (B, f, d) float, pairs (P,) int64, prefix (B, d) float or None)
        -> (B, k + P) with k = d if a prefix is given, else 0: the prefix, then the dot products
        of the n = f + (k > 0) vectors [prefix, vecs] at the flat positions ``pairs`` (i * n + j)
        of their (n, n) matrix of dot products

The composed form (:func:`dot_interaction_reference`: concatenate, ``bmm``, gather the flat
positions, concatenate) is what the model computed before; it runs on every device and is what
the ONNX exporter writes (``model_export/onnx_op.py``: Concat, MatMul, GatherElements, standard
ops on every execution provider). On the CPU with the C++ extension and float32 inputs one kernel
(``csrc/interaction.cpp``) computes only the wanted pairs, eight rows at a time, about three times
faster at 1000 rows than the composed form on one core. Each dot product there is a fixed sequence
of float multiplies and adds, so it matches the composed form to float rounding (not bit for bit:
``bmm``'s summation order is its own). Differentiable in ``vecs`` and ``prefix`` (the backward is
the composed formula: (G + G^T) V with G the gradient scattered back to the (n, n) positions).
"""

from __future__ import annotations

from typing import Any

import torch

from lma.ops import _native


def dot_interaction_reference(vecs: torch.Tensor, pairs: torch.Tensor,
                              prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The composed form (any device, any float dtype); see the module docstring."""
    v = vecs if prefix is None else torch.cat([prefix[:, None, :], vecs], dim=1)
    flat = torch.bmm(v, v.transpose(1, 2)).flatten(1)  # (B, n * n)
    dots = flat.gather(1, pairs.expand(flat.shape[0], -1))  # (B, P)
    return dots if prefix is None else torch.cat([prefix, dots], dim=1)


def _kernel(vecs: torch.Tensor, prefix: torch.Tensor | None) -> Any:
    """The C++ extension if it can take these inputs (CPU, float32), else None."""
    if vecs.device.type != "cpu" or vecs.dtype != torch.float32:
        return None
    if prefix is not None and (prefix.device.type != "cpu" or prefix.dtype != torch.float32):
        return None
    ext = _native.native_module()
    return ext if ext is not None and hasattr(ext, "dot_interaction") else None


def _check(vecs: torch.Tensor, pairs: torch.Tensor, prefix: torch.Tensor | None) -> None:
    if vecs.dim() != 3:
        raise ValueError(f"vecs must be (B, f, d), got shape {tuple(vecs.shape)}")
    if pairs.dim() != 1 or pairs.dtype != torch.int64:
        raise ValueError(f"pairs must be a 1-d int64 tensor, got {pairs.dtype} {tuple(pairs.shape)}")
    if prefix is not None and (prefix.dim() != 2 or prefix.shape[0] != vecs.shape[0]
                               or prefix.shape[1] != vecs.shape[2]):
        raise ValueError(f"prefix must be (B, d) = ({vecs.shape[0]}, {vecs.shape[2]}), "
                         f"got {tuple(prefix.shape)}")


@torch.library.custom_op("lma::dot_interaction", mutates_args=())
def dot_interaction_op(vecs: torch.Tensor, pairs: torch.Tensor,
                       prefix: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring."""
    _check(vecs, pairs, prefix)
    ext = _kernel(vecs, prefix)
    if ext is None:
        return dot_interaction_reference(vecs, pairs, prefix)
    empty = vecs.new_empty((vecs.shape[0], 0))
    return ext.dot_interaction(empty if prefix is None else prefix, vecs, pairs)


@dot_interaction_op.register_fake
def _fake(vecs, pairs, prefix=None):  # noqa: ANN001, ANN202
    k = 0 if prefix is None else prefix.shape[1]
    return vecs.new_empty((vecs.shape[0], k + pairs.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    vecs, pairs, prefix = inputs
    ctx.save_for_backward(vecs, pairs, prefix)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    vecs, pairs, prefix = ctx.saved_tensors
    v = vecs if prefix is None else torch.cat([prefix[:, None, :], vecs], dim=1)
    b, n = v.shape[0], v.shape[1]
    k = 0 if prefix is None else prefix.shape[1]
    g = grad[:, k:].to(v.dtype)
    gmat = torch.zeros((b, n * n), dtype=v.dtype, device=v.device)
    gmat.scatter_add_(1, pairs.expand(b, -1), g)
    gmat = gmat.view(b, n, n)
    gv = torch.bmm(gmat + gmat.transpose(1, 2), v)  # d(v_i . v_j) = v_j dv_i + v_i dv_j
    if prefix is None:
        return gv, None, None
    gprefix = gv[:, 0] + grad[:, :k].to(v.dtype)
    return gv[:, 1:], None, gprefix


dot_interaction_op.register_autograd(_backward, setup_context=_setup_context)


def dot_interaction(vecs: torch.Tensor, pairs: torch.Tensor,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Entry point: ``[prefix, dots at pairs]`` (B, k + P); see the module docstring."""
    return dot_interaction_op(vecs, pairs, prefix)
