"""The LMA hot serving form against the hash form: one LMA 16x model (default Z), converted with
``LMAEmbedding.to_serving("hot")``, both exported with ``torch.export`` and timed in one process,
calls interleaved (5 rounds of hash, hot), one thread; checks that both give bit-identical logits.

    flock /tmp/lma-bigjob.lock taskset -c 0 python scripts/bench_hot_form.py BENCH_DIR

``BENCH_DIR`` is a folder prepared by ``scripts/bench_model.py`` (its ``feature_map`` and
``signatures.npz``: an UNTRAINED model on a synthetic value-set vocabulary; e.g. ``--fmap-rows
1000000`` or the default Criteo-Kaggle size). ``--op`` times the two ops alone instead, at the
Kaggle shape (M = 33.7M floats, 107k hot rows, 88% of the tokens hot). ``--onnx`` times the
ONNX models ``bench_model.py --only lma16/table,lma16/hot --export-only`` wrote to ``BENCH_DIR``
in onnxruntime (one thread), interleaved likewise; those two are built separately (their MLPs'
random initialisations differ), so only their times are compared. Prints one line per row
count: median thread CPU ms of each form and hot / hash.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def models(bench_dir: Path) -> None:
    import bench_model as bm
    import torch

    model, fmap = bm._model(bench_dir, bm.variants(True)["lma16/table"])
    hot = copy.deepcopy(model)
    hot.embedding.to_serving("hot")
    dense, tok = bm._batches(fmap, 8, 0)[0]
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    progs = {}
    with torch.no_grad():
        for name, m in (("hash", model), ("hot", hot)):
            progs[name] = torch.export.export(
                m, (torch.from_numpy(dense), torch.from_numpy(tok)),
                dynamic_shapes=({0: batch}, {0: batch})).module()
    for rows in (1, 100, 1000):
        bs = bm._batches(fmap, rows, 100 + rows)
        with torch.no_grad():
            for d, t in bs:
                a = progs["hash"](torch.from_numpy(d), torch.from_numpy(t))
                b = progs["hot"](torch.from_numpy(d), torch.from_numpy(t))
                if not torch.equal(a, b):
                    raise SystemExit(f"{rows} rows: the hot form's logits differ")
        share = float((hot.embedding.hot_index(torch.from_numpy(bs[0][1])) >= 0).float().mean())
        res: dict[str, tuple[list[float], list[float]]] = {"hash": ([], []), "hot": ([], [])}
        for _ in range(5):
            for name, prog in progs.items():
                def fn(b, prog=prog):  # noqa: ANN001, ANN202
                    with torch.no_grad():
                        return prog(torch.from_numpy(b[0]), torch.from_numpy(b[1]))
                w, c = bm._time(fn, bs)
                res[name][0].append(w)
                res[name][1].append(c)
        med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
        sys.stdout.write(
            f"rows {rows} (hot tokens {share:.3f}): hash wall {med['hash'][0]:.3f} cpu "
            f"{med['hash'][1]:.3f} ms | hot wall {med['hot'][0]:.3f} cpu {med['hot'][1]:.3f} ms | "
            f"hot/hash cpu {med['hot'][1] / med['hash'][1]:.2f}; identical logits\n")


def ops() -> None:
    import torch

    from lma.ops import HashedGatherConfig, KeyLookup, hashed_gather, hot_gather

    m, n_hot = 33_748_837, 107_000
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=m, seed=0)
    c = cfg.param_tensors()
    g = torch.Generator().manual_seed(0)
    mem = torch.randn(m, generator=g)
    sig_tok = torch.randint(-(1 << 62), 1 << 62, (n_hot,), generator=g)
    hot = torch.randn(n_hot, 16, generator=g)
    kl = KeyLookup.build(sig_tok.numpy(), np.arange(n_hot))
    minus1 = torch.tensor(-1)

    def bench(fn) -> float:  # noqa: ANN001
        for _ in range(5):
            fn()
        ts = []
        for _ in range(200):
            t = time.thread_time()
            fn()
            ts.append(time.thread_time() - t)
        return statistics.median(ts) * 1e3

    for rows in (1, 100, 1000):
        tok = torch.randint(-(1 << 62), 1 << 62, (rows, 26), generator=g)
        pick = torch.rand(rows, 26, generator=g) < 0.88
        tok[pick] = sig_tok[torch.randint(0, n_hot, (int(pick.sum()),), generator=g)]
        keys = torch.randint(-(1 << 62), 1 << 62, (rows, 26), generator=g)
        idx = kl(tok, minus1)
        with torch.no_grad():
            a = bench(lambda keys=keys: hashed_gather(mem, keys, c, cfg))
            b = bench(lambda idx=idx, tok=tok: hot_gather(mem, hot, idx, tok, c, cfg))
            k = bench(lambda tok=tok: kl(tok, minus1))
        sys.stdout.write(f"rows {rows}: lma::hashed_gather {a:.3f} ms, lma::hot_gather {b:.3f} "
                         f"ms, key lookup (token -> hot row) {k:.3f} ms (thread CPU)\n")


def onnx_models(bench_dir: Path) -> None:
    import bench_model as bm
    import onnxruntime as ort

    fmap = bm._fmap(bench_dir)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = {n: ort.InferenceSession(str(bench_dir / d / "model.onnx"), so,
                                    providers=["CPUExecutionProvider"])
            for n, d in (("hash", "lma16_table"), ("hot", "lma16_hot"))}
    for rows in (1, 100, 1000):
        bs = bm._batches(fmap, rows, 100 + rows)
        res: dict[str, list[float]] = {n: [] for n in sess}
        for _ in range(5):
            for n, s in sess.items():
                _, c = bm._time(lambda b, s=s: s.run(None, {"dense": b[0], "tokens": b[1]}), bs)
                res[n].append(c)
        m = {n: statistics.median(v) for n, v in res.items()}
        sys.stdout.write(f"onnxruntime rows {rows}: hash cpu {m['hash']:.3f} ms | hot cpu "
                         f"{m['hot']:.3f} ms | hot/hash {m['hot'] / m['hash']:.2f}\n")


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bench_dir", nargs="?", type=Path)
    ap.add_argument("--op", action="store_true", help="time the two ops alone")
    ap.add_argument("--onnx", action="store_true",
                    help="time bench_model.py's exported lma16/table and lma16/hot ONNX models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.op:
        ops()
    elif args.bench_dir is None:
        ap.error("give BENCH_DIR (prepared by scripts/bench_model.py) or --op")
    elif args.onnx:
        onnx_models(args.bench_dir)
    else:
        models(args.bench_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
