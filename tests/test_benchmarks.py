"""Smoke runs of the benchmarks: they run end to end and write their reports (no timing asserts)."""

from __future__ import annotations

import json

from lma.cli import main as cli_main


def test_bench_op_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli_main(["-q", "bench", "op", "--batches", "64", "--zs", "1,16", "--log2m", "16",
                   "--impls", "torch,cpp,onnx,full", "--full-rows", "100000", "--repeats", "3",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    md = (out / "op_bench.md").read_text()
    for impl in ("torch", "cpp", "onnx", "full"):
        assert f"| {impl} | 64 |" in md
    data = json.loads((out / "op_bench.json").read_text())
    impls = {row["impl"] for row in data["rows"]}
    assert {"torch", "cpp", "onnx", "full"} <= impls
    assert all(row["ms"] > 0 and row["lookups_per_s"] > 0 for row in data["rows"])
    assert (out / "op_bench.png").stat().st_size > 0


def test_dlrm_vs_lr_smoke(tmp_path):
    """scripts/dlrm_vs_lr.py end to end on synthetic rows: every model per seed, a choice of the
    first-order L2 on validation, the summary table and the plot."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "dvl"
    r = subprocess.run([sys.executable, "scripts/dlrm_vs_lr.py", "--data", "synth:1500:4",
                        "--seeds", "0,1", "--l2-grid", "1e-4,1e-2", "--min-count", "2",
                        "--out", str(out)], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    models = {row["model"] for row in rows}
    assert models == {"dlrm", "dlrm+fo l2=0.0001", "dlrm+fo l2=0.01", "first order alone",
                      "logistic regression"}
    assert len(rows) == 2 * 5
    assert all(0.0 < float(row["test_auc"]) <= 1.0 for row in rows)
    summary = (out / "summary.md").read_text()
    assert "| mean |" in summary and "chosen on mean validation AUC" in summary
    assert (out / "per_seed.png").stat().st_size > 0
