"""Sweeps: files written, resume skips finished runs, paired statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from lma.sweep import (
    group_stats,
    make_run,
    merge_sweeps,
    paired_interval,
    plan_runs,
    read_runs,
    run_sweep,
    summary_markdown,
    t975,
)


def test_tiny_real_sweep_writes_files_and_resumes(tmp_path) -> None:
    kw = {"dim": 8, "epochs": 1, "batch_size": 512, "bottom_mlp": [16], "top_mlp": [16]}
    args = dict(data="synth:1200:3", out_dir=tmp_path, kinds=("full", "robez", "lma"),
                compressions=(8,), variants=[("lma", 8, {"z": 2})], train_kwargs=kw,
                progress=False)
    first = run_sweep(seeds=(0, 1), **args)
    assert len(first.ran) == 8 and not first.skipped
    rows = read_runs(first.csv)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {r["variant"] for r in rows} == {"full", "robez", "lma", "lma z=2"}
    assert all(0 < r["test_auc"] < 1 and r["serving_bytes"] > 0 for r in rows)
    text = first.summary.read_text()
    assert "| lma z=2 | 8x | 2 |" in text and "| full | 1x | 2 |" in text
    assert first.plot is not None and first.plot.read_bytes()[:4] == b"\x89PNG"

    again = run_sweep(seeds=(0, 1), **args)  # nothing left to do
    assert again.ran == [] and len(again.skipped) == 8
    assert len(read_runs(first.csv)) == 8

    more = run_sweep(seeds=(0, 1, 2), **args)  # only the new seed runs
    assert len(more.ran) == 4 and all(k.split("|")[2] == "2" for k in more.ran)
    assert len(read_runs(first.csv)) == 12


def _stub(aucs: dict[str, list[float]], calls: list[str]):
    """A trainer returning fixed test AUCs per (variant, seed); qr fails like an infeasible budget."""

    def train(cfg):
        run = make_run(cfg.embedding, cfg.compression, cfg.seed, cfg.options)
        calls.append(run.key)
        if cfg.embedding == "qr":
            raise ValueError("qr: the smallest compositional layout needs more parameters")
        auc = aucs[run.variant][cfg.seed]
        size = 1000.0 / cfg.compression
        return SimpleNamespace(metrics={
            "test_auc": auc, "test_logloss": 0.5, "val_auc": auc, "train_rows_per_s": 100.0 * cfg.compression,
            "embedding_params": size, "serving_bytes": 4 * size + 10, "embedding_serving_bytes": 4 * size,
            "best_epoch": 1,
        })

    return train


def test_stub_sweep_statistics_and_failures(tmp_path) -> None:
    full = [0.70, 0.71, 0.69, 0.72]
    lma = [a + d for a, d in zip(full, [0.010, 0.012, 0.009, 0.011], strict=True)]  # clearly better
    robez = [a + d for a, d in zip(full, [0.01, -0.012, 0.004, -0.003], strict=True)]  # noise
    aucs = {"full": full, "lma": lma, "robez": robez}
    calls: list[str] = []
    paths = run_sweep("synth:10", tmp_path, kinds=("full", "robez", "lma", "qr"), compressions=(4,),
                      seeds=range(4), variants=[], trainer=_stub(aucs, calls), progress=False)
    rows = read_runs(paths.csv)
    assert len(rows) == 16 and sum(r["status"] == "failed" for r in rows) == 4
    stats = {s.variant: s for s in group_stats(rows)}
    d = np.array(lma) - np.array(full)
    half = 3.182 * d.std(ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert stats["lma"].diff_mean == pytest.approx(d.mean())
    assert stats["lma"].diff_lo == pytest.approx(d.mean() - half)
    assert stats["lma"].resolved is True and stats["robez"].resolved is False
    assert stats["lma"].rows_per_s == pytest.approx(4.0)  # 400 rows/s vs full's 100
    assert stats["qr"].n == 0 and stats["qr"].failed == 4
    md = summary_markdown(rows)
    assert "| lma | 4x | 4 |" in md and "yes" in md and "(4 failed)" in md

    # Resume: failed runs are skipped too unless asked to retry.
    calls.clear()
    run_sweep("synth:10", tmp_path, kinds=("full", "robez", "lma", "qr"), compressions=(4,),
              seeds=range(4), variants=[], trainer=_stub(aucs, calls), progress=False)
    assert calls == []
    run_sweep("synth:10", tmp_path, kinds=("full", "robez", "lma", "qr"), compressions=(4,),
              seeds=range(4), variants=[], trainer=_stub(aucs, calls), progress=False,
              retry_failed=True)
    assert len(calls) == 4 and all(k.startswith("qr|") for k in calls)


def test_partial_last_line_is_ignored(tmp_path) -> None:
    calls: list[str] = []
    aucs = {"full": [0.7], "hash": [0.69]}
    paths = run_sweep("synth:10", tmp_path, kinds=("full", "hash"), compressions=(2,), seeds=(0,),
                      variants=[], trainer=_stub(aucs, calls), progress=False)
    with paths.csv.open("a") as f:
        f.write("hash|4|0|{},hash,hash,4,0")  # a run cut off while writing its row
    assert len(read_runs(paths.csv)) == 2


def test_plan_and_helpers() -> None:
    runs = plan_runs(["full", "lma"], [1, 16], [0, 1],
                     [("lma", 16, {"z": 1}), ("lma", 16, {"z": 4, "aligned": True})])
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys)) == 2 * (1 + 2 + 2)  # lma's default is z=4, so z=1 is a variant
    assert make_run("lma", 16, 0, {"z": 4}).variant == "lma"  # the default block size
    assert make_run("robez", 16, 0, {"z": 1}).variant == "robez"
    assert sum(r.kind == "full" for r in runs) == 2
    assert make_run("lma", 16, 0, {"aligned": True, "z": 4}).variant == "lma aligned=True"
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert abs(t975(1000) - 1.9623) < 1e-3 and t975(31) < 2.042
    m, lo, hi = paired_interval([0.01, 0.02, 0.03])
    assert m == pytest.approx(0.02) and hi - m == pytest.approx(4.303 * 0.01 / math.sqrt(3))


def test_merge_parallel_sweeps(tmp_path) -> None:
    aucs = {"full": [0.70, 0.71], "lma": [0.71, 0.73]}
    calls: list[str] = []
    for seed in (0, 1):
        run_sweep("synth:10", tmp_path / f"s{seed}", kinds=("full", "lma"), compressions=(4,),
                  seeds=[seed], variants=[], trainer=_stub(aucs, calls), progress=False)
    out = merge_sweeps([tmp_path / "s0", tmp_path / "s1", tmp_path / "s1"], tmp_path / "all")
    rows = read_runs(out / "runs.csv")
    assert sorted((r["kind"], r["seed"]) for r in rows) == [("full", 0), ("full", 1), ("lma", 0), ("lma", 1)]
    stats = {s.variant: s for s in group_stats(rows)}
    assert stats["lma"].diff_mean == pytest.approx(0.015)
    assert (out / "summary.md").read_text().count("| lma | 4x | 2 |") == 1


def test_parallel_jobs_write_every_run_once(tmp_path) -> None:
    paths = run_sweep("synth:1500:3", tmp_path, kinds=("full", "hash"), compressions=(4,),
                      seeds=[0, 1], variants=[], progress=False, jobs=2,
                      train_kwargs={"epochs": 1, "threads": 1})
    rows = read_runs(paths.csv)
    assert sorted(r["key"] for r in rows) == sorted(paths.ran)
    assert sorted((r["kind"], r["seed"]) for r in rows) == [("full", 0), ("full", 1), ("hash", 0), ("hash", 1)]
    assert all(r["status"] == "ok" and 0 <= r["test_auc"] <= 1 for r in rows)
