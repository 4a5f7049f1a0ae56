"""Prometheus series of every long-running command, and the /metrics + /healthz server.

All series are defined here, once, so a reader sees the whole list in one screen and the
commands share the names. `serve(port, health)` runs a small HTTP server in a daemon thread:
`/metrics` in the Prometheus text format, `/healthz` answering 200 while `health()` is true
and 503 otherwise. A port it cannot listen on is a `SettingsError` naming
PIPELINE_METRICS_PORT (exit 2): the commands serve before they connect to anything.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from pipeline.errors import SettingsError

FRAMES_RECEIVED = Counter(
    "pipeline_frames_received", "Websocket frames received", ["path"])
FRAMES_LOGGED = Counter(
    "pipeline_frames_logged", "Frames appended to the raw: streams", ["key"])
FRAMES_DROPPED = Counter(
    "pipeline_frames_dropped", "Entries dropped: the buffer was full, or Redis kept refusing them",
    ["key"])
BAD_FRAMES = Counter(
    "pipeline_bad_frames", "Frames logged to raw:market:other (unknown, malformed, binary)")
BATCH_SIZE = Histogram(
    "pipeline_batch_size", "Entries per Redis write batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
REDIS_WRITE_SECONDS = Histogram(
    "pipeline_redis_write_seconds", "Time of one batch write to Redis",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
RECONNECTS = Counter(
    "pipeline_reconnects", "Websocket reconnects", ["reason"])
GAPS = Counter("pipeline_gaps", "Gaps recorded in the log", ["key"])
# Redis Cluster: WAIT after user-data appends (pipeline.clusterwriter)
REDIS_WAIT_SECONDS = Histogram(
    "pipeline_redis_wait_seconds", "Time of one WAIT for a replica after raw:user appends",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
REDIRECTS = Counter("pipeline_redis_redirects",
                    "Entries Redis Cluster redirected (MOVED, ASK) and the writer sent again",
                    ["kind"])
FAILOVER_LOST = Counter("pipeline_failover_lost",
                        "Entries a cluster master acknowledged that its promoted replica lacked",
                        ["key"])
UNREPLICATED = Counter("pipeline_unreplicated",
                       "Batches of raw:user entries no replica acknowledged within the WAIT")
BUFFER_FILL = Gauge("pipeline_buffer_fill",
                    "Entries the ingest buffer holds (waiting, or sent and not yet accepted)")
BUFFER_BYTES = Gauge("pipeline_buffer_bytes", "Bytes of the entries the ingest buffer holds")
REDIS_OUTAGE = Gauge(
    "pipeline_redis_outage_seconds",
    "How long the log writer's current Redis outage has lasted (unreachable, not answering, "
    "refusing entries), from when its first round trip was sent; 0 while it writes")
CONNECTIONS = Gauge("pipeline_connections", "Open websocket connections", ["path"])
CONSUMER_LAG = Gauge(
    "pipeline_consumer_lag", "Entries not yet delivered to a projection's group", ["group", "key"])
VIEW_AGE = Gauge("pipeline_view_age_seconds", "Age of the newest value a projection wrote",
                 ["projection"])
EVENTS_PROJECTED = Counter(
    "pipeline_events_projected", "Log entries a projection has applied", ["projection"])
DEAD_LETTERS = Counter(
    "pipeline_dead_letters", "Entries moved to a dead-letter stream", ["projection"])
UNKNOWN_EVENTS = Counter(
    "pipeline_unknown_events", "Events of a type this version does not know", ["type"])
REST_WEIGHT = Gauge(
    "pipeline_rest_weight_used_1m", "Last X-MBX-USED-WEIGHT-1M reported by the exchange")
# What this process serves, so every other series of it can be joined to an account or a
# shard (`* on(instance) group_left(account) pipeline_process_info`): a user ingestor serves one
# account, a market ingestor one shard; "" for none.
PROCESS_INFO = Gauge(
    "pipeline_process_info", "1, labelled with the process's role, account label and market "
    "shard", ["role", "account", "shard"])
RECONCILIATIONS = Counter(
    "pipeline_reconciliations", "REST reconciliations of the user stream, by account and "
    "outcome (complete; partial: a call failed and the next run tries again)",
    ["account", "outcome"])
LISTING_CHANGES = Counter(
    "pipeline_listing_changes", "Symbols subscribed (listed) or unsubscribed (delisted) while "
    "running, from exchangeInfo", ["change"])


def describe(role: str, *, account: str | None = None, shard: str | None = None) -> None:
    PROCESS_INFO.labels(role, account or "", shard or "").set(1)


def serve(port: int, health: Callable[[], bool] = lambda: True,
          host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start /metrics and /healthz on `port` (0 picks a free one: read `server.server_port`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                ok = health()
                body, status, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), \
                    "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # taken, or not ours to take: a bad setting, not a traceback
        raise SettingsError("PIPELINE_METRICS_PORT",
                            f"cannot listen on {host}:{port}: {exc.strerror}") from None
    HEALTHY.set_function(lambda: _health_value(health))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


# --- for alerting rules (deploy/prometheus/alerts.yml) -------------------------------------
# /healthz as a series, so a rule can page on it without a blackbox prober. It reads the same
# `health()` callable when scraped, so the two never disagree; a process serves one /metrics,
# and the last `serve` call sets it.
HEALTHY = Gauge("pipeline_healthy", "1 while /healthz answers 200, else 0")


def _health_value(health: Callable[[], bool]) -> float:
    try:
        return 1.0 if health() else 0.0
    except Exception:  # /healthz would answer 500: unhealthy either way
        return 0.0
