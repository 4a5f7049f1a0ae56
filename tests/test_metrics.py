"""Every long-running command serves /metrics (Prometheus text) and /healthz on
--metrics-port: checked on the real ingestor and projector, running against the simulator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.localredis import LocalRedis, free_port
from tests.conftest import ROOT

INGEST_SERIES = ("pipeline_frames_received", "pipeline_frames_logged", "pipeline_batch_size",
                 "pipeline_redis_write_seconds", "pipeline_reconnects", "pipeline_gaps",
                 "pipeline_buffer_fill", "pipeline_connections")
PROJECTOR_SERIES = ("pipeline_consumer_lag", "pipeline_view_age_seconds",
                    "pipeline_dead_letters", "pipeline_events_projected")


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}


def start(argv: list[str], env: dict[str, str], log: Path, **kw: object) -> subprocess.Popen[str]:
    with open(log, "w") as err:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=env, stderr=err, text=True,
            **kw)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """The simulator, and `ingest market`, `project`, `ingest user` each with a metrics port,
    on a private redis-server, shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    redis_server = LocalRedis(tmp_path / "redis").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        sim = start(["simulate", "--ws-port", "0", "--rest-port", "0", "--symbols", "BTCUSDT"],
                    base_env(), tmp_path / "sim.log", stdout=subprocess.PIPE)
        procs.append(sim)
        assert sim.stdout is not None
        ready = sim.stdout.readline()
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", ready)
        env = {**base_env(), "REDIS_URL": redis_server.url, "BINANCE_WS_URL": ws,
               "BINANCE_REST_URL": rest, "PIPELINE_SYMBOLS": "BTCUSDT"}
        ports = {"ingest": free_port(), "project": free_port(), "user": free_port()}
        procs.append(start(["ingest", "market", "--metrics-port", str(ports["ingest"])], env,
                           tmp_path / "ingest.log"))
        procs.append(start(["project", "--metrics-port", str(ports["project"])], env,
                           tmp_path / "project.log"))
        procs.append(start(["ingest", "user", "--metrics-port", str(ports["user"])],
                           {**env, "BINANCE_API_KEY": "sim-api-key",
                            "BINANCE_API_SECRET": "sim-api-secret"}, tmp_path / "user.log"))
        yield ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        redis_server.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(port: int, path: str, pattern: str, timeout: float = 20.0) -> str:
    """The body of `path` once it matches `pattern` (the command starts, then data flows)."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            status, body = get(port, path)
        except OSError:  # not listening yet
            status = 0
        if status == 200 and re.search(pattern, body, re.M):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{path} on {port} never matched {pattern!r}: {body[-2000:]}")


def test_ingestor_serves_its_series_and_health(running: dict[str, int]) -> None:
    body = wait_for(running["ingest"], "/metrics",
                    r'^pipeline_frames_logged_total\{key="raw:market:markPrice"\} [1-9]')
    for name in INGEST_SERIES:
        assert re.search(rf"^# TYPE {name}(_total)? ", body, re.M), name
    assert re.search(r"^pipeline_batch_size_count [1-9]", body, re.M)
    assert re.search(r"^pipeline_redis_write_seconds_bucket\{le=", body, re.M)
    assert get(running["ingest"], "/healthz")[0] == 200


def test_projector_serves_lag_view_age_and_dead_letters(running: dict[str, int]) -> None:
    body = wait_for(running["project"], "/metrics",
                    r'^pipeline_events_projected_total\{projection="mark_price"\} [1-9]')
    for name in PROJECTOR_SERIES:
        assert re.search(rf"^# TYPE {name}(_total)? ", body, re.M), name
    wait_for(running["project"], "/metrics",
             r'^pipeline_consumer_lag\{group="mark_price",key="raw:market:markPrice"\} ')
    assert wait_for(running["project"], "/healthz", r"ok")


def test_user_ingestor_serves_its_connection_and_health(running: dict[str, int]) -> None:
    body = wait_for(running["user"], "/metrics", r'^pipeline_connections\{path="private"\} 1')
    assert re.search(r"^# TYPE pipeline_frames_logged_total ", body, re.M)
    assert "sim-api-key" not in body and "sim-api-secret" not in body
    assert wait_for(running["user"], "/healthz", r"ok")


# --- pipeline_healthy: /healthz as a series, for the alerting rules ------------------------

def test_every_process_serves_its_health_check_as_a_series(running: dict[str, int]) -> None:
    for role, port in running.items():
        body = wait_for(port, "/metrics", r"^pipeline_healthy 1\.0$")
        assert re.search(r"^# TYPE pipeline_healthy gauge$", body, re.M), role
        assert get(port, "/healthz")[0] == 200, role


def test_the_health_series_says_0_whenever_healthz_answers_503() -> None:
    from pipeline import metrics

    verdict = {"ok": False}

    def health() -> bool:
        if verdict.get("raise"):
            raise RuntimeError("the health check itself failed")
        return verdict["ok"]

    server = metrics.serve(0, health, host="127.0.0.1")
    port = server.server_port
    try:
        assert get(port, "/healthz")[0] == 503
        assert re.search(r"^pipeline_healthy 0\.0$", get(port, "/metrics")[1], re.M)
        verdict["ok"] = True
        assert get(port, "/healthz")[0] == 200
        assert re.search(r"^pipeline_healthy 1\.0$", get(port, "/metrics")[1], re.M)
        verdict["raise"] = True
        assert re.search(r"^pipeline_healthy 0\.0$", get(port, "/metrics")[1], re.M)
    finally:
        server.shutdown()
        server.server_close()
