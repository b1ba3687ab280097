"""Hashed gather: (memory (M,), keys (B, S) int64) -> (B, S, d), slots from hash spec v1.

:func:`hashed_gather` is the entry point the embedding modules call. It runs the custom operator
``torch.ops.lma.hashed_gather`` (see ``_op.py``), which picks the fastest implementation for the
tensors' device (C++ on CPU, Triton on CUDA, pure torch otherwise) and is differentiable in
``memory``, traceable by ``torch.compile`` / ``torch.export``, and exported to ONNX as one
``ai.lma::HashedGather`` node. The pure-torch reference lives in ``reference.py``.
"""

from __future__ import annotations

import torch

from lma.ops._op import hashed_gather_op
from lma.ops.reference import HashedGatherConfig, slot_indices_torch

__all__ = ["HashedGatherConfig", "hashed_gather", "slot_indices_torch"]


def hashed_gather(
    memory: torch.Tensor,
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    dim: int,
    z: int,
    mode: str,
    aligned: bool,
) -> torch.Tensor:
    """(M,) float memory, (B, S) int64 keys -> (B, S, dim). Differentiable in ``memory``.

    coef_a (nb, 2, 4), coef_b (nb, 2), nibble_w (16, nb) are the int64 spec-v1 constants
    (``HashedGatherConfig.param_tensors``); nb = dim / z. ``mode`` is "lma" (keys are 64-bit
    minhash signatures) or "robez" (keys are token ids); ``aligned`` puts blocks at multiples of z.
    """
    return hashed_gather_op(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned)
