"""Optimizers for huge embedding tables.

Adam keeps two state tensors the size of each parameter; for a 540M-float table that is 4.3 GB
beside 2.2 GB of weights. Row-wise Adagrad, the optimizer production DLRM training uses for
its tables (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``), keeps one accumulator per table row: the running
sum of the mean squared gradient of the row. A row's step is ``lr * g / (sqrt(acc) + eps)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of each 2-D parameter (``(rows,)`` floats of state).

    1-D parameters (the flat shared memories of ROBE-Z and LMA, where a token's floats are
    scattered over the memory and there are no rows) get one accumulator per element: plain
    Adagrad, still one state tensor instead of Adam's two. Sparse (COO) and dense gradients are
    both accepted; sparse ones are coalesced first, so a row met several times in a batch takes
    one step with its summed gradient, as dense Adagrad would.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}")
        if eps <= 0:
            raise ValueError(f"RowWiseAdagrad: eps must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @staticmethod
    def _rows(p: torch.Tensor) -> int:
        return p.shape[0] if p.dim() >= 1 else 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(self._rows(p), dtype=torch.float32, device=p.device)
                acc = state["sum"]
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    idx = g.indices()[0]
                    vals = g.values()
                    sq = vals.pow(2) if vals.dim() == 1 else vals.pow(2).flatten(1).mean(1)
                    acc.index_add_(0, idx, sq.to(acc.dtype))
                    scale = acc.index_select(0, idx).sqrt_().add_(eps)
                    if vals.dim() > 1:
                        scale = scale.view(-1, *([1] * (vals.dim() - 1)))
                    p.index_add_(0, idx, (vals / scale).mul_(-lr).to(p.dtype))
                else:
                    sq = g.pow(2) if g.dim() <= 1 else g.pow(2).flatten(1).mean(1)
                    acc.add_(sq.to(acc.dtype).reshape(acc.shape))
                    scale = acc.sqrt().add_(eps)
                    if g.dim() > 1:
                        scale = scale.view(-1, *([1] * (g.dim() - 1)))
                    p.add_((g / scale).mul_(-lr).to(p.dtype))
        return loss

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now."""
        return sum(int(s["sum"].numel() * s["sum"].element_size())
                   for s in self.state.values() if "sum" in s)
