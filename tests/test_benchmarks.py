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
