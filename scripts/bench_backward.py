"""Forward + backward of a gather from a shared (M,) memory, by implementation.

    python scripts/bench_backward.py

B = 2048 rows, S = 26 slots, d = 16 floats each (852k gathered floats per call); median ms of
forward + backward(sum) over repeated calls, for M in {1e5, 1e6, 1e7}.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from lma.ops import HashedGatherConfig, hashed_gather

B, S, D = 2048, 26, 16


def median_ms(fn, reps: int = 7) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * float(np.median(ts))


def measure(m: int) -> list[float]:
    """ms of forward + backward for each implementation at memory size ``m``."""
    mem = torch.randn(m, requires_grad=True)
    idx = torch.randint(0, m, (B * S * D,))
    keys = torch.randint(-(2**62), 2**62, (B, S))

    def adv() -> None:
        mem.grad = None
        mem[idx].sum().backward()

    def sel() -> None:
        mem.grad = None
        mem.index_select(0, idx).sum().backward()

    def emb() -> None:
        mem.grad = None
        F.embedding(idx, mem.view(-1, 1)).sum().backward()

    def op(z: int):
        cfg = HashedGatherConfig(D, z, "robez", False, m)
        consts = cfg.param_tensors()

        def run() -> None:
            mem.grad = None
            hashed_gather(mem, keys, consts, cfg).sum().backward()

        return run

    return [median_ms(f) for f in (adv, sel, emb, op(1), op(16))]


def main() -> None:
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| M | advanced indexing | index_select | F.embedding | hashed_gather Z=1 | Z=16 |")
    print("|---|---|---|---|---|---|")
    for m in (10**5, 10**6, 10**7):
        row = measure(m)
        print(f"| {m:.0e} | " + " | ".join(f"{t:.0f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()
