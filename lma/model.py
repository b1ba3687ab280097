"""DLRM: bottom MLP over dense features, pluggable embeddings, pairwise dot interaction, top MLP.

The model returns logits; training adds the loss, serving adds the sigmoid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lma.embeddings.base import Embedding
from lma.features import FeatureMap
from lma.ops.interaction import dot_interaction
from lma.tokens import PAD_TOKEN


@dataclass
class DLRMConfig:
    n_dense: int
    slot_fields: list[int]  # field index of each token slot (multi-valued fields span several)
    dim: int = 16
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 32])
    top_mlp: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    # "dot": the top MLP sees the bottom output and pairwise dots (original DLRM).
    # "dot-cat": it also sees the field vectors themselves, a first-order path that helps
    # small data (a token's own effect need not go through a dot product).
    # "dot-wide": DLRM plus a linear logit over dense features and field vectors.
    interaction: str = "dot"
    # First-order ("wide") term: a learned scalar per token, pooled per field and summed, plus a
    # linear function of the dense features, added to the logit: a logistic regression inside
    # the model. None, or the spec of its scalar table: {"kind": "full" | "hash", "n_params",
    # "min_count", "seed"} (see ``first_order_spec``).
    first_order: dict[str, Any] | None = None

    @property
    def n_fields(self) -> int:
        return max(self.slot_fields) + 1 if self.slot_fields else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mlp(sizes: list[int], last_activation: bool, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def first_order_spec(kind: str, n_tokens_params: int, min_count: int, seed: int) -> dict[str, Any]:
    """Spec of a first-order table: ``full`` (one scalar per vocabulary token, ``min_count``
    threshold, OOV scalar per field) or ``hash`` (``n_tokens_params`` hashed scalars)."""
    if kind not in ("full", "hash"):
        raise ValueError(f"first-order table kind must be 'full' or 'hash', got {kind!r}")
    return {"kind": kind, "n_params": int(n_tokens_params), "min_count": int(min_count),
            "seed": int(seed)}


def build_first_order(config: DLRMConfig, feature_map: FeatureMap,
                      embedding: Embedding | None = None) -> Embedding | None:
    """The first-order scalar table that ``config.first_order`` describes (None without one).

    A full scalar table over the same vocabulary as a full-table ``embedding`` (same threshold
    and lookup) uses the embedding's token -> row map instead of holding a second, identical
    key table: checkpoints and bundles store it once, and the model resolves each token once."""
    fo = config.first_order
    if not fo:
        return None
    from lma.embeddings import EmbeddingSpec, build_embedding
    from lma.embeddings.tables import shares_vocabulary

    spec = EmbeddingSpec.from_config({**fo, "dim": 1, "n_params": max(1, int(fo["n_params"]))})
    if embedding is not None and shares_vocabulary(spec, embedding):
        return build_embedding(spec, feature_map, rows_from=embedding)
    return build_embedding(spec, feature_map)


def build_dlrm(config: DLRMConfig, embedding: Embedding, feature_map: FeatureMap) -> DLRM:
    """DLRM with ``embedding`` and, where the config asks for one, its first-order table."""
    return DLRM(config, embedding, build_first_order(config, feature_map, embedding))


class DLRM(nn.Module):
    def __init__(self, config: DLRMConfig, embedding: Embedding,
                 first_order: Embedding | None = None):
        super().__init__()
        if embedding.dim != config.dim:
            raise ValueError(f"embedding dim {embedding.dim} != model dim {config.dim}")
        if (first_order is None) != (not config.first_order):
            raise ValueError("config.first_order and the first_order table must come together "
                             "(build the model with lma.model.build_dlrm)")
        if first_order is not None and first_order.dim != 1:
            raise ValueError(f"the first-order table must have dim 1, got {first_order.dim}")
        self.config = config
        self.embedding = embedding
        # While True, forward() is the first-order term alone (the trainer's wide warm-up).
        self.wide_only = False
        self.has_dense = config.n_dense > 0
        # Dense inputs are standardised with the training rows' statistics (set by the trainer,
        # saved with the weights); identity until then.
        self.register_buffer("dense_mean", torch.zeros(config.n_dense))
        self.register_buffer("dense_std", torch.ones(config.n_dense))
        if self.has_dense:
            self.bottom = mlp([config.n_dense, *config.bottom_mlp, config.dim], last_activation=True)
        n_vec = config.n_fields + int(self.has_dense)
        self.n_pairs = n_vec * (n_vec - 1) // 2
        # Derived (non-persistent) buffers are made on the CPU explicitly, so that a model built
        # under torch.device("meta") to receive loaded weights still computes them.
        # The upper triangle of the (n, n) dot products, as flat positions i * n + j: the pairs
        # lma::dot_interaction computes (on the CPU only those; its composed and ONNX forms
        # gather them from the flattened matrix with one GatherElements, as fast in onnxruntime
        # as anything tried: a Gather on axis 1 copies one float at a time there).
        iu = torch.triu_indices(n_vec, n_vec, offset=1, device="cpu")
        self.register_buffer("pair_index", iu[0] * n_vec + iu[1], persistent=False)
        if config.interaction not in ("dot", "dot-cat", "dot-wide"):
            raise ValueError(
                f"interaction must be 'dot', 'dot-cat' or 'dot-wide', got {config.interaction!r}"
            )
        self.cat_fields = config.interaction == "dot-cat"
        # "dot-wide": a linear (wide) logit over the raw dense features and the field vectors is
        # added to the top MLP's logit, like a logistic regression beside the deep part.
        self.wide = (
            nn.Linear(config.n_dense + config.n_fields * config.dim, 1)
            if config.interaction == "dot-wide" else None
        )
        top_in = self.n_pairs + (config.dim if self.has_dense else 0)
        top_in += config.n_fields * config.dim if self.cat_fields else 0
        self.top = mlp([top_in, *config.top_mlp, 1], last_activation=False, dropout=config.dropout)
        # Multi-valued fields: mean-pool their slots (padding excluded) into one vector per field.
        slot_fields = torch.tensor(config.slot_fields, dtype=torch.int64, device="cpu")
        self.pooled = len(set(config.slot_fields)) != len(config.slot_fields)
        pool = torch.zeros(len(config.slot_fields), config.n_fields, device="cpu")
        pool[torch.arange(len(config.slot_fields), device="cpu"), slot_fields] = 1.0
        self.register_buffer("pool", pool, persistent=False)
        self.first_order = first_order
        # The first-order table reads its rows from the embedding's token -> row map: resolve
        # each token once for both.
        self.shared_rows = (first_order is not None
                            and getattr(first_order, "rows_from", None) is embedding)
        self.linear = None
        if first_order is not None:
            # A logistic regression's starting point: every weight 0. The deep part's last layer
            # starts at 0 too, so training begins from the first-order model and the deep part
            # grows as a correction to it.
            with torch.no_grad():
                for p in first_order.parameters():
                    p.zero_()
            if self.has_dense:
                self.linear = nn.Linear(config.n_dense, 1)
                nn.init.zeros_(self.linear.weight)
                nn.init.zeros_(self.linear.bias)
            last = [m for m in self.top if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _pool(self, tokens: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens, (B, S, k) slot values -> (B, F, k): mean over each field's slots."""
        if not self.pooled:
            return e
        mask = (tokens != PAD_TOKEN).to(e.dtype)  # (B, S)
        w = mask[:, :, None] * self.pool[None]  # (B, S, F)
        denom = w.sum(1).clamp_min(1.0)  # (B, F)
        return torch.einsum("bsf,bsk->bfk", w, e) / denom[:, :, None]

    def first_order_logit(self, dense: torch.Tensor, tokens: torch.Tensor,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
        """The first-order term (B,) from standardised dense features and tokens (and, when the
        table shares the embedding's map, the tokens' rows if already resolved)."""
        assert self.first_order is not None
        scalars = self.first_order(tokens) if rows is None else self.first_order.gather(rows)
        z = self._pool(tokens, scalars).sum((1, 2))
        if self.linear is not None:
            z = z + self.linear(dense).squeeze(1)
        return z

    def field_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, F, d) one vector per field."""
        return self._pool(tokens, self.embedding(tokens))  # (B, F, d)

    def forward(self, dense: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """dense (B, n_dense) float32, tokens (B, S) int64 -> logits (B,)."""
        if self.has_dense:
            dense = (dense - self.dense_mean) / self.dense_std
        if self.wide_only:
            return self.first_order_logit(dense, tokens)
        rows = self.embedding.rows(tokens) if self.shared_rows else None
        vecs = (self.field_vectors(tokens) if rows is None
                else self._pool(tokens, self.embedding.gather(rows)))  # (B, F, d)
        x = self.bottom(dense) if self.has_dense else None  # (B, d)
        # [x, the upper triangle of the dot products of [x, field vectors]] (B, d + n_pairs)
        top_in = dot_interaction(vecs, self.pair_index, x)
        if self.cat_fields:
            top_in = torch.cat([top_in, vecs.flatten(1)], dim=1)  # + (B, F * d)
        logit = self.top(top_in).squeeze(1)
        if self.wide is not None:
            logit = logit + self.wide(torch.cat([dense, vecs.flatten(1)], dim=1)).squeeze(1)
        if self.first_order is not None:
            logit = logit + self.first_order_logit(dense, tokens, rows)
        return logit
