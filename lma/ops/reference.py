"""Pure-torch reference of the hashed gather: slots from hash spec v1, gather, scatter-add.

Every faster implementation (C++ CPU kernel, GPU kernel, ONNX function) must match these indices
bit for bit. This is also the fallback where no native kernel is available.

Every implementation takes the op's parameters as one :class:`HashedGatherConfig` (layout: d, Z,
mode, aligned, M; and how its constants were made: T, seed) plus the constants as one
:class:`GatherConstants` of tensors (which live on the module's device, as buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from lma import hashspec


class GatherConstants(NamedTuple):
    """The int64 spec-v1 constants as tensors: A (nb, 2, 4), B (nb, 2), W (16, nb)."""

    a: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor

    def to(self, device: torch.device) -> GatherConstants:
        return GatherConstants(*(t.to(device) for t in self))


@dataclass(frozen=True)
class HashedGatherConfig:
    """Parameters of one hashed gather: what every implementation of the op receives."""

    dim: int
    z: int
    mode: str  # "lma" | "robez"
    aligned: bool
    m: int
    n_subkeys: int = 8  # T: how W was made (the implementations read the constants)
    seed: int = 0  # hash seed the constants derive from

    def __post_init__(self) -> None:
        if self.z < 1 or self.dim % self.z:
            raise ValueError(f"Z={self.z} must divide the embedding dimension d={self.dim}")
        if self.mode not in ("lma", "robez"):
            raise ValueError(f"mode must be 'lma' or 'robez', got {self.mode!r}")
        hashspec.n_starts(self.m, self.z, self.aligned)  # validates Z <= M

    @classmethod
    def of_op(cls, m: int, dim: int, z: int, mode: str, aligned: bool) -> HashedGatherConfig:
        """The config of the custom op's flat arguments (its schema, fixed for saved programs)."""
        return cls(dim=int(dim), z=int(z), mode=str(mode), aligned=bool(aligned), m=int(m))

    def with_m(self, m: int) -> HashedGatherConfig:
        return replace(self, m=int(m))

    @property
    def n_blocks(self) -> int:
        return self.dim // self.z

    @property
    def n_starts(self) -> int:
        return hashspec.n_starts(self.m, self.z, self.aligned)

    def op_args(self) -> tuple[int, int, str, bool]:
        """(dim, z, mode, aligned): the op's non-tensor arguments."""
        return self.dim, self.z, self.mode, self.aligned

    def params(self) -> hashspec.HashParams:
        return hashspec.make_params(self.seed, self.n_blocks, self.n_subkeys)

    def param_tensors(self) -> GatherConstants:
        """The spec constants of ``seed`` as tensors (A (nb, 2, 4), B (nb, 2), W (16, nb))."""
        p = self.params()
        return GatherConstants(torch.from_numpy(p.A), torch.from_numpy(p.B),
                               torch.from_numpy(p.nibble_weights))

    def check(self, consts: GatherConstants) -> None:
        if consts.a.shape[0] != self.n_blocks:
            raise ValueError(f"need coef_a.shape[0] == dim / Z (dim={self.dim}, Z={self.z}, "
                             f"coef_a {tuple(consts.a.shape)})")


def slot_indices_torch(keys: torch.Tensor, consts: GatherConstants,
                       cfg: HashedGatherConfig) -> torch.Tensor:
    """(N,) int64 keys -> (N, nb * Z) int64 memory indices, exactly as ``hashspec.slot_indices``."""
    a, b, w = GatherConstants(*consts).to(keys.device)
    nb = a.shape[0]
    shifts16 = torch.tensor([0, 16, 32, 48], device=keys.device)
    if cfg.mode == "lma":
        shifts = torch.arange(hashspec.NIBBLES, device=keys.device, dtype=torch.int64) * 4
        nib = (keys[:, None] >> shifts) & 0xF  # (N, 16)
        bkeys = (nib[:, :, None] * w[None]).sum(1)  # (N, nb) < 2^32 (no int64 matmul on CUDA)
        u = (bkeys[:, :, None] >> shifts16) & 0xFFFF  # (N, nb, 4)
    else:
        u = ((keys[:, None] >> shifts16) & 0xFFFF)[:, None, :]  # (N, 1, 4)
    x = (u[:, :, None, :] * a[None]).sum(-1)  # (N, nb, 2) < 2^50
    h = torch.remainder(x + b[None], hashspec.P)
    hh = h[..., 0] * hashspec.P + h[..., 1]  # (N, nb) < 2^62
    starts = torch.remainder(hh, cfg.n_starts)
    if cfg.aligned:
        starts = starts * cfg.z
    idx = starts[:, :, None] + torch.arange(cfg.z, device=keys.device, dtype=torch.int64)
    return idx.reshape(keys.shape[0], nb * cfg.z)


def hashed_gather_reference(memory: torch.Tensor, keys: torch.Tensor, consts: GatherConstants,
                            cfg: HashedGatherConfig) -> torch.Tensor:
    """(M,) float memory, (B, S) int64 keys -> (B, S, dim). Differentiable in ``memory``."""
    idx = slot_indices_torch(keys.reshape(-1), consts, cfg.with_m(memory.shape[0]))
    return memory[idx].reshape(*keys.shape, cfg.dim)


def hashed_gather_backward_reference(grad: torch.Tensor, keys: torch.Tensor,
                                     consts: GatherConstants,
                                     cfg: HashedGatherConfig) -> torch.Tensor:
    """grad (B, S, dim), keys (B, S) -> dense (M,) memory gradient: scatter-add via the slots."""
    idx = slot_indices_torch(keys.reshape(-1), consts, cfg)
    out = grad.new_zeros(cfg.m)
    return out.index_add_(0, idx.reshape(-1), grad.reshape(-1))


def compose_hot_gather(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``lma::hot_gather`` made of a backend's hashed gather: the cold tokens (index < 0) are
    picked out, gathered with ``forward`` as a batch of their own, and scattered back beside the
    hot rows. Each row of the hashed gather depends on its own key alone, so the cold rows are
    exactly those a gather of all keys would give."""

    def hot_gather(memory: torch.Tensor, hot: torch.Tensor, index: torch.Tensor,
                   keys: torch.Tensor, c: GatherConstants, cfg: HashedGatherConfig) -> torch.Tensor:
        dev = memory.device
        flat_i = index.reshape(-1).to(dev)
        flat_k = keys.reshape(-1).to(dev)
        out = memory.new_empty((flat_i.shape[0], cfg.dim))
        cold = (flat_i < 0).nonzero().squeeze(1)
        warm = (flat_i >= 0).nonzero().squeeze(1)
        if warm.numel():
            out[warm] = hot.to(dev)[flat_i[warm]]
        if cold.numel():
            out[cold] = forward(memory, flat_k[cold], c, cfg).reshape(-1, cfg.dim)
        return out.reshape(*index.shape, cfg.dim)

    return hot_gather


def hot_gather_reference(memory: torch.Tensor, hot: torch.Tensor, index: torch.Tensor,
                         keys: torch.Tensor, consts: GatherConstants,
                         cfg: HashedGatherConfig) -> torch.Tensor:
    """Pure-torch ``lma::hot_gather``: ``hot[index]`` where index >= 0, else the reference
    hashed gather of ``keys``; (...) index and keys -> (..., dim)."""
    gather = compose_hot_gather(
        lambda m, k, c, g: hashed_gather_reference(m, k, GatherConstants(*c).to(m.device), g))
    return gather(memory, hot, index, keys, consts, cfg.with_m(memory.shape[0]))
