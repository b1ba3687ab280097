"""``lma bench soak``: a long, moderate, fixed-rate load on one served model, with the server's
resident memory and the latency percentiles sampled every ``--every`` seconds.

It answers three questions about a server left running: does its memory keep growing after
warm-up (target: less than 5% between the end of warm-up and the end), does it answer every
request, and does its tail latency stay where it started. One real uvicorn process (the same
settings and pinning as ``lma bench serve``), the open loop of :mod:`loadtest.openloop` offering
``--rate`` requests/s in ``ceil(--seconds / --every)`` consecutive windows of ``--every`` s (latency from each request's
intended send time; each window waits for its last answers, so windows are ``--every`` s plus at
most one request's latency apart), the server's RSS (psutil, with its children) read at the end
of each window. Output under ``--out/<timestamp>/``: ``soak.json``, ``soak.md``, ``soak.png``
(``python -m loadtest.soak render DIR`` writes the last two and the summary again from the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_serve import (
    LoadDriver,
    LoadSettings,
    ServerSettings,
    _bundle_table_dtype,
    _cpu_list,
    _get_json,
    machine_info,
    serve,
)

logger = logging.getLogger("loadtest.soak")

GROWTH_TARGET = 0.05
# "p99 steady": the median window p99 of the last third of the measured windows at most this
# many times that of the first third (a drift, not one contention spike, fails it).
P99_DRIFT_LIMIT = 1.5


def summarise(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The soak's verdicts from its windows (``t0_s`` start and ``t_s`` end time, ``rss`` at the
    end, ``latency_ms``, ``errors``, ``sent``, ``ok``): memory growth from the end of the last
    window that started within warm-up, errors, p99 drift over the windows after it."""
    def warm(s: dict[str, Any]) -> bool:
        return s["t0_s"] < warmup_s - 1e-9

    measured = [s for s in samples if not warm(s)] or samples[-1:]
    base = next((s["rss"] for s in reversed(samples) if warm(s)), measured[0]["rss"])
    rss = np.asarray([s["rss"] for s in measured], dtype=np.float64)
    t = np.asarray([s["t_s"] for s in measured], dtype=np.float64)
    slope = float(np.polyfit(t, rss, 1)[0]) if len(t) >= 2 else 0.0
    p99 = np.asarray([s["latency_ms"].get("p99", math.nan) for s in measured])
    p50 = np.asarray([s["latency_ms"].get("p50", math.nan) for s in measured])
    third = max(1, len(measured) // 3)
    first, last = float(np.nanmedian(p99[:third])), float(np.nanmedian(p99[-third:]))
    errors = sum(sum(s["errors"].values()) for s in samples)
    errors_after = sum(sum(s["errors"].values()) for s in measured)
    growth = float(rss[-1] / base - 1.0)
    drift = last / first if first > 0 else math.nan
    return {
        "warmup_s": warmup_s,
        "windows": len(samples),
        "measured_windows": len(measured),
        "rss_after_warmup": float(base),
        "rss_end": float(rss[-1]),
        "rss_max_after_warmup": float(rss.max()),
        "rss_growth": growth,
        "rss_max_growth": float(rss.max() / base - 1.0),
        "rss_slope_mb_per_min": slope * 60 / 1e6,
        "requests": int(sum(s["sent"] for s in samples)),
        "ok": int(sum(s["ok"] for s in samples)),
        "errors": int(errors),
        "errors_after_warmup": int(errors_after),
        "p50_ms_median": float(np.nanmedian(p50)),
        "p99_ms_median": float(np.nanmedian(p99)),
        "p99_ms_max": float(np.nanmax(p99)),
        "p99_ms_first_third": first,
        "p99_ms_last_third": last,
        "p99_drift": drift,
        "verdicts": {
            f"memory growth after warm-up < {GROWTH_TARGET:.0%}": growth < GROWTH_TARGET,
            "no errors": errors == 0,
            f"p99 steady (last third / first third <= {P99_DRIFT_LIMIT})":
                bool(drift <= P99_DRIFT_LIMIT),
        },
    }


async def _soak(url: str, payloads: list[Any], rate: float, seconds: float, every: float,
                load: LoadSettings, rss: Any) -> list[dict[str, Any]]:
    from loadtest.openloop import new_session, run_rate

    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    async with new_session(load.connections) as session:
        # A fixed number of full windows: each one also waits for its last answers, so a loop
        # on the elapsed time would end with slivers of windows that send nothing.
        n_windows = max(1, math.ceil(seconds / every - 1e-9))
        for w in range(n_windows):
            start = time.perf_counter() - t0
            span = min(every, seconds - w * every)
            r = await run_rate(url, payloads, rate, span, session=session,
                               timeout_s=load.timeout_s, max_in_flight=load.max_in_flight,
                               seed=load.seed + w)
            s = r.summary()
            samples.append({"window": w, "t0_s": start, "t_s": time.perf_counter() - t0,
                            "rss": rss(),
                            "sent": s["sent"], "ok": s["ok"], "errors": s["errors"],
                            "achieved_rps": s["achieved_rps"], "latency_ms": s["latency_ms"],
                            "client_lag_ms": s["client_lag_ms"]})
            lat = s["latency_ms"]
            logger.info("  t=%5.0f s  RSS %.1f MB  p50 %.2f ms  p99 %.2f ms  %d/%d ok",
                        samples[-1]["t_s"], samples[-1]["rss"] / 1e6, lat.get("p50", math.nan),
                        lat.get("p99", math.nan), s["ok"], s["sent"])
    return samples


def write_plot(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    t = [x["t_s"] for x in s]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax.plot(t, [x["rss"] / 1e6 for x in s], "-o", ms=3)
    ax.axvline(report["summary"]["warmup_s"], color="grey", ls=":", label="end of warm-up")
    base = report["summary"]["rss_after_warmup"] / 1e6
    ax.axhline(base * (1 + GROWTH_TARGET), color="C3", ls="--", lw=0.8,
               label=f"+{GROWTH_TARGET:.0%} of the RSS after warm-up")
    ax.set_ylabel("server RSS (MB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for key, style in (("p50", "--"), ("p99", "-o")):
        ax2.plot(t, [x["latency_ms"].get(key, math.nan) for x in s], style, ms=3, label=key)
    ax2.set_yscale("log")
    ax2.set_xlabel(f"seconds since the start (windows of {report['every_s']:g} s)")
    ax2.set_ylabel("latency (ms, from intended send)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Soak: {report['label']}, {report['rate']:g} req/s of {report['candidates']} "
                 f"candidate(s) ({report['machine']['note']})", fontsize=9)
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict[str, Any]) -> str:
    sm = report["summary"]
    srv = report["server"]
    lines = [
        f"# Soak: {report['label']}", "",
        f"Created {report['created_utc']} by `{report['command']}`.", "",
        f"**Machine: {report['machine']['note']}**; load average at the start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average'])}.", "",
        f"Bundle `{report['bundle']}` ({report['kind']}, tables {report['table_dtype']}), served "
        f"by `uvicorn service.main:app` (backend {srv['backend']}, {srv['workers']} worker(s), "
        f"{srv['threads']} thread(s), max batch {srv['max_batch_rows']} rows, max wait "
        f"{srv['max_wait_ms']} ms, CPUs {srv['cpus'] or 'any'}). Load: {report['rate']:g} req/s "
        f"of {report['candidates']}-candidate v1 requests from `{report['data']}`, open loop, "
        f"{report['seconds']:g} s in windows of {report['every_s']:g} s; the first "
        f"{sm['warmup_s']:g} s are warm-up.", "",
        "![soak](soak.png)", "",
        "| verdict | result |", "|---|---|",
    ]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in sm["verdicts"].items()]
    lines += [
        "", "| measure | value |", "|---|---|",
        f"| RSS after warm-up | {sm['rss_after_warmup'] / 1e6:.1f} MB |",
        f"| RSS at the end | {sm['rss_end'] / 1e6:.1f} MB ({sm['rss_growth']:+.2%}) |",
        f"| highest RSS after warm-up | {sm['rss_max_after_warmup'] / 1e6:.1f} MB "
        f"({sm['rss_max_growth']:+.2%}) |",
        f"| RSS trend after warm-up (least squares) | {sm['rss_slope_mb_per_min']:+.3f} MB/min |",
        f"| requests / answered / errors | {sm['requests']} / {sm['ok']} / {sm['errors']} "
        f"({sm.get('errors_after_warmup', '-')} after warm-up) |",
        f"| window p50, median | {sm['p50_ms_median']:.2f} ms |",
        f"| window p99, median / max | {sm['p99_ms_median']:.2f} / {sm['p99_ms_max']:.2f} ms |",
        f"| window p99, first / last third (median) | {sm['p99_ms_first_third']:.2f} / "
        f"{sm['p99_ms_last_third']:.2f} ms (x{sm['p99_drift']:.2f}) |",
        "", "| t s | RSS MB | answered req/s | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in report["samples"]:
        lat = x["latency_ms"]
        lines.append(f"| {x['t_s']:.0f} | {x['rss'] / 1e6:.1f} | {x['achieved_rps']:.1f} | "
                     f"{lat.get('p50', math.nan):.2f} | {lat.get('p99', math.nan):.2f} | "
                     f"{lat.get('max', math.nan):.2f} | {sum(x['errors'].values())} |")
    return "\n".join(lines) + "\n"


def run_soak(bundle: Path, label: str, server: ServerSettings, load: LoadSettings, rate: float,
             seconds: float, every: float, warmup_s: float, out_root: Path,
             command: str = "") -> Path:
    import os

    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = out_root / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    if load.cpus:
        try:
            os.sched_setaffinity(0, _cpu_list(load.cpus))
        except (AttributeError, OSError, ValueError) as exc:
            logger.warning("load generator not pinned to %s (%s)", load.cpus, exc)
    (c,) = load.candidates
    driver = LoadDriver(load)
    with serve(bundle, server, run_dir / "raw" / f"server-{label}.log") as srv:
        info = _get_json(srv.url + "/v1/models")["models"][0]
        payloads = driver.payloads(info["name"], c)
        logger.info("soak of %s: %g req/s of %d candidate(s) for %g s", label, rate, c, seconds)
        samples = asyncio.run(_soak(srv.url, payloads, rate, seconds, every, load, srv.rss_bytes))
    report = {
        "created_utc": stamp, "command": command, "machine": machine_info(),
        "label": label, "bundle": str(bundle), "kind": info.get("kind"),
        "table_dtype": _bundle_table_dtype(bundle), "server": server.__dict__,
        "data": load.data, "candidates": c, "rate": rate, "seconds": seconds, "every_s": every,
        "samples": samples, "summary": summarise(samples, warmup_s),
    }
    (run_dir / "soak.json").write_text(json.dumps(report, indent=1, default=str))
    write_plot(report, run_dir)
    (run_dir / "soak.md").write_text(markdown(report))
    logger.info("soak report written to %s", run_dir)
    return run_dir


def render(run_dir: Path) -> None:
    """Summary, ``soak.md`` and ``soak.png`` again from ``soak.json`` (after a change to them)."""
    path = run_dir / "soak.json"
    report = json.loads(path.read_text())
    report["summary"] = summarise(report["samples"], report["summary"]["warmup_s"])
    path.write_text(json.dumps(report, indent=1, default=str))
    write_plot(report, run_dir)
    (run_dir / "soak.md").write_text(markdown(report))


def cmd_soak(args: argparse.Namespace) -> int:
    label, _, path = args.bundle.rpartition("=")
    bundle = Path(path)
    label = label or bundle.name
    load = LoadSettings(data=args.request_data, candidates=(args.candidates,),
                        unseen_rate=args.unseen_rate, pool=args.pool, timeout_s=args.timeout,
                        cpus=args.client_cpus or None)
    server = ServerSettings(backend=args.backend, threads=args.threads,
                            max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms,
                            cpus=args.server_cpus or None)
    run_dir = run_soak(bundle, label, server, load, args.rate, args.seconds, args.every,
                       args.warmup_seconds, Path(args.out),
                       command=getattr(args, "command_line", None)
                       or "lma " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    report = json.loads((run_dir / "soak.json").read_text())
    sys.stdout.write(f"report: {run_dir / 'soak.md'}\n")
    return 0 if all(report["summary"]["verdicts"].values()) or not args.check else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, metavar="[LABEL=]PATH", help="the bundle to serve")
    p.add_argument("--request-data", default="synth:5000:1:kaggle",
                   help="request rows (lma --data spec; default synth:5000:1:kaggle)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per request")
    p.add_argument("--rate", type=float, default=40.0, help="offered requests/s")
    p.add_argument("--seconds", type=float, default=600.0, help="length of the soak")
    p.add_argument("--every", type=float, default=10.0, help="seconds per sample window")
    p.add_argument("--warmup-seconds", type=float, default=60.0,
                   help="the first seconds are warm-up: growth is measured from their end")
    p.add_argument("--pool", type=int, default=256, help="distinct request bodies")
    p.add_argument("--unseen-rate", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch-rows", type=int, default=1024)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--server-cpus", default="1", help="taskset CPU list of the server ('' none)")
    p.add_argument("--client-cpus", default="0", help="CPUs of the load generator ('' none)")
    p.add_argument("--check", action="store_true", help="exit 1 when a verdict is not met")
    p.add_argument("--out", default="reports", help="the report goes to OUT/<timestamp>/")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``soak`` to ``lma bench``."""
    p = bench_subparsers.add_parser(
        "soak", help="moderate load for a long time on one served model: resident memory and "
                     "p50/p99 every few seconds, growth after warm-up, errors")
    add_arguments(p)
    p.set_defaults(func=cmd_soak)


def main(argv: list[str] | None = None) -> int:
    from lma.cli import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:  # python -m loadtest.soak render REPORT_DIR
        render(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak")
    add_arguments(parser)
    parser.set_defaults(func=cmd_soak, command="bench soak")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser.parse_args(argv)
    args.command_line = "python -m loadtest.soak " + " ".join(shlex.quote(a) for a in argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
