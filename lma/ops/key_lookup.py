"""Constant-time key resolution: the ``lma::key_lookup`` op over a key table (key table v3,
"Key tables" in ``lma/hashspec.py``): token -> full-table row, LMA signature or QR row.

    lma::key_lookup(keys (...) int64, default (broadcastable to keys) int64,
                    table (2 + M + ceil(G / 2), 2) int64: (M, G), (A, n_keys), M (key, value)
                    slots, then the G group displacements)
        -> (...) int64: the value of each key in the table, else its default

Two reads per query (the key's group displacement, then its one slot's key and value) instead
of a 17-25-step binary search.
Implementations, chosen by device like ``lma::hashed_gather``: the C++ extension on CPU, a Triton
kernel on CUDA, the pure-torch reference otherwise; the ONNX exporter writes one
``ai.lma::KeyLookup`` node whose model-local function uses standard ops with CUDA kernels
(``model_export/onnx_op.py``). :class:`KeyLookup` holds a table as buffers, persistent by
default: checkpoints and bundles store the built table (``<module>.key_table.table`` and
``.header``) and a model loaded from them takes it as is, memory-mapped, instead of building it
again (tens of seconds and several times the table's memory at the Criteo-Kaggle vocabulary).
The ``header`` buffer records the table layout version, the slot count and the key count, so
a table of another layout (v2: a (n_buckets, 8) table; v1: ``slots``, ``values``, ``coef_a``,
``coef_b``) is never used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lma import hashspec
from lma.ops._op import implementation

logger = logging.getLogger(__name__)


_LO32 = (1 << 32) - 1


def slot_hashes_torch(keys: torch.Tensor, n_slots: torch.Tensor | int, n_groups: torch.Tensor | int,
                      multiplier: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """(N,) int64 keys -> group, base and step, exactly as ``hashspec.slot_hashes``: int64
    arithmetic whose wrapping product has the bits of the unsigned one; ``multiplier`` is A in
    its int64 form."""
    y = keys * multiplier  # wraps mod 2^64
    lo = y & _LO32  # the low 32 bits, as a non-negative int64
    hi = (y >> 32) & _LO32  # the high 32 bits unsigned (arithmetic shift, then mask)
    g = torch.remainder(hi, n_groups)
    s0 = torch.remainder(lo, n_slots)
    s1 = 1 + torch.remainder(hi, n_slots - 1)
    return g, s0, s1


def key_lookup_reference(keys: torch.Tensor, default: torch.Tensor,
                         table: torch.Tensor) -> torch.Tensor:
    """Pure-torch key lookup (any device); the ground truth the other implementations match.
    The table's own first rows give M, G and A (as tensors: no host round trip on a GPU)."""
    flat = keys.reshape(-1)
    m, n_groups, mult = table[0, 0], table[0, 1], table[1, 0]
    g, s0, s1 = slot_hashes_torch(flat, m, n_groups, mult)
    disp = table.reshape(-1)[hashspec.ROW * (hashspec.META_ROWS + m) + g]
    slot = torch.remainder(s0 + disp * s1, m)
    pair = table[hashspec.META_ROWS + slot]  # (N, 2): one (key, value) per key
    hit = (pair[:, 0] == flat).reshape(keys.shape)
    got = pair[:, 1].reshape(keys.shape)
    return torch.where(hit, got, default.to(got.dtype).expand(keys.shape))


@torch.library.custom_op("lma::key_lookup", mutates_args=())
def key_lookup_op(keys: torch.Tensor, default: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(...) int64 keys -> (...) int64 values (default where absent); see the module docstring."""
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    return implementation(keys.device).key_lookup(keys, default, table)


@key_lookup_op.register_fake
def _key_lookup_fake(keys, default, table):  # noqa: ANN001, ANN202
    return keys.new_empty(keys.shape)


def key_lookup(keys: torch.Tensor, default: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Entry point: value of each key in the table, else ``default`` (broadcast to keys)."""
    return key_lookup_op(keys, default, table)


class KeyTableUnavailable(ValueError):
    """Raised while loading weights into a placeholder when the stored key table cannot be used
    and nothing to build one from was stored (``lma.rebuild`` then builds the model from its
    feature map instead)."""


# The buffers of a stored key table, in state-dict order (v2 tables had the same names and a
# (n_buckets, 8) table); v1 tables stored these instead.
TABLE_BUFFERS = ("table", "header")
V1_TABLE_BUFFERS = ("slots", "values", "coef_a", "coef_b")


def _table_tensors(table: hashspec.KeyTable) -> dict[str, torch.Tensor]:
    header = np.array([hashspec.KEY_TABLE_VERSION, table.n_slots, table.n_keys], dtype=np.int64)
    arrays = {"table": table.rows, "header": header}
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in arrays.items()}


def stored_table_problem(state_dict: dict[str, Any], prefix: str) -> str | None:
    """Why the key table stored under ``prefix`` in ``state_dict`` cannot be used as it is
    (None when it can): absent (checkpoints and bundles written before tables were stored),
    incomplete, of another layout version, or inconsistent with its own header."""
    header = state_dict.get(prefix + "header")
    if header is not None and header.dtype == torch.int64 and header.shape == (3,):
        version = int(header[0])
        if version != hashspec.KEY_TABLE_VERSION:
            return (f"the stored key table has layout v{version}, this build reads "
                    f"v{hashspec.KEY_TABLE_VERSION}")
    got = {n: state_dict.get(prefix + n) for n in TABLE_BUFFERS}
    if all(v is None for v in got.values()):
        if any(state_dict.get(prefix + n) is not None for n in V1_TABLE_BUFFERS):
            return (f"the stored key table has layout v1, this build reads "
                    f"v{hashspec.KEY_TABLE_VERSION}")
        return "no key table stored"
    missing = [n for n, v in got.items() if v is None]
    if missing:
        return f"the stored key table lacks {', '.join(missing)}"
    if any(v.dtype != torch.int64 for v in got.values()):
        return "the stored key table is not int64"
    header = got["header"]
    if header.shape != (3,):
        return f"the stored key table's header has shape {tuple(header.shape)}, not (3,)"
    _, n_slots, n_keys = (int(x) for x in header.tolist())
    table = got["table"]
    shape_ok = table.dim() == 2 and table.shape[1] == hashspec.ROW and table.shape[0] >= 3
    m, n_groups = (int(x) for x in table[0].tolist()) if shape_ok else (-1, -1)
    if (not shape_ok or m != n_slots or not 2 <= m < 1 << 32 or n_groups < 1
            or table.shape[0] != hashspec.table_rows(m, n_groups) or not 0 <= n_keys < m
            or int(table[1, 1]) != n_keys):
        return (f"the stored key table's shapes do not fit together (table "
                f"{tuple(table.shape)}, header: {n_slots} slots, {n_keys} keys)")
    return None


class KeyLookup(nn.Module):
    """A key table as buffers: ``forward(keys, default) -> values``.

    ``KeyLookup(table)`` holds a built table; ``KeyLookup()`` is a placeholder (empty meta
    tensors) for a model built to receive loaded weights, filled by ``load_state_dict`` from a
    stored table. ``persistent=False`` keeps the table out of the state dict (rebuilt by its
    owner when the module is made)."""

    def __init__(self, table: hashspec.KeyTable | None = None, *, persistent: bool = True):
        super().__init__()
        if table is None:
            tensors = {n: torch.empty((0, hashspec.ROW) if n == "table" else (0,),
                                      dtype=torch.int64, device="meta") for n in TABLE_BUFFERS}
            self.n_keys = 0
        else:
            tensors = _table_tensors(table)
            self.n_keys = table.n_keys
        for n, t in tensors.items():
            self.register_buffer(n, t, persistent=persistent)

    @classmethod
    def build(cls, keys: np.ndarray, values: np.ndarray, seed: int = 0, *,
              persistent: bool = True) -> KeyLookup:
        return cls(hashspec.build_key_table(keys, values, seed=seed), persistent=persistent)

    @property
    def is_placeholder(self) -> bool:
        """True until a stored table has been loaded into a placeholder."""
        return bool(self.table.is_meta)

    def forward(self, keys: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
        return key_lookup(keys, default, self.table)

    def nbytes(self) -> int:
        return int(self.table.numel() * 8)

    def prepare_state(self, state_dict: dict[str, Any], prefix: str,
                      source: Callable[[], tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Called by the owning module before its entries of ``state_dict`` are loaded (from its
        ``_load_from_state_dict``; ``prefix`` is this module's, e.g. ``embedding.key_table.``):
        when the stored table cannot be used (see :func:`stored_table_problem`), put a usable
        one in its place: this module's own table when it holds one (built from the feature
        map), else one built from ``source()`` (keys, values), e.g. the sorted vocabulary an
        older checkpoint stored instead of the table. Without either a placeholder raises
        :class:`KeyTableUnavailable`."""
        problem = stored_table_problem(state_dict, prefix)
        if problem is None:
            return
        if not self.is_placeholder:
            tensors = {n: getattr(self, n) for n in TABLE_BUFFERS}
            how = "the table built with the model"
        elif source is not None:
            keys, values = source()
            tensors = _table_tensors(hashspec.build_key_table(keys, values))
            how = f"a table built now from {len(keys)} stored keys"
        else:
            raise KeyTableUnavailable(f"{prefix.rstrip('.')}: {problem}")
        logger.log(logging.INFO if problem == "no key table stored" else logging.WARNING,
                   "%s: %s; using %s", prefix.rstrip("."), problem, how)
        for k in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[k]
        state_dict.update({prefix + n: t for n, t in tensors.items()})

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # A stored table has its own shape (the slot count depends on the build), so the
        # buffers are replaced rather than copied into; assign=False still copies the data.
        if not all(n in self._non_persistent_buffers_set for n in TABLE_BUFFERS):
            missing = [prefix + n for n in TABLE_BUFFERS if prefix + n not in state_dict]
            problem = stored_table_problem(state_dict, prefix)
            if missing:
                missing_keys.extend(missing)
            elif problem is not None:
                error_msgs.append(f"{prefix.rstrip('.')}: {problem}")
            else:
                assign = bool(local_metadata.get("assign_to_params_buffers", False))
                for n in TABLE_BUFFERS:
                    t = state_dict[prefix + n]
                    old = self._buffers[n]
                    if not assign:
                        device = t.device if old is None or old.is_meta else old.device
                        t = t.to(device=device, copy=True)
                    self._buffers[n] = t
                self.n_keys = int(self.header[2])
        if strict:
            known = {n for n in TABLE_BUFFERS if n not in self._non_persistent_buffers_set}
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in known)

    def extra_repr(self) -> str:
        return (f"keys={self.n_keys}, rows={self.table.shape[0]}, "
                f"table_version={hashspec.KEY_TABLE_VERSION}")
