"""Hot reload, measured against real uvicorn processes and a real redis-server.

    python scripts/reload_bench.py BUNDLE [--out report.json]

Serves ``BUNDLE`` as version 1 of a model repository from two server processes (A with the
admin token, B not; both subscribed to one reload channel), with client threads sending
16-row requests to every server all the time, and measures:

1. admin route (parts 1-2 are a timing benchmark: run them under the shared lock): version 2 published (one rename), then ``POST /v1/models/NAME/reload`` on A;
   the time from that call to the first answer from A carrying version 2 (and the route's own
   load, warm-up and drain seconds);
2. pub/sub: version 3 published, then one ``PUBLISH`` on the channel; per server, the time from
   the publish to its first answer carrying version 3;
3. memory (B stopped first): RSS and USS of A serving one version; with two versions loaded (a request is held in
   flight on the old one, its body not yet sent, so the reload cannot unload it); and after that
   request has answered and the old version is unloaded.

Versions 2-4 are copies of the same bundle (the folder name is the version), so every version
loads the same bytes. Failed requests are counted and reported (the run asserts there are none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service_fixtures import RedisServer, Server  # noqa: E402

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def mem(server: Server) -> dict[str, float]:
    p = psutil.Process(server.proc.pid)
    info = p.memory_full_info()
    return {"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1)}


def publish(bundle: Path, model_dir: Path, version: str) -> None:
    tmp = model_dir / f".incoming-{version}"
    shutil.copytree(bundle, tmp)
    os.rename(tmp, model_dir / version)


class Clients:
    def __init__(self, servers: list[Server], name: str, rows: list[dict], per_server: int = 2):
        self.servers, self.name, self.rows = servers, name, rows
        self.answers: list[list[tuple[float, str | None]]] = [[] for _ in servers]
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(len(servers)) for _ in range(per_server)]

    def _run(self, i: int) -> None:
        url = f"{self.servers[i].url}/v1/models/{self.name}:predict"
        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    r = s.post(url, json={"instances": self.rows}, timeout=60)
                    ok = r.status_code == 200
                    self.answers[i].append((time.monotonic(), r.json()["version"] if ok else None))
                    self.failed += 0 if ok else 1
                except requests.RequestException:
                    self.failed += 1

    def first(self, i: int, version: str, after: float) -> float | None:
        ts = [t for t, v in list(self.answers[i]) if v == version and t >= after]
        return min(ts) if ts else None

    def wait_first(self, i: int, version: str, after: float, timeout: float = 300) -> float:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            t = self.first(i, version, after)
            if t is not None:
                return t
            time.sleep(0.005)
        raise RuntimeError(f"server {i} never answered from version {version}")

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def held_request(server: Server, name: str) -> tuple[socket.socket, bytes]:
    """A predict request whose body is not finished: it holds the version it resolved. Returns
    the socket and the rest of the body."""
    body = json.dumps({"instances": [{"I1": 1}]}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(f"POST /v1/models/{name}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
              f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
    return s, body[5:]


def serving(server: Server, name: str) -> str:
    return requests.get(f"{server.url}/v1/models/{name}", timeout=10).json()["version"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--name", default="m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-only", action="store_true",
                    help="only part 3, on server A alone (not a timing benchmark)")
    args = ap.parse_args()
    bundle = Path(args.bundle).resolve()
    name = args.name
    rows = [{"I1": i, "I2": i % 7, "C1": f"v{i}", "C2": "x"} for i in range(16)]
    report: dict[str, object] = {"bundle": str(bundle), "bundle_bytes": sum(
        f.stat().st_size for f in bundle.iterdir() if f.is_file()), "cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    model_dir = work / "repo" / name
    model_dir.mkdir(parents=True)
    shutil.copytree(bundle, model_dir / "1")
    rs = RedisServer().start()
    channel = "lma:reload:v1"
    servers: list[Server] = []
    try:
        servers = [Server(str(work / "repo"), work / f"{x}.log", admin_token=TOKEN if x == "a"
                          else None, redis_url=rs.url, reload_channel=channel)
                   for x in ("a" if args.memory_only else "ab")]
        for s in servers:
            s.wait_ready(600)
        if not args.memory_only:
            timing(report, servers, rs, channel, bundle, model_dir, name, rows)
        memory(report, servers, bundle, model_dir, name)
    finally:
        for s in servers:
            s.stop()
        rs.kill()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    assert report.get("failed_requests", 0) == 0
    return 0


def timing(report: dict, servers: list[Server], rs: RedisServer, channel: str, bundle: Path,
           model_dir: Path, name: str, rows: list[dict]) -> None:
    """Parts 1 and 2 (a timing benchmark: run it under the shared lock)."""
    a = servers[0]
    client = redis.Redis.from_url(rs.url)
    while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < 2:
        time.sleep(0.05)
    with Clients(servers, name, rows) as load:
        time.sleep(2.0)
        # 1. admin route on A
        publish(bundle, model_dir, "2")
        t0 = time.monotonic()
        r = requests.post(f"{a.url}/v1/models/{name}/reload", headers=AUTH, timeout=600)
        t_route = time.monotonic() - t0
        assert r.status_code == 200, r.text
        first = load.wait_first(0, "2", t0)
        report["admin"] = {"publish_to_first_answer_s": round(first - t0, 3),
                           "route_seconds": round(t_route, 3), **r.json()["loaded"],
                           "drain_seconds": r.json()["drain_seconds"]}
        time.sleep(2.0)
        # 2. pub/sub to A and B
        publish(bundle, model_dir, "3")
        t0 = time.monotonic()
        n = client.publish(channel, json.dumps({"v": 1, "model": name}))
        firsts = [load.wait_first(i, "3", t0) for i in range(2)]
        report["pubsub"] = {"receivers": n, "publish_to_first_answer_s":
                            [round(f - t0, 3) for f in firsts]}
        deadline = time.monotonic() + 600
        while any(serving(s, name) != "3" for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
    report["failed_requests"] = load.failed
    report["answers"] = [len(x) for x in load.answers]
    # B stopped before the memory part, so no page of a weights file is shared with another
    # process and USS counts it too.
    servers[1].stop()


def memory(report: dict, servers: list[Server], bundle: Path, model_dir: Path, name: str
           ) -> None:
    """Part 3 on A, without client load, so the numbers are the models' own."""
    a = servers[0]
    new = str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1)
    time.sleep(2.0)
    report["memory_one_version"] = mem(a)
    publish(bundle, model_dir, new)
    held, rest = held_request(a, name)
    res: dict[str, object] = {}
    th = threading.Thread(target=lambda: res.update(r=requests.post(
        f"{a.url}/v1/models/{name}/reload", headers=AUTH, timeout=600)))
    th.start()
    while serving(a, name) != new:
        time.sleep(0.05)
    time.sleep(1.0)
    report["memory_two_versions"] = mem(a)
    held.sendall(rest)
    held.settimeout(30)
    data = b""
    while b'"version"' not in data:
        chunk = held.recv(65536)
        if not chunk:
            break
        data += chunk
    held.close()
    th.join(600)
    report["held_request_answer"] = data.decode(errors="replace").split("\r\n\r\n", 1)[-1][:200]
    report["reload_answer"] = res["r"].json()  # type: ignore[union-attr]
    time.sleep(2.0)
    report["memory_after_unload"] = mem(a)


if __name__ == "__main__":
    sys.exit(main())
