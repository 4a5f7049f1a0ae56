"""`pipeline status`: what an operator sees, and when it says unhealthy (exit 1).

The integration tests run the real projector (`pipeline project`) and `pipeline status` as
subprocesses against a private redis-server; the log is seeded with realistic frames so the
tests do not wait for a simulator. The rules themselves are tested on plain values.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trio

from pipeline.eventlog import ControlEntry, Retention, control_entry, frame_entry, route_frame
from pipeline.health import (
    FUTURE_ID_TOLERANCE_S,
    Connection,
    Group,
    Outage,
    Stream,
    ViewFamily,
    assess,
    mark_silent,
    open_connections,
    outages,
    tampering,
)
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.writer import LogWriter
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from projections.core.keys import KEY_CONN_MARKET, KEY_CONN_USER, KEY_USER
from tests.conftest import ROOT, run_cli


def mark_frame(symbol: str, event_ms: int) -> bytes:
    data = (f'{{"e":"markPriceUpdate","E":{event_ms},"s":"{symbol}","p":"64012.10000000",'
            f'"i":"64000.55000000","P":"64050.00000000","r":"0.00010000","T":1795507200000}}')
    return f'{{"stream":"{symbol.lower()}@markPrice@1s","data":{data}}}'.encode()


def log_marks(r: redis.Redis, n: int, conn: str = "mkt-1-abc123") -> None:
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            now = time.time()
            pipe.xadd("raw:market:markPrice", frame_entry(
                mark_frame("BTCUSDT", int(now * 1000)), now, conn, i))
        pipe.execute()


def status(redis_server: LocalRedis, *args: str) -> tuple[int, dict]:
    done = run_cli("status", "--json", *args, env={"REDIS_URL": redis_server.url}, timeout=30)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def group(report: dict, key: str, name: str) -> dict:
    stream = next(s for s in report["streams"] if s["key"] == key)
    return next(g for g in stream["groups"] if g["name"] == name)


def wait_until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def projector(redis_server: LocalRedis) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "REDIS_URL"))}
    env["REDIS_URL"] = redis_server.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "project", "--only", "mark_price", "--block-ms", "100"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_stopped_projectors_growing_lag_is_reported_and_exits_1(
    redis_server: LocalRedis, r: redis.Redis, projector: subprocess.Popen[bytes],
) -> None:
    log_marks(r, 20)
    caught_up = lambda: r.exists("websocket:mark_price:btcusdt") and all(  # noqa: E731
        g["lag"] == 0 and g["pending"] == 0 for g in r.xinfo_groups("raw:market:markPrice"))
    wait_until(caught_up)
    code, report = status(redis_server, "--max-lag", "25")
    assert code == 0, report["problems"]
    assert report["healthy"] and group(report, "raw:market:markPrice", "mark_price")["lag"] == 0

    projector.send_signal(signal.SIGTERM)
    projector.wait(10)
    log_marks(r, 30)
    code, report = status(redis_server, "--max-lag", "25")
    assert code == 1
    assert group(report, "raw:market:markPrice", "mark_price")["lag"] == 30
    assert any("mark_price" in p and "lag 30" in p for p in report["problems"])

    log_marks(r, 20)
    code, report = status(redis_server, "--max-lag", "25")
    assert code == 1 and group(report, "raw:market:markPrice", "mark_price")["lag"] == 50


def test_terminal_table_names_the_lagging_group(redis_server: LocalRedis, r: redis.Redis) -> None:
    log_marks(r, 5)
    r.xgroup_create("raw:market:markPrice", "mark_price", id="0")
    done = run_cli("status", "--max-lag", "2", env={"REDIS_URL": redis_server.url})
    assert done.returncode == 1
    assert "raw:market:markPrice" in done.stdout and "mark_price" in done.stdout
    assert "UNHEALTHY" in done.stdout and "lag 5 > 2" in done.stdout


def test_connection_open_on_a_quiet_path_is_silent_and_unhealthy(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    opened_ms = int(time.time() * 1000) - 120_000
    r.xadd(KEY_CONN_MARKET, control_entry(
        "opened", {"path": "market", "streams": 3, "name": "mkt-1"}, opened_ms / 1000,
        "mkt-1-abc123"), id=f"{opened_ms}-0")
    r.xadd("raw:market:markPrice", frame_entry(mark_frame("BTCUSDT", opened_ms),
                                               opened_ms / 1000, "mkt-1-abc123", 0),
           id=f"{opened_ms + 1}-0")
    code, report = status(redis_server)
    assert code == 1
    (conn,) = report["connections"]
    assert conn["id"] == "mkt-1-abc123" and conn["silent"] and conn["age_s"] > 100
    assert any("silent" in p for p in report["problems"])


async def test_a_user_stream_that_loops_on_rejected_connections_is_unhealthy(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    # the real connection and writer, on the real clock, against the simulator, which accepts
    # a private stream on an unknown listenKey and closes it at once (4001)
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
    writer = LogWriter(make_client(redis_server.url))
    url = "/private/ws?listenKey=no-such-key&events=ORDER_TRADE_UPDATE"
    timing = Timing(backoff_base=0.05, backoff_cap=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        await nursery.start(writer.run)
        conn = WsConnection(ConnSpec("usr", "private", lambda: sim.ws_url + url, route_frame),
                            writer, conn_key=KEY_CONN_USER, timing=timing)
        nursery.start_soon(conn.run)
        with trio.fail_after(20):
            while r.xlen(KEY_CONN_USER) < 10:  # noqa: ASYNC110 - written by the writer thread
                await trio.sleep(0.05)
        await trio.sleep(1.2)
        done = await trio.to_thread.run_sync(functools.partial(
            run_cli, "status", "--json", env={"REDIS_URL": redis_server.url,
                                              "PIPELINE_SILENCE_TIMEOUT": "1"}))
        nursery.cancel_scope.cancel()
    assert done.returncode == 1, done.stdout
    report = json.loads(done.stdout)
    (down,) = report["outages"]
    assert down["name"] == "usr" and down["down_s"] > 1 and down["failed_links"] >= 10
    assert down["last_reason"] == "server_closed: 4001"
    assert [p for p in report["problems"] if p.startswith("connection usr:")]


def test_dead_letters_and_rest_weight_are_reported(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    r.xadd("dlq:mark_price", {"source": "raw:market:markPrice", "error": "bad"})
    r.xadd(KEY_USER, control_entry("snapshot", {"kind": "openOrders", "symbol": None,
                                                "response": [], "weight_used_1m": 47}, 1.0))
    code, report = status(redis_server)
    assert report["dead_letters"] == {"dlq:mark_price": 1}
    assert report["weight_used_1m"] == 47
    assert code == 0  # reported, not judged


def test_unreachable_redis_is_a_bad_setting(tmp_path: Path) -> None:
    done = run_cli("status", env={"REDIS_URL": "redis://user:hunter2@127.0.0.1:1/0"})
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr and "hunter2" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- the rules, on plain values ----------------------------------------------------------

def ctl(ctl_: str, conn: str, ts: float, **body: object) -> ControlEntry:
    return ControlEntry(b"0-0", ctl_, body, ts, conn)


def test_a_connection_is_open_until_closed_or_replaced_by_one_of_the_same_name() -> None:
    entries = [
        ctl("opened", "mkt-1-a", 100.0, name="mkt-1", path="market", streams=9),
        ctl("opened", "mkt-2-a", 100.0, name="mkt-2", path="public", streams=3),
        ctl("closed", "mkt-2-a", 150.0, reason="server_closed"),
        ctl("opened", "mkt-2-b", 151.0, name="mkt-2", path="public", streams=3),
        ctl("opened", "usr-1-a", 160.0, name="usr-1", path="private"),
        # its process was killed: no `closed`, then a new one under the same name
        ctl("opened", "usr-1-b", 170.0, name="usr-1", path="private"),
    ]
    conns = open_connections(entries, now=200.0)
    assert [(c.id, c.age_s) for c in conns] == [
        ("mkt-1-a", 100.0), ("usr-1-b", 30.0), ("mkt-2-b", 49.0)]


def test_only_ticking_paths_can_be_silent() -> None:
    conns = [Connection("m", "mkt-1", "market", 100.0, 9), Connection("u", "usr-1", "private",
                                                                      100.0, 1)]
    quiet = [Stream("raw:market:markPrice", 10, None, 45.0), Stream("raw:user", 1, None, 900.0)]
    assert [c.silent for c in mark_silent(conns, quiet, 30.0)] == [True, False]
    fresh = [Stream("raw:market:markPrice", 10, None, 0.5)]
    assert [c.silent for c in mark_silent(conns, fresh, 30.0)] == [False, False]


def test_stale_or_missing_views_and_lag_make_it_unhealthy_but_listener_lag_does_not() -> None:
    streams = [
        Stream("raw:market:markPrice", 100, None, 0.2,
               (Group("raw:market:markPrice", "mark_price", 1, 0, 11, lag_exact=False),)),
        Stream("raw:market:depth20", 100, None, 0.2),
        Stream("websocket:orders", 10, None, 5.0,
               (Group("websocket:orders", "listener", 1, 3, 10_000),)),
    ]
    views = [ViewFamily("mark_price", "string", 3, 12.5, 10.0),
             ViewFamily("position", "string", 1, 9999.0, None)]
    problems = assess([], streams, views, max_lag=10)
    assert problems == [
        "group mark_price on raw:market:markPrice: lag 11 or more > 10",
        "views mark_price: newest is 12.5 s old (limit 10 s)",
        "views orderbook: none, while raw:market:depth20 is being written",
    ]


def link(entries: list[ControlEntry], name: str, conn: str, opened: float | None,
         closed: float, reason: str, frames: int = 0) -> None:
    """The lifecycle entries of one link as the connection writes them."""
    if opened is not None:
        entries.append(ctl("opened", conn, opened, name=name, path="private", streams=1))
        entries.append(ctl("closed", conn, closed, reason=reason, frames=frames))
    else:
        entries.append(ctl("closed", conn, closed, reason=reason, frames=0, name=name,
                           path="private", url="wss://x/private/ws?listenKey=***"))


def test_a_connection_is_down_from_the_end_of_its_last_working_link() -> None:
    entries: list[ControlEntry] = []
    link(entries, "usr", "usr-a", 100.0, 500.0, "server_closed: 1006")  # up for 400 s
    for i in range(6):  # then every attempt fails: refused, or accepted and closed at once
        if i % 2:
            link(entries, "usr", f"usr-{i}", None, 501.0 + i, "connect_failed: timeout")
        else:
            link(entries, "usr", f"usr-{i}", 501.0 + i, 501.0 + i, "server_closed: 4001")
    assert outages(entries, now=520.0, limit_s=30.0) == []  # 20 s: not yet
    assert outages(entries, now=540.0, limit_s=30.0) == [
        Outage("usr", 40.0, 6, "connect_failed: timeout")]
    problems = assess([], [], [], max_lag=10, down=outages(entries, 540.0, 30.0))
    assert problems == ["connection usr: no working link for 40 s (6 failed since, last: "
                        "connect_failed: timeout)"]


def test_a_connection_is_up_again_once_a_link_stays_open_or_carries_a_frame() -> None:
    entries: list[ControlEntry] = []
    for i in range(5):
        link(entries, "mkt-1", f"mkt-1-{i}", 10.0 * i, 10.0 * i, "server_closed: 1000")
    assert [o.name for o in outages(entries, now=100.0, limit_s=30.0)] == ["mkt-1"]
    entries.append(ctl("opened", "mkt-1-up", 100.0, name="mkt-1", path="market"))
    assert [o.name for o in outages(entries, now=105.0, limit_s=30.0)] == ["mkt-1"]
    assert outages(entries, now=111.0, limit_s=30.0) == []  # open for 10 s: up
    short = list(entries[:-1])
    link(short, "mkt-1", "mkt-1-data", 100.0, 101.0, "server_closed: 1006", frames=3)
    assert outages(short, now=120.0, limit_s=30.0) == []  # it carried frames: it worked


def test_links_replaced_for_silence_one_after_another_are_down_from_the_last_frame() -> None:
    def silent_link(conn: str, opened: float, frames: int) -> None:
        entries.append(ctl("opened", conn, opened, name="mkt-1", path="public"))
        entries.append(ctl("silent", conn, opened + 30.0, seconds=30.0, path="public"))
        entries.append(ctl("closed", conn, opened + 33.0, reason="silent", frames=frames))

    entries: list[ControlEntry] = []
    entries.append(ctl("opened", "mkt-1-a", 0.0, name="mkt-1", path="public"))
    entries.append(ctl("silent", "mkt-1-a", 130.0, seconds=30.0, path="public"))  # last at 100
    entries.append(ctl("closed", "mkt-1-a", 133.0, reason="silent", frames=500))
    silent_link("mkt-1-b", 133.5, 0)
    entries.append(ctl("opened", "mkt-1-c", 167.0, name="mkt-1", path="public"))
    (down,) = outages(entries, now=170.0, limit_s=30.0)
    assert (down.down_s, down.failed_links, down.last_reason) == (70.0, 1, "silent")
    assert outages(entries, now=195.0, limit_s=30.0)  # c might yet go silent too
    assert outages(entries, now=203.0, limit_s=30.0) == []  # open 36 s, never silent: up


def test_a_connection_stopped_on_purpose_is_not_judged() -> None:
    entries: list[ControlEntry] = []
    link(entries, "usr", "usr-a", None, 10.0, "connect_failed: ConnectionRefusedError")
    link(entries, "usr", "usr-b", 20.0, 20.5, "shutdown")
    assert outages(entries, now=1000.0, limit_s=30.0) == []
    link(entries, "usr", "usr-c", None, 1001.0, "connect_failed: ConnectionRefusedError")
    assert [o.failed_links for o in outages(entries, now=1100.0, limit_s=30.0)] == [1]


# --- a role's abuse of its own streams (issue #17), performed on a real Redis -------------

MAX_ID = "18446744073709551615-18446744073709551615"


def problems_about(report: dict, key: str) -> list[str]:
    return [p for p in report["problems"] if p.startswith(f"stream {key}:")]


def test_a_never_trimmed_stream_that_lost_entries_is_unhealthy(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    for i in range(10):
        r.xadd(KEY_USER, frame_entry(b'{"e":"ORDER_TRADE_UPDATE"}', time.time(), "usr-a", i))
    code, report = status(redis_server)
    assert code == 0 and not problems_about(report, KEY_USER)
    stream = next(s for s in report["streams"] if s["key"] == KEY_USER)
    assert (stream["length"], stream["entries_added"]) == (10, 10)

    r.xadd(KEY_USER, frame_entry(b"{}", time.time(), "usr-a", 11), maxlen=0)  # the abuse
    code, report = status(redis_server)
    assert code == 1
    assert problems_about(report, KEY_USER) == [
        "stream raw:user: 11 of its 11 entries were removed, but it is never trimmed"]


def test_a_count_retained_stream_cut_far_below_its_retention_is_unhealthy(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    entry = control_entry("closed", {"reason": "shutdown"}, time.time(), "mkt-1-abc123")
    for _ in range(400):  # what the writer does with conn=100: trims as it appends
        r.xadd(KEY_CONN_MARKET, entry, maxlen=100, approximate=True)
    done = run_cli("status", "--json", env={"REDIS_URL": redis_server.url,
                                            "PIPELINE_RETENTION": "conn=100"})
    assert done.returncode == 0, done.stdout

    r.xtrim(KEY_CONN_MARKET, maxlen=3, approximate=False)  # as XADD ... MAXLEN 3 would
    done = run_cli("status", "--json", env={"REDIS_URL": redis_server.url,
                                            "PIPELINE_RETENTION": "conn=100"})
    assert done.returncode == 1
    assert problems_about(json.loads(done.stdout), KEY_CONN_MARKET) == [
        "stream raw:conn:market: 3 entries after 400 appends, far below its retention (~100): "
        "trimmed by hand"]


def test_a_stream_whose_last_id_runs_ahead_of_the_server_clock_is_unhealthy(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    r.xadd(KEY_CONN_USER, control_entry("closed", {"reason": "shutdown"}, time.time(), "usr-a"))
    r.xadd(KEY_CONN_USER, control_entry("closed", {}, time.time()), id=MAX_ID)
    with pytest.raises(redis.ResponseError, match="exhausted"):
        r.xadd(KEY_CONN_USER, control_entry("opened", {}, time.time()))  # the harm
    hour_ahead = int(time.time() * 1000) + 3_600_000
    r.xadd("raw:market:depth", frame_entry(b"{}", time.time(), "mkt-1-a", 1),
           id=f"{hour_ahead}-0")
    r.xadd("raw:market:aggTrade", frame_entry(b"{}", time.time(), "mkt-1-a", 1))  # as usual
    code, report = status(redis_server)
    assert code == 1
    assert problems_about(report, KEY_CONN_USER) == [
        "stream raw:conn:user: its last id is the largest possible, so every append with an "
        "automatic id (XADD *) now fails"]
    (ahead,) = problems_about(report, "raw:market:depth")
    seconds = re.search(rf"last id {hour_ahead}-0 is (\d+) s ahead of the server clock", ahead)
    assert seconds is not None, ahead
    assert 3500 < int(seconds[1]) <= 3600  # less the time status took to look
    assert not problems_about(report, "raw:market:aggTrade")


def test_connections_of_both_ingestors_are_read_from_their_own_streams(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    now = time.time()
    r.xadd(KEY_CONN_MARKET, control_entry("opened", {"path": "market", "streams": 3,
                                                     "name": "mkt-1"}, now, "mkt-1-abc123"))
    r.xadd(KEY_CONN_USER, control_entry("opened", {"path": "private", "streams": 1,
                                                   "name": "usr"}, now, "usr-def456"))
    r.xadd(KEY_CONN_MARKET, control_entry("opened", {"path": "public", "streams": 2,
                                                     "name": "mkt-2"}, now, "mkt-2-aaaaaa"))
    r.xadd(KEY_CONN_MARKET, control_entry("closed", {"reason": "shutdown"}, now,
                                          "mkt-2-aaaaaa"))
    code, report = status(redis_server)
    assert code == 0, report["problems"]
    assert [(c["id"], c["path"]) for c in report["connections"]] == [
        ("mkt-1-abc123", "market"), ("usr-def456", "private")]


# --- the tampering rules, on plain values -------------------------------------------------

def test_tampering_rules_judge_each_stream_by_its_own_retention() -> None:
    def stream(key: str, length: int, added: int, last_id: str = "5-0",
               ahead: float = 0.0) -> Stream:
        return Stream(key, length, None, 1.0, entries_added=added, last_id=last_id,
                      last_id_ahead_s=ahead)

    retention = {"user": Retention(), "conn": Retention(maxlen=100),
                 "aggTrade": Retention(max_age_s=60.0)}
    fine = [stream("raw:user", 7, 7), stream("raw:conn:user", 100, 5000),
            stream("raw:conn:market", 30, 30), stream("raw:market:aggTrade", 1, 90_000),
            stream("raw:conn:user", 0, 0), stream("websocket:orders", 0, 900),
            stream("raw:market:depth", 1, 1, ahead=FUTURE_ID_TOLERANCE_S)]
    assert tampering(fine, retention) == []
    bad = [stream("raw:user", 6, 7), stream("raw:conn:user", 49, 5000),
           stream("raw:conn:market", 14, 30), stream("websocket:orders", 1, 1, ahead=999.4),
           stream("raw:market:depth", 1, 1, last_id=MAX_ID, ahead=1e16)]
    assert tampering(bad, retention) == [
        "stream raw:user: 1 of its 7 entries were removed, but it is never trimmed",
        "stream raw:conn:user: 49 entries after 5000 appends, far below its retention (~100): "
        "trimmed by hand",
        "stream raw:conn:market: 14 entries after 30 appends, far below its retention (~100): "
        "trimmed by hand",
        "stream websocket:orders: last id 5-0 is 999 s ahead of the server clock (an explicit "
        "id was appended)",
        "stream raw:market:depth: its last id is the largest possible, so every append with "
        "an automatic id (XADD *) now fails",
    ]
