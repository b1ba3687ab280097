"""ROBE-Z / HashedNet: every field's embeddings read blocks of one shared float memory.

A token's d-dim embedding is ``d / Z`` blocks of ``Z`` contiguous floats of ``memory`` (M floats,
M = the parameter budget), each block at a start given by hash spec v1 of (token hash, block).
``Z = 1`` is HashedNet (every element hashed on its own); larger Z reads whole cache lines.

Initialisation: U(+-1/sqrt(d)), the distribution the full tables use. Every output element is
one memory float, so at the start of training each embedding element has exactly the variance it
would have in a full table (1 / (3 d)) and the DLRM interaction sees the same scale whatever the
kind; no re-tuning of learning rates between kinds is needed.

The backward of the gather is a scatter-add of the (B, S, d) output gradient into a dense (M,)
gradient (done by autograd of ``hashed_gather``); the memory is trained as a dense parameter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lma.embeddings.base import Embedding, EmbeddingSpec, as_compute_dtype, register
from lma.embeddings.tables import SPARSE_THRESHOLD
from lma.features import FeatureMap
from lma.ops import GatherConstants, HashedGatherConfig, hashed_gather, slot_indices

# Default block size: Z = 1 is HashedNet, the baseline of the LMA paper and the finest sharing.
DEFAULT_Z = 1


def init_memory(memory: torch.Tensor, dim: int, seed: int) -> None:
    """U(+-1/sqrt(d)) in place, from a generator seeded with ``seed`` (reproducible on CPU)."""
    bound = 1.0 / dim**0.5
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        memory.copy_(torch.empty(memory.shape).uniform_(-bound, bound, generator=g))


class SharedMemoryEmbedding(Embedding):
    """Base of the kinds that hash into one shared (M,) memory (``robez``, ``lma``).

    Options (``spec.options``): ``z`` block size (divides d), ``aligned`` (blocks at multiples of
    Z), ``seed`` (hash seed; default ``spec.seed``), ``t`` (LMA sub-keys per block key).
    """

    mode: ClassVar[str]
    default_z: ClassVar[int] = DEFAULT_Z

    def __init__(self, spec: EmbeddingSpec):
        super().__init__(spec)
        opts = spec.options
        self.z = int(opts.get("z", self.default_z))
        self.aligned = bool(opts.get("aligned", False))
        self.hash_seed = int(opts.get("seed", spec.seed))
        self.n_subkeys = int(opts.get("t", 8))
        m = int(spec.n_params)
        if spec.dim % self.z:
            raise ValueError(f"option z={self.z} must divide the embedding dimension d={spec.dim}")
        if m < self.z:
            raise ValueError(
                f"parameter budget {m} is below one block (z={self.z}): lower the compression "
                "or the block size"
            )
        self.gather_config = HashedGatherConfig(
            dim=spec.dim, z=self.z, mode=self.mode, aligned=self.aligned, m=m,
            n_subkeys=self.n_subkeys, seed=self.hash_seed,
        )
        a, b, w = self.gather_config.param_tensors()
        # Derived from the hash seed, so not part of the state dict.
        self.register_buffer("coef_a", a, persistent=False)  # (nb, 2, 4) int64
        self.register_buffer("coef_b", b, persistent=False)  # (nb, 2) int64
        self.register_buffer("nibble_w", w, persistent=False)  # (16, nb) int64
        self.memory = nn.Parameter(torch.empty(m))  # (M,)
        init_memory(self.memory, spec.dim, spec.seed)
        # Large memories train with sparse gradients: a dense (M,) gradient and optimizer step
        # per batch would cost more than the lookups themselves (option sparse: true/false).
        sparse_opt = opts.get("sparse", "auto")
        self.sparse = m > SPARSE_THRESHOLD if sparse_opt in ("auto", None) else bool(sparse_opt)

    def gather_constants(self) -> GatherConstants:
        """The hash constants (buffers, on the module's device)."""
        return GatherConstants(self.coef_a, self.coef_b, self.nibble_w)

    def gather(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 keys -> (B, S, d) blocks of the memory."""
        consts = self.gather_constants()
        if self.sparse and self.training and torch.is_grad_enabled():
            idx = slot_indices(keys.reshape(-1), consts, self.gather_config)  # (N, d)
            return _SparseGather.apply(self.memory, idx).reshape(*keys.shape, self.dim)
        return as_compute_dtype(hashed_gather(self.memory, keys, consts, self.gather_config))

    def resolved_options(self) -> dict[str, Any]:
        return {"z": self.z, "aligned": self.aligned, "seed": self.hash_seed}

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["options"] = {**cfg["options"], **self.resolved_options()}
        return cfg

    def extra_state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.memory] if self.sparse else []


class _SparseGather(torch.autograd.Function):
    """memory[idx] whose gradient w.r.t. the (M,) memory is a sparse COO tensor (nnz = idx.numel()),
    for optimizers that update only the touched slots (SparseAdam, Adagrad, SGD)."""

    @staticmethod
    def forward(ctx: Any, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.m = memory.shape[0]
        return memory.index_select(0, idx.reshape(-1)).view(idx.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(idx.reshape(1, -1), grad.reshape(-1), (ctx.m,),
                                    check_invariants=False)
        return g, None


@register
class RobeZEmbedding(SharedMemoryEmbedding):
    """ROBE-Z (HashedNet at Z = 1): key = token hash; no per-token state at serving."""

    kind = "robez"
    mode = "robez"

    @classmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> RobeZEmbedding:
        return cls(spec)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S, d)."""
        return self.gather(tokens)
