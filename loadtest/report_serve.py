"""The report of ``lma bench serve``: ``report.md`` and the PNG plots, from ``report.json``'s dict.

    python -m loadtest.report_serve reports/<timestamp>     # targets and plots again from report.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

COMPONENTS = ("embedding", "key_lookup", "mlp", "other")
PLOTS = ("latency.png", "throughput.png", "footprint.png", "auc_bytes.png")


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.2f}"


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _shapes(report: dict[str, Any]) -> list[str]:
    return [str(c) for c in report["load"]["candidates"]]


def _state(m: dict[str, Any]) -> int:
    c = m.get("components") or {}
    return int(c.get("embedding", 0)) + int(c.get("key_lookup", 0))


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    shapes = _shapes(report)
    note = report["machine"]["note"]
    paths = []

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, c in zip(axes[0], shapes, strict=True):
        for i, m in enumerate(models):
            runs = m["runs"].get(c, {}).get("open_loop", [])
            pts = [(r["offered_rps"], r["latency_ms"]) for r in runs if r["latency_ms"]]
            if not pts:
                continue
            x = [p[0] for p in pts]
            color = f"C{i}"
            ax.plot(x, [p[1]["p99"] for p in pts], "-o", color=color, label=f"{m['label']} p99")
            ax.plot(x, [p[1]["p95"] for p in pts], ":", color=color, label=f"{m['label']} p95")
            ax.plot(x, [p[1]["p50"] for p in pts], "--", color=color, label=f"{m['label']} p50")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel("latency from intended send time (ms)")
        ax.set_title(f"{c} candidate(s) per request")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Latency against offered load ({note})", fontsize=9)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, c in zip(axes[0], shapes, strict=True):
        top = 0.0
        for i, m in enumerate(models):
            run = m["runs"].get(c, {})
            ol = run.get("open_loop", [])
            if not ol:
                continue
            x = [r["offered_rps"] for r in ol]
            ax.plot(x, [r["achieved_rps"] for r in ol], "-o", color=f"C{i}", label=m["label"])
            sat = run["closed_loop"]["rps"]
            ax.axhline(sat, color=f"C{i}", ls=":", lw=1)
            top = max(top, *x, sat)
        ax.plot([0, top], [0, top], color="grey", lw=0.8, label="answered = offered")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("answered requests/s")
        ax.set_title(f"{c} candidate(s); dotted: closed-loop saturation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput ({note})", fontsize=9)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [m["label"] for m in models]
    bottom = [0.0] * len(models)
    for j, comp in enumerate(COMPONENTS):
        vals = [float((m.get("components") or {}).get(comp, 0)) / 1e6 for m in models]
        ax.bar(labels, vals, bottom=bottom, color=f"C{j}", label=comp)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.scatter(labels, [m["disk_bytes_total"] / 1e6 for m in models], color="k", marker="_",
               s=400, label="bundle on disk", zorder=3)
    ax.set_ylabel("MB")
    ax.set_title("Model bytes by component (manifest) and bundle on disk")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", rotation=30)
    x = range(len(models))
    ax2.bar([i - 0.2 for i in x], [m["rss_loaded"] / 1e6 for m in models], width=0.4,
            label="loaded, idle")
    ax2.bar([i + 0.2 for i in x], [m["rss_peak"] / 1e6 for m in models], width=0.4,
            label="peak under load")
    ax2.set_xticks(list(x), labels, rotation=30)
    ax2.set_ylabel("MB")
    ax2.set_title("Server resident memory (psutil RSS)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"Footprint ({note})", fontsize=9)
    fig.tight_layout()
    paths.append(out / "footprint.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if not any(m.get("test_auc") is not None for m in models):
        ax.text(0.5, 0.5, "no AUC: untrained models", ha="center", va="center",
                transform=ax.transAxes)
    for i, m in enumerate(models):
        total = (m.get("components") or {}).get("total") or 0
        auc = m.get("test_auc")
        if auc is None or not total:
            continue
        ax.scatter([total / 1e6], [auc], color=f"C{i}", s=40)
        ax.annotate(m["label"], (total / 1e6, auc), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (MB, manifest total)")
    ax.set_ylabel("test AUC (bundle metrics)")
    ax.set_title("AUC against bytes", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "auc_bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _point(m: dict[str, Any], c: str, rate: float) -> dict[str, Any] | None:
    for r in m["runs"].get(c, {}).get("open_loop", []):
        if abs(r["offered_rps"] - rate) < 1e-6:
            return r
    return None


def markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    shapes = _shapes(report)
    srv, ld = report["server"], report["load"]
    mach = report["machine"]
    lines = [
        "# Serving benchmark: LMA against full-embedding baselines",
        "",
        f"Created {report['created_utc']} by `{report['command']}`.",
        "",
        f"**Machine: {mach['note']}.** {mach['processor']}, {mach['cpus']} CPUs, "
        f"{mach['memory_bytes'] / 2**30:.0f} GiB, {mach['platform']}, Python {mach['python']}; "
        f"load average at the start {', '.join(f'{x:.1f}' for x in mach['load_average'])}. "
        "Every number below is from this one run on this machine; compare models by their "
        "ratios, not the absolute values.",
        "",
        f"Server (identical for every model): `uvicorn service.main:app`, backend "
        f"{srv['backend']}, device {srv['device']}, {srv['workers']} worker(s), {srv['threads']} "
        f"intra-op thread(s), max batch {srv['max_batch_rows']} rows, max wait "
        f"{srv['max_wait_ms']} ms, deadline {srv['timeout_ms']} ms, CPUs "
        f"{srv['cpus'] or 'any'} (taskset). Load: route {ld['route']}, request rows from "
        f"`{ld['data']}` ({ld['unseen_rate']:.0%} of categorical values unseen), load generator "
        f"on CPUs {ld['cpus'] or 'any'}; closed-loop probe {ld['probe_s']} s with "
        f"{ld['probe_concurrency']} clients; open loop {ld['duration_s']} s per offered rate "
        f"after {ld['warmup_s']} s warm-up, latency from each request's intended send time, at "
        f"most {ld['max_in_flight']} requests outstanding.",
        "",
        "## Summary",
        "",
        "| model | kind | compression | tables | test AUC | serving state MB (embedding + key lookup) "
        "| model MB | bundle on disk MB | RSS loaded MB | RSS peak MB | ready s | "
        + " | ".join(f"saturation req/s ({c} cand.)" for c in shapes) + " | errors |",
        "|---" * (12 + len(shapes)) + "|",
    ]
    for m in models:
        sat = [_f(m["runs"].get(c, {}).get("closed_loop", {}).get("rps"), 1) for c in shapes]
        lines.append(
            f"| {m['label']}{' (UNTRAINED)' if m.get('untrained') else ''} | {m.get('kind')} | "
            f"{_f(m.get('compression'), 0)} | {m.get('table_dtype', 'float32')} | "
            f"{_f(m.get('test_auc'), 4)} | {_mb(_state(m))} | "
            f"{_mb((m.get('components') or {}).get('total'))} | {_mb(m['disk_bytes_total'])} | "
            f"{_mb(m['rss_loaded'])} | {_mb(m['rss_peak'])} | {_f(m['ready_s'])} | "
            + " | ".join(sat) + f" | {m['errors_total']} |")
    if any(m.get("untrained") for m in models):
        lines += ["", "**UNTRAINED models** (initial weights on a synthetic value-set vocabulary): "
                  "footprint, memory and latency are real, quality is not measured (no AUC)."]
    lines += ["", "Serving state and model MB are the service's `GET /v1/models/{name}` bytes "
              "(from the bundle manifest); RSS is the server process's resident memory (psutil). "
              "Saturation: answered requests/s of the closed-loop probe. Errors: failed or "
              "wrong answers over every probe and rate (timeouts, 503 queue full, 504 deadline)."]
    if report.get("targets"):
        lines += ["", "## Targets (LMA 16x against full tables, same run)", "",
                  "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {t['goal']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Latency against offered load", "", "![latency](latency.png)",
              "![throughput](throughput.png)", ""]
    for c in shapes:
        lines += [f"### {c} candidate(s) per request", "",
                  "| model | offered req/s | answered req/s | p50 ms | p95 ms | p99 ms | max ms "
                  "| errors | client lag p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
        for m in models:
            for r in m["runs"].get(c, {}).get("open_loop", []):
                lat = r["latency_ms"] or {}
                errs = sum(r["errors"].values())
                lines.append(
                    f"| {m['label']} | {_f(r['offered_rps'], 1)} | {_f(r['achieved_rps'], 1)} | "
                    f"{_f(lat.get('p50'))} | {_f(lat.get('p95'))} | {_f(lat.get('p99'))} | "
                    f"{_f(lat.get('max'))} | {errs}{' ' + str(r['errors']) if errs else ''} | "
                    f"{_f((r.get('client_lag_ms') or {}).get('p99'))} |")
        lines.append("")
    lines += ["## Footprint by component", "", "![footprint](footprint.png)", "",
              "| model | " + " | ".join(f"{c} MB" for c in COMPONENTS) + " | total MB | "
              "bundle files (MB) |", "|---" * (3 + len(COMPONENTS)) + "|"]
    for m in models:
        comp = m.get("components") or {}
        files = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in m["disk_bytes"].items())
        lines.append(f"| {m['label']} | " + " | ".join(_mb(comp.get(c)) for c in COMPONENTS)
                     + f" | {_mb(comp.get('total'))} | {files} |")
    lines += ["", "## AUC against bytes", "", "![auc](auc_bytes.png)", "",
              "## Where the time goes (server side)", "",
              "From the server's `/metrics` scraped before and after each open-loop rate (means "
              "over that rate), at the moderate rate the p99 targets use (the highest rate up to "
              "half the reference's saturation throughput that the reference answered in full). "
              "\"Other\" is the server time per request that is neither queue wait nor model "
              "compute (taking a request to wait for its whole batch's compute): JSON decoding, "
              "row encoding (token hashing), the response and the event loop; the in-process "
              "table below splits those.", "",
              "| model | candidates | offered req/s | requests | server ms/request | "
              "queue wait ms | compute ms/batch | rows/batch | other ms/request |",
              "|---|---|---|---|---|---|---|---|---|"]
    ref = next((m for m in models if m.get("kind") == "full"), models[0] if models else None)
    for c in shapes:
        if ref is None or c not in ref["runs"]:
            continue
        from loadtest.bench_serve import moderate_rate

        rate = moderate_rate(ref, c, report["load"]["rates"][c])
        for m in models:
            pt = _point(m, c, rate)
            b = (pt or {}).get("server")
            at = _f(rate, 1)
            if not b:
                # Reports written before per-rate scrapes: the means over all rates.
                b = m["runs"].get(c, {}).get("server_open_loop")
                at = "all rates"
            if not b:
                continue
            lines.append(f"| {m['label']} | {c} | {at} | {b['requests']:.0f} | "
                         f"{_f(b['server_ms_per_request'])} | "
                         f"{_f(b['queue_wait_ms_per_part'])} | {_f(b['compute_ms_per_batch'])} | "
                         f"{_f(b['rows_per_batch'], 1)} | {_f(b['other_ms_per_request'])} |")
    lines += ["", "## Profile per model: where a request's time goes", "",
              "Median ms per request of each step. JSON decoding (parse + request decoding), "
              "row encoding (token hashing) and the response (orjson) are the in-process steps "
              "of the next section; queue wait is the server's own mean at the moderate rate "
              "above (`/metrics`); key resolution, gather and MLP & rest split the model call "
              "on the same encoded rows by timing cut copies of its ONNX graph "
              "(`loadtest/model_profile.py`: up to the key lookups, up to the embedding rows, "
              "the whole model; each includes one onnxruntime call's fixed cost).", "",
              "| model | candidates | JSON decoding | encoding | queue wait | key resolution | "
              "gather | MLP & rest | response | model (whole) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in shapes:
        rate = None
        if ref is not None and c in ref["runs"]:
            from loadtest.bench_serve import moderate_rate

            rate = moderate_rate(ref, c, report["load"]["rates"][c])
        for m in models:
            ip = (m.get("inprocess") or {}).get(c)
            if not ip:
                continue
            st = ip.get("stages_median_ms", {})
            ms = ip.get("model_stages_ms") or {}
            pt = _point(m, c, rate) if rate is not None else None
            qw = ((pt or {}).get("server") or {}).get("queue_wait_ms_per_part")
            dec = (st["json_parse"] + st["decode"]) if "json_parse" in st else None
            lines.append(
                f"| {m['label']} | {c} | {_f(dec, 3)} | {_f(st.get('encode'), 3)} | "
                f"{_f(qw, 3)} | {_f(ms.get('key_resolution'), 3)} | {_f(ms.get('gather'), 3)} | "
                f"{_f(ms.get('mlp_and_rest'), 3)} | {_f(st.get('response'), 3)} | "
                f"{_f(ms.get('model'), 3)} |")
    lines += ["", "## Service against in-process scoring", "",
              "The same request bodies scored in one thread of a child process with the same "
              "backend and threads, pinned to the server's CPUs, through the service's own steps "
              "without HTTP or the batcher (median ms per request for each step), and the model "
              "alone on the encoded rows in a loop; against the service's closed-loop rows/s.", "",
              "| model | candidates | JSON parse | decode | encode rows | model | response | "
              "steps rows/s | model-only rows/s | service rows/s | service / model-only |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        for c in shapes:
            ip = (m.get("inprocess") or {}).get(c)
            cl = m["runs"].get(c, {}).get("closed_loop")
            if not ip or not cl:
                continue
            st = ip.get("stages_median_ms", {})
            lines.append(
                f"| {m['label']} | {c} | "
                + " | ".join(_f(st.get(k), 3) for k in
                             ("json_parse", "decode", "encode", "model", "response"))
                + f" | {_f(ip.get('pipeline_rows_per_s'), 0)} | {_f(ip['rows_per_s'], 0)} | "
                f"{_f(cl['rows_per_s'], 0)} | {_f(cl['rows_per_s'] / ip['rows_per_s'], 3)} |")
    lines += ["", "## Load and readiness", "",
              "| model | ready s (spawn to ready) | bundle load s | warm-up s |",
              "|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['label']} | {_f(m['ready_s'])} | {_f(m.get('load_seconds'), 3)} | "
                     f"{_f(m.get('warmup_seconds'), 3)} |")
    if report.get("not_done"):
        lines += ["", "## Not measured", ""]
        lines += [f"- {k}: {v}" for k, v in report["not_done"].items()]
    lines += ["", f"Benchmark wall time {report['wall_seconds']:.0f} s. Raw data: `report.json`; "
              "server logs under `raw/`.", ""]
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.md"
    path.write_text(markdown(report))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    report = json.loads((out / "report.json").read_text())
    from loadtest.bench_serve import targets

    report["targets"] = targets(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    write_plots(report, out)
    write_markdown(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
