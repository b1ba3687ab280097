"""Prometheus metrics of one server process (each ``--workers`` process counts its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.batcher import BatchStats

_LATENCY = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "lma_request_seconds", "Request latency in the server, by route, model and status",
            ["route", "model", "status"], buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram(
            "lma_batch_rows", "Rows per model call", ["model"], buckets=_ROWS, registry=r)
        self.batch_requests = Histogram(
            "lma_batch_requests", "Requests (or request parts) coalesced into one model call",
            ["model"], buckets=_ROWS, registry=r)
        self.queue_wait_seconds = Histogram(
            "lma_queue_wait_seconds", "Time a request part waited for its batch", ["model"],
            buckets=_LATENCY, registry=r)
        self.compute_seconds = Histogram(
            "lma_compute_seconds", "Model compute time per batch", ["model"], buckets=_LATENCY,
            registry=r)
        self.queue_rows = Gauge(
            "lma_queue_rows", "Rows waiting for a batch", ["model"], registry=r)
        self.errors = Counter(
            "lma_errors_total", "Refused or failed requests, by type and status",
            ["type", "status"], registry=r)
        self.reloads = Counter(
            "lma_reloads_total", "Model versions loaded and swapped in by the admin routes",
            ["model"], registry=r)
        self.reload_failures = Counter(
            "lma_reload_failures_total", "New versions refused on reload, by stage (open: "
            "checksums, versions, backend; warmup: the warm-up batch)", ["model", "stage"],
            registry=r)
        self.unloads = Counter(
            "lma_unloads_total", "Model versions unloaded after their requests finished",
            ["model"], registry=r)
        self.feature_store_seconds = Histogram(
            "lma_feature_store_seconds", "Feature-store round trip of one request (every entity "
            "of the request in one call), by result (ok or the error kind)", ["result"],
            buckets=_LATENCY, registry=r)
        self.feature_store_hits = Counter(
            "lma_feature_store_hits_total", "Distinct entities found in the feature store",
            registry=r)
        self.feature_store_misses = Counter(
            "lma_feature_store_misses_total", "Distinct entities the feature store holds nothing "
            "for", registry=r)
        self.feature_store_errors = Counter(
            "lma_feature_store_errors_total", "Feature-store calls that failed, by kind "
            "(connection, timeout, redis: an error reply, backoff: refused at once while backing "
            "off, deadline: the request's own deadline ran out first)", ["kind"], registry=r)
        self.feature_store_up = Gauge(
            "lma_feature_store_up", "1 while the last feature-store call (a request's or a "
            "readiness probe's) succeeded; 0 after a failure, before the first call, and without "
            "REDIS_URL", registry=r)
        self.rows_scored = Counter(
            "lma_rows_scored_total", "Rows answered with a prediction", ["model"], registry=r)
        # Prediction cache (service.cache) and reload triggers (service.reload, service.pubsub).
        self.cache_hits = Counter(
            "lma_prediction_cache_hits_total", "Rows answered from the prediction cache",
            ["model"], registry=r)
        self.cache_misses = Counter(
            "lma_prediction_cache_misses_total", "Rows looked up in the prediction cache and "
            "scored by the model", ["model"], registry=r)
        self.cache_hit_ratio = Gauge(
            "lma_prediction_cache_hit_ratio", "Hits / rows looked up in the cache since start",
            ["model"], registry=r)
        self.cache_writes = Counter(
            "lma_prediction_cache_writes_total", "Entries written to the prediction cache",
            ["model"], registry=r)
        self.cache_errors = Counter(
            "lma_prediction_cache_errors_total", "Cache calls failed or skipped (op: get, set; "
            "reason: error, timeout, backoff after a failure, deadline, too_many_pending)",
            ["op", "reason"], registry=r)
        self.reload_triggers = Counter(
            "lma_reload_triggers_total", "Reloads asked for, by trigger (admin, watch, pubsub) "
            "and outcome (loaded, unchanged, refused, error)", ["model", "trigger", "outcome"],
            registry=r)
        self.reload_messages = Counter(
            "lma_reload_messages_total", "Messages on the reload channel, by result (reload, "
            "own: sent by this process, bad)", ["result"], registry=r)
        self.reload_listener_connected = Gauge(
            "lma_reload_listener_connected", "1 while subscribed to the reload channel",
            registry=r)
        self.reload_listener_reconnects = Counter(
            "lma_reload_listener_reconnects_total", "Times the reload channel's connection was "
            "lost and tried again", registry=r)

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_rows.labels(model).observe(stats.rows)
        self.batch_requests.labels(model).observe(stats.requests)
        self.compute_seconds.labels(model).observe(stats.compute_s)
        h = self.queue_wait_seconds.labels(model)
        for w in stats.queue_wait_s:
            h.observe(w)

    def observe_feature_fetch(self, seconds: float, hits: int, misses: int,
                              error: str | None) -> None:
        self.feature_store_seconds.labels(error or "ok").observe(seconds)
        if error is not None:
            self.feature_store_errors.labels(error).inc()
            return
        self.feature_store_hits.inc(hits)
        self.feature_store_misses.inc(misses)

    def queue_depth(self, model: str, rows: int) -> None:
        self.queue_rows.labels(model).set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
