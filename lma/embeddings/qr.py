"""Quotient-remainder (compositional) embeddings, per field (Shi et al., KDD 2020).

Each field f has ``n_f`` rows of a full table: its vocabulary (count >= min_count, sorted token
hashes; row 1 + position) and one OOV row (row 0). Row ``i`` is written in a mixed radix
``(m_0, ..., m_{k-1})`` with ``prod m_j >= n_f``; digit ``j`` selects a row of component table j,
and the embedding is the element-wise product of the k component rows. For k = 2 this is the
quotient-remainder trick (``i % m`` and ``i // m``); k = 1 is a full table; k >= 3 is the paper's
generalised version, used when the budget is too small for two tables of ~sqrt(n_f) rows. Distinct
rows have distinct digit tuples, so every vocabulary token gets its own embedding.

Budget: radices are chosen per field so that ``d * sum of component rows <= spec.n_params``: a
common compression factor lambda is found by bisection, and each field takes its largest
configuration with at most ``n_f / lambda`` rows (never below its smallest configuration).

Initialisation: component entries U(+-a_k) with ``(a_k^2 / 3)^k = 1 / (3 d)``, so a product of k
of them has the variance of a full-table element under U(+-1/sqrt(d)) (the full tables' init).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lma.embeddings.base import Embedding, EmbeddingSpec, register
from lma.embeddings.tables import lookup_option
from lma.features import FeatureMap
from lma.ops.key_lookup import KeyLookup


def _candidates(n: int) -> list[tuple[int, ...]]:
    """Mixed-radix layouts of n rows, one per distinct total row count, fewest rows last."""
    cands: dict[int, tuple[int, ...]] = {n: (n,)}
    if n > 1:
        for m in range(2, math.isqrt(n - 1) + 2):  # remainder radix m, quotient radix ceil(n/m)
            q = -(-n // m)
            rows = m + q
            if rows < n and rows not in cands:
                cands[rows] = (m, q)
        k = 3
        while 2**k <= 2 * n and k <= 64:
            m = math.ceil(n ** (1.0 / k))
            while m > 2 and (m - 1) ** k >= n:
                m -= 1
            last = -(-n // m ** (k - 1))
            radices = (m,) * (k - 1) + (last,)
            rows = sum(radices)
            if rows not in cands:
                cands[rows] = radices
            k += 1
    return [cands[r] for r in sorted(cands, reverse=True)]


def choose_radices(sizes: list[int], dim: int, budget: int) -> list[tuple[int, ...]]:
    """Per-field mixed radices with ``dim * total rows <= budget``, as close to it as one common
    compression factor allows. Raises ValueError when even the smallest layouts do not fit."""
    layouts = [_candidates(n)[::-1] for n in sizes]  # fewest rows first
    rows = [np.array([sum(c) for c in ls], dtype=np.float64) for ls in layouts]  # ascending

    def pick(lam: float) -> list[int]:
        # Largest layout with at most n / lam rows, else the smallest one.
        return [
            max(int(np.searchsorted(r, n / lam, side="right")) - 1, 0)
            for n, r in zip(sizes, rows, strict=True)
        ]

    def total(choice: list[int]) -> int:
        return dim * int(sum(r[i] for r, i in zip(rows, choice, strict=True)))

    smallest = [0] * len(sizes)
    if total(smallest) > budget:
        raise ValueError(
            f"qr: the smallest compositional layout needs {total(smallest)} parameters, above the "
            f"budget of {budget}; lower the compression (or the dimension)"
        )
    lam = 1.0
    if total(pick(1.0)) > budget:
        lo, hi = 1.0, float(max(sizes)) + 1.0  # total(pick(lo)) > budget >= total(pick(hi))
        while hi / lo > 1 + 1e-9:
            mid = math.sqrt(lo * hi)
            if total(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        lam = hi
    return [ls[i] for ls, i in zip(layouts, pick(lam), strict=True)]


@register
class QREmbedding(Embedding):
    """Per-field compositional embeddings: element-wise product of k component rows."""

    kind = "qr"

    def __init__(self, spec: EmbeddingSpec, vocabs: list[np.ndarray], slot_fields: list[int]):
        super().__init__(spec)
        d = spec.dim
        sizes = [len(v) + 1 for v in vocabs]  # + the OOV row (row 0)
        self.radices = choose_radices(sizes, d, spec.n_params)
        n_comp = max(len(r) for r in self.radices)

        # Global sorted vocabulary -> the token's row in its own field (1 + position; OOV = 0).
        all_tok = np.concatenate([np.asarray(v, np.int64) for v in vocabs]) if vocabs else np.zeros(0, np.int64)
        local = np.concatenate([np.arange(1, len(v) + 1) for v in vocabs]) if vocabs else np.zeros(0)
        order = np.argsort(all_tok, kind="stable")
        self.register_buffer("vocab", torch.from_numpy(np.ascontiguousarray(all_tok[order])))
        self.register_buffer("local_row", torch.from_numpy(local[order].astype(np.int32)))
        self.lookup = lookup_option(spec)
        # Not stored: QR models are small, and their state dict predates stored key tables.
        self.key_table = (KeyLookup.build(all_tok[order], local[order].astype(np.int64),
                                          persistent=False)
                          if self.lookup == "table" else None)
        self.register_buffer("oov_row", torch.zeros(1, dtype=torch.int64), persistent=False)

        # Component tables: table j stacks component j of every field with >= j + 1 components.
        n_slots = len(slot_fields)
        div = np.ones((n_slots, n_comp), np.int64)
        rad = np.ones((n_slots, n_comp), np.int64)
        off = np.zeros((n_slots, n_comp), np.int64)
        active = np.zeros((n_slots, n_comp), bool)
        field_off = np.zeros((len(sizes), n_comp), np.int64)
        comp_rows = [0] * n_comp
        for f, r in enumerate(self.radices):
            for j, m in enumerate(r):
                field_off[f, j] = comp_rows[j]
                comp_rows[j] += m
        for s, f in enumerate(slot_fields):
            r = self.radices[f]
            for j, m in enumerate(r):
                div[s, j] = math.prod(r[:j])
                rad[s, j] = m
                off[s, j] = field_off[f, j]
                active[s, j] = True
        self.register_buffer("digit_div", torch.from_numpy(div))  # (S, K)
        self.register_buffer("digit_rad", torch.from_numpy(rad))  # (S, K)
        self.register_buffer("digit_off", torch.from_numpy(off))  # (S, K)
        self.register_buffer("digit_active", torch.from_numpy(active))  # (S, K)
        self.components = nn.ParameterList(
            [nn.Parameter(torch.empty(n, d)) for n in comp_rows]  # (rows_j, d)
        )
        g = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for f, r in enumerate(self.radices):
                k = len(r)
                bound = math.sqrt(3.0) * (1.0 / (3.0 * d)) ** (1.0 / (2 * k))
                for j, m in enumerate(r):
                    w = self.components[j]
                    a = int(field_off[f, j])
                    w[a : a + m].uniform_(-bound, bound, generator=g)

    @classmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> QREmbedding:
        return cls(spec, feature_map.vocab(spec.min_count), feature_map.schema.slot_fields())

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> (B, S) int64 row of the token in its field's table (0 = OOV)."""
        if self.key_table is not None:
            return self.key_table(tokens, self.oov_row)
        n = self.vocab.shape[0]
        if n == 0:
            return torch.zeros_like(tokens)
        pos = torch.searchsorted(self.vocab, tokens).clamp_(max=n - 1)
        found = self.vocab[pos] == tokens
        return torch.where(found, self.local_row[pos].long(), torch.zeros_like(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S, d): product of the component rows of each token's row."""
        rows = self.rows(tokens)  # (B, S)
        idx = (rows[..., None] // self.digit_div) % self.digit_rad + self.digit_off  # (B, S, K)
        out: torch.Tensor | None = None
        for j, w in enumerate(self.components):
            e = F.embedding(idx[..., j], w)  # (B, S, d)
            e = torch.where(self.digit_active[:, j, None], e, torch.ones_like(e))
            out = e if out is None else out * e
        assert out is not None
        return out

    def state_bytes(self) -> int:
        """The key table (or the sorted vocabulary (int64) and each token's row (int32))."""
        if self.key_table is not None:
            return self.key_table.nbytes()
        return int(self.vocab.numel() * 8 + self.local_row.numel() * 4)

    def extra_state_arrays(self) -> dict[str, np.ndarray]:
        return {}
