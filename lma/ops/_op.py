"""The ``lma::hashed_gather`` custom operator (torch.library) and its one device dispatch.

Ops (their schemas are fixed: saved programs, ``model.pt2``, refer to them):
    lma::hashed_gather(memory (M,), keys (...) int64, coef_a (nb,2,4), coef_b (nb,2),
                       nibble_w (16,nb), dim, z, mode, aligned) -> (..., dim)
    lma::hashed_gather_backward(grad (..., dim), keys, coef_a, coef_b, nibble_w, m, dim, z, mode,
                                aligned) -> (M,) dense gradient (scatter-add)
    lma::hot_gather(memory (M,), hot (H, dim), index (...) int64, keys (...) int64, coef_a,
                    coef_b, nibble_w, dim, z, mode, aligned) -> (..., dim): hot[index] where
                    index >= 0, else exactly lma::hashed_gather of keys (the serving form of an
                    LMA embedding whose signed tokens' rows were computed at export; inference
                    only: its backward raises)
    lma::hot_embed(memory, hot, table (rows, 2) int64, tokens (...) int64, coef_a, coef_b,
                   nibble_w, dim, z, mode, aligned) -> (..., dim): lma::hot_gather of the hot
                   rows the key table gives each token (lma::key_lookup, -1 where absent), in
                   one pass on the CPU (what an LMA embedding in the hot form runs)

All have fake (meta) implementations, so they trace under ``torch.compile`` and ``torch.export``;
the forward's autograd formula calls the backward op. Inside, the flat arguments become one
:class:`HashedGatherConfig` and one :class:`GatherConstants`, and :func:`implementation` picks,
once per call, the :class:`Backend` for the tensors' device: CUDA -> Triton kernels
(``triton_kernels.py``, imported lazily); CPU -> the C++ extension (``csrc/hashed_gather.cpp``);
otherwise (no triton, no compiler, other devices, or ``LMA_DISABLE_NATIVE_OPS=1``) the pure-torch
reference, with one logged warning. ``lma::key_lookup`` (``key_lookup.py``) uses the same
dispatch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import torch

from lma import hashspec
from lma.ops import _native
from lma.ops.reference import (
    GatherConstants,
    HashedGatherConfig,
    compose_hot_gather,
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


class Backend(NamedTuple):
    """One implementation of the ops, all with the same signatures."""

    name: str
    forward: Callable[[torch.Tensor, torch.Tensor, GatherConstants, HashedGatherConfig], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, GatherConstants, HashedGatherConfig], torch.Tensor]
    slot_indices: Callable[[torch.Tensor, GatherConstants, HashedGatherConfig], torch.Tensor]
    key_lookup: Callable[..., torch.Tensor]
    # (memory, hot, index, keys, consts, cfg) -> (..., dim); see hot_gather_op.
    hot_gather: Callable[..., torch.Tensor]
    # (memory, hot, table, tokens, consts, cfg) -> (..., dim); see hot_embed_op. None: composed
    # of key_lookup and hot_gather (compose_hot_embed).
    hot_embed: Callable[..., torch.Tensor] | None = None

    def embed(self, memory: torch.Tensor, hot: torch.Tensor, table: torch.Tensor,
              tokens: torch.Tensor, c: GatherConstants, cfg: HashedGatherConfig) -> torch.Tensor:
        """``lma::hot_embed`` with this backend: its fused kernel, or lookup then hot gather."""
        if self.hot_embed is not None:
            return self.hot_embed(memory, hot, table, tokens, c, cfg)
        index = self.key_lookup(tokens, torch.full((), -1, dtype=torch.int64,
                                                   device=tokens.device), table)
        return self.hot_gather(memory, hot, index, tokens, c, cfg)


def _cpp_backend(ext: ModuleType) -> Backend:
    def fwd(memory, keys, c, cfg):  # noqa: ANN001, ANN202
        return ext.forward(memory, keys, *c, cfg.dim, cfg.z, cfg.mode == "lma", cfg.aligned)

    def bwd(grad, keys, c, cfg):  # noqa: ANN001, ANN202
        return ext.backward(grad, keys, *c, cfg.m, cfg.dim, cfg.z, cfg.mode == "lma",
                            cfg.aligned, "auto")

    def idx(keys, c, cfg):  # noqa: ANN001, ANN202
        return ext.slot_indices(keys, *c, cfg.m, cfg.z, cfg.mode == "lma", cfg.aligned)

    def hot(memory, hot_rows, index, keys, c, cfg):  # noqa: ANN001, ANN202
        return ext.hot_gather(memory, hot_rows, index, keys, *c, cfg.dim, cfg.z,
                              cfg.mode == "lma", cfg.aligned)

    def embed(memory, hot_rows, table, tokens, c, cfg):  # noqa: ANN001, ANN202
        return ext.hot_embed(memory, hot_rows, table, tokens, *c, cfg.dim, cfg.z,
                             cfg.mode == "lma", cfg.aligned)

    return Backend("cpp", fwd, bwd, idx, ext.key_lookup, hot, embed)


def _torch_backend() -> Backend:
    from lma.ops.key_lookup import key_lookup_reference

    def fwd(memory, keys, c, cfg):  # noqa: ANN001, ANN202
        dev = memory.device
        return hashed_gather_reference(memory, keys.to(dev), GatherConstants(*c).to(dev), cfg)

    def bwd(grad, keys, c, cfg):  # noqa: ANN001, ANN202
        dev = grad.device
        return hashed_gather_backward_reference(grad, keys.to(dev), GatherConstants(*c).to(dev), cfg)

    return Backend("torch", fwd, bwd, slot_indices_torch, key_lookup_reference,
                   compose_hot_gather(fwd))


def implementation(device: torch.device, name: str | None = None) -> Backend:
    """The one device dispatch: the backend for ``device`` (or the one named, if available)."""
    name = name or backend_for(device)
    if name == "cpp":
        ext = _native.native_module()
        if ext is None:
            raise RuntimeError(f"native CPU kernels unavailable: {_native.native_error()}")
        return _cpp_backend(ext)
    if name == "triton":
        tk = triton_module()
        if tk is None:
            raise RuntimeError("triton kernels unavailable")
        return Backend("triton", tk.forward, tk.backward, tk.slot_indices, tk.key_lookup,
                       compose_hot_gather(tk.forward))
    if name == "torch":
        return _torch_backend()
    raise ValueError(f"unknown backend {name!r}; choose cpp, triton or torch")


def _check(memory: torch.Tensor, keys: torch.Tensor, consts: GatherConstants,
           cfg: HashedGatherConfig) -> None:
    if memory.dim() != 1:
        raise ValueError(f"memory must be 1-d (M,), got shape {tuple(memory.shape)}")
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    cfg.check(consts)


def _config(m: int, dim: int, z: int, mode: str, aligned: bool) -> HashedGatherConfig:
    if mode not in ("lma", "robez"):
        raise ValueError(f"mode must be 'lma' or 'robez', got {mode!r}")
    if z < 1 or dim % z:
        raise ValueError(f"need Z | dim (dim={dim}, Z={z})")
    return HashedGatherConfig.of_op(m, dim, z, mode, aligned)


def _prepare(memory: torch.Tensor, keys: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor,
             nibble_w: torch.Tensor, dim: int, z: int, mode: str,
             aligned: bool) -> tuple[HashedGatherConfig, GatherConstants]:
    """The flat op arguments of a gather over ``memory`` as one config and one set of constants,
    checked against the memory and the keys."""
    cfg = _config(memory.shape[0], dim, z, mode, aligned)
    consts = GatherConstants(coef_a, coef_b, nibble_w)
    _check(memory, keys, consts, cfg)
    return cfg, consts


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
    cfg, consts = _prepare(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned)
    return implementation(memory.device).forward(memory, keys, consts, cfg)


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
    cfg = _config(m, dim, z, mode, aligned)
    consts = GatherConstants(coef_a, coef_b, nibble_w)
    return implementation(grad.device).backward(grad, keys, consts, cfg)


@hashed_gather_backward_op.register_fake
def _hashed_gather_backward_fake(grad, keys, coef_a, coef_b, nibble_w, m, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    return grad.new_empty((m,))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned = inputs
    ctx.save_for_backward(keys, coef_a, coef_b, nibble_w)
    ctx.cfg = (memory.shape[0], dim, z, mode, aligned)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    keys, coef_a, coef_b, nibble_w = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = hashed_gather_backward_op(grad.contiguous(), keys, coef_a, coef_b, nibble_w, *ctx.cfg)
    return g, None, None, None, None, None, None, None, None


hashed_gather_op.register_autograd(_backward, setup_context=_setup_context)


def slot_indices(keys: torch.Tensor, consts: GatherConstants, cfg: HashedGatherConfig,
                 backend: str | None = None) -> torch.Tensor:
    """(N,) int64 keys -> (N, nb * Z) int64 slot indices with the chosen (or automatic) backend."""
    consts = GatherConstants(*consts)
    cfg.check(consts)
    return implementation(keys.device, backend).slot_indices(keys.reshape(-1), consts, cfg)


@torch.library.custom_op("lma::hot_gather", mutates_args=())
def hot_gather_op(
    memory: torch.Tensor,
    hot: torch.Tensor,
    index: torch.Tensor,
    keys: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    dim: int,
    z: int,
    mode: str,
    aligned: bool,
) -> torch.Tensor:
    """(M,) memory, (H, dim) hot rows, (...) int64 index (-1 = cold) and keys -> (..., dim):
    ``hot[index]`` where index >= 0, else ``lma::hashed_gather(memory, keys, ...)``."""
    cfg, consts = _prepare(memory, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned)
    _check_hot_rows(memory, hot, dim)
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    if index.shape != keys.shape:
        raise ValueError(f"index {tuple(index.shape)} and keys {tuple(keys.shape)} must have "
                         "the same shape")
    return implementation(memory.device).hot_gather(memory, hot, index, keys, consts, cfg)


def _check_hot_rows(memory: torch.Tensor, hot: torch.Tensor, dim: int) -> None:
    if hot.dim() != 2 or hot.shape[1] != dim:
        raise ValueError(f"hot must be (H, dim={dim}), got shape {tuple(hot.shape)}")
    if hot.dtype != memory.dtype:
        raise TypeError(f"hot must have the memory's dtype {memory.dtype}, got {hot.dtype}")


@hot_gather_op.register_fake
def _hot_gather_fake(memory, hot, index, keys, coef_a, coef_b, nibble_w, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    return memory.new_empty((*index.shape, dim))


def _hot_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    pass


def _hot_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    raise RuntimeError(
        "lma::hot_gather is the inference-only serving form of an LMA embedding and has no "
        "gradient: train the hash form (LMAEmbedding with serve='hash') and convert it for "
        "serving afterwards")


hot_gather_op.register_autograd(_hot_backward, setup_context=_hot_setup_context)


@torch.library.custom_op("lma::hot_embed", mutates_args=())
def hot_embed_op(
    memory: torch.Tensor,
    hot: torch.Tensor,
    table: torch.Tensor,
    tokens: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    nibble_w: torch.Tensor,
    dim: int,
    z: int,
    mode: str,
    aligned: bool,
) -> torch.Tensor:
    """``lma::hot_gather(memory, hot, lma::key_lookup(tokens, -1, table), tokens, ...)`` in one
    pass where the backend has a fused kernel (C++); ``table`` is a key table v3 token -> hot
    row."""
    cfg, consts = _prepare(memory, tokens, coef_a, coef_b, nibble_w, dim, z, mode, aligned)
    _check_hot_rows(memory, hot, dim)
    if table.dim() != 2 or table.shape[1] != hashspec.ROW or table.dtype != torch.int64:
        raise ValueError(f"table must be a (rows, {hashspec.ROW}) int64 key table (v3), got "
                         f"{table.dtype} {tuple(table.shape)}")
    return implementation(memory.device).embed(memory, hot, table, tokens, consts, cfg)


@hot_embed_op.register_fake
def _hot_embed_fake(memory, hot, table, tokens, coef_a, coef_b, nibble_w, dim, z, mode, aligned):  # noqa: ANN001, ANN202
    return memory.new_empty((*tokens.shape, dim))


hot_embed_op.register_autograd(_hot_backward, setup_context=_hot_setup_context)
