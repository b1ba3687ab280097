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
``sig_min_count`` (2), ``serve`` ("hash" | "hot", see below).

Serving forms. A token's embedding is a deterministic function of (memory, key), so for the
signed tokens it can be computed once, after training. ``serve="hash"`` (training, and bundles
exported with ``lma export --lma-serving hash``) resolves token -> signature with a key table and
hashes and gathers ``d / Z`` blocks per token. ``serve="hot"`` (what :meth:`LMAEmbedding.to_serving`
makes at export, the ``lma export`` default) holds the signed tokens' rows themselves (``hot``,
(H, d) in the memory's dtype, computed through the same gather, so bit for bit the hash form's
rows) and a key table token -> hot row; ``lma::hot_embed`` (that lookup and ``lma::hot_gather``
in one pass) copies a hot token's row and hashes only the other tokens, by their own hash,
exactly as the hash form does. The hot form needs no
signatures (they are folded into its rows) and is inference only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lma.embeddings.base import EmbeddingSpec, as_compute_dtype, building_for_load, register
from lma.embeddings.robez import SharedMemoryEmbedding
from lma.embeddings.tables import lookup_option
from lma.features import FeatureMap
from lma.ops import hashed_gather, hot_embed
from lma.ops.key_lookup import KeyLookup
from lma.signatures import (
    DEFAULT_MIN_COUNT,
    DEFAULT_SAMPLE_ROWS,
    SignatureTable,
    compute_signatures,
)

logger = logging.getLogger(__name__)

# "hash": token -> signature -> hashed blocks (training); "hot": precomputed rows of the signed
# tokens, hashed blocks for the others (serving; made from a trained hash form).
SERVING_FORMS = ("hash", "hot")


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
        self.serve = str(opts.get("serve", "hash"))
        if self.serve not in SERVING_FORMS:
            raise ValueError(f"option serve must be one of {SERVING_FORMS}, got {self.serve!r}")
        self.set_kind = str(opts.get("set_kind", "rows"))
        self.sample_rows = int(opts.get("sample_rows", DEFAULT_SAMPLE_ROWS))
        self.sig_min_count = int(opts.get("sig_min_count", DEFAULT_MIN_COUNT))
        self.signature_meta = dict(signatures.meta)
        # Per-token state, saved through ``extra_state_arrays`` rather than the state dict.
        self.register_buffer("sig_tokens", torch.from_numpy(signatures.tokens.copy()), persistent=False)
        self.register_buffer("sig_values", torch.from_numpy(signatures.signatures.copy()), persistent=False)
        # Token -> signature in constant time (option lookup="search": the old binary search).
        # Stored with the weights; a model built to receive them takes the stored table.
        self.lookup = lookup_option(spec)
        self.key_table: KeyLookup | None = None
        self.hot_lookup: KeyLookup | None = None
        if self.serve == "hot":
            # Placeholders that the stored hot form fills (load_state_dict): the rows (resized
            # to the stored ones on load) and the token -> row table.
            self.register_buffer("hot", torch.empty((0, spec.dim)))
            self.hot_lookup = KeyLookup()
        elif self.lookup == "table":
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
        if table is None and str(spec.options.get("serve", "hash")) == "hot":
            table = SignatureTable.empty()  # folded into the hot rows, which the weights hold
        if table is None:
            logger.warning("lma embedding built without signatures: every token falls back to "
                           "random allocation by its hash (call LMAEmbedding.prepare first)")
            table = SignatureTable.empty()
        return cls(spec, table)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], *args: Any) -> None:
        stored = state_dict.get(prefix + "hot")
        if self.serve == "hot" and isinstance(stored, torch.Tensor) and stored.dim() == 2:
            # The hot rows' count is the stored model's (its signed tokens): the placeholder
            # takes the stored shape, and the loader then assigns or copies into it as usual.
            old = self._buffers["hot"]
            assign = bool(local_metadata.get("assign_to_params_buffers", False))
            dtype = stored.dtype if assign or self.memory.is_meta else self.memory.dtype
            self._buffers["hot"] = torch.empty(stored.shape, dtype=dtype, device=old.device)
        if self.key_table is not None:
            # Checkpoints and bundles written before key tables were stored: built from the
            # signature table (per-token state), which is always at hand.
            self.key_table.prepare_state(
                state_dict, prefix + "key_table.",
                lambda: (self.sig_tokens.cpu().numpy(), self.sig_values.cpu().numpy()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def resolve_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S) int64 keys: the signature where the token has one, else
        the token hash (``lma::key_lookup`` over a key table, or a binary search). In the hot
        form: the keys ``lma::hot_gather`` hashes for cold tokens, i.e. the tokens themselves
        (the signed tokens' signatures are folded into the hot rows)."""
        if self.serve == "hot":
            return tokens
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
        if self.serve == "hot":
            return self.hot_forward(tokens)
        return self.gather(self.resolve_keys(tokens))

    @property
    def n_signed(self) -> int:
        """Tokens with a signature (in the hot form: with a hot row, the same tokens)."""
        return int(self.hot.shape[0] if self.serve == "hot" else self.sig_tokens.shape[0])

    def hot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hot form: (B, S) int64 tokens -> (B, S) int64 hot row of each token, -1 where cold."""
        assert self.hot_lookup is not None
        return self.hot_lookup(tokens, torch.full((), -1, dtype=torch.int64,
                                                  device=tokens.device))

    def hot_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.hot_lookup is None or self.hot_lookup.is_placeholder:
            raise RuntimeError("LMA hot serving form without its hot rows: load the weights of "
                               "a hot-form bundle, or make it with to_serving('hot')")
        if self.training and torch.is_grad_enabled() and self.memory.requires_grad:
            raise RuntimeError("the LMA hot serving form is inference only (lma::hot_embed has "
                               "no gradient): train the hash form (serve='hash') and convert it "
                               "with to_serving('hot'); call eval() or use torch.no_grad()")
        # token -> hot row (key table) and the rows in one op (lma::hot_embed)
        out = hot_embed(self.memory, self.hot, self.hot_lookup.table, tokens,
                        self.gather_constants(), self.gather_config)
        return as_compute_dtype(out)

    @torch.no_grad()
    def to_serving(self, form: str) -> LMAEmbedding:
        """Convert this embedding, in place, to serving form ``form`` ("hash" or "hot"); returns
        it. "hot": each signed token's row is computed now through the hash form's own lookup
        and gather (so the rows, in the memory's dtype, are bit for bit those the hash form
        reads), and the signatures are dropped. Convert after any change of the memory's dtype
        (``lma export --dtype float16`` casts, then converts). The hot form cannot go back."""
        if form not in SERVING_FORMS:
            raise ValueError(f"serving form must be one of {SERVING_FORMS}, got {form!r}")
        if form == self.serve:
            return self
        if form == "hash":
            raise ValueError("a hot-form LMA embedding cannot be turned back into the hash form: "
                             "its signatures were folded into its rows (export the checkpoint "
                             "again with --lma-serving hash)")
        tokens = self.sig_tokens
        keys = self.resolve_keys(tokens)
        rows = hashed_gather(self.memory.detach(), keys, self.gather_constants(),
                             self.gather_config)
        n_hot = int(tokens.shape[0])
        self.hot_lookup = KeyLookup.build(tokens.cpu().numpy(),
                                          np.arange(n_hot, dtype=np.int64)).to(tokens.device)
        self.register_buffer("hot", rows.contiguous())
        self.key_table = None
        self.sig_tokens = tokens.new_empty(0)
        self.sig_values = self.sig_values.new_empty(0)
        self.serve = "hot"
        logger.info("LMA embedding in hot serving form: %d hot rows (%.1f MB), other tokens hashed",
                    n_hot, rows.numel() * rows.element_size() / 1e6)
        return self

    def signature_table(self) -> SignatureTable:
        return SignatureTable(self.sig_tokens.cpu().numpy(), self.sig_values.cpu().numpy(),
                              self.signature_meta)

    def state_bytes(self) -> int:
        """The per-token state serving holds: the key table (slots + signatures), or for
        lookup="search" 8 bytes of token hash + 8 bytes of signature per signed token; in the
        hot form the hot rows and their key table (token -> row)."""
        if self.serve == "hot":
            assert self.hot_lookup is not None
            return self.hot_lookup.nbytes() + int(self.hot.numel() * self.hot.element_size())
        if self.key_table is not None:
            return self.key_table.nbytes()
        return int(self.sig_tokens.numel() * 8 + self.sig_values.numel() * 8)

    def extra_state_arrays(self) -> dict[str, np.ndarray]:
        """The signature table; nothing in the hot form, whose weights hold all it serves with."""
        return {} if self.serve == "hot" else self.signature_table().to_arrays()

    def resolved_options(self) -> dict[str, Any]:
        return {
            **super().resolved_options(),
            "t": self.n_subkeys,
            "set_kind": self.set_kind,
            "sample_rows": self.sample_rows,
            "sig_min_count": self.sig_min_count,
            "lookup": self.lookup,
            "serve": self.serve,
        }
