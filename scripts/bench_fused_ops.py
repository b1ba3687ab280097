"""The fused CPU ops against the composed forms they replace, each pair in one process with calls
alternating (this machine's speed drifts over minutes), one thread:

- ``lma::dot_interaction`` (C++) vs its composed form (concatenate, bmm, gather, concatenate) at
  1000 rows x 27 vectors x 16;
- ``lma::hot_embed`` (the hot form's token -> hot row lookup and gather in one pass) vs
  ``lma::key_lookup`` then ``lma::hot_gather``, on the LMA 16x hot-form embedding of
  ``scripts/bench_model.py`` (its ``--out`` folder, prepared) and its 1000-row request draws;
- the interaction's forward + backward at a training batch (2048 rows);
- ``lma::key_lookup`` per key on a cache-resident table (1000 keys) and on the hot table.

    taskset -c 0 python scripts/bench_fused_ops.py --bench-out /tmp/bench_model [--calls 400]

Prints a markdown table (median ms per call, ratio of medians).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def alternate(fns: dict[str, Callable[[int], object]], calls: int) -> dict[str, float]:
    """Median ms per call of each function, calls alternating between them."""
    for f in fns.values():
        for i in range(10):
            f(i)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(calls):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(i)
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bench-out", default="/tmp/bench_model",
                    help="scripts/bench_model.py --out folder (feature map and signatures)")
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import bench_model as bm

    from lma.ops import KeyLookup, _native, hot_embed, hot_gather, key_lookup
    from lma.ops.interaction import dot_interaction, dot_interaction_reference

    if _native.native_module() is None:
        sys.exit(f"the C++ kernels are unavailable: {_native.native_error()}")
    rows: list[tuple[str, float, float, str]] = []

    g = torch.Generator().manual_seed(0)
    vecs = [torch.randn(1000, 26, 16, generator=g) for _ in range(4)]
    pre = [torch.randn(1000, 16, generator=g) for _ in range(4)]
    iu = torch.triu_indices(27, 27, 1)
    pairs = iu[0] * 27 + iu[1]
    r = alternate({"composed": lambda i: dot_interaction_reference(vecs[i % 4], pairs, pre[i % 4]),
                   "fused": lambda i: dot_interaction(vecs[i % 4], pairs, pre[i % 4])}, args.calls)
    rows.append(("dot interaction, 1000 rows x 27 x 16", r["composed"], r["fused"],
                 "bmm + gather + 2 cat -> lma::dot_interaction"))

    # Training: forward and backward (the op's backward is the composed formula).
    vt = [torch.randn(2048, 26, 16, generator=g, requires_grad=True) for _ in range(2)]
    xt = [torch.randn(2048, 16, generator=g, requires_grad=True) for _ in range(2)]

    def train_step(f: Callable[..., torch.Tensor], i: int) -> None:
        f(vt[i % 2], pairs, xt[i % 2]).sum().backward()

    r = alternate({"composed": lambda i: train_step(dot_interaction_reference, i),
                   "fused": lambda i: train_step(dot_interaction, i)}, args.calls // 2)
    rows.append(("dot interaction forward + backward, 2048 rows", r["composed"], r["fused"],
                 "a training step's share"))

    out = Path(args.bench_out)
    model, fmap = bm._model(out, bm.variants(True)["lma16/hot"])
    emb = model.embedding
    toks = [torch.from_numpy(b[1]) for b in bm._batches(fmap, 1000, 1100)]
    c, cfg = emb.gather_constants(), emb.gather_config
    with torch.no_grad():
        for t in toks:
            assert torch.equal(hot_embed(emb.memory, emb.hot, emb.hot_lookup.table, t, c, cfg),
                               hot_gather(emb.memory, emb.hot, emb.hot_index(t), t, c, cfg))
        r = alternate({
            "composed": lambda i: hot_gather(emb.memory, emb.hot, emb.hot_index(toks[i % 8]),
                                             toks[i % 8], c, cfg),
            "fused": lambda i: hot_embed(emb.memory, emb.hot, emb.hot_lookup.table, toks[i % 8],
                                         c, cfg)}, args.calls)
    rows.append(("LMA 16x hot form, 1000 rows x 26 tokens", r["composed"], r["fused"],
                 "key_lookup + hot_gather -> lma::hot_embed (bit-identical)"))

    keys = np.unique(np.random.default_rng(0).integers(-(2**62), 2**62, 1000))
    small = KeyLookup.build(keys, np.arange(len(keys), dtype=np.int64)).table
    q = [torch.from_numpy(np.random.default_rng(i).choice(keys, 26000)) for i in range(4)]
    m1 = torch.tensor(-1)
    r = alternate({"small": lambda i: key_lookup(q[i % 4], m1, small),
                   "hot": lambda i: key_lookup(toks[i % 8], m1, emb.hot_lookup.table)}, args.calls)
    rows.append(("key_lookup ns per key: 1000-key table / hot table", r["small"] / 26e-3,
                 r["hot"] / 26e-3, "26,000 keys per call"))

    sys.stdout.write("| what | composed (or first) ms | fused (or second) ms | ratio | note |\n"
                     "|---|---|---|---|---|\n")
    for what, a, b, note in rows:
        sys.stdout.write(f"| {what} | {a:.3f} | {b:.3f} | {b / a:.2f} | {note} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
