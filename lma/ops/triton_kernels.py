"""Triton kernels of the hashed gather for CUDA tensors: slot indices, forward, backward.

Imported lazily (only when a CUDA tensor reaches the op), so the package works without triton.
Each program handles ``BN`` keys: it computes the (BN, n_blocks) block starts of hash spec v1 in
registers (integer arithmetic in int64, exact), then reads / writes the (BN, n_blocks, Z) tile.
The backward scatters the output gradient with float atomic adds into a dense (M,) gradient.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (used by the tests).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from lma import hashspec

P = hashspec.P


@triton.jit
def _mod_p(x):
    """x mod (2^31 - 1) for 0 <= x < 2^62 (int64), by Mersenne folding."""
    x = (x & 2147483647) + (x >> 31)
    x = (x & 2147483647) + (x >> 31)
    return tl.where(x >= 2147483647, x - 2147483647, x)


@triton.jit
def _block_starts(
    keys_ptr,
    a_ptr,
    b_ptr,
    w_ptr,
    offs_n,
    mask_n,
    offs_c,
    mask_c,
    nb,
    n_starts,
    Z: tl.constexpr,
    BN: tl.constexpr,
    NBP: tl.constexpr,
    LMA: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(BN,) keys -> (BN, NBP) int64 block starts (hash spec v1)."""
    k = tl.load(keys_ptr + offs_n, mask=mask_n, other=0)
    if LMA:
        kk = tl.zeros((BN, NBP), dtype=tl.int64)
        for p in tl.static_range(16):
            nib = (k >> (4 * p)) & 15
            wrow = tl.load(w_ptr + p * nb + offs_c, mask=mask_c, other=0)
            kk += nib[:, None] * wrow[None, :]
    else:
        kk = k[:, None]
    x0 = tl.load(b_ptr + offs_c * 2, mask=mask_c, other=0)[None, :]
    x1 = tl.load(b_ptr + offs_c * 2 + 1, mask=mask_c, other=0)[None, :]
    for i in tl.static_range(4):
        u = (kk >> (16 * i)) & 65535
        a0 = tl.load(a_ptr + offs_c * 8 + i, mask=mask_c, other=0)
        a1 = tl.load(a_ptr + offs_c * 8 + 4 + i, mask=mask_c, other=0)
        x0 = x0 + a0[None, :] * u
        x1 = x1 + a1[None, :] * u
    h = _mod_p(x0) * 2147483647 + _mod_p(x1)
    s = h % n_starts
    if ALIGNED:
        s = s * Z
    return s


@triton.jit
def _gather_kernel(
    mem_ptr,
    keys_ptr,
    a_ptr,
    b_ptr,
    w_ptr,
    out_ptr,
    grad_ptr,
    idx_ptr,
    N,
    nb,
    n_starts,
    DIM,
    Z: tl.constexpr,
    ZP: tl.constexpr,
    NBP: tl.constexpr,
    BN: tl.constexpr,
    LMA: tl.constexpr,
    ALIGNED: tl.constexpr,
    WHAT: tl.constexpr,
):
    """WHAT = 0: forward gather; 1: backward atomic scatter-add; 2: slot indices only."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BN + tl.arange(0, BN).to(tl.int64)
    mask_n = offs_n < N
    offs_c = tl.arange(0, NBP).to(tl.int64)
    mask_c = offs_c < nb
    s = _block_starts(
        keys_ptr,
        a_ptr,
        b_ptr,
        w_ptr,
        offs_n,
        mask_n,
        offs_c,
        mask_c,
        nb,
        n_starts,
        Z,
        BN,
        NBP,
        LMA,
        ALIGNED,
    )
    offs_z = tl.arange(0, ZP).to(tl.int64)
    src = s[:, :, None] + offs_z[None, None, :]
    dst = offs_n[:, None, None] * DIM + offs_c[None, :, None] * Z + offs_z[None, None, :]
    m3 = mask_n[:, None, None] & mask_c[None, :, None] & (offs_z < Z)[None, None, :]
    if WHAT == 0:
        vals = tl.load(mem_ptr + src, mask=m3, other=0.0)
        tl.store(out_ptr + dst, vals, mask=m3)
    elif WHAT == 1:
        g = tl.load(grad_ptr + dst, mask=m3, other=0.0)
        tl.atomic_add(out_ptr + src, g, mask=m3)
    else:
        tl.store(idx_ptr + dst, src, mask=m3)


def _launch(
    what: int,
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    m: int,
    dim: int,
    z: int,
    mode: str,
    aligned: bool,
    memory: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    dev = keys.device
    flat = keys.reshape(-1).contiguous()
    n = flat.numel()
    nb = dim // z
    a = coef_a.to(dev, torch.int64).contiguous()
    b = coef_b.to(dev, torch.int64).contiguous()
    w = nibble_w.to(dev, torch.int64).contiguous()
    n_starts = hashspec.n_starts(m, z, aligned)
    # Tile dims >= 2: a size-1 arange is avoided (masks drop the padding lanes).
    nbp = max(2, triton.next_power_of_2(nb))
    zp = max(2, triton.next_power_of_2(z))
    bn = max(1, min(256, 2048 // (nbp * zp)))
    if what == 0:
        assert memory is not None
        mem = memory.contiguous()
        out = torch.empty((n, dim), dtype=mem.dtype, device=dev)
        args = (mem, out, out, flat)
    elif what == 1:
        assert grad is not None
        g = grad.reshape(-1).contiguous()
        out = torch.zeros(m, dtype=g.dtype, device=dev)
        args = (out, out, g, flat)
    else:
        out = torch.empty((n, dim), dtype=torch.int64, device=dev)
        args = (flat, flat, flat, out)
    if n == 0:
        return out
    mem_arg, out_arg, grad_arg, idx_arg = args
    grid = (triton.cdiv(n, bn),)
    _gather_kernel[grid](
        mem_arg,
        flat,
        a,
        b,
        w,
        out_arg,
        grad_arg,
        idx_arg,
        n,
        nb,
        n_starts,
        dim,
        Z=z,
        ZP=zp,
        NBP=nbp,
        BN=bn,
        LMA=(mode == "lma"),
        ALIGNED=bool(aligned),
        WHAT=what,
    )
    return out


def slot_indices(keys: torch.Tensor, consts: Any, cfg: Any) -> torch.Tensor:
    """(N,) int64 keys -> (N, dim) int64 slot indices (``consts``/``cfg``: see reference.py)."""
    return _launch(2, keys, *consts, cfg.m, cfg.dim, cfg.z, cfg.mode, cfg.aligned)


def forward(memory: torch.Tensor, keys: torch.Tensor, consts: Any, cfg: Any) -> torch.Tensor:
    """memory (M,), keys (...) -> (..., dim)."""
    out = _launch(0, keys, *consts, memory.shape[0], cfg.dim, cfg.z, cfg.mode, cfg.aligned,
                  memory=memory)
    return out.reshape(*keys.shape, cfg.dim)


def backward(grad: torch.Tensor, keys: torch.Tensor, consts: Any, cfg: Any) -> torch.Tensor:
    """grad (..., dim), keys (...) -> dense (M,) gradient (atomic scatter-add)."""
    return _launch(1, keys, *consts, cfg.m, cfg.dim, cfg.z, cfg.mode, cfg.aligned, grad=grad)


@triton.jit
def _key_lookup_kernel(keys_ptr, def_ptr, table_ptr, out_ptr, N, BN: tl.constexpr):
    """Key table v3 lookup (hashspec "Key tables"): BN keys per program; M, G and A from the
    table's first rows, then per key its group's displacement and its one (key, value) slot."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BN + tl.arange(0, BN).to(tl.int64)
    mask = offs < N
    m = tl.load(table_ptr)
    n_groups = tl.load(table_ptr + 1)
    mult = tl.load(table_ptr + 2)
    k = tl.load(keys_ptr + offs, mask=mask, other=0)
    y = k * mult  # the int64 product wraps with the bits of the unsigned one
    lo = y & 4294967295  # non-negative int64: the low 32 bits
    hi = (y >> 32) & 4294967295  # the high 32 bits, unsigned (arithmetic shift, then mask)
    # Every operand of % is non-negative, so % (which truncates, like C) is the spec's remainder.
    g = hi % n_groups
    s0 = lo % m
    s1 = 1 + hi % (m - 1)
    disp = tl.load(table_ptr + 2 * (2 + m) + g, mask=mask, other=0)
    slot = (s0 + disp * s1) % m
    key = tl.load(table_ptr + 4 + 2 * slot, mask=mask, other=0)
    hit = (key == k) & mask
    v = tl.load(table_ptr + 5 + 2 * slot, mask=hit, other=0)
    d = tl.load(def_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.where(hit, v, d), mask=mask)


def key_lookup(keys: torch.Tensor, default: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(...) int64 keys -> (...) int64 values or defaults; ``table`` a key table v3 (rows, 2)."""
    dev = keys.device
    flat = keys.reshape(-1).contiguous()
    d = default.to(dev, torch.int64).expand(keys.shape).reshape(-1).contiguous()
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        bn = 128
        _key_lookup_kernel[(triton.cdiv(n, bn),)](
            flat, d, table.to(dev, torch.int64).contiguous(), out, n, BN=bn,
        )
    return out.reshape(keys.shape)
