"""The ``lma::hashed_gather`` custom operator (torch.library) and its implementation dispatch.

Ops:
    lma::hashed_gather(memory (M,), keys (...) int64, coef_a (nb,2,4), coef_b (nb,2),
                       nibble_w (16,nb), dim, z, mode, aligned) -> (..., dim)
    lma::hashed_gather_backward(grad (..., dim), keys, coef_a, coef_b, nibble_w, m, dim, z, mode,
                                aligned) -> (M,) dense gradient (scatter-add)

Both have fake (meta) implementations, so they trace under ``torch.compile`` and ``torch.export``;
the forward's autograd formula calls the backward op. Implementations, chosen per call:
CUDA tensors -> Triton kernels (``triton_kernels.py``, imported lazily); CPU tensors -> the C++
extension (``csrc/hashed_gather.cpp``); otherwise (no triton, no compiler, other devices, or
``LMA_DISABLE_NATIVE_OPS=1``) the pure-torch reference, with one logged warning.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from lma.ops import _native
from lma.ops.reference import (
    hashed_gather_backward_reference,
    hashed_gather_reference,
    slot_indices_torch,
)

logger = logging.getLogger(__name__)

_triton: ModuleType | None = None
_triton_tried = False
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def triton_module() -> ModuleType | None:
    """The Triton kernels module, or None if triton is missing or disabled."""
    global _triton, _triton_tried
    if _native.native_disabled():
        return None
    if not _triton_tried:
        _triton_tried = True
        try:
            from lma.ops import triton_kernels

            _triton = triton_kernels
        except Exception as exc:  # noqa: BLE001 - missing / broken triton means fallback
            _warn_once(
                "triton",
                "Triton kernels unavailable (%s: %s); CUDA tensors use the pure-torch hashed gather",
                type(exc).__name__,
                exc,
            )
    return _triton


def backend_for(device: torch.device) -> str:
    """Which implementation a tensor on ``device`` gets: 'cpp', 'triton' or 'torch'."""
    if device.type == "cpu":
        return "cpp" if _native.native_module() is not None else "torch"
    if device.type == "cuda":
        return "triton" if triton_module() is not None else "torch"
    return "torch"


def _check(
    memory: torch.Tensor, keys: torch.Tensor, coef_a: torch.Tensor, dim: int, z: int, mode: str
) -> None:
    if memory.dim() != 1:
        raise ValueError(f"memory must be 1-d (M,), got shape {tuple(memory.shape)}")
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    if mode not in ("lma", "robez"):
        raise ValueError(f"mode must be 'lma' or 'robez', got {mode!r}")
    if z < 1 or dim % z or coef_a.shape[0] != dim // z:
        raise ValueError(
            f"need Z | dim and coef_a.shape[0] == dim / Z (dim={dim}, Z={z}, "
            f"coef_a {tuple(coef_a.shape)})"
        )


@torch.library.custom_op("lma::hashed_gather", mutates_args=())
def hashed_gather_op(
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
    """(M,) memory, (...) int64 keys -> (..., dim) gathered blocks (see module docstring)."""
    _check(memory, keys, coef_a, dim, z, mode)
    backend = backend_for(memory.device)
    if backend == "cpp":
        ext = _native.native_module()
        assert ext is not None
        return ext.forward(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode == "lma", aligned)
    if backend == "triton":
        tk = triton_module()
        assert tk is not None
        return tk.forward(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned)
    dev = memory.device
    return hashed_gather_reference(
        memory,
        keys.to(dev),
        coef_a.to(dev),
        coef_b.to(dev),
        nibble_w.to(dev),
        dim,
        z,
        mode,
        aligned,
    )


@hashed_gather_op.register_fake
def _hashed_gather_fake(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    return memory.new_empty((*keys.shape, dim))


@torch.library.custom_op("lma::hashed_gather_backward", mutates_args=())
def hashed_gather_backward_op(
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
    """grad (..., dim), keys (...) -> (M,) dense memory gradient (scatter-add via the slots)."""
    backend = backend_for(grad.device)
    if backend == "cpp":
        ext = _native.native_module()
        assert ext is not None
        return ext.backward(
            grad, keys, coef_a, coef_b, nibble_w, m, dim, z, mode == "lma", aligned, "auto"
        )
    if backend == "triton":
        tk = triton_module()
        assert tk is not None
        return tk.backward(grad, keys, coef_a, coef_b, nibble_w, m, dim, z, mode, aligned)
    dev = grad.device
    return hashed_gather_backward_reference(
        grad,
        keys.to(dev),
        coef_a.to(dev),
        coef_b.to(dev),
        nibble_w.to(dev),
        m,
        dim,
        z,
        mode,
        aligned,
    )


@hashed_gather_backward_op.register_fake
def _hashed_gather_backward_fake(grad, keys, coef_a, coef_b, nibble_w, m, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    return grad.new_empty((m,))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned = inputs
    ctx.save_for_backward(keys, coef_a, coef_b, nibble_w)
    ctx.cfg = (memory.shape[0], dim, z, mode, aligned)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    keys, coef_a, coef_b, nibble_w = ctx.saved_tensors
    m, dim, z, mode, aligned = ctx.cfg
    g = None
    if ctx.needs_input_grad[0]:
        g = hashed_gather_backward_op(
            grad.contiguous(), keys, coef_a, coef_b, nibble_w, m, dim, z, mode, aligned
        )
    return g, None, None, None, None, None, None, None, None


hashed_gather_op.register_autograd(_backward, setup_context=_setup_context)


def slot_indices(
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    m: int,
    z: int,
    mode: str,
    aligned: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """(N,) int64 keys -> (N, nb * Z) int64 slot indices with the chosen (or automatic) backend."""
    backend = backend or backend_for(keys.device)
    flat = keys.reshape(-1)
    dim = coef_a.shape[0] * z
    if backend == "cpp":
        ext = _native.native_module()
        if ext is None:
            raise RuntimeError(f"native CPU kernels unavailable: {_native.native_error()}")
        return ext.slot_indices(flat, coef_a, coef_b, nibble_w, m, z, mode == "lma", aligned)
    if backend == "triton":
        tk = triton_module()
        if tk is None:
            raise RuntimeError("triton kernels unavailable")
        return tk.slot_indices(flat, coef_a, coef_b, nibble_w, m, z, mode, aligned, dim)
    dev = keys.device
    return slot_indices_torch(
        flat, coef_a.to(dev), coef_b.to(dev), nibble_w.to(dev), m, z, mode, aligned
    )
