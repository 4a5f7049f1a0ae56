"""Shared fixtures: a private redis-server per test on a free port (never 6379's data)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.localredis import LocalRedis

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def r(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ...` as a user would, with a clean environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_",
                                                                          "REDIS_URL"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT)
