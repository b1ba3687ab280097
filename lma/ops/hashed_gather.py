"""Hashed gather: (memory (M,), keys (B, S) int64) -> (B, S, d), slots from hash spec v1.

:func:`hashed_gather` is the entry point the embedding modules call. It runs the custom operator
``torch.ops.lma.hashed_gather`` (see ``_op.py``), which picks the fastest implementation for the
tensors' device (C++ on CPU, Triton on CUDA, pure torch otherwise) and is differentiable in
``memory``, traceable by ``torch.compile`` / ``torch.export``, and exported to ONNX as one
``ai.lma::HashedGather`` node. The pure-torch reference lives in ``reference.py``.
"""

from __future__ import annotations

import torch

from lma.ops._op import hashed_gather_op, hot_embed_op, hot_gather_op
from lma.ops.reference import GatherConstants, HashedGatherConfig, slot_indices_torch

__all__ = ["GatherConstants", "HashedGatherConfig", "hashed_gather", "hot_embed", "hot_gather",
           "slot_indices_torch"]


def hashed_gather(memory: torch.Tensor, keys: torch.Tensor, consts: GatherConstants,
                  cfg: HashedGatherConfig) -> torch.Tensor:
    """(M,) float memory, (B, S) int64 keys -> (B, S, dim). Differentiable in ``memory``.

    ``consts`` are the int64 spec-v1 constants (``cfg.param_tensors()``, or a module's buffers);
    ``cfg.mode`` is "lma" (keys are 64-bit minhash signatures) or "robez" (token ids).
    """
    a, b, w = consts
    cfg.check(GatherConstants(a, b, w))
    return hashed_gather_op(memory, keys, a, b, w, *cfg.op_args())


def hot_gather(memory: torch.Tensor, hot: torch.Tensor, index: torch.Tensor, keys: torch.Tensor,
               consts: GatherConstants, cfg: HashedGatherConfig) -> torch.Tensor:
    """The serving form of the gather: ``hot[index]`` where ``index >= 0`` (rows computed
    ahead, e.g. an LMA embedding's signed tokens), else exactly ``hashed_gather(memory, keys)``.
    (M,) memory, (H, dim) hot rows of the memory's dtype, (...) int64 index (-1 = cold) and keys
    -> (..., dim). Inference only: its backward raises."""
    a, b, w = consts
    cfg.check(GatherConstants(a, b, w))
    return hot_gather_op(memory, hot, index, keys, a, b, w, *cfg.op_args())


def hot_embed(memory: torch.Tensor, hot: torch.Tensor, table: torch.Tensor, tokens: torch.Tensor,
              consts: GatherConstants, cfg: HashedGatherConfig) -> torch.Tensor:
    """``hot_gather`` of the hot rows the key table ``table`` (token -> hot row) gives each
    token, -1 (cold: hashed) where it has none; the lookup and the gather in one pass on the
    CPU. Inference only."""
    a, b, w = consts
    cfg.check(GatherConstants(a, b, w))
    return hot_embed_op(memory, hot, table, tokens, a, b, w, *cfg.op_args())
