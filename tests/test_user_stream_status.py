"""`pipeline status` on the user stream, from `raw:conn:user`: unhealthy while no private
connection works (none open, or a 4001 loop of short ones), an IP ban shown with its end. The
rules on plain values, and the command on a real Redis seeded as the ingestor writes."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

from pipeline.eventlog import ControlEntry, control_entry
from pipeline.health import UserStream, user_stream_problems, user_stream_state
from pipeline.localredis import LocalRedis
from projections.core.keys import KEY_CONN_USER
from tests.conftest import run_cli

NOW = 1_800_000_000.0
_n = iter(range(1, 10_000))


def entry(ctl: str, body: dict[str, Any], at: float, conn: str = "usr-aaaaaa") -> ControlEntry:
    return ControlEntry(f"{next(_n)}-0".encode(), ctl, body, at, conn)


def opened(conn: str, at: float) -> ControlEntry:
    return entry("opened", {"path": "private", "streams": 1, "name": "usr"}, at, conn)


def closed(conn: str, at: float, reason: str = "server_closed: 4001") -> ControlEntry:
    return entry("closed", {"reason": reason, "frames": 0}, at, conn)


def test_no_user_ingestor_no_judgement() -> None:
    assert user_stream_state([], NOW) is None
    assert user_stream_problems(None) == []


def test_an_open_connection_is_a_working_user_stream() -> None:
    state = user_stream_state([opened("usr-a", NOW - 100)], NOW)
    assert state == UserStream(True, 100.0, None, 0)
    assert user_stream_problems(state) == []


def test_no_open_connection_is_unhealthy_whatever_closed_it() -> None:
    for reason in ("server_closed: 4001", "error: OSError", "shutdown"):
        state = user_stream_state([opened("usr-a", NOW - 100), closed("usr-a", NOW - 40,
                                                                      reason)], NOW)
        assert user_stream_problems(state) == [
            f"user stream: no working connection for 40 s (last close: {reason})"]


def test_a_loop_of_connections_the_server_closes_at_once_is_unhealthy() -> None:
    loop = []
    for i in range(4):
        loop += [opened(f"usr-{i}", NOW - 20 + i), closed(f"usr-{i}", NOW - 20 + i + 0.01)]
    loop.append(opened("usr-9", NOW - 0.5))  # caught just after one more reconnect
    (problem,) = user_stream_problems(user_stream_state(loop, NOW))
    assert problem.startswith("user stream: 4 connections ended in the last 60 s (last: "
                              "server_closed: 4001)")
    # once a connection has lasted, the stream works again
    assert user_stream_problems(user_stream_state(loop, NOW + 5.5)) == []


def test_rotations_and_one_reconnect_are_not_a_loop() -> None:
    entries = [opened("usr-a", NOW - 50), entry("rotated", {}, NOW - 10, "usr-a"),
               opened("usr-b", NOW - 10), closed("usr-a", NOW - 9, "rotated"),
               closed("usr-b", NOW - 3, "error: OSError"), opened("usr-c", NOW - 2)]
    assert user_stream_problems(user_stream_state(entries, NOW)) == []


def test_a_ban_is_a_problem_with_its_end_and_a_429_back_off_is_only_shown() -> None:
    ban = entry("rest_backoff", {"status": 418, "method": "GET", "path": "/fapi/v1/openOrders",
                                 "retry_after": "7200", "wait_s": 7200, "until": NOW + 3600},
                NOW - 3600, "")
    state = user_stream_state([opened("usr-a", NOW - 9000), ban], NOW)
    assert state is not None and state.backoff is not None
    assert user_stream_problems(state) == [
        "REST: IP banned by the exchange until 2027-01-15T09:00:00Z (418 on GET "
        "/fapi/v1/openOrders)"]
    assert user_stream_state([opened("usr-a", NOW - 9000), ban], NOW + 3601).backoff is None
    slow = entry("rest_backoff", {"status": 429, "until": NOW + 30}, NOW - 30, "")
    state = user_stream_state([opened("usr-a", NOW - 9000), slow], NOW)
    assert state is not None and state.backoff is not None
    assert user_stream_problems(state) == []


def test_pipeline_status_shows_the_user_stream_and_a_running_back_off(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    now = time.time()
    r.xadd(KEY_CONN_USER, control_entry("opened", {"path": "private", "streams": 1,
                                                   "name": "usr"}, now - 5, "usr-abcdef"))
    r.xadd(KEY_CONN_USER, control_entry("rest_backoff", {
        "status": 429, "method": "GET", "path": "/fapi/v1/openOrders", "retry_after": "100000",
        "wait_s": 60.0, "until": now + 55, "scope": "calls that spend weight"}, now - 5))
    done = run_cli("status", env={"REDIS_URL": redis_server.url})
    assert done.returncode == 0, done.stdout
    assert "user stream: connected" in done.stdout
    assert "REST backing off (calls that spend weight) until" in done.stdout
    assert "429 on GET /fapi/v1/openOrders, Retry-After 100000" in done.stdout

    r.xadd(KEY_CONN_USER, control_entry("closed", {"reason": "server_closed: 4001",
                                                   "frames": 0}, now, "usr-abcdef"))
    done = run_cli("status", "--json", env={"REDIS_URL": redis_server.url})
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["user_stream"]["connected"] is False
    (problem,) = [p for p in report["problems"] if p.startswith("user stream")]
    assert re.fullmatch(r"user stream: no working connection for \d+ s \(last close: "
                        r"server_closed: 4001\)", problem), problem
