"""Baseline kinds: full per-field tables and the hashing trick."""

from __future__ import annotations

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
    """

    kind = "full"

    def __init__(self, spec: EmbeddingSpec, vocab: np.ndarray | None, slot_fields: list[int],
                 n_fields: int, n_vocab: int | None = None):
        super().__init__(spec)
        self.register_buffer("slot_fields", torch.tensor(slot_fields, dtype=torch.int64))
        self.lookup = lookup_option(spec)
        self.key_table: KeyLookup | None = None
        if vocab is None:
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
        if self.key_table is not None:
            # Checkpoints and bundles written before key tables were stored hold the sorted
            # vocabulary instead (rows are positions in it): the table is built from it once.
            vocab = state_dict.pop(prefix + "vocab", None)
            source = None if vocab is None else (
                lambda: (vocab.cpu().numpy(), np.arange(vocab.shape[0], dtype=np.int64)))
            self.key_table.prepare_state(state_dict, prefix + "key_table.", source)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, S) row indices (OOV row of the slot's field when absent)."""
        if self.key_table is not None:
            return self.key_table(tokens, self.n_vocab + self.slot_fields)
        if self.n_vocab == 0:
            return (self.n_vocab + self.slot_fields).expand_as(tokens)
        pos = torch.searchsorted(self.vocab, tokens).clamp_(max=self.n_vocab - 1)
        found = self.vocab[pos] == tokens
        return torch.where(found, pos, self.n_vocab + self.slot_fields)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return as_compute_dtype(self.table(self.rows(tokens)))

    def parameter_count(self) -> int:
        return self.table.weight.numel()

    def state_bytes(self) -> int:
        """What serving holds besides the rows: the key table (or the sorted vocabulary)."""
        if self.key_table is not None:
            return self.key_table.nbytes()
        return 8 * self.n_vocab  # the sorted vocabulary (int64 token hashes)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight] if self.sparse else []


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
