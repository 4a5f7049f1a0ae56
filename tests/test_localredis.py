"""The tests' own redis-server processes start even when their port is taken meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.localredis import LocalRedis


def test_a_port_taken_between_choosing_and_binding_is_chosen_again(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LocalRedis(tmp_path)
        server.port = taken.getsockname()[1]  # as if another process won the race for it
        with server:
            assert server.port != taken.getsockname()[1]
            assert server.client().ping()


def test_a_port_the_caller_gave_is_not_changed(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            LocalRedis(tmp_path, port=port).start()
