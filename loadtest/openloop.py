"""Fixed-rate open-loop load generator: sends on a schedule whatever the answers do, and times each
request from its *intended* send time, so a slow server's queueing shows in the latencies instead
of silently lowering the offered load (no coordinated omission).

    python -m loadtest.openloop --url http://127.0.0.1:8000 --model demo --route v2-binary \\
        --rate 50,100,200 --duration 10 --candidates 100 --out reports/openloop.json

For each offered rate it writes p50/p90/p95/p99/p99.9/max latency, the achieved rate, errors by
kind and HTTP status, and how far the client itself fell behind its schedule (``client_lag_ms``:
if that is large, the generator, not the server, was the limit). ``--csv`` adds one line per
request. Requests are ready bodies built once (``loadtest.payloads``); connections are kept
alive, up to ``--connections`` at once: a request waiting for a free connection is waiting in the
server's queue as far as its latency is concerned.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loadtest.payloads import (
    DEFAULT_DATA,
    ROUTES,
    Payload,
    RequestSpec,
    build_payloads,
    count_predictions,
    load_request_set,
)

logger = logging.getLogger("loadtest.openloop")
PERCENTILES = (50, 90, 95, 99, 99.9)


@dataclass
class Sample:
    """One request: intended send time (s from start), latency from it, status, error kind."""

    intended_s: float
    latency_ms: float
    service_ms: float  # from the request's headers leaving on a connection to the answer
    status: int
    error: str | None


@dataclass
class RunResult:
    route: str
    offered_rps: float
    duration_s: float
    arrivals: str
    sent: int
    ok: int
    errors: dict[str, int]
    status: dict[str, int]
    achieved_rps: float
    rows_per_request: int
    latency_ms: dict[str, float]
    service_ms: dict[str, float]
    client_lag_ms: dict[str, float]
    samples: list[Sample] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        return d


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PERCENTILES}
    out["max"] = float(a.max())
    out["mean"] = float(a.mean())
    return out


def schedule(rate: float, duration: float, arrivals: str, seed: int) -> np.ndarray:
    """Intended send times in [0, duration): evenly spaced, or a Poisson process of that rate."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    if arrivals == "uniform":
        return np.arange(int(math.floor(rate * duration))) / rate
    if arrivals == "poisson":
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 16)
        t = np.cumsum(gaps) - gaps[0]
        return t[t < duration]
    raise ValueError(f"arrivals must be uniform or poisson, got {arrivals!r}")


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    p: Payload,
    t0: float,
    intended: float,
    timeout: aiohttp.ClientTimeout,
    lags: list[float],
    in_flight: list[int],
) -> Sample:
    start = time.perf_counter()
    lags.append((start - (t0 + intended)) * 1e3)
    status, error = 0, None
    marks: dict[str, float] = {}
    try:
        async with session.post(
            url + p.path, data=p.body, headers=p.headers, timeout=timeout, trace_request_ctx=marks
        ) as r:
            body = await r.read()
            status = r.status
            if count_predictions(p.route, status, r.headers, body) != p.rows:
                error = f"http_{status}" if status != 200 else "bad_answer"
    except TimeoutError:
        error = "timeout"
    except aiohttp.ClientError as exc:
        error = type(exc).__name__
    done = time.perf_counter()
    in_flight[0] -= 1
    sent = marks.get("sent", start)
    return Sample(intended, (done - (t0 + intended)) * 1e3, (done - sent) * 1e3, status, error)


async def _headers_sent(session, ctx, params) -> None:
    # A request may wait for a free connection after it was due; service time starts here.
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["sent"] = time.perf_counter()


def new_session(connections: int) -> aiohttp.ClientSession:
    """Keep-alive session of at most ``connections`` connections, marking when requests leave."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), trace_configs=[trace]
    )


async def run_rate(
    url: str,
    payloads: Sequence[Payload],
    rate: float,
    duration: float,
    *,
    session: aiohttp.ClientSession | None = None,
    arrivals: str = "uniform",
    connections: int = 256,
    timeout_s: float = 10.0,
    max_in_flight: int = 20000,
    seed: int = 0,
) -> RunResult:
    """Offer ``rate`` requests/s for ``duration`` s, cycling through ``payloads``.

    ``session`` (kept alive across calls, e.g. after a warm-up) or a new one of ``connections``.
    """
    if not payloads:
        raise ValueError("no payloads")
    if session is None:
        async with new_session(connections) as own:
            return await run_rate(
                url, payloads, rate, duration, session=own, arrivals=arrivals,
                timeout_s=timeout_s, max_in_flight=max_in_flight, seed=seed,
            )  # fmt: skip
    times = schedule(rate, duration, arrivals, seed)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    lags: list[float] = []
    tasks: list[asyncio.Task] = []
    in_flight = [0]
    dropped = 0
    t0 = time.perf_counter() + 0.05
    for i, intended in enumerate(times):
        delay = t0 + intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight[0] >= max_in_flight:
            # Bounded memory: past this many outstanding requests the server is far beyond
            # saturation; the request is counted as an error rather than queued without end.
            dropped += 1
            continue
        p = payloads[i % len(payloads)]
        in_flight[0] += 1
        tasks.append(
            asyncio.create_task(_one(session, url, p, t0, intended, timeout, lags, in_flight))
        )
    samples = list(await asyncio.gather(*tasks))
    end = time.perf_counter()
    errors = Counter(s.error for s in samples if s.error)
    if dropped:
        errors["client_in_flight_limit"] = dropped
    status = Counter(str(s.status) for s in samples)
    ok = sum(1 for s in samples if s.error is None)
    elapsed = max(end - t0, 1e-9)
    return RunResult(
        route=payloads[0].route,
        offered_rps=rate,
        duration_s=duration,
        arrivals=arrivals,
        sent=len(samples) + dropped,
        ok=ok,
        errors=dict(errors),
        status=dict(status),
        achieved_rps=ok / elapsed,
        rows_per_request=payloads[0].rows,
        latency_ms=_percentiles([s.latency_ms for s in samples if s.error is None]),
        service_ms=_percentiles([s.service_ms for s in samples if s.error is None]),
        client_lag_ms=_percentiles(lags),
        samples=samples,
    )


def write_csv(path: Path, results: Sequence[RunResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offered_rps", "intended_s", "latency_ms", "service_ms", "status", "error"])
        for r in results:
            for s in r.samples:
                w.writerow(
                    [r.offered_rps, f"{s.intended_s:.6f}", f"{s.latency_ms:.3f}",
                     f"{s.service_ms:.3f}", s.status, s.error or ""]
                )  # fmt: skip


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rate takes numbers separated by commas: {text!r}"
        ) from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("--rate needs positive rates")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.openloop", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--model", default="demo", help="model name in the request paths")
    ap.add_argument("--route", choices=ROUTES, default="v1")
    ap.add_argument(
        "--rate",
        type=_rates,
        default=[50.0],
        help="offered requests/s; several (comma-separated) run in turn",
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    ap.add_argument("--candidates", type=int, default=100, help="candidates per request")
    ap.add_argument("--data", default=DEFAULT_DATA, help="request rows (an lma --data spec)")
    ap.add_argument(
        "--unseen-rate",
        type=float,
        default=0.05,
        help="share of categorical values never seen in training",
    )
    ap.add_argument("--top-k", type=int, default=10, help="v1 top_k (0: none)")
    ap.add_argument("--pool", type=int, default=64, help="distinct ready requests")
    ap.add_argument("--connections", type=int, default=256, help="keep-alive connections")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a request fails")
    ap.add_argument("--max-in-flight", type=int, default=20000)
    ap.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds at the first rate before measuring (0: none)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON summary (printed when absent)")
    ap.add_argument("--csv", type=Path, help="one line per request")
    return ap.parse_args(argv)  # fmt: skip


async def _main(args: argparse.Namespace) -> list[RunResult]:
    spec = RequestSpec(
        data=args.data,
        candidates=args.candidates,
        unseen_rate=args.unseen_rate,
        top_k=args.top_k or None,
        pool=args.pool,
        seed=args.seed,
    )
    payloads = build_payloads(load_request_set(spec), args.route, args.model)
    url = args.url.rstrip("/")
    kw = dict(
        arrivals=args.arrivals,
        timeout_s=args.timeout,
        max_in_flight=args.max_in_flight,
        seed=args.seed,
    )
    results = []
    async with new_session(args.connections) as session:
        if args.warmup > 0:
            await run_rate(url, payloads, args.rate[0], args.warmup, session=session, **kw)
        for rate in args.rate:
            r = await run_rate(url, payloads, rate, args.duration, session=session, **kw)
            logger.info(
                "%s at %.0f/s: %d ok, %d errors, p50 %.2f ms, p99 %.2f ms, client lag p99 %.2f ms",
                r.route, rate, r.ok, sum(r.errors.values()), r.latency_ms.get("p50", math.nan),
                r.latency_ms.get("p99", math.nan), r.client_lag_ms.get("p99", math.nan),
            )  # fmt: skip
            results.append(r)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = asyncio.run(_main(args))
    report = {
        "url": args.url,
        "model": args.model,
        "route": args.route,
        "data": args.data,
        "candidates": args.candidates,
        "unseen_rate": args.unseen_rate,
        "runs": [r.summary() for r in results],
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if args.csv:
        write_csv(args.csv, results)
    return 0 if all(not r.errors for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
