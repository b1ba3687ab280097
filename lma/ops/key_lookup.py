"""Constant-time key resolution: the ``lma::key_lookup`` op over a key table (hash spec, "Key
tables" in ``lma/hashspec.py``): token -> full-table row, LMA signature or QR row.

    lma::key_lookup(keys (...) int64, default (broadcastable to keys) int64, slots (nb, 8) int64,
                    values (nb * 8,) int64, coef_a (2, 2, 4) int64, coef_b (2, 2) int64)
        -> (...) int64: the value of each key in the table, else its default

Two cache lines of keys per query instead of a 17-25-step binary search. Implementations, chosen
by device like ``lma::hashed_gather``: the C++ extension on CPU, a Triton kernel on CUDA, the
pure-torch reference otherwise; the ONNX exporter writes one ``ai.lma::KeyLookup`` node whose
model-local function uses standard ops with CUDA kernels (``model_export/onnx_op.py``).
:class:`KeyLookup` holds a table's tensors as non-persistent buffers (rebuilt from the
vocabulary or signature table, so checkpoints and their state dicts are unchanged).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lma import hashspec
from lma.ops._op import implementation


def bucket_pair_torch(keys: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor,
                      n_buckets: int) -> torch.Tensor:
    """(N,) int64 keys -> (N, 2) candidate buckets, exactly as ``hashspec.bucket_pair``."""
    shifts = torch.tensor([0, 16, 32, 48], device=keys.device)
    u = (keys[:, None] >> shifts) & 0xFFFF  # (N, 4)
    # Broadcast product and integer sum (no int64 matmul: CUDA has none); every sum < 2^50.
    x = (u[:, None, None, :] * coef_a[None].to(keys.device)).sum(-1)  # (N, 2, 2)
    h = torch.remainder(x + coef_b[None].to(keys.device), hashspec.P)
    hh = h[..., 0] * hashspec.P + h[..., 1]  # (N, 2) < 2^62
    b0 = torch.remainder(hh[:, 0], n_buckets)
    b1 = torch.remainder(b0 + 1 + torch.remainder(hh[:, 1], n_buckets - 1), n_buckets)
    return torch.stack([b0, b1], dim=1)


def key_lookup_reference(keys: torch.Tensor, default: torch.Tensor, slots: torch.Tensor,
                         values: torch.Tensor, coef_a: torch.Tensor,
                         coef_b: torch.Tensor) -> torch.Tensor:
    """Pure-torch key lookup (any device); the ground truth the other implementations match."""
    flat = keys.reshape(-1)
    nb = slots.shape[0]
    b = bucket_pair_torch(flat, coef_a, coef_b, nb)  # (N, 2)
    cand = slots[b].reshape(flat.shape[0], 2 * hashspec.BUCKET)  # two cache lines per key
    eq = cand == flat[:, None]
    hit = eq.any(dim=1)
    pos = eq.to(torch.uint8).argmax(dim=1)  # first matching slot (at most one matches)
    bucket = b.gather(1, (pos // hashspec.BUCKET)[:, None]).squeeze(1)
    got = values[bucket * hashspec.BUCKET + pos % hashspec.BUCKET]
    out = torch.where(hit, got, torch.zeros_like(got)).reshape(keys.shape)
    return torch.where(hit.reshape(keys.shape), out, default.to(out.dtype).expand(keys.shape))


@torch.library.custom_op("lma::key_lookup", mutates_args=())
def key_lookup_op(keys: torch.Tensor, default: torch.Tensor, slots: torch.Tensor,
                  values: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """(...) int64 keys -> (...) int64 values (default where absent); see the module docstring."""
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    return implementation(keys.device).key_lookup(keys, default, slots, values, coef_a, coef_b)


@key_lookup_op.register_fake
def _key_lookup_fake(keys, default, slots, values, coef_a, coef_b):  # noqa: ANN001, ANN202
    return keys.new_empty(keys.shape)


def key_lookup(keys: torch.Tensor, default: torch.Tensor, slots: torch.Tensor,
               values: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """Entry point: value of each key in the table, else ``default`` (broadcast to keys)."""
    return key_lookup_op(keys, default, slots, values, coef_a, coef_b)


class KeyLookup(nn.Module):
    """A key table as (non-persistent) buffers: ``forward(keys, default) -> values``."""

    def __init__(self, table: hashspec.KeyTable):
        super().__init__()
        p = table.params
        self.seed = table.seed
        self.n_keys = table.n_keys
        self.register_buffer("slots", torch.from_numpy(table.slots), persistent=False)
        self.register_buffer("values", torch.from_numpy(table.values), persistent=False)
        self.register_buffer("coef_a", torch.from_numpy(p.A), persistent=False)
        self.register_buffer("coef_b", torch.from_numpy(p.B), persistent=False)

    @classmethod
    def build(cls, keys: np.ndarray, values: np.ndarray, seed: int = 0) -> KeyLookup:
        return cls(hashspec.build_key_table(keys, values, seed=seed))

    def forward(self, keys: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
        return key_lookup(keys, default, self.slots, self.values, self.coef_a, self.coef_b)

    def nbytes(self) -> int:
        return int(self.slots.numel() * 8 + self.values.numel() * 8)

    def extra_repr(self) -> str:
        return f"keys={self.n_keys}, buckets={self.slots.shape[0]}, seed={self.seed}"
