"""GPU training check: train each kind with its memory resident on the GPU, then compare with the
same run on the CPU and export the GPU-trained checkpoint.

    PYTHONPATH=. python3 scripts/gpu_train_check.py [--rows 200000] [--out docs/gpu_train_check.md]

For each kind: `train_model(device="cuda")` on synthetic rows (1 epoch, batch 1024), its test AUC
and rows/s; the same config on the CPU for AUC agreement (different float reduction orders, so
close but not identical); the GPU run's checkpoint exported to a bundle and verified (torch eager
vs torch program vs onnxruntime). Prints a markdown table and writes it to --out (and $OUT).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lma.train import TrainConfig, load_splits, train_model

KINDS = [("full", 1.0, {}), ("hash", 16.0, {}), ("robez", 16.0, {"z": 16, "aligned": True}),
         ("lma", 16.0, {"z": 16, "aligned": True}), ("lma", 16.0, {"z": 1})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--out", default="docs/gpu_train_check.md")
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    base = TrainConfig(data=f"synth:{args.rows}:0", epochs=1, batch_size=1024, progress=False,
                       patience=1, interaction="dot-cat")
    splits, _ = load_splits(base)
    name = torch.cuda.get_device_name(0)
    lines = [
        f"# GPU training check ({name})",
        "",
        f"`PYTHONPATH=. python3 scripts/gpu_train_check.py --rows {args.rows}`; torch "
        f"{torch.__version__}; synthetic data ({args.rows:,} rows, Criteo schema), 1 epoch, "
        "batch 1024, Adam. CPU runs use this machine's CPU.",
        "",
        "| kind | options | GPU test AUC | CPU test AUC | GPU rows/s | CPU rows/s | bundle verify |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = True
    for kind, comp, opts in KINDS:
        res = {}
        for device in ("cuda", "cpu"):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(**{**base.__dict__, "embedding": kind, "compression": comp,
                                     "options": opts, "device": device,
                                     "out": f"{tmp}/ck" if device == "cuda" else None})
                t0 = time.perf_counter()
                m = train_model(cfg, splits).metrics
                m["wall"] = time.perf_counter() - t0
                verdict = "-"
                if device == "cuda" and not args.no_export:
                    try:
                        from model_export.bundle import export_bundle, load_bundle
                        from model_export.verify import verify_bundle

                        export_bundle(f"{tmp}/ck", f"{tmp}/bundle")
                        report = verify_bundle(load_bundle(f"{tmp}/bundle"))
                        verdict = "ok" if report.ok else "MISMATCH"
                    except Exception as e:  # report, keep checking the other kinds
                        verdict = f"error: {type(e).__name__}: {str(e)[:80]}"
                    ok &= verdict == "ok"
                res[device] = (m, verdict)
        (g, verdict), (c, _) = res["cuda"], res["cpu"]
        ok &= abs(g["test_auc"] - c["test_auc"]) < 0.01
        lines.append(f"| {kind} {comp:g}x | {opts or ''} | {g['test_auc']:.4f} | {c['test_auc']:.4f} "
                     f"| {g['train_rows_per_s']:,.0f} | {c['train_rows_per_s']:,.0f} | {verdict} |")
        print(lines[-1], flush=True)
    lines += ["", f"result: {'OK' if ok else 'CHECK FAILED'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(args.out).name).write_text(text)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
