"""Constant-time key resolution: the ``lma::key_lookup`` op over a key table (key table v2,
"Key tables" in ``lma/hashspec.py``): token -> full-table row, LMA signature or QR row.

    lma::key_lookup(keys (...) int64, default (broadcastable to keys) int64,
                    table (n_buckets, 8) int64: per bucket 4 keys then their 4 values)
        -> (...) int64: the value of each key in the table, else its default

Two cache lines per query (each holds keys and values) instead of a 17-25-step binary search.
Implementations, chosen by device like ``lma::hashed_gather``: the C++ extension on CPU, a Triton
kernel on CUDA, the pure-torch reference otherwise; the ONNX exporter writes one
``ai.lma::KeyLookup`` node whose model-local function uses standard ops with CUDA kernels
(``model_export/onnx_op.py``). :class:`KeyLookup` holds a table as buffers, persistent by
default: checkpoints and bundles store the built table (``<module>.key_table.table`` and
``.header``) and a model loaded from them takes it as is, memory-mapped, instead of building it
again (tens of seconds and several times the table's memory at the Criteo-Kaggle vocabulary).
The ``header`` buffer records the table layout version, the bucket count and the key count, so
a table of another layout (v1: ``slots``, ``values``, ``coef_a``, ``coef_b``) is never used.
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


def bucket_pair_torch(keys: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(N,) int64 keys -> (N, 2) candidate buckets, exactly as ``hashspec.bucket_pair``."""
    lo = keys & _LO32  # the low 32 bits, as a non-negative int64
    hi = (keys >> 32) & _LO32  # the high 32 bits unsigned (arithmetic shift, then mask)
    b0 = torch.remainder(lo, n_buckets)
    b1 = torch.remainder(b0 + 1 + torch.remainder(hi, n_buckets - 1), n_buckets)
    return torch.stack([b0, b1], dim=1)


def key_lookup_reference(keys: torch.Tensor, default: torch.Tensor,
                         table: torch.Tensor) -> torch.Tensor:
    """Pure-torch key lookup (any device); the ground truth the other implementations match."""
    flat = keys.reshape(-1)
    n = flat.shape[0]
    b = bucket_pair_torch(flat, table.shape[0])  # (N, 2)
    cand = table[b]  # (N, 2, 8): two cache lines per key
    eq = (cand[:, :, : hashspec.BUCKET] == flat[:, None, None]).reshape(n, 2 * hashspec.BUCKET)
    hit = eq.any(dim=1)
    pos = eq.to(torch.uint8).argmax(dim=1)  # first matching slot (at most one matches)
    vals = cand[:, :, hashspec.BUCKET:].reshape(n, 2 * hashspec.BUCKET)
    got = vals.gather(1, pos[:, None]).squeeze(1).reshape(keys.shape)
    return torch.where(hit.reshape(keys.shape), got, default.to(got.dtype).expand(keys.shape))


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


# The buffers of a stored key table, in state-dict order; v1 tables stored these instead.
TABLE_BUFFERS = ("table", "header")
V1_TABLE_BUFFERS = ("slots", "values", "coef_a", "coef_b")


def _table_tensors(table: hashspec.KeyTable) -> dict[str, torch.Tensor]:
    header = np.array([hashspec.KEY_TABLE_VERSION, table.n_buckets, table.n_keys], dtype=np.int64)
    arrays = {"table": table.buckets, "header": header}
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
    _, nb, n_keys = (int(x) for x in header.tolist())
    table = got["table"]
    if (table.dim() != 2 or table.shape[1] != hashspec.ROW or table.shape[0] != nb or nb < 2
            or not 0 <= n_keys <= nb * hashspec.BUCKET):
        return (f"the stored key table's shapes do not fit together (table "
                f"{tuple(table.shape)}, header: {nb} buckets, {n_keys} keys)")
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
        # A stored table has its own shape (the bucket count depends on the build), so the
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
        return (f"keys={self.n_keys}, buckets={self.table.shape[0]}, "
                f"table_version={hashspec.KEY_TABLE_VERSION}")
