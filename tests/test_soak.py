"""`lma bench soak`: a few seconds of it against a real uvicorn server (the smoke version of the
10-minute run), and its verdicts on made-up windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.soak import main, summarise


def _window(t: float, rss_mb: float, p99: float, errors: int = 0) -> dict:
    return {"t0_s": t - 10, "t_s": t, "rss": rss_mb * 1e6, "sent": 100, "ok": 100 - errors,
            "errors": {"http_503": errors} if errors else {},
            "latency_ms": {"p50": p99 / 4, "p99": p99}}


def test_verdicts() -> None:
    flat = [_window(10 * i, 200 + (5 if i == 0 else 0.1 * i), 20.0) for i in range(1, 13)]
    s = summarise(flat, warmup_s=20)
    assert s["rss_after_warmup"] == pytest.approx(200.2e6)
    assert s["measured_windows"] == 10 and all(s["verdicts"].values())
    growing = [_window(10 * i, 200 * (1 + 0.01 * i), 20.0) for i in range(1, 13)]
    s = summarise(growing, warmup_s=20)
    assert s["rss_growth"] > 0.05 and s["rss_slope_mb_per_min"] > 0
    assert not s["verdicts"]["memory growth after warm-up < 5%"]
    drifting = [_window(10 * i, 200, 10.0 * i) for i in range(1, 13)]
    s = summarise(drifting, warmup_s=20)
    assert s["p99_drift"] > 1.5 and not s["verdicts"][
        "p99 steady (last third / first third <= 1.5)"]
    late = summarise([*flat[:-1], _window(120, 200, 20, errors=2)], 20)
    assert not late["verdicts"]["no errors"] and late["errors_after_warmup"] == 2
    early = summarise([_window(10, 200, 20, errors=3), *flat[1:]], 20)
    assert early["errors"] == 3 and early["errors_after_warmup"] == 0


def test_soak_smoke(tmp_path: Path) -> None:
    """Three 1-second windows against a tiny LMA bundle: every request answered, RSS and
    latency sampled per window, report, plot and JSON written."""
    pytest.importorskip("loadtest.openloop")
    from lma.train import TrainConfig, train_model
    from model_export.bundle import export_bundle

    train_model(TrainConfig(data="synth:1200:3", embedding="lma", compression=16, epochs=1,
                            progress=False, threads=1, out=str(tmp_path / "ck")))
    bundle = export_bundle(tmp_path / "ck", tmp_path / "lma16", sample_rows=64)
    out = tmp_path / "reports"
    rc = main(["--bundle", f"lma16={bundle}", "--request-data", "synth:600:1",
               "--candidates", "10", "--rate", "20", "--seconds", "3", "--every", "1",
               "--warmup-seconds", "1", "--pool", "16", "--server-cpus", "", "--client-cpus",
               "", "--out", str(out)])
    assert rc == 0
    (run_dir,) = list(out.iterdir())
    report = json.loads((run_dir / "soak.json").read_text())
    for name in ("soak.md", "soak.png"):
        assert (run_dir / name).stat().st_size > 0
    assert len(report["samples"]) == 3
    for w in report["samples"]:
        assert w["rss"] > 10e6 and w["ok"] == w["sent"] > 0 and w["latency_ms"]["p99"] > 0
    s = report["summary"]
    assert s["errors"] == 0 and s["verdicts"]["no errors"] and s["measured_windows"] == 2
    assert report["table_dtype"] == "float32" and report["kind"] == "lma"
    assert "shared 2-core machine" in (run_dir / "soak.md").read_text()
    (run_dir / "soak.md").unlink()
    assert main(["render", str(run_dir)]) == 0 and (run_dir / "soak.md").is_file()
