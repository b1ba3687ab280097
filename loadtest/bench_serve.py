"""``lma bench serve``: the same service under the same load, LMA beside full-embedding baselines.

For every bundle in turn (given with ``--bundle LABEL=PATH``, or trained and exported here from
``--data`` with ``--models full,lma16,lma64,robez16,hash16``), one run:

1. start a real uvicorn process (``uvicorn service.main:app``) with identical settings for every
   model (backend, device, workers, threads, batching; pinned to ``--server-cpus`` with taskset and
   ``OMP_NUM_THREADS``), and wait for ``/v2/health/ready``;
2. read what the server reports (``GET /v1/models/{name}``: kind, bytes by component, load and
   warm-up time, test AUC) and its resident memory (psutil, the process and its children);
3. for each request shape (``--candidates 1,100``): a closed-loop probe (``--probe-concurrency``
   clients, each sending as soon as its last answer came) measures throughput at saturation, then
   the fixed-rate open loop of :mod:`loadtest.openloop` offers each rate of ``--rates`` and times
   every request from its intended send time (no coordinated omission);
4. scrape ``/metrics`` for the server-side breakdown (queue wait, model compute, rows per batch),
   stop the server, and score the same rows in-process with the same backend and threads (what the
   HTTP layer costs).

Rates are the same for every model: given, or (``--rates auto``) fractions ``--rate-fractions``
of the first model's closed-loop throughput. Output under ``--out/<timestamp>/``: ``report.md``,
``report.json`` and the plots ``latency.png`` (percentiles against offered load), ``throughput.png``,
``footprint.png`` (bytes by component, and resident memory) and ``auc_bytes.png``. Load is bounded
(``--max-in-flight`` outstanding requests, ``--timeout`` per request) and goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("loadtest.bench_serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE_NOTE = "shared 2-core machine, contended (other agents' jobs running)"
DEFAULT_MODELS = "full,lma16,lma64,robez16,hash16"
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)
# The fraction of the reference's saturation throughput at which the p99 targets are read.
MODERATE_FRACTION = 0.5
KINDS = ("full", "lma", "robez", "hash", "qr")
COMPONENTS = ("embedding", "key_lookup", "mlp", "other")


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One model to build: ``lma16`` -> kind lma at 16x; ``full`` -> full tables; ``-fp16``
    suffix -> float16 tables (``lma export --dtype float16``); ``-z16`` (any
    ``-KEY=VALUE`` or ``-zN``) -> embedding options, e.g. ``lma16-z16`` is lma at 16x with Z = 16."""

    label: str
    kind: str
    compression: float
    fp16: bool = False
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label = text.strip()
        head, *opts = label.split("-")
        m = re.fullmatch(r"([a-z]+?)(\d+(?:\.\d+)?)?", head)
        if not m or m.group(1) not in KINDS:
            raise ValueError(f"model {text!r}: expected KIND[COMPRESSION][-fp16][-zN] with KIND "
                             f"one of {KINDS} (e.g. full, lma16, robez16, full-fp16, lma16-z16)")
        kind = m.group(1)
        comp = float(m.group(2)) if m.group(2) else 1.0
        if kind == "full" and comp != 1.0:
            raise ValueError(f"model {text!r}: full tables have compression 1")
        if kind != "full" and m.group(2) is None:
            raise ValueError(f"model {text!r}: give the compression, e.g. {kind}16")
        fp16 = False
        options: list[tuple[str, str]] = []
        for o in opts:
            if o == "fp16":
                fp16 = True
            elif re.fullmatch(r"z\d+", o):
                options.append(("z", o[1:]))
            elif "=" in o:
                k, v = o.split("=", 1)
                options.append((k, v))
            else:
                raise ValueError(f"model {text!r}: unknown suffix -{o} (fp16, zN or KEY=VALUE)")
        return cls(label, kind, comp, fp16, tuple(options))

    def train_options(self) -> list[str]:
        return [a for k, v in self.options for a in ("--option", f"{k}={v}")]


def build_bundles(specs: Sequence[ModelSpec], data: str, root: Path, train_args: Sequence[str],
                  sample_rows: int = 256) -> tuple[dict[str, Path], dict[str, str]]:
    """Train each model with ``lma train`` on ``data`` and export it with ``lma export``.

    Returns (label -> bundle folder, label -> why it was not built). Bundles already in ``root``
    (a manifest present) are reused, so a rerun only measures; a checkpoint without its bundle
    is exported again (e.g. after an exporter change)."""
    from lma.cli import main as lma

    bundles: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for s in specs:
        paths = _paths_to_build(s, root, bundles, skipped)
        if paths is None:
            continue
        ck, out = paths
        argv = ["-q", "train", "--data", data, "--embedding", s.kind,
                "--compression", f"{s.compression:g}", *s.train_options(), "--out", str(ck),
                *train_args]
        if (ck / "metrics.json").is_file():
            logger.info("exporting %s from its checkpoint %s", s.label, ck)
        else:
            logger.info("building %s: lma %s", s.label, " ".join(argv[1:]))
            if lma(argv) != 0:
                raise RuntimeError(f"lma train failed for {s.label}")
        export(ck, out, s, ["--sample-rows", str(sample_rows)])
        bundles[s.label] = out
    return bundles, skipped


def _paths_to_build(spec: ModelSpec, root: Path, bundles: dict[str, Path],
                    skipped: dict[str, str]) -> tuple[Path, Path] | None:
    """(checkpoint, bundle) folders of a model still to build, or None when it is settled: its
    bundle is already in ``root`` (recorded in ``bundles``) or it cannot be built (``skipped``).
    An fp16 model is its float32 twin's checkpoint exported with float16 tables (``lma export
    --dtype float16``), so it is never trained or built twice."""
    ck = root / "checkpoints" / spec.label.removesuffix("-fp16")
    out = root / "bundles" / spec.label
    if (out / "manifest.json").is_file():
        bundles[spec.label] = out
        return None
    return ck, out


def export(ck: Path, out: Path, spec: ModelSpec, extra: Sequence[str]) -> None:
    """``lma export`` of a checkpoint (``--dtype float16`` for the ``-fp16`` models)."""
    from lma.cli import main as lma

    dtype = ["--dtype", "float16"] if spec.fp16 else []
    if lma(["-q", "export", str(ck), "--out", str(out), "--name", spec.label, *dtype,
            *extra]) != 0:
        raise RuntimeError(f"lma export failed for {spec.label}")


def build_untrained_bundles(specs: Sequence[ModelSpec], preset: str, root: Path, *,
                            rows: int | None = None, signature_rows: int = 125_000,
                            seed: int = 0, dim: int = 16, zipf: float | None = None
                            ) -> tuple[dict[str, Path], dict[str, str]]:
    """UNTRAINED models at a synthetic preset's full vocabulary (``kaggle``: Criteo Kaggle's 33.7M
    values at its 45.8M rows), for footprint and latency only: the feature map is drawn from the
    generator's value set without rows (:func:`lma.data.synthetic.value_set_feature_map`), LMA's
    signatures come from ``signature_rows`` synthetic rows of the preset, the weights are the
    initial ones. Saved as checkpoints (metrics say ``untrained``) and exported with
    ``lma export``. ``zipf``: the skew of value frequencies (default: the preset's); a flatter
    skew reaches more of the preset's value supports at the same rows."""
    import numpy as np

    from lma.checkpoint import save_checkpoint
    from lma.cli import _kv_options  # `lma train --option`'s reading of KEY=VALUE
    from lma.data import open_source
    from lma.data.synthetic import KAGGLE_ROWS, SynthConfig, value_set_feature_map
    from lma.train import TrainConfig, build_model

    n_rows = rows or (KAGGLE_ROWS if preset == "kaggle" else 1_000_000)
    bundles: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    fmap = None
    sig_tokens = None
    for s in specs:
        paths = _paths_to_build(s, root, bundles, skipped)
        if paths is None:
            continue
        ck, out = paths
        if not (ck / "metrics.json").is_file():
            if fmap is None:
                t0 = time.perf_counter()
                fmap = value_set_feature_map(
                    SynthConfig(rows=n_rows, seed=seed, preset=preset, zipf=zipf), n_rows,
                    seed=seed)
                data = f"synth:{signature_rows}:{seed}:{preset}" + (f":zipf={zipf}" if zipf else "")
                sig_tokens = np.ascontiguousarray(open_source(data).read_all().tokens, np.int64)
                logger.info("value-set feature map of %s at %d rows: %d tokens (%.0f s)", preset,
                            n_rows, sum(len(t) for t in fmap.tokens), time.perf_counter() - t0)
            cfg = TrainConfig(data=f"synth:{n_rows}:{seed}:{preset}", embedding=s.kind,
                              compression=s.compression, dim=dim, seed=seed, progress=False,
                              options=_kv_options([f"{k}={v}" for k, v in s.options]))
            model = build_model(cfg, fmap, sig_tokens)
            metrics = {"untrained": True, "embedding": s.kind, "compression": s.compression,
                       "vocabulary": int(sum(len(t) for t in fmap.tokens)),
                       "value_set": {"preset": preset, "rows": n_rows, "zipf": zipf},
                       "note": f"untrained: initial weights on the {preset} preset's value-set "
                               "feature map; no AUC"}
            save_checkpoint(ck, model, fmap, metrics,
                            train_config={"embedding": s.kind, "compression": s.compression,
                                          "untrained": True})
            del model
        export(ck, out, s, ["--data", f"synth:512:{seed}:{preset}", "--sample-rows", "256"])
        bundles[s.label] = out
    return bundles, skipped


# ----------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerSettings:
    """Identical for every model of a run."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    workers: int = 1
    threads: int = 1
    max_batch_rows: int = 1024
    max_wait_ms: float = 2.0
    timeout_ms: float = 1000.0
    cpus: str | None = None  # taskset list, e.g. "1"

    def env(self, bundle: Path, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "LMA_SERVE_MODELS": str(bundle),
            "LMA_SERVE_BACKEND": self.backend,
            "LMA_SERVE_DEVICE": self.device,
            "LMA_SERVE_WORKERS": str(self.workers),
            "LMA_SERVE_THREADS": str(self.threads),
            "LMA_SERVE_MAX_BATCH_ROWS": str(self.max_batch_rows),
            "LMA_SERVE_MAX_WAIT_MS": str(self.max_wait_ms),
            "LMA_SERVE_TIMEOUT_MS": str(self.timeout_ms),
            "LMA_SERVE_PORT": str(port),
            # The service itself pins onnxruntime's threads; these keep numpy/torch pools at the
            # same size.
            "OMP_NUM_THREADS": str(max(self.threads, 1)),
            "MKL_NUM_THREADS": str(max(self.threads, 1)),
            "OPENBLAS_NUM_THREADS": str(max(self.threads, 1)),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep),
        })
        return env

    def pin(self, argv: list[str]) -> list[str]:
        if not self.cpus or not shutil.which("taskset"):
            return argv
        if max(_cpu_list(self.cpus)) >= (os.cpu_count() or 1):
            logger.warning("server CPUs %s are not on this machine (%s CPUs): not pinned",
                           self.cpus, os.cpu_count())
            return argv
        return ["taskset", "-c", self.cpus, *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    ready_s: float
    log: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children (the workers)."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for q in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += q.memory_info().rss
        return total


def _get_json(url: str, timeout: float = 5.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return json.loads(r.read())


def _get_text(url: str, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
        return r.read().decode()


@contextlib.contextmanager
def serve(bundle: Path, settings: ServerSettings, log: Path,
          ready_timeout_s: float = 600.0) -> Iterator[Server]:
    """A uvicorn process serving ``bundle`` on a free loopback port, ready when yielded."""
    import urllib.error
    import urllib.request

    port = free_port()
    argv = settings.pin([sys.executable, "-m", "uvicorn", "service.main:app", "--host",
                         "127.0.0.1", "--port", str(port), "--workers", str(settings.workers),
                         "--log-level", "warning"])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=settings.env(bundle, port), stdout=logf,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server for {bundle} exited with {proc.returncode}; "
                                       f"log: {log}\n{log.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:  # noqa: S310
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.perf_counter() - t0 > ready_timeout_s:
                    raise TimeoutError(f"the server for {bundle} was not ready in "
                                       f"{ready_timeout_s:.0f} s; log: {log}")
                time.sleep(0.1)
            yield Server(proc, url, time.perf_counter() - t0, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RssSampler:
    """Peak resident memory of a server while load runs (sampled every ``every_s``)."""

    def __init__(self, server: Server, every_s: float = 0.25):
        self.server, self.every_s = server, every_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# ----------------------------------------------------------------------------- metrics


# Label values may hold braces (route templates such as /v1/models/{name}:predict).
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\d+)?$')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} of the samples (comments dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _sum_of(metrics: dict[str, float], name: str, model: str) -> float:
    want = f'model="{model}"'
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") and want in k)


def server_breakdown(before: dict[str, float], after: dict[str, float], model: str
                     ) -> dict[str, float]:
    """Means over the load between two scrapes, for ``model``'s series: server time per request,
    queue wait per request part, model compute per batch, rows per batch, counts."""
    def delta(name: str) -> float:
        return _sum_of(after, name, model) - _sum_of(before, name, model)

    req_n, req_s = delta("lma_request_seconds_count"), delta("lma_request_seconds_sum")
    qw_n, qw_s = delta("lma_queue_wait_seconds_count"), delta("lma_queue_wait_seconds_sum")
    b_n, c_s = delta("lma_compute_seconds_count"), delta("lma_compute_seconds_sum")
    rows = delta("lma_batch_rows_sum")

    def mean(s: float, n: float) -> float:
        return s / n if n else math.nan

    return {
        "requests": req_n,
        "batches": b_n,
        "server_ms_per_request": 1e3 * mean(req_s, req_n),
        "queue_wait_ms_per_part": 1e3 * mean(qw_s, qw_n),
        "compute_ms_per_batch": 1e3 * mean(c_s, b_n),
        "rows_per_batch": mean(rows, b_n),
        # What a request spends neither waiting for its batch nor in its batch's model call:
        # JSON decoding, encoding of the rows (token hashing), the response and the event loop.
        # Approximate: a request waits for the whole of its batch's compute.
        "other_ms_per_request": 1e3 * (mean(req_s, req_n) - mean(qw_s, qw_n) - mean(c_s, b_n)),
    }


# ----------------------------------------------------------------------------- load


@dataclass
class LoadSettings:
    data: str
    candidates: tuple[int, ...] = (1, 100)
    route: str = "v1"
    rates: dict[int, list[float]] | None = None  # candidates -> offered rates; None: auto
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    duration_s: float = 10.0
    warmup_s: float = 1.0
    probe_s: float = 5.0
    probe_concurrency: int = 16
    unseen_rate: float = 0.05
    pool: int = 64
    connections: int = 256
    timeout_s: float = 10.0
    max_in_flight: int = 2000
    seed: int = 0
    cpus: str | None = None  # the client's own CPUs


class LoadDriver:
    """The load generators this benchmark uses, behind one small interface: build the request
    pool for a model, probe throughput with a closed loop, offer a fixed rate with the open loop.
    Requests and the open loop are :mod:`loadtest.payloads` and :mod:`loadtest.openloop`."""

    def __init__(self, load: LoadSettings):
        try:
            from loadtest import openloop as _openloop  # noqa: F401
            from loadtest import payloads as _payloads
        except ImportError as exc:
            raise ValueError(f"lma bench serve needs the load generators loadtest.payloads and "
                             f"loadtest.openloop, which are not installed here ({exc})") from None

        self.load = load
        self._payloads = _payloads
        self._sets: dict[int, Any] = {}

    def payloads(self, model: str, candidates: int) -> list[Any]:
        p = self._payloads
        if candidates not in self._sets:
            spec = p.RequestSpec(data=self.load.data, candidates=candidates,
                                 unseen_rate=self.load.unseen_rate, top_k=None,
                                 pool=self.load.pool, seed=self.load.seed)
            self._sets[candidates] = p.load_request_set(spec)
        return p.build_payloads(self._sets[candidates], self.load.route, model)

    async def closed_loop(self, url: str, payloads: Sequence[Any], concurrency: int,
                          seconds: float) -> dict[str, Any]:
        """``concurrency`` clients each sending the next request when the last was answered."""
        import numpy as np

        from loadtest.openloop import new_session
        from loadtest.payloads import count_predictions

        lat: list[float] = []
        errors: dict[str, int] = {}
        stop = time.perf_counter() + seconds

        async def client(session: Any, k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                p = payloads[i % len(payloads)]
                i += concurrency
                t = time.perf_counter()
                try:
                    async with session.post(url + p.path, data=p.body, headers=p.headers) as r:
                        body = await r.read()
                        good = count_predictions(p.route, r.status, r.headers, body) == p.rows
                        kind = None if good else f"http_{r.status}"
                except Exception as exc:  # counted, the probe goes on
                    kind = type(exc).__name__
                if kind is None:
                    lat.append((time.perf_counter() - t) * 1e3)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

        t0 = time.perf_counter()
        async with new_session(concurrency) as session:
            await asyncio.gather(*(client(session, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
        a = np.asarray(lat) if lat else np.asarray([math.nan])
        return {"concurrency": concurrency, "seconds": elapsed, "ok": len(lat),
                "errors": errors, "rps": len(lat) / elapsed,
                "rows_per_s": len(lat) * payloads[0].rows / elapsed,
                "latency_ms": {"p50": float(np.percentile(a, 50)),
                               "p99": float(np.percentile(a, 99))}}

    async def open_loop(self, url: str, payloads: Sequence[Any], rates: Sequence[float],
                        model: str | None = None) -> list[dict[str, Any]]:
        """One run per offered rate; with ``model``, each run also gets the server's own
        breakdown over it (``server``, from ``/metrics`` scraped before and after)."""
        from loadtest.openloop import new_session, run_rate

        ld = self.load
        kw = dict(timeout_s=ld.timeout_s, max_in_flight=ld.max_in_flight, seed=ld.seed)
        out = []
        async with new_session(ld.connections) as session:
            if ld.warmup_s > 0:
                await run_rate(url, payloads, rates[0], ld.warmup_s, session=session, **kw)
            for rate in rates:
                before = parse_metrics(_get_text(url + "/metrics")) if model else None
                r = await run_rate(url, payloads, rate, ld.duration_s, session=session, **kw)
                out.append(r.summary())
                if model and before is not None:
                    after = parse_metrics(_get_text(url + "/metrics"))
                    out[-1]["server"] = server_breakdown(before, after, model)
                logger.info("  %.1f req/s offered: %.1f answered/s, p50 %.2f ms, p99 %.2f ms, "
                            "%d errors", rate, r.achieved_rps, r.latency_ms.get("p50", math.nan),
                            r.latency_ms.get("p99", math.nan), sum(r.errors.values()))
        return out


# ----------------------------------------------------------------------------- in-process


def inprocess_throughput(bundle: Path, settings: ServerSettings, data: str,
                         batch_sizes: Sequence[int], seconds: float, unseen_rate: float
                         ) -> dict[str, Any]:
    """The same requests scored in-process with the same backend, threads and CPUs (a child
    process pinned as the server was): the service's steps timed one by one, and the model
    alone. What the HTTP layer and the batcher add is the difference to the service."""
    argv = settings.pin([sys.executable, "-m", "loadtest.bench_serve", "_inprocess",
                         str(bundle), "--backend", settings.backend, "--device", settings.device,
                         "--threads", str(settings.threads), "--data", data,
                         "--unseen-rate", str(unseen_rate),
                         "--batches", ",".join(map(str, batch_sizes)),
                         "--seconds", str(seconds)])
    env = settings.env(bundle, 0)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"in-process scoring of {bundle} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _inprocess_main(argv: Sequence[str]) -> int:
    """The child of :func:`inprocess_throughput`: for each batch size B, the v1 request bodies of
    B candidates the load uses, taken through the service's own steps in one thread without
    HTTP (JSON parse, request decoding, row encoding, the model, the response), each timed; and
    the model alone on the encoded rows in a loop."""
    import numpy as np
    import orjson

    from lma.bundle import load_bundle
    from lma.records import RecordEncoder
    from loadtest.payloads import RequestSpec, build_payloads, load_request_set
    from service.backends import open_backend
    from service.decoding import decode_v1, parse_json, rows_to_arrays
    from service.state import sigmoid

    ap = argparse.ArgumentParser(prog="bench_serve _inprocess")
    ap.add_argument("bundle")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", required=True)
    ap.add_argument("--unseen-rate", type=float, default=0.05)
    ap.add_argument("--batches", default="1,100")
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    bundle = load_bundle(a.bundle)
    backend = open_backend(a.backend, bundle, a.device, a.threads)
    encoder = RecordEncoder(bundle.feature_map().schema)
    out: dict[str, Any] = {}
    encoded_by_batch: dict[str, list[tuple[Any, Any]]] = {}
    for b in (int(x) for x in a.batches.split(",")):
        spec = RequestSpec(data=a.data, candidates=b, unseen_rate=a.unseen_rate, top_k=None,
                           pool=16)
        bodies = [p.body for p in build_payloads(load_request_set(spec), "v1", "m")]
        stages: dict[str, list[float]] = {k: [] for k in
                                          ("json_parse", "decode", "encode", "model", "response")}
        encoded = []
        stop = time.perf_counter() + a.seconds
        i = 0
        while time.perf_counter() < stop or i < 2 * len(bodies):
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            obj = parse_json(body)
            t1 = time.perf_counter()
            req = decode_v1(obj, 1 << 30)
            t2 = time.perf_counter()
            dense, tokens = rows_to_arrays(encoder, req.rows, req.where)
            t3 = time.perf_counter()
            probs = sigmoid(backend.run(dense, tokens))
            t4 = time.perf_counter()
            orjson.dumps({"predictions": probs, "model": "m", "version": "1"},
                         option=orjson.OPT_SERIALIZE_NUMPY)
            t5 = time.perf_counter()
            if i >= len(bodies):  # the first pass warms caches
                for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                                 strict=True):
                    stages[k].append(dt)
            elif len(encoded) < len(bodies):
                encoded.append((dense, tokens))
            i += 1
        total = [sum(x) for x in zip(*stages.values(), strict=True)]
        model_times: list[float] = []
        stop = time.perf_counter() + a.seconds
        k = 0
        while time.perf_counter() < stop or k < 5:
            d, t = encoded[k % len(encoded)]
            t0 = time.perf_counter()
            backend.run(d, t)
            model_times.append(time.perf_counter() - t0)
            k += 1
        out[str(b)] = {
            "requests": len(total),
            "stages_median_ms": {k: float(np.median(v)) * 1e3 for k, v in stages.items()},
            "pipeline_median_ms": float(np.median(total)) * 1e3,
            "pipeline_rows_per_s": b * len(total) / sum(total),
            "calls": len(model_times),
            "median_ms": float(np.median(model_times)) * 1e3,
            "p99_ms": float(np.percentile(model_times, 99)) * 1e3,
            "rows_per_s": b * len(model_times) / sum(model_times),
        }
        encoded_by_batch[str(b)] = encoded
    if a.backend == "onnxruntime" and a.device == "cpu":
        # The model split into key resolution, gather and the rest (loadtest.model_profile);
        # the served session is closed first, so the cut copies do not add to its memory.
        from loadtest.model_profile import StageModels

        del backend
        stage_models = StageModels(bundle, a.threads)
        try:
            for b, encoded in encoded_by_batch.items():
                out[b]["model_stages_ms"] = stage_models.profile(encoded, a.seconds / 3)
        finally:
            stage_models.close()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


# ----------------------------------------------------------------------------- the run


def _bundle_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def _bundle_metrics(path: Path) -> dict[str, Any]:
    m = json.loads((path / "manifest.json").read_text()).get("metrics")
    return m if isinstance(m, dict) else {}


def _bundle_table_dtype(path: Path) -> str:
    """Storage type of the bundle's embedding tables (float32 before the manifest said)."""
    dt = json.loads((path / "manifest.json").read_text()).get("dtype")
    return str(dt.get("dtype", "float32")) if isinstance(dt, dict) else "float32"


def _bundle_auc(path: Path) -> float | None:
    auc = _bundle_metrics(path).get("test_auc")
    return float(auc) if isinstance(auc, int | float) else None


def bench_model(label: str, bundle: Path, server: ServerSettings, load: LoadSettings,
                driver: LoadDriver, rates: dict[int, list[float]] | None, run_dir: Path,
                inprocess_s: float) -> dict[str, Any]:
    """One model: start its server, measure, stop it, score in-process. ``rates`` None: probe
    this model first and derive the rates from it (returned under ``derived_rates``)."""
    logger.info("== %s (%s)", label, bundle)
    res: dict[str, Any] = {"label": label, "bundle": str(bundle),
                           "disk_bytes": _bundle_files(bundle), "errors_total": 0}
    res["disk_bytes_total"] = sum(res["disk_bytes"].values())
    res["untrained"] = bool(_bundle_metrics(bundle).get("untrained", False))
    res["table_dtype"] = _bundle_table_dtype(bundle)
    with serve(bundle, server, run_dir / "raw" / f"server-{label}.log") as srv:
        models = _get_json(srv.url + "/v1/models")["models"]
        name = models[0]["name"]
        info = _get_json(f"{srv.url}/v1/models/{name}")
        res.update(name=name, info=info, kind=info.get("kind"),
                   compression=info.get("compression"), components=info.get("bytes", {}),
                   test_auc=info.get("test_auc", _bundle_auc(bundle)),
                   ready_s=srv.ready_s, load_seconds=info.get("load_seconds"),
                   warmup_seconds=info.get("warmup_seconds"), rss_loaded=srv.rss_bytes())
        res["runs"] = {}
        derived: dict[int, list[float]] = {}
        with RssSampler(srv) as rss:
            for c in load.candidates:
                payloads = driver.payloads(name, c)
                before = parse_metrics(_get_text(srv.url + "/metrics"))
                probe = asyncio.run(driver.closed_loop(srv.url, payloads, load.probe_concurrency,
                                                       load.probe_s))
                logger.info("  %d candidates: closed loop %.1f req/s (%d errors)", c, probe["rps"],
                            sum(probe["errors"].values()))
                if rates is None or c not in rates:
                    base = max(probe["rps"], 1.0)
                    derived[c] = [round(base * f, 1) for f in load.fractions]
                rs = (rates or {}).get(c) or derived[c]
                mid = parse_metrics(_get_text(srv.url + "/metrics"))
                runs = asyncio.run(driver.open_loop(srv.url, payloads, rs, name))
                after = parse_metrics(_get_text(srv.url + "/metrics"))
                errs = sum(probe["errors"].values()) + sum(sum(r["errors"].values()) for r in runs)
                res["errors_total"] += errs
                res["runs"][str(c)] = {
                    "closed_loop": probe, "open_loop": runs,
                    "server_probe": server_breakdown(before, mid, name),
                    "server_open_loop": server_breakdown(mid, after, name),
                }
        res["rss_peak"] = max(rss.peak, res["rss_loaded"])
    if derived:
        res["derived_rates"] = {str(c): v for c, v in derived.items()}
    res["inprocess"] = inprocess_throughput(bundle, server, load.data, load.candidates,
                                            inprocess_s, load.unseen_rate)
    return res


def run_benchmark(bundles: dict[str, Path], server: ServerSettings, load: LoadSettings,
                  out_root: Path, *, skipped: dict[str, str] | None = None,
                  inprocess_s: float = 2.0, command: str = "") -> Path:
    """Measure every bundle and write the report; returns the report folder."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = out_root / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    if load.cpus:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.sched_setaffinity(0, _cpu_list(load.cpus))
    driver = LoadDriver(load)
    rates = dict(load.rates) if load.rates else None
    results = []
    t0 = time.perf_counter()
    for label, path in bundles.items():
        r = bench_model(label, Path(path), server, load, driver, rates, run_dir, inprocess_s)
        if rates is None or any(c not in rates for c in load.candidates):
            rates = {**(rates or {}), **{int(c): v for c, v in r.get("derived_rates", {}).items()}}
        results.append(r)
    report = {
        "created_utc": stamp,
        "command": command,
        "machine": machine_info(),
        "server": server.__dict__,
        "load": {**{k: v for k, v in load.__dict__.items() if k != "rates"},
                 "rates": {str(c): v for c, v in (rates or {}).items()}},
        "wall_seconds": time.perf_counter() - t0,
        "models": results,
        "not_done": skipped or {},
    }
    report["targets"] = targets(report)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    from loadtest.report_serve import write_markdown, write_plots

    write_plots(report, run_dir)
    write_markdown(report, run_dir)
    logger.info("report written to %s", run_dir)
    return run_dir


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def machine_info() -> dict[str, Any]:
    import psutil

    versions = {}
    for mod in ("onnxruntime", "numpy", "uvicorn", "fastapi"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {"note": MACHINE_NOTE, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "load_average": list(os.getloadavg()), "versions": versions}


# ----------------------------------------------------------------------------- targets


def _find(models: list[dict[str, Any]], kind: str, compression: float | None) -> dict | None:
    """The first float32 model of ``kind`` (at ``compression``): the targets compare LMA and
    full tables as trained; float16 variants are reported beside them."""
    for m in models:
        if m.get("table_dtype", "float32") != "float32":
            continue
        if m.get("kind") == kind and (compression is None or
                                      float(m.get("compression") or 1) == compression):
            return m
    return None


def _rate_point(m: dict[str, Any], c: int, rate: float) -> dict[str, Any] | None:
    for r in m["runs"].get(str(c), {}).get("open_loop", []):
        if abs(r["offered_rps"] - rate) < 1e-6:
            return r
    return None


def serving_state_bytes(m: dict[str, Any]) -> int:
    comp = m.get("components") or {}
    return int(comp.get("embedding", 0)) + int(comp.get("key_lookup", 0))


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (LMA 16x against full tables, same run), each with the measured value
    and whether it is met."""
    models = report["models"]
    full, lma = _find(models, "full", None), _find(models, "lma", 16.0)
    out: list[dict[str, Any]] = []
    if full and lma:
        def add(name: str, value: float, goal: str, met: bool) -> None:
            out.append({"target": name, "value": value, "goal": goal, "met": bool(met)})

        r = serving_state_bytes(lma) / max(serving_state_bytes(full), 1)
        add("serving state (embedding + key lookup) LMA16 / full", r, "<= 1/16 (0.0625)",
            r <= 1 / 16)
        r = lma["rss_loaded"] / max(full["rss_loaded"], 1)
        add("server resident memory LMA16 / full", r, "<= 1/5 (0.2)", r <= 0.2)
        for c, rates in report["load"]["rates"].items():
            moderate = moderate_rate(full, c, rates)
            a, b = _rate_point(lma, int(c), moderate), _rate_point(full, int(c), moderate)
            if a and b and a["latency_ms"] and b["latency_ms"]:
                r = a["latency_ms"]["p99"] / b["latency_ms"]["p99"]
                add(f"p99 at {moderate:g} req/s, {c} candidate(s), LMA16 / full", r, "<= 0.8",
                    r <= 0.8)
            ta = lma["runs"][c]["closed_loop"]["rps"]
            tb = full["runs"][c]["closed_loop"]["rps"]
            r = ta / max(tb, 1e-9)
            add(f"throughput at saturation, {c} candidate(s), LMA16 / full", r, ">= 1.2", r >= 1.2)
    for m in models:
        for c, run in m["runs"].items():
            ip = m.get("inprocess", {}).get(c)
            if not ip:
                continue
            r = run["closed_loop"]["rows_per_s"] / ip["rows_per_s"]
            out.append({"target": f"{m['label']}: service rows/s / in-process model rows/s, batch {c}",
                        "value": r, "goal": ">= 0.5 (within 2x)", "met": r >= 0.5})
    return out


def moderate_rate(ref: dict[str, Any], c: str, rates: Sequence[float]) -> float:
    """The offered rate the p99 targets are read at: the highest rate up to MODERATE_FRACTION of
    the reference's closed-loop throughput that the reference answered in full (no errors, at
    least 97% of the offered rate); the lowest rate when none qualifies."""
    cap = float(ref["runs"][c]["closed_loop"]["rps"])
    good = []
    for r in sorted(rates):
        pt = _rate_point(ref, int(c), r)
        if (r <= MODERATE_FRACTION * cap * 1.001 and pt and not pt["errors"]
                and pt["achieved_rps"] >= 0.97 * r):
            good.append(r)
    return good[-1] if good else min(rates)


# ----------------------------------------------------------------------------- CLI


def _parse_rates(text: str, candidates: Sequence[int]) -> dict[int, list[float]] | None:
    """``auto``, ``R1,R2,...`` (every request shape) or ``1:R,R/100:R,R`` (per shape)."""
    if text == "auto":
        return None
    out: dict[int, list[float]] = {}
    if ":" in text:
        for part in text.split("/"):
            c, rs = part.split(":", 1)
            out[int(c)] = [float(x) for x in rs.split(",") if x]
    else:
        rs = [float(x) for x in text.split(",") if x]
        out = {c: list(rs) for c in candidates}
    if any(r <= 0 for v in out.values() for r in v):
        raise ValueError("--rates must be positive")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--bundle", action="append", default=[], metavar="LABEL=PATH",
                   help="a bundle to serve (repeatable); without any, models are built from --data")
    g.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"models to build: KIND[COMPRESSION][-fp16] (default {DEFAULT_MODELS})")
    g.add_argument("--data", default=None,
                   help="training data of the built models, and the request rows (lma --data spec)")
    g.add_argument("--request-data", default=None, help="request rows (default: --data)")
    g.add_argument("--build-dir", default=None,
                   help="where built checkpoints and bundles go (default <out>/build); existing "
                        "bundles there are reused")
    g.add_argument("--train-args", default="--epochs 5 --threads 1 --seed 0",
                   help="extra `lma train` options for every built model")
    g.add_argument("--untrained", default=None, metavar="PRESET",
                   help="instead of training: UNTRAINED models at a synthetic preset's full "
                        "vocabulary (kaggle: 33.7M values), for footprint and latency; requests "
                        "from synth:5000:1:PRESET unless --request-data")
    g.add_argument("--untrained-zipf", type=float, default=None,
                   help="skew of the untrained vocabulary's value frequencies, one exponent "
                        "for every field (default: the preset's; kaggle's calibrated skew gives "
                        "33.8M values at 45.8M rows)")
    g = p.add_argument_group("server (identical for every model)")
    g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--threads", type=int, default=1, help="intra-op threads of the model")
    g.add_argument("--max-batch-rows", type=int, default=1024)
    g.add_argument("--max-wait-ms", type=float, default=2.0)
    g.add_argument("--timeout-ms", type=float, default=1000.0, help="server request deadline")
    g.add_argument("--server-cpus", default="1", help="taskset CPU list of the server ('' none)")
    g = p.add_argument_group("load")
    g.add_argument("--candidates", default="1,100", help="candidates per request, comma-separated")
    g.add_argument("--route", default="v1", choices=["v1", "v2-json", "v2-binary"])
    g.add_argument("--rates", default="auto",
                   help="offered req/s: auto (fractions of the first model's saturation "
                        "throughput), R1,R2,... or 1:R,R/100:R,R")
    g.add_argument("--rate-fractions", default=",".join(map(str, DEFAULT_FRACTIONS)))
    g.add_argument("--duration", type=float, default=10.0, help="seconds per offered rate")
    g.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    g.add_argument("--probe-seconds", type=float, default=5.0, help="closed-loop probe length")
    g.add_argument("--probe-concurrency", type=int, default=16)
    g.add_argument("--unseen-rate", type=float, default=0.05)
    g.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    g.add_argument("--max-in-flight", type=int, default=2000, help="outstanding requests at most")
    g.add_argument("--client-cpus", default="0", help="CPUs of the load generator ('' none)")
    g.add_argument("--inprocess-seconds", type=float, default=2.0)
    g.add_argument("--quick", action="store_true",
                   help="smoke run: 1 s per rate, 0.5 s probes, 3 auto rates, 0.2 s in-process")
    p.add_argument("--out", default="reports", help="reports go to OUT/<timestamp>/")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import shlex

    cands = tuple(int(x) for x in args.candidates.split(",") if x)
    out = Path(args.out)
    skipped: dict[str, str] = {}
    if args.bundle:
        bundles = {}
        for item in args.bundle:
            label, _, path = item.partition("=")
            if not path:
                raise ValueError(f"--bundle {item!r}: expected LABEL=PATH")
            bundles[label] = Path(path)
    elif args.untrained:
        specs = [ModelSpec.parse(s) for s in args.models.split(",") if s.strip()]
        build = Path(args.build_dir) if args.build_dir else out / "build"
        bundles, skipped = build_untrained_bundles(specs, args.untrained, build,
                                                   zipf=args.untrained_zipf)
        args.request_data = args.request_data or (
            f"synth:5000:1:{args.untrained}"
            + (f":zipf={args.untrained_zipf}" if args.untrained_zipf else ""))
    else:
        if not args.data:
            raise ValueError("give --bundle LABEL=PATH (repeatable), --data to build models, or "
                             "--untrained PRESET")
        specs = [ModelSpec.parse(s) for s in args.models.split(",") if s.strip()]
        build = Path(args.build_dir) if args.build_dir else out / "build"
        bundles, skipped = build_bundles(specs, args.data, build, shlex.split(args.train_args))
    data = args.request_data or args.data
    if not data:
        raise ValueError("--request-data (or --data) is needed for the request rows")
    fractions = tuple(float(x) for x in args.rate_fractions.split(",") if x)
    load = LoadSettings(
        data=data, candidates=cands, route=args.route, rates=_parse_rates(args.rates, cands),
        fractions=fractions, duration_s=args.duration, warmup_s=args.warmup,
        probe_s=args.probe_seconds, probe_concurrency=args.probe_concurrency,
        unseen_rate=args.unseen_rate, timeout_s=args.timeout, max_in_flight=args.max_in_flight,
        cpus=args.client_cpus or None)
    inprocess_s = args.inprocess_seconds
    if args.quick:
        load.duration_s, load.warmup_s, load.probe_s = 1.0, 0.2, 0.5
        load.fractions = (0.25, 0.5, 1.0)
        inprocess_s = 0.2
    server = ServerSettings(backend=args.backend, device=args.device, workers=args.workers,
                            threads=args.threads, max_batch_rows=args.max_batch_rows,
                            max_wait_ms=args.max_wait_ms, timeout_ms=args.timeout_ms,
                            cpus=args.server_cpus or None)
    run_dir = run_benchmark(bundles, server, load, out, skipped=skipped, inprocess_s=inprocess_s,
                            command=getattr(args, "command_line", None)
                            or "lma " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    sys.stdout.write(f"report: {run_dir / 'report.md'}\n")
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``lma bench`` (the ``lma.bench`` entry-point group)."""
    p = bench_subparsers.add_parser(
        "serve", help="LMA against full-embedding baselines through the HTTP service: latency, "
                      "throughput, memory, bytes, AUC")
    add_arguments(p)
    p.set_defaults(func=cmd_bench_serve)
    from loadtest import soak

    soak.register(bench_subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_inprocess"]:
        return _inprocess_main(argv[1:])
    from lma.cli import run_command

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_serve")
    add_arguments(parser)
    parser.set_defaults(func=cmd_bench_serve, command="bench serve")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser.parse_args(argv)
    args.command_line = "python -m loadtest.bench_serve " + " ".join(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
