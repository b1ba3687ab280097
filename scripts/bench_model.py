"""Model latency at the Criteo-Kaggle vocabulary: full vs LMA 16x vs ROBE-Z 16x, onnxruntime and
the torch program, key lookup before (binary search) and after (key table), and the share of key
resolution; also LMA's block size Z (1, 4, 16; aligned or not).

    flock /tmp/lma-bigjob.lock python scripts/bench_model.py --out /tmp/bench_model [--quick]

Models are UNTRAINED: built through the project's API (``build_embedding`` + ``build_dlrm`` with
``lma train``'s default DLRM) on a synthetic feature map of the Kaggle vocabulary
(``lma.data.synthetic.value_set_feature_map``, preset ``kaggle``, 45,840,617 rows: ~33.7M tokens);
LMA's signature table signs the most frequent tokens (as many as a 125k-row sample signs: 107k)
with random signatures. Latency does not depend on training; AUC does and is not measured here.
``lma16/hot`` is LMA 16x (default Z) in the hot serving form ``lma export`` writes by default
(``LMAEmbedding.to_serving("hot")``: the signed tokens' rows precomputed); its key resolution is
token -> hot row (``-1`` for the hashed tokens).

Every measurement is its own process (one engine per process), pinned to core 0 (``taskset``)
with one thread: ``prepare`` builds the feature map once; ``export`` builds a model and writes its
ONNX files (whole model and key resolution alone); ``time`` loads one engine and times 1, 100 and
1000 rows (token draws follow the value counts, 5% unseen; 8 batches cycled; median wall-clock
and median thread CPU time, which is steadier on a contended machine). The torch
program engine is ``torch.export`` of the eager model, built in the timing process. Peak RSS of
each process is recorded (``ru_maxrss``). Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = [1, 100, 1000]
# onnxruntime runs model.onnx as exported (the ai.lma nodes as their ONNX functions: what every
# execution provider runs) or with the native ops library registered (lma.ort_ops: the C++
# kernels, what CPU serving runs by default), its weights mapped from the file as onnxruntime
# loads them (serving's default, LMA_SERVE_WEIGHTS=mmap) or, with "/private", read into arrays
# of the process's own memory (LMA_SERVE_WEIGHTS=private; numpy asks for transparent huge pages
# for large arrays, which the page cache's file mappings do not get); torch is the torch.export
# program (its tables are the process's own memory too).
ENGINES = ("onnxruntime", "onnxruntime+native", "onnxruntime+native/private", "torch")
N_SIGNED = 107_000  # tokens a 125k-row sample signs at this vocabulary (issue 9)
UNSEEN = 0.05


def variants(quick: bool) -> dict[str, dict[str, Any]]:
    # Most informative first (results.json is written after every measurement).
    v = {
        "full/table": {"kind": "full", "options": {"lookup": "table"}},
        "lma16/table": {"kind": "lma", "options": {"lookup": "table"}},
        "lma16/hot": {"kind": "lma", "options": {"lookup": "table"}, "serve": "hot"},
        "robez16": {"kind": "robez", "options": {}},
        "full/search": {"kind": "full", "options": {"lookup": "search"}},
        "lma16/search": {"kind": "lma", "options": {"lookup": "search"}},
    }
    # LMA's block size (Z = 1 is lma16/table above).
    zs = [(4, False), (16, False), (4, True), (16, True)]
    for z, al in zs[: 1 if quick else None]:
        v[f"lma16/z{z}{'a' if al else ''}"] = {"kind": "lma", "options": {"lookup": "table", "z": z,
                                                                          "aligned": al}}
    return v


def _fmap(out: Path):  # noqa: ANN202
    from lma.features import FeatureMap

    return FeatureMap.load(out / "feature_map")


def _model(out: Path, spec: dict[str, Any]):  # noqa: ANN202
    import torch

    from lma.embeddings import EmbeddingSpec, build_embedding
    from lma.model import DLRMConfig, build_dlrm
    from lma.signatures import SignatureTable

    fmap = _fmap(out)
    dim = 16
    full = fmap.full_table_rows(1) * dim
    kind = spec["kind"]
    n_params = full if kind == "full" else full // 16
    es = EmbeddingSpec(kind=kind, dim=dim, n_params=n_params, seed=0, options=dict(spec["options"]))
    state = {}
    if kind == "lma":
        sig = np.load(out / "signatures.npz")
        state = {"signatures": SignatureTable(sig["tokens"], sig["signatures"], {"untrained": True})}
    with torch.no_grad():
        emb = build_embedding(es, fmap, **state)
        cfg = DLRMConfig(n_dense=13, slot_fields=fmap.schema.slot_fields(), dim=dim)
        model = build_dlrm(cfg, emb, fmap).eval()
    if spec.get("serve") == "hot":
        model.embedding.to_serving("hot")
    return model, fmap


class _Resolve:
    """Key resolution alone, as the model does it: tokens -> rows (full), keys (lma), or hot rows
    (-1 where hashed: the lma hot form)."""

    @staticmethod
    def module(model):  # noqa: ANN001, ANN205
        import torch

        emb = model.embedding

        class R(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = emb

            def forward(self, tokens: torch.Tensor) -> torch.Tensor:
                if getattr(self.emb, "serve", "hash") == "hot":
                    return self.emb.hot_index(tokens)
                return self.emb.resolve_keys(tokens) if hasattr(self.emb, "resolve_keys") \
                    else self.emb.rows(tokens)

        return R().eval()


def _batches(fmap, rows: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    sf = fmap.schema.slot_fields()
    cdf = []
    for f in range(len(fmap.tokens)):
        c = np.cumsum(np.asarray(fmap.counts[f], dtype=np.float64))
        cdf.append(c / c[-1])
    out = []
    for _ in range(8):
        cols = []
        for f in sf:
            idx = np.minimum(np.searchsorted(cdf[f], rng.random(rows)), len(cdf[f]) - 1)
            cols.append(fmap.tokens[f][idx])
        tok = np.stack(cols, axis=1).astype(np.int64)
        unseen = rng.random(tok.shape) < UNSEEN
        tok[unseen] = rng.integers(-(2**63), 2**63 - 1, int(unseen.sum()), dtype=np.int64)
        dense = rng.standard_normal((rows, 13)).astype(np.float32)
        out.append((dense, tok))
    return out


def _time(fn, batches) -> tuple[float, float]:  # noqa: ANN001
    """Median wall-clock and median thread CPU ms per call. The engine runs on the calling thread
    (one intra-op thread), so CPU time leaves out the time the scheduler gives other processes
    on this shared machine; wall time is what a caller waits."""
    for b in batches:
        fn(b)
    once = time.perf_counter()
    fn(batches[0])
    once = time.perf_counter() - once
    n = int(max(15, min(300, 1.5 / max(once, 1e-6))))
    ts, cs = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(batches[i % len(batches)])
        cs.append(time.thread_time() - c0)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, statistics.median(cs) * 1e3


def cmd_prepare(out: Path, rows: int) -> dict[str, Any]:
    from lma.data.synthetic import SynthConfig, value_set_feature_map

    t0 = time.perf_counter()
    fmap = value_set_feature_map(SynthConfig(preset="kaggle"), rows)
    fmap.save(out / "feature_map")
    toks = np.concatenate(fmap.tokens)
    cnt = np.concatenate(fmap.counts)
    top = np.argsort(-cnt, kind="stable")[:N_SIGNED]
    rng = np.random.default_rng(0)
    sig_tok = np.sort(toks[top])
    sigs = rng.integers(-(2**63), 2**63 - 1, len(sig_tok), dtype=np.int64)
    np.savez(out / "signatures.npz", tokens=sig_tok, signatures=sigs)
    occ = float(cnt[top].sum() / cnt.sum())
    return {"tokens": int(len(toks)), "signed": int(len(sig_tok)), "signed_occurrence_share": occ,
            "seconds": time.perf_counter() - t0}


def cmd_export(out: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from model_export import onnx_op

    t0 = time.perf_counter()
    model, fmap = _model(out, spec)
    build_s = time.perf_counter() - t0
    d = out / name.replace("/", "_")
    d.mkdir(parents=True, exist_ok=True)
    dense, tok = _batches(fmap, 8, 0)[0]
    td, tt = torch.from_numpy(dense), torch.from_numpy(tok)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        prog = torch.export.export(model, (td, tt), dynamic_shapes=({0: batch}, {0: batch}))
        onnx_op.export_onnx(prog, (td, tt), d / "model.onnx", ["dense", "tokens"], ["logits"])
        if spec["kind"] != "robez":
            res = _Resolve.module(model)
            rp = torch.export.export(res, (tt,), dynamic_shapes=({0: batch},))
            onnx_op.export_onnx(rp, (tt,), d / "resolve.onnx", ["tokens"], ["keys"])
    emb = model.embedding
    return {"build_s": build_s, "export_s": time.perf_counter() - t0 - build_s,
            "state_bytes": int(emb.state_bytes()), "params": int(emb.parameter_count())}


def _engine_fn(out: Path, name: str, spec: dict[str, Any], engine: str, part: str):  # noqa: ANN202
    """(fn(batch), feature map): one engine of one exported variant, ready to call."""
    d = out / name.replace("/", "_")
    if engine.startswith("onnxruntime"):
        import onnxruntime as ort

        fmap = _fmap(out)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        if engine.startswith("onnxruntime+native"):
            from lma import ort_ops

            ort_ops.add_to(so)
        held = _private_initializers(d / f"{part}.onnx", so) if engine.endswith("/private") else []
        sess = ort.InferenceSession(str(d / f"{part}.onnx"), so, providers=["CPUExecutionProvider"])

        def fn(b, _held=held):  # noqa: ANN001, ANN202 - _held: arrays the session must outlive
            feed = {"dense": b[0], "tokens": b[1]} if part == "model" else {"tokens": b[1]}
            return sess.run(None, feed)
    else:
        import torch

        torch.set_num_threads(1)
        model, fmap = _model(out, spec)
        dense, tok = _batches(fmap, 8, 0)[0]
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        with torch.no_grad():
            if part == "model":
                prog = torch.export.export(model, (torch.from_numpy(dense), torch.from_numpy(tok)),
                                           dynamic_shapes=({0: batch}, {0: batch})).module()
            else:
                prog = torch.export.export(_Resolve.module(model), (torch.from_numpy(tok),),
                                           dynamic_shapes=({0: batch},)).module()

        def fn(b):  # noqa: ANN001, ANN202
            with torch.no_grad():
                if part == "model":
                    return prog(torch.from_numpy(b[0]), torch.from_numpy(b[1]))
                return prog(torch.from_numpy(b[1]))
    return fn, fmap


def _private_initializers(path: Path, so: Any) -> list[Any]:
    """Every initializer of ``path`` of 1 MB or more read into a numpy array of this process
    (from its external data file, or the model itself) and handed to onnxruntime with
    ``add_initializer``, as ``LMA_SERVE_WEIGHTS=private`` serves (lma.predictor.onnx_session)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    held: list[Any] = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            arr = np.empty(tuple(init.dims), dtype)
            with open(path.parent / ext["location"], "rb", buffering=0) as f:
                f.seek(int(ext.get("offset", 0)))
                f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        elif len(init.raw_data) >= 1 << 20:
            arr = np.array(numpy_helper.to_array(init), copy=True)
        else:
            continue
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        so.add_initializer(init.name, value)
        held.append((arr, value))
    return held


def cmd_time(out: Path, name: str, spec: dict[str, Any], engine: str, part: str) -> dict[str, Any]:
    fn, fmap = _engine_fn(out, name, spec, engine, part)
    res: dict[str, Any] = {"cpu": {}}
    for rows in ROWS:
        res[str(rows)], res["cpu"][str(rows)] = _time(fn, _batches(fmap, rows, 100 + rows))
    return res


def cmd_interleaved(out: Path, variants_: dict[str, dict[str, Any]], engine: str,
                    calls: int) -> dict[str, Any]:
    """Every variant's whole model in ONE process (one engine kind, one thread), calls
    alternating between the models (the order rotated each round), so that the machine's
    drift over minutes falls on all of them alike. Pessimistic for models that rely on cache
    residency: each call runs after another model's call has used the caches. Per row count:
    median wall ms per model, and the median over rounds of each model's time over
    full/table's in the same round."""
    fns = {}
    fmap = None
    for name, spec in variants_.items():
        fns[name], fmap = _engine_fn(out, name, spec, engine, "model")
    names = list(fns)
    res: dict[str, Any] = {"models": names, "calls": calls}
    for rows in ROWS:
        batches = _batches(fmap, rows, 100 + rows)
        for fn in fns.values():
            for b in batches:
                fn(b)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(calls):
            b = batches[i % len(batches)]
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name](b)
                times[name].append((time.perf_counter() - t0) * 1e3)
        cell: dict[str, Any] = {"median_ms": {n: statistics.median(t) for n, t in times.items()}}
        if "full/table" in times:
            ref = times["full/table"]
            cell["ratio_vs_full"] = {n: statistics.median(a / r for a, r in zip(t, ref, strict=True))
                                     for n, t in times.items() if n != "full/table"}
        res[str(rows)] = cell
    return res


def _run(args: list[str], pin: bool = True) -> dict[str, Any]:
    cmd = (["taskset", "-c", "0"] if pin else []) + [sys.executable, __file__, *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr[-1500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def worker(argv: list[str]) -> int:
    cmd, out = argv[0], Path(argv[1])
    if cmd == "prepare":
        res = cmd_prepare(out, int(argv[2]))
    elif cmd == "interleave":
        res = cmd_interleaved(out, json.loads(argv[3]), argv[2], int(argv[4]))
    else:
        name, spec = argv[2], json.loads(argv[3])
        res = cmd_export(out, name, spec) if cmd == "export" else cmd_time(out, name, spec,
                                                                          argv[4], argv[5])
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench_model")
    ap.add_argument("--quick", action="store_true", help="fewer Z variants")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--export-only", action="store_true",
                    help="prepare and export only (no timing; for the variants given by --only)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every cell this many times, the variants alternating within each "
                         "round (this machine's speed drifts over minutes: ratios are taken "
                         "within a round); a cell's figure is the median over rounds")
    ap.add_argument("--interleaved", type=int, default=0, metavar="CALLS",
                    help="also time the variants' whole models in one process per engine, calls "
                         "alternating between models, CALLS calls each per row count")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated engines to time (of {', '.join(ENGINES)})")
    ap.add_argument("--fmap-rows", type=int, default=45_840_617,
                    help="rows whose value set makes the vocabulary (default: Criteo Kaggle's)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": {"created": time.strftime("%Y-%m-%d %H:%M"),
                                        "load_avg_before": os.getloadavg()[0]}}
    rpath = out / "results.json"
    if rpath.exists():
        results = json.loads(rpath.read_text())
    if not (out / "feature_map").exists():
        results["prepare"] = _run(["--worker", "prepare", str(out), str(args.fmap_rows)], pin=False)
        rpath.write_text(json.dumps(results, indent=1))
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        ap.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    vs = variants(args.quick)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only.split(",")}
    for name, spec in vs.items():
        r = results.setdefault("variants", {}).setdefault(name, {"spec": spec})
        if "export" not in r or "error" in r["export"]:
            r["export"] = _run(["--worker", "export", str(out), name, json.dumps(spec)], pin=False)
            rpath.write_text(json.dumps(results, indent=1))
    for rnd in range(0 if args.export_only else args.rounds):
        for name, spec in vs.items():
            r = results["variants"][name]
            for engine in engines:
                parts = (["model"] if spec["kind"] == "robez" or "/z" in name
                         else ["model", "resolve"])
                for part in parts:
                    key = f"{engine}/{part}"
                    if args.rounds == 1 and key in r and "error" not in r[key]:
                        continue
                    cell = _run(["--worker", "time", str(out), name, json.dumps(spec), engine,
                                 part])
                    if args.rounds > 1:
                        cell["round"] = rnd
                        r.setdefault(f"{key}@rounds", []).append(cell)
                        cell = _median_cell(r[f"{key}@rounds"])
                    r[key] = cell
                    rpath.write_text(json.dumps(results, indent=1))
                    sys.stderr.write(f"round {rnd} {name} {key}: {cell}\n")
    if args.interleaved and not args.export_only:
        for engine in engines:
            cell = _run(["--worker", "interleave", str(out), engine, json.dumps(vs),
                         str(args.interleaved)])
            results.setdefault("interleaved", {})[engine] = cell
            rpath.write_text(json.dumps(results, indent=1))
            sys.stderr.write(f"interleaved {engine}: {cell}\n")
    results["meta"]["load_avg_after"] = os.getloadavg()[0]
    rpath.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report(results))
    sys.stdout.write(report(results))
    return 0


def _median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-row-count medians over a cell's rounds (wall and CPU), errors left out."""
    ok = [c for c in cells if "error" not in c]
    if not ok:
        return cells[-1]
    rows = [k for k in ok[0] if k.isdigit()]
    med = {k: statistics.median(c[k] for c in ok) for k in rows}
    med["cpu"] = {k: statistics.median(c["cpu"][k] for c in ok) for k in rows}
    med["peak_rss_gb"] = max(c.get("peak_rss_gb", 0.0) for c in ok)
    med["rounds"] = len(ok)
    return med


def _round_ratios(results: dict[str, Any]) -> list[str]:
    """Each model's 1000-row time over full tables' in the same round (wall-clock)."""
    v = results.get("variants", {})
    ref = {e: {c["round"]: c["1000"] for c in v.get("full/table", {}).get(f"{e}/model@rounds", [])
               if "error" not in c} for e in ENGINES}
    if not any(ref.values()):
        return []
    lines = ["", "Per round, 1000 rows, model / full tables in the same round (wall-clock):", "",
             "| model | engine | ratio per round | median |", "|---|---|---|---|"]
    for engine in ENGINES:
        for name, r in v.items():
            if name == "full/table":
                continue
            ratios = [c["1000"] / ref[engine][c["round"]]
                      for c in r.get(f"{engine}/model@rounds", [])
                      if "error" not in c and c["round"] in ref[engine]]
            if ratios:
                lines.append(f"| {name} | {engine} | {', '.join(f'{x:.2f}' for x in ratios)} | "
                             f"{statistics.median(ratios):.2f} |")
    return lines


def _interleaved_table(results: dict[str, Any]) -> list[str]:
    il = results.get("interleaved", {})
    if not il:
        return []
    lines = ["", "All models in one process per engine, calls alternating (median ms; in brackets "
             "the median per-call ratio to full/table):", "",
             "| model | engine | 1 row | 100 rows | 1000 rows |", "|---|---|---|---|---|"]
    for engine, cell in il.items():
        if "error" in cell:
            lines.append(f"| - | {engine} | error: {cell['error'][-200:]} | | |")
            continue
        for name in cell["models"]:
            parts = []
            for rows in ROWS:
                c = cell[str(rows)]
                ratio = c.get("ratio_vs_full", {}).get(name)
                parts.append(f"{c['median_ms'][name]:.3f}" + (f" ({ratio:.2f})" if ratio else ""))
            lines.append(f"| {name} | {engine} | " + " | ".join(parts) + " |")
    return lines


def report(results: dict[str, Any]) -> str:
    v = results.get("variants", {})
    lines = ["| model | lookup | engine | 1 row ms | 100 rows ms | 1000 rows ms | key resolution "
             "ms at 1000 (share) | vs full/table at 1000 | CPU ms at 1000: model, key resolution "
             "(share) | vs full/table (CPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine in ENGINES:
        ref = v.get("full/table", {}).get(f"{engine}/model", {}).get("1000")
        ref_cpu = v.get("full/table", {}).get(f"{engine}/model", {}).get("cpu", {}).get("1000")
        for name in ("full/search", "full/table", "lma16/search", "lma16/table", "lma16/hot",
                     "robez16"):
            r = v.get(name, {})
            m = r.get(f"{engine}/model", {})
            if "1000" not in m:
                continue
            res = r.get(f"{engine}/resolve", {})
            share = (f"{res['1000']:.2f} ({100 * res['1000'] / m['1000']:.0f}%)"
                     if "1000" in res else "-")
            kind, _, lk = name.partition("/")
            ratio = f"{m['1000'] / ref:.2f}" if ref else "-"
            mc, rc = m.get("cpu", {}).get("1000"), res.get("cpu", {}).get("1000")
            cpu = "-" if mc is None else f"{mc:.2f}" + (
                f", {rc:.2f} ({100 * rc / mc:.0f}%)" if rc is not None else "")
            ratio_cpu = f"{mc / ref_cpu:.2f}" if mc is not None and ref_cpu else "-"
            lines.append(f"| {kind} | {lk or '-'} | {engine} | {m['1']:.3f} | {m['100']:.2f} | "
                         f"{m['1000']:.2f} | {share} | {ratio} | {cpu} | {ratio_cpu} |")
    zs = [k for k in v if "/z" in k]
    if zs:
        lines += ["", "| model | Z | engine | 1 row ms | 100 rows ms | 1000 rows ms |",
                  "|---|---|---|---|---|---|"]
        for engine in ENGINES:
            for name in zs:
                m = v[name].get(f"{engine}/model", {})
                if "1000" in m:
                    kind, _, z = name.partition("/")
                    lines.append(f"| {kind} | {z[1:]} | {engine} | {m['1']:.3f} | {m['100']:.2f} "
                                 f"| {m['1000']:.2f} |")
    lines += _round_ratios(results)
    lines += _interleaved_table(results)
    lines += ["", "Build / export / peak RSS per process (GB):", ""]
    for name, r in v.items():
        e = r.get("export", {})
        peaks = [r[k].get("peak_rss_gb") for k in r if "/" in k and isinstance(r[k], dict)]
        lines.append(f"- {name}: build {e.get('build_s', float('nan')):.0f} s, export "
                     f"{e.get('export_s', float('nan')):.0f} s, serving state "
                     f"{e.get('state_bytes', 0) / 1e6:.0f} MB, peak RSS export "
                     f"{e.get('peak_rss_gb', float('nan')):.1f}, timing "
                     f"{max([p for p in peaks if p] or [float('nan')]):.1f}"
                     + (f"; ERROR {e['error'][-300:]}" if "error" in e else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
