"""Train/validation/test splits: seeded random (the reference protocol) and time-ordered."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _bounds(n: int, fractions: Sequence[float]) -> tuple[int, int]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    f = [float(x) for x in fractions]
    if min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    a = int(n * f[0])
    b = min(int(n * (f[0] + f[1])), n)
    return a, b


def random_split(
    n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, val, test).

    ``perm = np.random.default_rng(seed).permutation(n)``; the first ``int(n * f_train)`` rows of
    ``perm`` are train, up to ``int(n * (f_train + f_val))`` validation, the rest test.
    """
    a, b = _bounds(n, fractions)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:a], perm[a:b], perm[b:]


def time_split(
    times: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, val, test) in time order: earliest rows train, latest test.

    Rows with equal times keep their file order (stable sort), so the split is deterministic.
    """
    times = np.asarray(times)
    if times.ndim != 1:
        raise ValueError(f"times must be 1-D, got shape {times.shape}")
    a, b = _bounds(len(times), fractions)
    order = np.argsort(times, kind="stable")
    return order[:a], order[a:b], order[b:]
