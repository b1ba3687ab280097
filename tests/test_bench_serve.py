"""`lma bench serve`: a smoke run (two tiny models, real uvicorn servers, real open-loop load) and
the pieces it is made of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.bench_serve import (
    ModelSpec,
    _parse_rates,
    build_bundles,
    main,
    parse_metrics,
    server_breakdown,
)
from loadtest.report_serve import PLOTS

DATA = "synth:1200:3"


def test_model_spec_parse() -> None:
    assert ModelSpec.parse("full") == ModelSpec("full", "full", 1.0)
    assert ModelSpec.parse("lma16") == ModelSpec("lma16", "lma", 16.0)
    assert ModelSpec.parse("robez64") == ModelSpec("robez64", "robez", 64.0)
    assert ModelSpec.parse("full-fp16").fp16
    z16 = ModelSpec.parse("lma16-z16-aligned=true")
    assert (z16.kind, z16.compression, z16.options) == ("lma", 16.0, (("z", "16"),
                                                                       ("aligned", "true")))
    assert z16.train_options() == ["--option", "z=16", "--option", "aligned=true"]
    for bad in ("lma", "full4", "bogus16", "lma16x", "lma16-q"):
        with pytest.raises(ValueError, match="model"):
            ModelSpec.parse(bad)


def test_parse_rates() -> None:
    assert _parse_rates("auto", (1, 100)) is None
    assert _parse_rates("5,10", (1, 100)) == {1: [5.0, 10.0], 100: [5.0, 10.0]}
    assert _parse_rates("1:50,100/100:5", (1, 100)) == {1: [50.0, 100.0], 100: [5.0]}
    with pytest.raises(ValueError):
        _parse_rates("0,5", (1,))


def test_metrics_breakdown_reads_route_labels_with_braces() -> None:
    def scrape(n: int, req_s: float, qw: float, comp: float, rows: float) -> dict[str, float]:
        route = 'path="/v1/models/{name}:predict",model="m",status="200"'
        return parse_metrics("\n".join([
            "# HELP lma_request_seconds Request latency",
            f"lma_request_seconds_count{{{route}}} {n}",
            f"lma_request_seconds_sum{{{route}}} {req_s}",
            f'lma_request_seconds_count{{path="/metrics",model="",status="200"}} {n * 7}',
            f'lma_queue_wait_seconds_count{{model="m"}} {n}',
            f'lma_queue_wait_seconds_sum{{model="m"}} {qw}',
            f'lma_compute_seconds_count{{model="m"}} {n / 2}',
            f'lma_compute_seconds_sum{{model="m"}} {comp}',
            f'lma_batch_rows_sum{{model="m"}} {rows}',
            f'lma_compute_seconds_count{{model="other"}} {n * 3}',
        ]))

    b = server_breakdown(scrape(10, 1.0, 0.1, 0.2, 40), scrape(110, 3.0, 0.6, 0.7, 240), "m")
    assert b["requests"] == 100 and b["batches"] == 50
    assert b["server_ms_per_request"] == pytest.approx(20.0)
    assert b["queue_wait_ms_per_part"] == pytest.approx(5.0)
    assert b["compute_ms_per_batch"] == pytest.approx(10.0)
    assert b["rows_per_batch"] == pytest.approx(4.0)
    assert b["other_ms_per_request"] == pytest.approx(5.0)


def test_fp16_model_is_its_float32_twin_exported_with_float16_tables(tmp_path: Path) -> None:
    """`full-fp16` reuses `full`'s checkpoint (one training) and exports it with float16 tables."""
    bundles, skipped = build_bundles([ModelSpec.parse("full"), ModelSpec.parse("full-fp16")],
                                     DATA, tmp_path, ["--epochs", "1", "--threads", "1"])
    assert not skipped and set(bundles) == {"full", "full-fp16"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["full"]
    m32, m16 = (json.loads((bundles[k] / "manifest.json").read_text())
                for k in ("full", "full-fp16"))
    assert (m32["dtype"]["dtype"], m16["dtype"]["dtype"]) == ("float32", "float16")
    assert m16["components"]["embedding"] * 2 == m32["components"]["embedding"]
    assert m16["model"]["name"] == "full-fp16"


def test_bench_serve_smoke(tmp_path: Path) -> None:
    """Two tiny models through the whole benchmark: built with `lma train`/`lma export`, each
    served by its own uvicorn process, driven with 1- and 100-candidate requests; the report,
    plots and JSON are written and every server answered every request."""
    pytest.importorskip("loadtest.openloop", reason="the open-loop load generator "
                        "(loadtest/openloop.py, loadtest/payloads.py) is not in this checkout")
    out = tmp_path / "reports"
    rc = main([
        "--data", DATA, "--models", "full,lma16", "--build-dir", str(tmp_path / "build"),
        "--train-args", "--epochs 1 --batch-size 512 --threads 1 --seed 0",
        "--candidates", "1,100", "--rates", "1:20,40/100:4,8", "--quick",
        "--server-cpus", "", "--client-cpus", "", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name != "build"]
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("report.md", *PLOTS):
        path = run_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert [m["label"] for m in report["models"]] == ["full", "lma16"]
    for m in report["models"]:
        assert m["errors_total"] == 0, (m["label"], m["runs"])
        assert m["rss_loaded"] > 10e6 and m["rss_peak"] >= m["rss_loaded"]
        assert m["components"]["embedding"] > 0 and m["disk_bytes_total"] > 0
        assert m["test_auc"] is not None and m["ready_s"] > 0
        for c, rates in (("1", [20.0, 40.0]), ("100", [4.0, 8.0])):
            run = m["runs"][c]
            assert run["closed_loop"]["ok"] > 0
            assert [r["offered_rps"] for r in run["open_loop"]] == rates
            for r in run["open_loop"]:
                assert r["ok"] == r["sent"] > 0 and r["latency_ms"]["p99"] > 0
                assert r["server"]["requests"] >= r["ok"]
            assert run["server_open_loop"]["requests"] >= sum(r["ok"] for r in run["open_loop"])
            assert m["inprocess"][c]["rows_per_s"] > 0
            split = m["inprocess"][c]["model_stages_ms"]
            assert split["model"] > 0 and split["key_resolution"] > 0  # both kinds look keys up
            assert min(split["gather"], split["mlp_and_rest"]) >= 0
    full, lma = report["models"]
    assert lma["components"]["embedding"] < full["components"]["embedding"]
    md = (run_dir / "report.md").read_text()
    assert "shared 2-core machine" in md and "| lma16 | lma | 16 |" in md
    assert "## Profile per model" in md
    assert any(t["target"].startswith("serving state") for t in report["targets"])


def test_untrained_bundles_at_a_preset_vocabulary(tmp_path: Path) -> None:
    """The scale-(b) path at a small preset: the value-set vocabulary without rows, untrained
    weights, exported, and labelled untrained (no AUC)."""
    from lma.data.synthetic import SynthConfig, expected_distinct
    from loadtest.bench_serve import build_untrained_bundles

    bundles, skipped = build_untrained_bundles([ModelSpec.parse("full")], "small", tmp_path,
                                               rows=20_000, signature_rows=1000)
    assert not skipped
    manifest = json.loads((bundles["full"] / "manifest.json").read_text())
    assert manifest["metrics"]["untrained"] is True and "test_auc" not in manifest["metrics"]
    expected = sum(expected_distinct(SynthConfig(rows=20_000, preset="small"), 20_000))
    assert manifest["metrics"]["vocabulary"] == pytest.approx(expected, rel=0.05)
