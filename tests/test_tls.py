"""The TLS profile end to end: Redis started by the deployment's own entrypoint and redis.conf
in TLS-only mode, with the certificates and passwords that deploy/make-secrets.sh makes; the
pipeline started through its own entrypoint with `rediss://`, each command as its own user,
checking the server against the deployment's CA. Only the image's `docker-entrypoint.sh`
(which drops to the redis user) is replaced by a script that runs the command as it is.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.localredis import free_port
from pipeline.redisconn import make_client
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def wait(condition: Callable[[], object], timeout: float = 25.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


class TlsRedis:
    """deploy/redis/entrypoint.sh with REDIS_TLS=yes, on a free port in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.secrets = folder / "secrets"
        self.port = free_port()
        done = subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(self.secrets)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        (bin_dir / "docker-entrypoint.sh").write_text('#!/bin/sh\nexec "$@"\n')
        (bin_dir / "docker-entrypoint.sh").chmod(0o755)
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SECRETS_DIR": str(self.secrets),
               "REDIS_RUN_DIR": str(folder / "run"), "REDIS_DATA_DIR": str(folder / "data"),
               "REDIS_TLS": "yes"}
        (folder / "data").mkdir()
        # the address the container's network would give
        self.proc = subprocess.Popen(
            ["sh", str(DEPLOY / "redis" / "entrypoint.sh"), "--tls-port", str(self.port),
             "--bind", "127.0.0.1", "--logfile", str(folder / "redis.log")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.log = folder / "redis.log"

    def password(self, role: str) -> str:
        return (self.secrets / f"redis_password_{role}").read_text()

    def url(self, user: str) -> str:
        return (f"rediss://{user}:{self.password(user.replace('-', '_'))}@localhost:{self.port}"
                f"/0?ssl_ca_certs={self.secrets / 'redis_tls_ca'}")

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-800:]
        client = make_client(self.url("status"))
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    try:
        wait(server.ready, timeout=15)
        yield server
    finally:
        server.stop()


def test_redis_speaks_tls_only_and_its_conf_turns_off_what_no_role_needs(
    tls_redis: TlsRedis,
) -> None:
    admin = make_client(tls_redis.url("admin"))
    try:
        assert admin.config_get("port") == {"port": "0"}  # no plaintext port
        assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
        with pytest.raises(redis.ResponseError, match="DEBUG command not allowed"):
            admin.execute_command("DEBUG", "SLEEP", "0")
        with pytest.raises(redis.ResponseError, match="MODULE command not allowed"):
            admin.execute_command("MODULE", "LOAD", "/nonexistent/module.so")
    finally:
        admin.close()
    with socket.create_connection(("127.0.0.1", tls_redis.port), timeout=5) as plain:
        plain.sendall(b"PING\r\n")  # a plaintext client on the TLS port gets no answer
        plain.settimeout(2)
        try:
            reply = plain.recv(64)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert b"PONG" not in reply
    stranger = make_client(tls_redis.url("admin").split("?")[0])  # the system's CAs only
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        stranger.ping()
    stranger.close()


def test_the_pipeline_runs_end_to_end_over_rediss_each_command_as_its_own_user(
    tls_redis: TlsRedis, tmp_path: Path,
) -> None:
    from projections.client import MarketReader, OrdersConsumer

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_"))}
    procs: list[subprocess.Popen[str]] = []

    def as_role(user: str, env: dict[str, str]) -> dict[str, str]:
        # what compose.yaml + deploy/compose.tls.yaml give each service
        secret = tls_redis.secrets / f"redis_password_{user.replace('-', '_')}"
        return {**env, "REDIS_USER": user, "REDIS_SCHEME": "rediss",
                "REDIS_ADDRESS": f"localhost:{tls_redis.port}",
                "REDIS_PASSWORD_FILE": str(secret),
                "REDIS_CA_FILE": str(tls_redis.secrets / "redis_tls_ca")}

    def start(name: str, argv: list[str], env: dict[str, str], **kw: Any
              ) -> subprocess.Popen[str]:
        with open(tmp_path / f"{name}.log", "w") as err:
            proc = subprocess.Popen(["sh", str(DEPLOY / "pipeline-entrypoint.sh"),
                                     sys.executable, "-m", "pipeline", *argv],
                                    cwd=ROOT, env=env, stderr=err, text=True, **kw)
        procs.append(proc)
        return proc

    admin = make_client(tls_redis.url("admin"))
    try:
        sim = start("sim", ["simulate", "--script-account", "--symbols", "BTCUSDT"], base,
                    stdout=subprocess.PIPE)
        assert sim.stdout is not None
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", sim.stdout.readline())
        env = {**base, "BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest,
               "PIPELINE_SYMBOLS": "BTCUSDT",
               "PIPELINE_MARKET_STREAMS": "markPrice@1s,depth@100ms"}
        start("ingest-market", ["ingest", "market"], as_role("ingest-market", env))
        start("ingest-user", ["ingest", "user"], {
            **as_role("ingest-user", env), "BINANCE_API_KEY": "sim-api-key",
            "BINANCE_API_SECRET": "sim-api-secret"})
        # the deployment step: the admin loads the function library the projector calls
        loaded = subprocess.run(
            ["sh", str(DEPLOY / "pipeline-entrypoint.sh"), sys.executable, "-m", "pipeline",
             "functions", "load"], cwd=ROOT, env=as_role("admin", env), capture_output=True,
            text=True, timeout=60)
        assert loaded.returncode == 0, loaded.stderr
        start("project", ["project", "--block-ms", "200"], as_role("projector", env))

        wait(lambda: admin.exists("websocket:mark_price:btcusdt",
                                  "websocket:orderbook:btcusdt:20") == 2
             and admin.xlen("websocket:orders") > 0)
        status = subprocess.run(
            ["sh", str(DEPLOY / "pipeline-entrypoint.sh"), sys.executable, "-m", "pipeline",
             "status", "--json"], cwd=ROOT, env=as_role("status", env), capture_output=True,
            text=True, timeout=60)
        assert status.returncode in (0, 1), status.stderr
        report = json.loads(status.stdout)
        assert {c["path"] for c in report["connections"]} == {"market", "public", "private"}

        listener = make_client(tls_redis.url("listener"))
        events: list[object] = []
        consumer = OrdersConsumer(listener, group="listener", handler=events.append,
                                  start_id="0", block_ms=100)
        assert consumer.poll_once() > 0 and events
        listener.close()
        reader = make_client(tls_redis.url("reader"))
        assert MarketReader(reader, fallback=False).mark_price("BTCUSDT", max_age=60)
        reader.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        admin.close()
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log") if f.name != "redis.log"}
    for text in logs.values():
        assert "NOPERM" not in text and "SSL" not in text, logs
        for role in ("ingest_market", "ingest_user", "projector", "status"):
            assert tls_redis.password(role) not in text
