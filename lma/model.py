"""DLRM: bottom MLP over dense features, pluggable embeddings, pairwise dot interaction, top MLP.

The model returns logits; training adds the loss, serving adds the sigmoid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lma.embeddings.base import Embedding
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


class DLRM(nn.Module):
    def __init__(self, config: DLRMConfig, embedding: Embedding):
        super().__init__()
        if embedding.dim != config.dim:
            raise ValueError(f"embedding dim {embedding.dim} != model dim {config.dim}")
        self.config = config
        self.embedding = embedding
        self.has_dense = config.n_dense > 0
        # Dense inputs are standardised with the training rows' statistics (set by the trainer,
        # saved with the weights); identity until then.
        self.register_buffer("dense_mean", torch.zeros(config.n_dense))
        self.register_buffer("dense_std", torch.ones(config.n_dense))
        if self.has_dense:
            self.bottom = mlp([config.n_dense, *config.bottom_mlp, config.dim], last_activation=True)
        n_vec = config.n_fields + int(self.has_dense)
        self.n_pairs = n_vec * (n_vec - 1) // 2
        iu = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("pair_i", iu[0], persistent=False)
        self.register_buffer("pair_j", iu[1], persistent=False)
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
        slot_fields = torch.tensor(config.slot_fields, dtype=torch.int64)
        self.pooled = len(set(config.slot_fields)) != len(config.slot_fields)
        pool = torch.zeros(len(config.slot_fields), config.n_fields)
        pool[torch.arange(len(config.slot_fields)), slot_fields] = 1.0
        self.register_buffer("pool", pool, persistent=False)

    def field_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, F, d) one vector per field."""
        e = self.embedding(tokens)  # (B, S, d)
        if not self.pooled:
            return e
        mask = (tokens != PAD_TOKEN).to(e.dtype)  # (B, S)
        w = mask[:, :, None] * self.pool[None]  # (B, S, F)
        denom = w.sum(1).clamp_min(1.0)  # (B, F)
        return torch.einsum("bsf,bsd->bfd", w, e) / denom[:, :, None]

    def forward(self, dense: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """dense (B, n_dense) float32, tokens (B, S) int64 -> logits (B,)."""
        vecs = self.field_vectors(tokens)  # (B, F, d)
        if self.has_dense:
            dense = (dense - self.dense_mean) / self.dense_std
            x = self.bottom(dense)  # (B, d)
            vecs = torch.cat([x[:, None, :], vecs], dim=1)  # (B, F + 1, d)
        inter = torch.bmm(vecs, vecs.transpose(1, 2))  # (B, n, n)
        pairs = inter[:, self.pair_i, self.pair_j]  # (B, n_pairs)
        parts = [x, pairs] if self.has_dense else [pairs]
        if self.cat_fields:
            parts.append(vecs[:, int(self.has_dense):].flatten(1))  # (B, F * d)
        top_in = torch.cat(parts, dim=1) if len(parts) > 1 else pairs
        logit = self.top(top_in).squeeze(1)
        if self.wide is not None:
            fields = vecs[:, int(self.has_dense):].flatten(1)  # (B, F * d)
            logit = logit + self.wide(torch.cat([dense, fields], dim=1)).squeeze(1)
        return logit
