"""Fixtures of the service's end-to-end tests: a Criteo-trained LMA bundle, real Criteo test rows
as JSON, their `lma predict` answers, and real uvicorn processes serving the bundle."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

try:
    import redis
except ImportError:  # the serve extra brings it; tests needing Redis skip without it
    redis = None  # type: ignore[assignment]

REPO_ROOT = Path(__file__).resolve().parents[1]

N_ROWS = 300
MODEL = "criteo_lma"


@dataclass
class CriteoRows:
    records: list[dict]  # JSON rows as a client would send them (missing cells left out)
    dense: np.ndarray  # (N, 13) encoded by the readers
    tokens: np.ndarray  # (N, 26)
    expected: np.ndarray  # (N,) `lma predict` probabilities


@pytest.fixture(scope="session")
def criteo_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LMA model trained on the real Criteo sample (1 epoch, small) and exported."""
    from lma.train import TrainConfig, train_model
    from model_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("service")
    train_model(TrainConfig(data=f"criteo:{shared_data / 'criteo' / 'train_10k.tsv'}",
                            embedding="lma", compression=4, epochs=1, progress=False, threads=1,
                            out=str(root / "ck")))
    # With the torch program, so the torch backend serves model.pt2 (the exported program).
    return export_bundle(root / "ck", root / "repo" / MODEL / "1", name=MODEL, sample_rows=64,
                         torch_program=True)


@pytest.fixture(scope="session")
def criteo_bundle_v2(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model of the same schema (another seed), so its answers differ from
    ``criteo_bundle``'s: the new version of the reload and cache tests."""
    from lma.train import TrainConfig, train_model
    from model_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("v2")
    train_model(TrainConfig(data=f"criteo:{shared_data / 'criteo' / 'train_10k.tsv'}",
                            embedding="lma", compression=4, epochs=1, progress=False, threads=1,
                            seed=7, out=str(root / "ck")))
    return export_bundle(root / "ck", root / "bundle", name=MODEL, version="2", sample_rows=64)


def publish_version(bundle: Path, model_dir: Path, version: str, tamper: bool = False) -> Path:
    """Copy a bundle in as a version folder the way a publisher should: under a hidden name, then
    one rename, so a reload never sees half a folder. ``tamper`` flips one byte of the weights."""
    tmp = model_dir / f".incoming-{version}"
    shutil.copytree(bundle, tmp)
    if tamper:
        w = tmp / "weights.safetensors"
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0xFF
        w.write_bytes(bytes(data))
    dest = model_dir / version
    os.rename(tmp, dest)
    return dest


@pytest.fixture(scope="session")
def criteo_rows(shared_data: Path, criteo_bundle: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> CriteoRows:
    from lma.cli import main
    from lma.data import open_source

    src = shared_data / "criteo" / "test_10k_unlabeled.tsv"
    part = tmp_path_factory.mktemp("rows") / "test_head.tsv"
    with open(src) as f:
        lines = [next(f) for _ in range(N_ROWS)]
    part.write_text("".join(lines))
    out = part.with_suffix(".txt")
    assert main(["-q", "predict", str(criteo_bundle), "--data", f"criteo-test:{part}",
                 "--out", str(out)]) == 0
    expected = np.loadtxt(out)
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    records = []
    for cells in csv.reader(lines, delimiter="\t"):
        rec: dict = {}
        for name, v in zip(names, cells, strict=True):
            if v == "":
                continue
            rec[name] = int(v) if name.startswith("I") else v
        records.append(rec)
    data = open_source(f"criteo-test:{part}").read_all()
    return CriteoRows(records, np.ascontiguousarray(data.dense, np.float32),
                      np.ascontiguousarray(data.tokens, np.int64), expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


class RedisServer:
    def __init__(self, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                if client.ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test module's own (a module may kill and restart it)."""
    if redis is None or REDIS_SERVER is None:
        pytest.skip("redis-server (and the redis client) are needed")
    s = RedisServer().start()
    yield s
    s.kill()


class Server:
    """A real ``uvicorn service.main:app`` process with ``LMA_SERVE_*`` settings."""

    def __init__(self, models: str, log: Path, admin_token: str | None = None,
                 **settings: object):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LMA_SERVE_") and k != "LMA_ADMIN_TOKEN"}
        env["LMA_SERVE_MODELS"] = models
        if admin_token is not None:
            env["LMA_ADMIN_TOKEN"] = admin_token
        env["LMA_SERVE_THREADS"] = "1"
        for k, v in settings.items():
            env[f"LMA_SERVE_{k.upper()}"] = str(v)
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> Server:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        self.stop()  # no server is left behind by a failed start
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, value = line.rsplit(" ", 1)
            sample = head.split("{", 1)[0]
            if sample != name:
                continue
            lab = head[len(sample):].strip("{}")
            have = dict(p.split("=", 1) for p in lab.split(",") if p) if lab else {}
            if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
                total += float(value)
        return total


@pytest.fixture(scope="session")
def model_repo(criteo_bundle: Path) -> Path:
    return criteo_bundle.parents[1]


@pytest.fixture(scope="session")
def ort_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(str(model_repo), tmp_path_factory.mktemp("logs") / "ort.log").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def torch_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(str(model_repo), tmp_path_factory.mktemp("logs") / "torch.log",
               backend="torch").wait_ready(180)
    yield s
    s.stop()
