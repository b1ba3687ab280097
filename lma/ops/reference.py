"""Pure-torch reference of the hashed gather: slots from hash spec v1, gather, scatter-add.

Every faster implementation (C++ CPU kernel, GPU kernel, ONNX function) must match these indices
bit for bit. This is also the fallback where no native kernel is available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lma import hashspec


@dataclass(frozen=True)
class HashedGatherConfig:
    dim: int
    z: int
    mode: str  # "lma" | "robez"
    aligned: bool
    m: int
    n_subkeys: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.z:
            raise ValueError(f"Z={self.z} must divide the embedding dimension d={self.dim}")
        if self.mode not in ("lma", "robez"):
            raise ValueError(f"mode must be 'lma' or 'robez', got {self.mode!r}")
        hashspec.n_starts(self.m, self.z, self.aligned)  # validates Z <= M

    @property
    def n_blocks(self) -> int:
        return self.dim // self.z

    def params(self) -> hashspec.HashParams:
        return hashspec.make_params(self.seed, self.n_blocks, self.n_subkeys)

    def param_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (nb, 2, 4), B (nb, 2), W (16, nb)) int64 tensors of the spec constants."""
        p = self.params()
        return (torch.from_numpy(p.A), torch.from_numpy(p.B), torch.from_numpy(p.nibble_weights))


def slot_indices_torch(
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    m: int,
    z: int,
    mode: str,
    aligned: bool,
) -> torch.Tensor:
    """(N,) int64 keys -> (N, nb * Z) int64 memory indices, exactly as ``hashspec.slot_indices``."""
    nb = coef_a.shape[0]
    if mode == "lma":
        shifts = torch.arange(hashspec.NIBBLES, device=keys.device, dtype=torch.int64) * 4
        nib = (keys[:, None] >> shifts) & 0xF  # (N, 16)
        bkeys = nib @ nibble_w  # (N, nb) < 2^32
        u = (bkeys[:, :, None] >> torch.tensor([0, 16, 32, 48], device=keys.device)) & 0xFFFF
        x = torch.einsum("nci,cji->ncj", u, coef_a)  # (N, nb, 2) < 2^50
    else:
        u = (keys[:, None] >> torch.tensor([0, 16, 32, 48], device=keys.device)) & 0xFFFF
        x = torch.einsum("ni,cji->ncj", u, coef_a)
    h = torch.remainder(x + coef_b[None], hashspec.P)
    hh = h[..., 0] * hashspec.P + h[..., 1]  # (N, nb) < 2^62
    n = hashspec.n_starts(m, z, aligned)
    starts = torch.remainder(hh, n)
    if aligned:
        starts = starts * z
    idx = starts[:, :, None] + torch.arange(z, device=keys.device, dtype=torch.int64)
    return idx.reshape(keys.shape[0], nb * z)


def hashed_gather_reference(
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
    """(M,) float memory, (B, S) int64 keys -> (B, S, dim). Differentiable in ``memory``."""
    flat = keys.reshape(-1)
    idx = slot_indices_torch(flat, coef_a, coef_b, nibble_w, memory.shape[0], z, mode, aligned)
    return memory[idx].reshape(*keys.shape, dim)


def hashed_gather_backward_reference(
    grad: torch.Tensor,
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    m: int,
    dim: int,
    z: int,
    mode: str,
    aligned: bool,
) -> torch.Tensor:
    """grad (B, S, dim), keys (B, S) -> dense (M,) memory gradient: scatter-add via the slots."""
    flat = keys.reshape(-1)
    idx = slot_indices_torch(flat, coef_a, coef_b, nibble_w, m, z, mode, aligned)
    out = grad.new_zeros(m)
    return out.index_add_(0, idx.reshape(-1), grad.reshape(-1))
