"""Baseline kinds: full per-field tables and the hashing trick."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from lma.embeddings.base import (
    Embedding,
    EmbeddingSpec,
    as_compute_dtype,
    building_for_load,
    register,
)
from lma.features import FeatureMap
from lma.ops.key_lookup import KeyLookup

logger = logging.getLogger(__name__)

# Tables above this many floats train with sparse gradients (dense Adam state would dominate).
SPARSE_THRESHOLD = 4_000_000

# How tokens find their row (option ``lookup``): "table", a key table read in constant time
# (two cache lines per token, lma/hashspec.py), or "search", the binary search over the sorted
# vocabulary that it replaced (kept to measure one against the other).
LOOKUPS = ("table", "search")

# Feature-map meta flag: the map gives the vocabulary's size only (its tokens are placeholders),
# enough to build full tables that receive their weights and key table (lma.bundle).
SIZES_ONLY = "vocabulary_sizes_only"


def lookup_option(spec: EmbeddingSpec) -> str:
    mode = str(spec.options.get("lookup", "table"))
    if mode not in LOOKUPS:
        raise ValueError(f"option lookup must be one of {LOOKUPS}, got {mode!r}")
    return mode


def _init_rows(weight: torch.Tensor, generator: torch.Generator) -> None:
    # U(+-1/sqrt(d)) keeps the dot-product interaction O(1) at the start of training.
    bound = 1.0 / weight.shape[1] ** 0.5
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)


@register
class FullTables(Embedding):
    """One row per vocabulary token of each field (count >= min_count) plus an OOV row per field.

    Rows of all fields live in one ``nn.Embedding``; a token's row is its position in the sorted
    array of all vocabulary tokens (token hashes embed the field, so they are globally unique),
    and a token outside the vocabulary reads its field's OOV row. The token -> row map is a key
    table built from the vocabulary and stored with the weights (``key_table.*``), which hold no
    other form of the vocabulary; with option lookup="search" the sorted vocabulary itself
    (``vocab``) is stored and searched instead.

    Built to receive loaded weights (``vocab=None``, only the vocabulary's size known), the
    module takes the stored key table; checkpoints and bundles written before tables were stored
    hold the sorted vocabulary instead, from which the table is built at load.

    ``rows_from``: another FullTables over the same vocabulary (the DLRM's first-order scalars
    beside its embedding, see :func:`shares_vocabulary`) whose token -> row map this one uses:
    it then holds no key table (nor vocabulary) of its own, so checkpoints and bundles store the
    map once, and loading one written when both held a table drops this one's copy.
    """

    kind = "full"

    def __init__(self, spec: EmbeddingSpec, vocab: np.ndarray | None, slot_fields: list[int],
                 n_fields: int, n_vocab: int | None = None, rows_from: FullTables | None = None):
        super().__init__(spec)
        self.register_buffer("slot_fields", torch.tensor(slot_fields, dtype=torch.int64))
        self.lookup = lookup_option(spec)
        self.key_table: KeyLookup | None = None
        # Kept out of the module tree (the owner of the map registers it), hence __dict__.
        self.__dict__["rows_from"] = rows_from
        if rows_from is not None:
            if not shares_vocabulary(spec, rows_from):
                raise ValueError("rows_from must be a full table of the same min_count and lookup")
            self.n_vocab = rows_from.n_vocab
        elif vocab is None:
            if n_vocab is None:
                raise ValueError("FullTables without a vocabulary needs its size (n_vocab)")
            self.n_vocab = int(n_vocab)
            if self.lookup == "table":
                self.key_table = KeyLookup()
            else:
                self.register_buffer("vocab", torch.empty(self.n_vocab, dtype=torch.int64))
        else:
            self.n_vocab = len(vocab)
            ordered = np.ascontiguousarray(vocab[np.argsort(vocab, kind="stable")])
            if self.lookup == "table":
                self.key_table = KeyLookup.build(ordered, np.arange(self.n_vocab))
            else:
                self.register_buffer("vocab", torch.from_numpy(ordered))
        rows = self.n_vocab + n_fields
        self.sparse = rows * spec.dim > SPARSE_THRESHOLD
        self.table = nn.Embedding(rows, spec.dim, sparse=self.sparse)
        g = torch.Generator().manual_seed(spec.seed)
        _init_rows(self.table.weight, g)

    @classmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> FullTables:
        slot_fields, n_fields = feature_map.schema.slot_fields(), len(feature_map.schema.categorical)
        rows_from = state.get("rows_from")
        if rows_from is not None:
            return cls(spec, None, slot_fields, n_fields, rows_from=rows_from)
        if building_for_load():
            # The weights bring the key table: only the vocabulary's size is needed (counted
            # without copying the tokens).
            n = sum(int(np.count_nonzero(c >= spec.min_count)) for c in feature_map.counts)
            return cls(spec, None, slot_fields, n_fields, n_vocab=n)
        if feature_map.meta.get(SIZES_ONLY):
            raise ValueError("this feature map holds the vocabulary's size only; full tables "
                             "built from it must receive their key table with their weights")
        vocab = np.concatenate(feature_map.vocab(spec.min_count)) if feature_map.tokens else np.zeros(0, np.int64)
        return cls(spec, vocab, slot_fields, n_fields)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.rows_from is not None:
            self._drop_stored_copy(state_dict, prefix, args[-1])
        if self.key_table is not None:
            # Checkpoints and bundles written before key tables were stored hold the sorted
            # vocabulary instead (rows are positions in it): the table is built from it once.
            vocab = state_dict.pop(prefix + "vocab", None)
            source = None if vocab is None else (
                lambda: (vocab.cpu().numpy(), np.arange(vocab.shape[0], dtype=np.int64)))
            self.key_table.prepare_state(state_dict, prefix + "key_table.", source)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _drop_stored_copy(self, state_dict: dict[str, Any], prefix: str,
                          error_msgs: list[str]) -> None:
        """Checkpoints and bundles written before the map was shared hold this module's own
        copy of it (``key_table.*``, or ``vocab``): built from the same vocabulary, so equal to
        the owner's. The stored key table is compared with the owner's (already loaded: the
        owner comes first in the model) before it is dropped; a difference is an error, since
        outputs would change."""
        own = [k for k in state_dict if k.startswith(prefix + "key_table.") or k == prefix + "vocab"]
        if not own:
            return
        src = self.rows_from
        stored = {n: state_dict.get(prefix + "key_table." + n) for n in ("table", "header")}
        if src.key_table is not None and not src.key_table.is_placeholder and all(
                v is not None for v in stored.values()):
            ref: dict[str, torch.Tensor] = {"table": src.key_table.table,
                                            "header": src.key_table.header}
        elif src.key_table is None and prefix + "vocab" in state_dict:
            ref, stored = {"vocab": src.vocab}, {"vocab": state_dict[prefix + "vocab"]}
        else:
            ref = {}  # a table of another layout, or a vocabulary beside a table: sizes only
        for n, want in ref.items():
            got = stored[n]
            if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.cpu(), want.cpu()):
                error_msgs.append(f"{prefix.rstrip('.')}: the stored {n} differs from the "
                                  "embedding's it shares; the two vocabularies differ")
                return
        vocab = state_dict.get(prefix + "vocab")
        if vocab is not None and int(vocab.shape[0]) != self.n_vocab:
            error_msgs.append(f"{prefix.rstrip('.')}: the stored vocabulary has "
                              f"{int(vocab.shape[0])} tokens, the one it shares {self.n_vocab}")
            return
        logger.info("%s: dropping its stored copy of the embedding's token -> row map (%s)",
                    prefix.rstrip("."), ", ".join(k[len(prefix):] for k in own))
        for k in own:
            del state_dict[k]

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, S) row indices (OOV row of the slot's field when absent)."""
        if self.rows_from is not None:
            return self.rows_from.rows(tokens)
        if self.key_table is not None:
            return self.key_table(tokens, self.n_vocab + self.slot_fields)
        if self.n_vocab == 0:
            return (self.n_vocab + self.slot_fields).expand_as(tokens)
        pos = torch.searchsorted(self.vocab, tokens).clamp_(max=self.n_vocab - 1)
        found = self.vocab[pos] == tokens
        return torch.where(found, pos, self.n_vocab + self.slot_fields)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gather(self.rows(tokens))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, S) row indices (from :meth:`rows`) -> (B, S, d) float32."""
        return as_compute_dtype(self.table(rows))

    def parameter_count(self) -> int:
        return self.table.weight.numel()

    def state_bytes(self) -> int:
        """What serving holds besides the rows: the key table (or the sorted vocabulary); none
        when the map is shared (``rows_from``, counted by its owner)."""
        if self.rows_from is not None:
            return 0
        if self.key_table is not None:
            return self.key_table.nbytes()
        return 8 * self.n_vocab  # the sorted vocabulary (int64 token hashes)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight] if self.sparse else []


def shares_vocabulary(spec: EmbeddingSpec, other: Embedding) -> bool:
    """Whether a full table of ``spec`` over the same feature map has exactly ``other``'s token
    -> row map (same kind, vocabulary threshold and lookup), so it can use ``other``'s."""
    return (spec.kind == FullTables.kind and isinstance(other, FullTables)
            and other.rows_from is None and spec.min_count == other.spec.min_count
            and lookup_option(spec) == other.lookup)


@register
class HashingTrick(Embedding):
    """Token -> one of R = n_params / d rows (row = token hash mod R); whole rows collide."""

    kind = "hash"

    def __init__(self, spec: EmbeddingSpec):
        super().__init__(spec)
        self.n_rows = max(1, spec.n_params // spec.dim)
        self.sparse = self.n_rows * spec.dim > SPARSE_THRESHOLD
        self.table = nn.Embedding(self.n_rows, spec.dim, sparse=self.sparse)
        g = torch.Generator().manual_seed(spec.seed)
        _init_rows(self.table.weight, g)

    @classmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> HashingTrick:
        return cls(spec)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Token hashes are fmix64-mixed, so a plain remainder spreads them evenly.
        return as_compute_dtype(self.table(torch.remainder(tokens, self.n_rows)))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight] if self.sparse else []
