"""LMA: LSH-based memory allocation (arXiv 2103.06124) over a ROBE-Z shared memory.

Layout and initialisation are those of :mod:`lma.embeddings.robez` (one (M,) memory,
U(+-1/sqrt(d))). The difference is the key: a token's key is its 64-bit minhash signature
(:mod:`lma.signatures`), and block c of the embedding is placed by a block key made of T of the
signature's 4-bit sub-keys. Tokens with similar sets therefore share blocks in proportion to
their similarity: Pr[same block] ~ (J + (1 - J) / 16)^T.

Tokens without a signature (rare, outside the signature sample, or never seen, e.g. at serving)
use their token hash as the key: random allocation, with no vocabulary needed at serving.

Options: ``z`` (default 4), ``aligned`` (False), ``t`` sub-keys per block key (8), ``seed`` (hash
seed, default spec.seed), ``set_kind`` ("rows" | "cooccur"), ``sample_rows`` (125,000),
``sig_min_count`` (2).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lma.embeddings.base import EmbeddingSpec, building_for_load, register
from lma.embeddings.robez import SharedMemoryEmbedding
from lma.embeddings.tables import lookup_option
from lma.features import FeatureMap
from lma.ops.key_lookup import KeyLookup
from lma.signatures import (
    DEFAULT_MIN_COUNT,
    DEFAULT_SAMPLE_ROWS,
    SignatureTable,
    compute_signatures,
)

logger = logging.getLogger(__name__)


@register
class LMAEmbedding(SharedMemoryEmbedding):
    """Shared memory addressed by minhash signatures (token-hash fallback)."""

    kind = "lma"
    mode = "lma"
    # Z = 4: at the Criteo-Kaggle vocabulary and 1000 rows 1.4-2.4x faster to serve than Z = 1 in
    # the torch program and 1.2x or more in onnxruntime (docs/RESULTS.md, "Key lookup and model
    # latency"), for ~0.001 AUC (RESULTS sections 2-3).
    default_z = 4

    def __init__(self, spec: EmbeddingSpec, signatures: SignatureTable):
        super().__init__(spec)
        opts = spec.options
        self.set_kind = str(opts.get("set_kind", "rows"))
        self.sample_rows = int(opts.get("sample_rows", DEFAULT_SAMPLE_ROWS))
        self.sig_min_count = int(opts.get("sig_min_count", DEFAULT_MIN_COUNT))
        self.signature_meta = dict(signatures.meta)
        self.n_signed = len(signatures)
        # Per-token state, saved through ``extra_state_arrays`` rather than the state dict.
        self.register_buffer("sig_tokens", torch.from_numpy(signatures.tokens.copy()), persistent=False)
        self.register_buffer("sig_values", torch.from_numpy(signatures.signatures.copy()), persistent=False)
        # Token -> signature in constant time (option lookup="search": the old binary search).
        # Stored with the weights; a model built to receive them takes the stored table.
        self.lookup = lookup_option(spec)
        self.key_table: KeyLookup | None = None
        if self.lookup == "table":
            self.key_table = (KeyLookup() if building_for_load()
                              else KeyLookup.build(signatures.tokens, signatures.signatures))

    @classmethod
    def prepare(cls, spec: EmbeddingSpec, feature_map: FeatureMap, train_tokens: Any,
                progress: bool = False) -> dict[str, Any]:
        """Minhash signatures of the training tokens ((N, S) int64) -> ``{"signatures": table}``."""
        opts = spec.options
        table = compute_signatures(
            np.asarray(train_tokens),
            set_kind=str(opts.get("set_kind", "rows")),
            n_sample_rows=int(opts.get("sample_rows", DEFAULT_SAMPLE_ROWS)),
            min_count=int(opts.get("sig_min_count", DEFAULT_MIN_COUNT)),
            seed=spec.seed,
            slot_fields=feature_map.schema.slot_fields(),
            progress=progress,
        )
        return {"signatures": table}

    @classmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> LMAEmbedding:
        """``state``: ``signatures=SignatureTable`` (from :meth:`prepare`) or the arrays of
        :meth:`extra_state_arrays` (``sig_tokens``, ``sig_values``, ``sig_meta``)."""
        table = state.get("signatures")
        if table is None and "sig_tokens" in state:
            table = SignatureTable.from_arrays(state)
        if table is None:
            logger.warning("lma embedding built without signatures: every token falls back to "
                           "random allocation by its hash (call LMAEmbedding.prepare first)")
            table = SignatureTable.empty()
        return cls(spec, table)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.key_table is not None:
            # Checkpoints and bundles written before key tables were stored: built from the
            # signature table (per-token state), which is always at hand.
            self.key_table.prepare_state(
                state_dict, prefix + "key_table.",
                lambda: (self.sig_tokens.cpu().numpy(), self.sig_values.cpu().numpy()))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def resolve_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S) int64 keys: the signature where the token has one, else
        the token hash (``lma::key_lookup`` over a key table, or a binary search)."""
        if self.key_table is not None:
            return self.key_table(tokens, tokens)
        n = self.sig_tokens.shape[0]
        if n == 0:
            return tokens
        pos = torch.searchsorted(self.sig_tokens, tokens).clamp_(max=n - 1)  # (B, S)
        hit = self.sig_tokens[pos] == tokens
        return torch.where(hit, self.sig_values[pos], tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S, d)."""
        return self.gather(self.resolve_keys(tokens))

    def signature_table(self) -> SignatureTable:
        return SignatureTable(self.sig_tokens.cpu().numpy(), self.sig_values.cpu().numpy(),
                              self.signature_meta)

    def state_bytes(self) -> int:
        """The signature lookup serving holds: the key table (slots + signatures), or for
        lookup="search" 8 bytes of token hash + 8 bytes of signature per signed token."""
        if self.key_table is not None:
            return self.key_table.nbytes()
        return int(self.sig_tokens.numel() * 8 + self.sig_values.numel() * 8)

    def extra_state_arrays(self) -> dict[str, np.ndarray]:
        return self.signature_table().to_arrays()

    def resolved_options(self) -> dict[str, Any]:
        return {
            **super().resolved_options(),
            "t": self.n_subkeys,
            "set_kind": self.set_kind,
            "sample_rows": self.sample_rows,
            "sig_min_count": self.sig_min_count,
            "lookup": self.lookup,
        }
