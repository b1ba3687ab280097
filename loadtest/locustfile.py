"""Locust load test of the CTR service: ranking requests on the v1 route and the v2 route (JSON
and binary tensors), one task per route, each tagged with its route name.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                 # web UI :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 20 \\
        --run-time 30s --csv reports/locust --tags v2-binary --lma-candidates 100

Options (each also from its environment variable): ``--lma-model`` (LMA_LOADTEST_MODEL, the
served model's name), ``--lma-data`` (LMA_LOADTEST_DATA: ``synth:ROWS[:SEED]``, ``criteo:PATH``,
...), ``--lma-candidates`` (LMA_LOADTEST_CANDIDATES), ``--lma-unseen-rate``
(LMA_LOADTEST_UNSEEN_RATE), ``--lma-top-k`` (LMA_LOADTEST_TOP_K, 0 for none), ``--lma-pool``
(LMA_LOADTEST_POOL, distinct ready requests per route). ``--tags v1`` (or ``v2-json``,
``v2-binary``) keeps one route. Each answer is checked: 200 and one score per candidate.
Requests are built when locust starts; in a distributed run give the workers the same ``--lma-*``
options or variables as the master (docker-compose.yml sets the same environment on both).

Locust waits for each answer before the user's next request (a closed loop), so under overload
it understates tail latency; ``python -m loadtest.openloop`` sends at a fixed rate instead.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import threading
from pathlib import Path

from locust import FastHttpUser, constant, events, tag, task
from locust.runners import MasterRunner

try:
    _installed = importlib.util.find_spec("loadtest.payloads") is not None
except ModuleNotFoundError:
    _installed = False
if not _installed:
    # Run from a checkout that was not pip-installed: locust puts only this file's folder on
    # sys.path, so add the repository root for the `loadtest` package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.payloads import (  # noqa: E402
    DEFAULT_DATA,
    ROUTES,
    Payload,
    RequestSpec,
    build_payloads,
    count_predictions,
    load_request_set,
)

_lock = threading.Lock()
_pools: dict[str, list[Payload]] = {}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("lma-ctr")
    group.add_argument(
        "--lma-model",
        env_var="LMA_LOADTEST_MODEL",
        default="demo",
        help="model name in the request paths",
    )
    group.add_argument(
        "--lma-data",
        env_var="LMA_LOADTEST_DATA",
        default=DEFAULT_DATA,
        help="where the request rows come from (an lma --data spec)",
    )
    group.add_argument(
        "--lma-candidates",
        env_var="LMA_LOADTEST_CANDIDATES",
        type=int,
        default=100,
        help="candidates per ranking request",
    )
    group.add_argument(
        "--lma-unseen-rate",
        env_var="LMA_LOADTEST_UNSEEN_RATE",
        type=float,
        default=0.05,
        help="share of categorical values never seen in training",
    )
    group.add_argument(
        "--lma-top-k",
        env_var="LMA_LOADTEST_TOP_K",
        type=int,
        default=10,
        help="top_k of v1 ranking requests (0: none)",
    )
    group.add_argument(
        "--lma-pool",
        env_var="LMA_LOADTEST_POOL",
        type=int,
        default=64,
        help="distinct ready requests per route",
    )
    group.add_argument("--lma-seed", env_var="LMA_LOADTEST_SEED", type=int, default=0,
                       help="seed of the unseen-value draws")  # fmt: skip


@events.init.add_listener
def _build_pools(environment, **_kw) -> None:
    # Built before the run starts, so the run's clock measures requests, not request building
    # (the master sends nothing and builds none).
    if environment.parsed_options is not None and not isinstance(environment.runner, MasterRunner):
        _pool(environment.parsed_options, ROUTES[0])


def _pool(options, route: str) -> list[Payload]:
    with _lock:
        if not _pools:
            spec = RequestSpec(
                data=options.lma_data,
                candidates=options.lma_candidates,
                unseen_rate=options.lma_unseen_rate,
                top_k=options.lma_top_k or None,
                pool=options.lma_pool,
                seed=options.lma_seed,
            )
            rs = load_request_set(spec)
            for r in ROUTES:
                _pools[r] = build_payloads(rs, r, options.lma_model)
        return _pools[route]


class RankingUser(FastHttpUser):
    """Sends ranking requests back to back (no think time: each user is one closed loop)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self._next = {r: itertools.cycle(_pool(self.environment.parsed_options, r)) for r in ROUTES}

    def _send(self, route: str) -> None:
        p = next(self._next[route])
        with self.client.post(
            p.path, data=p.body, headers=p.headers, name=route, catch_response=True
        ) as resp:
            got = count_predictions(route, resp.status_code, resp.headers, resp.content or b"")
            if got != p.rows:
                detail = (resp.text or "")[:200] if resp.status_code != 200 else f"{got} scores"
                resp.failure(f"{route}: status {resp.status_code}, {detail}")

    @tag("v1")
    @task
    def v1(self) -> None:
        self._send("v1")

    @tag("v2-json")
    @task
    def v2_json(self) -> None:
        self._send("v2-json")

    @tag("v2-binary")
    @task
    def v2_binary(self) -> None:
        self._send("v2-binary")
