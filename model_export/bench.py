"""``lma bench op``: latency of the hashed-gather lookup alone, per implementation.

Sweeps batch B, block size Z and memory size M (F = 26 fields, d = 16, lma mode) over:
    torch     the pure-torch reference (eager)
    cpp       the ``lma::hashed_gather`` op with its C++ kernel
    compile   ``torch.compile`` of the pure-torch reference (dynamic shapes)
    onnx      onnxruntime running the model-local ONNX function (one HashedGather node)
and a full-table baseline: ``nn.Embedding`` with Criteo-Kaggle's 33.7M rows x 16 (2.16 GB).
Reports the median latency, lookups/s (token lookups: B x F), and an achieved bandwidth estimate
(bytes gathered + written + keys read, over the latency). Writes ``op_bench.md``, ``op_bench.json``
and ``op_bench.png`` (latency vs memory size, L2 / L3 marked) under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

F = 26
D = 16
L2_BYTES = 1 << 20
L3_BYTES = 32 << 20
DEFAULT_B = [1, 64, 512, 4096]
DEFAULT_Z = [1, 4, 16]
DEFAULT_LOG2M = [16, 18, 20, 22, 24, 25, 26]
IMPLS = ["torch", "cpp", "compile", "onnx", "full"]
ROW_ORDER = [*IMPLS, "cpp-aligned", "full+vocab"]


def _ints(text: str | None, default: list[int]) -> list[int]:
    return [int(x) for x in text.split(",") if x] if text else list(default)


POOL = 8  # distinct batches cycled through, so that small batches do not stay cache-hot


def cycling(fns: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs the next of ``fns`` on each call."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def time_it(fn: Callable[[], Any], repeats: int = 0, budget_s: float = 0.25) -> float:
    """Median wall time (ms) of ``fn`` after a warm-up; ``repeats`` or adaptive (>= 5 runs)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    n = repeats or int(min(200, max(5, budget_s / max(once, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _keys(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << 62), 1 << 62, (b, F), dtype=torch.int64, generator=g)


def _row(
    impl: str, b: int, z: int | None, m: int | None, ms: float, mem_bytes: int
) -> dict[str, Any]:
    lookups = b * F
    moved = lookups * D * 4 * 2 + lookups * 8  # gathered + written floats, keys read
    return {
        "impl": impl,
        "B": b,
        "Z": z,
        "M": m,
        "memory_MB": mem_bytes / 1e6,
        "ms": ms,
        "lookups_per_s": lookups / (ms / 1e3),
        "GB_per_s": moved / (ms / 1e3) / 1e9,
    }


def run_bench(
    batches: list[int],
    zs: list[int],
    log2ms: list[int],
    impls: list[str],
    full_rows: int,
    repeats: int = 0,
) -> list[dict[str, Any]]:
    """All measurements as rows of dicts (see ``_row``)."""
    from lma.ops import HashedGatherConfig, _native, hashed_gather, hashed_gather_reference

    rows: list[dict[str, Any]] = []
    if "cpp" in impls and _native.native_module() is None:
        logger.warning("C++ kernels unavailable (%s): skipping 'cpp'", _native.native_error())
        impls = [i for i in impls if i != "cpp"]
    keys = {b: [_keys(b, 1000 * b + i) for i in range(POOL)] for b in batches}
    compiled = torch.compile(hashed_gather_reference, dynamic=True) if "compile" in impls else None
    for z in zs:
        for lm in log2ms:
            m = 1 << lm
            cfg = HashedGatherConfig(dim=D, z=z, mode="lma", aligned=False, m=m, seed=1)
            consts = cfg.param_tensors()
            mem = torch.randn(m)
            sess = None
            if "onnx" in impls:
                sess = _ort_session(cfg, mem.numpy())
            for b in batches:
                ks = keys[b]
                fns: dict[str, Callable[[], Any]] = {}
                if "torch" in impls:
                    fns["torch"] = cycling(
                        [partial(hashed_gather_reference, mem, k, consts, cfg) for k in ks]
                    )
                if "cpp" in impls:
                    fns["cpp"] = cycling(
                        [partial(hashed_gather, mem, k, consts, cfg) for k in ks]
                    )
                if compiled is not None:
                    fns["compile"] = cycling(
                        [partial(compiled, mem, k, consts, cfg) for k in ks]
                    )
                if sess is not None:
                    fns["onnx"] = cycling(
                        [partial(sess.run, None, {"keys": k.numpy()}) for k in ks]
                    )
                with torch.no_grad():
                    for impl, fn in fns.items():
                        rows.append(_row(impl, b, z, m, time_it(fn, repeats), 4 * m))
                logger.info("Z=%d M=2^%d B=%d done", z, lm, b)
            mem = sess = None
    if "full" in impls and full_rows > 0:
        rows += _bench_full(batches, full_rows, repeats)
    if "cpp" in impls:
        rows += _bench_target(batches, repeats)
    return rows


def _ort_session(cfg: Any, memory: np.ndarray) -> Any:
    import onnxruntime as ort

    from model_export import onnx_op

    model = onnx_op.standalone_model(cfg, memory=memory)
    opts = ort.SessionOptions()
    threads = torch.get_num_threads()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _bench_full(batches: list[int], full_rows: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    try:
        table = torch.nn.Embedding(full_rows, D)
    except RuntimeError as exc:  # out of memory
        logger.warning("full-table baseline skipped (%s)", exc)
        return rows
    with torch.no_grad():
        table.weight.uniform_(-0.25, 0.25)
        for b in batches:
            g = torch.Generator().manual_seed(b)
            idxs = [torch.randint(0, full_rows, (b, F), generator=g) for _ in range(POOL)]
            ms = time_it(cycling([partial(table, i) for i in idxs]), repeats)
            rows.append(_row("full", b, None, full_rows * D, ms, full_rows * D * 4))
        # What a full-table model really does per lookup: token hash -> row (binary search in the
        # sorted vocabulary, as lma.embeddings.tables does), then the row gather.
        g = torch.Generator().manual_seed(7)
        vocab = torch.randint(-(1 << 62), 1 << 62, (full_rows,), generator=g).sort().values
        for b in batches:
            toks = [vocab[torch.randint(0, full_rows, (b, F), generator=g)] for _ in range(POOL)]

            def lookup(tok: torch.Tensor) -> torch.Tensor:
                return table(torch.searchsorted(vocab, tok))

            ms = time_it(cycling([partial(lookup, t) for t in toks]), repeats)
            rows.append(_row("full+vocab", b, None, full_rows * D, ms, full_rows * (D * 4 + 8)))
    return rows


def _bench_target(batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """The C++ op at the target point (Z = 16, M = 2^25) with blocks aligned to Z."""
    from lma.ops import HashedGatherConfig, hashed_gather

    m = 1 << 25
    cfg = HashedGatherConfig(dim=D, z=16, mode="lma", aligned=True, m=m, seed=1)
    consts = cfg.param_tensors()
    mem = torch.randn(m)
    rows = []
    with torch.no_grad():
        for b in batches:
            ks = [_keys(b, 1000 * b + i) for i in range(POOL)]
            fn = cycling([partial(hashed_gather, mem, k, consts, cfg) for k in ks])
            rows.append(_row("cpp-aligned", b, 16, m, time_it(fn, repeats), 4 * m))
    return rows


# ---------------------------------------------------------------- report


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups and the two targets."""
    by = {(r["impl"], r["B"], r["Z"], r["M"]): r for r in rows}
    ratios = []
    for (impl, b, z, m), r in by.items():
        if impl == "cpp" and ("torch", b, z, m) in by:
            ratios.append(by[("torch", b, z, m)]["ms"] / r["ms"])
    out: dict[str, Any] = {}
    if ratios:
        out["cpp_vs_torch_speedup"] = {
            "min": min(ratios),
            "median": statistics.median(ratios),
            "max": max(ratios),
            "points": len(ratios),
            "share_at_least_2x": sum(x >= 2 for x in ratios) / len(ratios),
        }
    full = {r["B"]: r for r in rows if r["impl"] == "full"}
    full_vocab = {r["B"]: r for r in rows if r["impl"] == "full+vocab"}
    target_m = 1 << 25
    cmp = []
    for (impl, b, z, m), r in by.items():
        if impl in ("cpp", "cpp-aligned") and z == 16 and m == target_m and b in full:
            c = {
                "B": b,
                "variant": "aligned" if impl == "cpp-aligned" else "unaligned",
                "lma_ms": r["ms"],
                "full_ms": full[b]["ms"],
                "ratio": r["ms"] / full[b]["ms"],
            }
            if b in full_vocab:
                c["full_vocab_ms"] = full_vocab[b]["ms"]
                c["ratio_vs_full_vocab"] = r["ms"] / full_vocab[b]["ms"]
            cmp.append(c)
    if cmp:
        out["lma_z16_vs_full"] = sorted(cmp, key=lambda c: (c["B"], c["variant"]))
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Hashed-gather lookup benchmark (`lma bench op`)",
        "",
        f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}. F = {F} fields, d = {D}, lma mode, unaligned blocks. "
        f"Median latency of one lookup call (cycling through {POOL} different batches, so small "
        "batches are not served from a hot cache); lookups/s counts token lookups (B x F); GB/s is an "
        "estimate of bytes moved (gathered + written floats, keys read) over the latency.",
        f"Mode: {'quick' if meta['quick'] else 'full'} sweep. Created {meta['created']}; "
        f"1-minute load average {meta['load_avg_1m_before']:.1f} before, "
        f"{meta['load_avg_1m_after']:.1f} after (other jobs share the machine when it exceeds "
        "the thread count, and the numbers are then noisy).",
        "",
    ]
    s = summary.get("cpp_vs_torch_speedup")
    if s:
        lines += [
            "## Targets",
            "",
            f"- C++ op vs torch eager reference: speed-up min {s['min']:.1f}x, median "
            f"{s['median']:.1f}x, max {s['max']:.1f}x over {s['points']} points; "
            f"{100 * s['share_at_least_2x']:.0f}% of points reach the 2x target.",
        ]
    if summary.get("lma_z16_vs_full"):
        lines += [
            "",
            "LMA Z=16 at 134 MB (M = 2^25, C++ op) against the 2.16 GB full table: `full` is the bare "
            "`nn.Embedding` row gather from precomputed row ids; `full+vocab` adds the token -> row "
            "binary search a full-table model needs (the LMA time includes its hashing).",
            "",
            "| B | LMA blocks | LMA ms | full ms | ratio | full+vocab ms | ratio | no slower than full? |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in summary["lma_z16_vs_full"]:
            fv = c.get("full_vocab_ms")
            lines.append(
                f"| {c['B']} | {c['variant']} | {_fmt_ms(c['lma_ms'])} | {_fmt_ms(c['full_ms'])} | "
                f"{c['ratio']:.2f} | {_fmt_ms(fv) if fv else '-'} | "
                f"{c.get('ratio_vs_full_vocab', float('nan')):.2f} | "
                f"{'yes' if c['ratio'] <= 1.02 else 'no'} |"
            )
    lines += [
        "",
        "## All points",
        "",
        "| impl | B | Z | M | memory MB | median ms | lookups/s | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["Z"] or 0, r["M"] or 0, r["B"], ROW_ORDER.index(r["impl"]))
    ):
        m = (
            f"2^{int(np.log2(r['M']))}"
            if not r["impl"].startswith("full")
            else f"{r['M'] // D:,} rows"
        )
        lines.append(
            f"| {r['impl']} | {r['B']} | {r['Z'] or '-'} | {m} | {r['memory_MB']:.1f} | "
            f"{_fmt_ms(r['ms'])} | {r['lookups_per_s']:.3g} | {r['GB_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no PNG")
        return False
    zs = sorted({r["Z"] for r in rows if r["Z"] is not None})
    bs = sorted({r["B"] for r in rows})
    b_show = bs[-1]
    fig, axes = plt.subplots(1, max(1, len(zs)), figsize=(5 * max(1, len(zs)), 4), squeeze=False)
    colors = {"torch": "C0", "cpp": "C1", "compile": "C2", "onnx": "C3", "full": "k"}
    for ax, z in zip(axes[0], zs, strict=False):
        for impl in ("torch", "cpp", "compile", "onnx"):
            pts = sorted(
                (r["memory_MB"] * 1e6, r["ms"])
                for r in rows
                if r["impl"] == impl and r["Z"] == z and r["B"] == b_show
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[impl], label=impl
                )
        full = [r for r in rows if r["impl"] == "full" and r["B"] == b_show]
        if full:
            ax.axhline(full[0]["ms"], color="k", ls="--", label="full table 2.16 GB")
        ax.axvline(L2_BYTES, color="gray", ls=":", label="L2 1 MB")
        ax.axvline(L3_BYTES, color="gray", ls="-.", label="L3 32 MB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("memory size (bytes, M x 4)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"Z={z}, B={b_show}, F={F}, d={D}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main_bench_op(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        batches, zs, log2ms = [64, 4096], [1, 16], [16, 20, 25]
    else:
        batches, zs, log2ms = DEFAULT_B, DEFAULT_Z, DEFAULT_LOG2M
    batches = _ints(args.batches, batches)
    zs = _ints(args.zs, zs)
    log2ms = _ints(args.log2m, log2ms)
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    if args.no_full_table:
        impls = [i for i in impls if i != "full"]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run_bench(batches, zs, log2ms, impls, args.full_rows, args.repeats)
    summary = summarise(rows)
    import onnxruntime

    meta = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "quick": bool(args.quick),
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - t0,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            meta["cpu"] = f"{names[0]} ({len(names)} logical CPUs)"
    except OSError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "op_bench_quick" if args.quick else "op_bench"
    md = markdown(rows, summary, meta)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1)
    )
    plot(rows, out / f"{stem}.png")
    head = md.split("## All points")[0]
    import sys

    sys.stdout.write(head + f"\nwrote {out / (stem + '.md')}, .json, .png\n")
    return 0
