"""`pipeline ingest market` against a real redis-server and a websocket server over real sockets.

What a user of the log checks: every frame the exchange sent is in its `raw:` key byte for byte,
connections come and go with control entries in `raw:conn`, nothing is missed across a rotation,
a Redis outage loses only what it must and says how much.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import redis
import trio
import trio_websocket

from pipeline import metrics
from pipeline.config import Settings, load_settings
from pipeline.eventlog import ControlEntry, FrameEntry, decode_entry
from pipeline.ingest_market import MarketIngest, market_specs, run_market_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.writer import LogWriter
from pipeline.wsconn import Timing
from tests.conftest import ROOT, run_cli

FAST = Timing(connect_timeout=3.0, disconnect_timeout=0.5, backoff_base=0.05, backoff_cap=0.2,
              control_interval=0.01, ack_timeout=2.0, max_overlap=1.0)
NON_ASCII = "prix: 1 234,5 € — 价格 — Ünïcødé ✓"


# --- a tiny exchange: just enough of Binance's websocket protocol for these tests -------------

PATH_OF_KIND = {"aggTrade": "market", "markPrice@1s": "market", "depth20@100ms": "public"}


@attrs.define(eq=False)
class TinyExchange:
    """Broadcasts one event per tick and stream to every connection subscribed to it, like the
    exchange does: during an overlap two connections get the same event (same id)."""

    interval: float = 0.01
    silent: bool = False
    port: int = 0
    next_id: int = 0
    sent: dict[str, list[bytes]] = attrs.field(factory=dict)  # stream -> frames sent, in order
    conns: list[tuple[str, set[str], trio.MemorySendChannel[str | bytes]]] = attrs.field(
        factory=list)
    opened: int = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, self._handler, "127.0.0.1", 0, None,
                max_message_size=8 * 1024 * 1024))
            self.port = server.port
            nursery.start_soon(self._ticker)
            task_status.started(f"ws://127.0.0.1:{self.port}")

    def _frame(self, stream: str) -> str:
        self.next_id += 1
        data = {"e": "aggTrade", "E": self.next_id, "a": self.next_id, "note": NON_ASCII}
        return '{"stream":"%s","data":%s}' % (stream, orjson.dumps(data).decode())

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.interval)
            if self.silent:
                continue
            streams = {s for path, subs, _ in self.conns for s in subs
                       if PATH_OF_KIND[s.split("@", 1)[1]] == path}
            for stream in sorted(streams):
                frame = self._frame(stream)
                self.sent.setdefault(stream, []).append(frame.encode())
                self.broadcast(frame, stream)

    def broadcast(self, frame: str | bytes, stream: str | None = None) -> None:
        for path, subs, chan in list(self.conns):
            if stream is None or (stream in subs and PATH_OF_KIND[stream.split("@", 1)[1]]
                                  == path):
                try:
                    chan.send_nowait(frame)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock):
                    pass

    def drop_all(self) -> None:
        for _, _, chan in self.conns:
            chan.close()

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        path, _, query = request.path.lstrip("/").partition("/stream?streams=")
        subs = set(query.split("/")) if query else set()
        send, recv = trio.open_memory_channel[str | bytes](10_000)
        entry = (path, subs, send)
        self.conns.append(entry)
        self.opened += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._control, ws, subs, nursery.cancel_scope)
                async with recv:
                    async for frame in recv:
                        try:
                            await ws.send_message(frame)
                        except trio_websocket.ConnectionClosed:
                            break
                nursery.cancel_scope.cancel()
        finally:
            self.conns.remove(entry)
            await ws.aclose()

    async def _control(self, ws: trio_websocket.WebSocketConnection, subs: set[str],
                       scope: trio.CancelScope) -> None:
        try:
            while True:
                msg = orjson.loads(await ws.get_message())
                if msg.get("method") == "SUBSCRIBE":
                    subs.update(msg["params"])
                await ws.send_message(orjson.dumps({"result": None, "id": msg["id"]}).decode())
        except trio_websocket.ConnectionClosed:
            scope.cancel()


# --- helpers -----------------------------------------------------------------------------------

def settings_for(redis_url: str, ws_url: str, **env: str) -> Settings:
    base = {"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url, "PIPELINE_SYMBOLS": "BTCUSDT",
            "PIPELINE_MARKET_STREAMS": "aggTrade"}
    return load_settings(env={**base, **env})


@asynccontextmanager
async def ingesting(settings: Settings, symbols: tuple[str, ...] = ("BTCUSDT",),
                    **kw: Any) -> AsyncIterator[MarketIngest]:
    client = make_client(settings.redis_url)
    async with trio.open_nursery() as nursery:
        ingest = await nursery.start(partial(run_market_ingest, settings, client, symbols,
                                             timing=FAST, **kw))
        yield ingest
        ingest.stop()
    client.close()


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Wait until `check()` returns something truthy (the guard only stops a hung test)."""
    with trio.fail_after(timeout):
        while not (result := check()):
            await trio.sleep(0.02)
    return result


def entries(r: redis.Redis, key: str) -> list[FrameEntry | ControlEntry]:
    return [decode_entry(i, f) for i, f in r.xrange(key)]


def frames(r: redis.Redis, key: str) -> list[FrameEntry]:
    return [e for e in entries(r, key) if isinstance(e, FrameEntry)]


def controls(r: redis.Redis, key: str, ctl: str) -> list[ControlEntry]:
    return [e for e in entries(r, key) if isinstance(e, ControlEntry) and e.ctl == ctl]


def ids_of(frame_list: list[FrameEntry]) -> list[int]:
    return [orjson.loads(f.frame)["data"]["a"] for f in frame_list]


@pytest.fixture
async def exchange(nursery: trio.Nursery) -> TinyExchange:
    ex = TinyExchange()
    await nursery.start(ex.serve)
    return ex


# --- the tests ---------------------------------------------------------------------------------

async def test_frames_are_logged_byte_exact_including_non_ascii(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}")
    async with ingesting(settings) as ingest:
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 20)
        await ingest.writer.flush()
        logged = frames(r, "raw:market:aggTrade")
    sent = exchange.sent["btcusdt@aggTrade"]
    assert NON_ASCII.encode() in logged[0].frame
    # exactly what was sent, same bytes, same order (the first ticks may predate the connection)
    first = sent.index(logged[0].frame)
    assert [f.frame for f in logged] == sent[first:first + len(logged)]
    assert [f.seq for f in logged] == list(range(1, len(logged) + 1))
    assert len({f.conn for f in logged}) == 1


async def test_each_stream_is_read_on_its_path_and_logged_in_its_family_key(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}",
                            PIPELINE_SYMBOLS="BTCUSDT,ETHUSDT",
                            PIPELINE_MARKET_STREAMS="depth20@100ms,markPrice@1s")
    async with ingesting(settings, ("BTCUSDT", "ETHUSDT")):
        await eventually(lambda: r.xlen("raw:market:depth20") >= 4
                         and r.xlen("raw:market:markPrice") >= 4)
    opened = controls(r, "raw:conn", "opened")
    assert sorted(c.body["path"] for c in opened) == ["market", "public"]
    by_path = {c.body["path"]: c.conn for c in opened}
    for f in frames(r, "raw:market:depth20"):
        assert f.conn == by_path["public"] and b"@depth20@100ms" in f.frame
    for f in frames(r, "raw:market:markPrice"):
        assert f.conn == by_path["market"] and b"@markPrice@1s" in f.frame
    names = {orjson.loads(f.frame)["stream"] for f in frames(r, "raw:market:depth20")}
    assert names == {"btcusdt@depth20@100ms", "ethusdt@depth20@100ms"}


async def test_streams_beyond_the_url_are_subscribed_and_their_replies_logged_as_other(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.ingest_market.URL_STREAMS", 1)
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}",
                            PIPELINE_SYMBOLS="BTCUSDT,ETHUSDT,SOLUSDT")
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    spec, = market_specs(settings, symbols)
    assert spec.url().endswith("/market/stream?streams=btcusdt@aggTrade")  # type: ignore[union-attr]
    assert spec.subscribe == ("ethusdt@aggTrade", "solusdt@aggTrade")
    async with ingesting(settings, symbols):
        def all_three() -> bool:
            names = {orjson.loads(f.frame)["stream"] for f in frames(r, "raw:market:aggTrade")}
            return len(names) == 3
        await eventually(all_three)
    replies = [orjson.loads(f.frame) for f in frames(r, "raw:market:other")]
    assert replies == [{"result": None, "id": replies[0]["id"]}]


async def test_malformed_frames_are_logged_to_other_and_the_ingestor_keeps_going(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}")
    bad: list[str | bytes] = [
        "not json at all", b"\x00\x01binary\xff", '{"stream":"btcusdt@nosuch","data":{}}',
        "[" * 10 + "x" * (3 * 1024 * 1024)]
    # names its stream completely, so it is routed there; the projector dead-letters it
    truncated = '{"stream":"btcusdt@aggTrade","da'
    before = metrics.BAD_FRAMES._value.get()
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 3)
        for frame in [*bad, truncated]:
            exchange.broadcast(frame)
        await eventually(lambda: r.xlen("raw:market:other") >= len(bad))
        n = r.xlen("raw:market:aggTrade")
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= n + 10)
    logged = [f.frame for f in frames(r, "raw:market:other")]
    assert logged == [b if isinstance(b, bytes) else b.encode() for b in bad]
    assert truncated.encode() in [f.frame for f in frames(r, "raw:market:aggTrade")]
    assert metrics.BAD_FRAMES._value.get() - before == len(bad)
    assert len(controls(r, "raw:conn", "opened")) == 1  # never reconnected


async def test_silent_connection_is_recorded_and_replaced(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}",
                            PIPELINE_MARKET_STREAMS="markPrice@1s",
                            PIPELINE_SILENCE_TIMEOUT="0.3")
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:markPrice") >= 3)
        exchange.silent = True
        await eventually(lambda: controls(r, "raw:conn", "silent"))
        exchange.silent = False
        await eventually(lambda: len(controls(r, "raw:conn", "opened")) >= 2)
        n = r.xlen("raw:market:markPrice")
        await eventually(lambda: r.xlen("raw:market:markPrice") > n)
    silent, = controls(r, "raw:conn", "silent")[:1]
    first, second = controls(r, "raw:conn", "opened")[:2]
    assert silent.conn == first.conn and silent.body["seconds"] >= 0.3
    closed = {c.conn: c.body["reason"] for c in controls(r, "raw:conn", "closed")}
    assert closed[first.conn] == "silent"
    assert frames(r, "raw:market:markPrice")[-1].conn == second.conn
    assert "wrong path" in caplog.text


async def test_dropped_connection_reconnects_with_a_new_connection_id(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}")
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 3)
        exchange.drop_all()
        await eventually(lambda: len(controls(r, "raw:conn", "opened")) >= 2)
        n = r.xlen("raw:market:aggTrade")
        await eventually(lambda: r.xlen("raw:market:aggTrade") > n)
    first, second = controls(r, "raw:conn", "opened")[:2]
    assert first.conn != second.conn and first.conn.startswith("mkt-1-")
    reasons = {c.conn: c.body["reason"] for c in controls(r, "raw:conn", "closed")}
    assert reasons[first.conn].startswith("server_closed")
    assert reasons[second.conn] == "shutdown"


async def test_rotation_opens_the_new_connection_first_and_misses_no_frame(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, f"ws://127.0.0.1:{exchange.port}",
                            PIPELINE_ROTATE_AFTER="0.3")
    async with ingesting(settings) as ingest:
        await eventually(lambda: len(controls(r, "raw:conn", "rotated")) >= 3)
        await ingest.writer.flush()
    logged = frames(r, "raw:market:aggTrade")
    ids = sorted(set(ids_of(logged)))
    for e in entries(r, "raw:conn"):
        print(e.recv_ts, e.conn, e.ctl, e.body)
    for f in logged:
        print(f.recv_ts, f.conn, f.seq, ids_of([f]))
    assert ids == list(range(ids[0], ids[-1] + 1))  # no id missing across three rotations
    assert len(ids) < len(logged)  # the overlaps logged some frames twice
    rotated = controls(r, "raw:conn", "rotated")
    reasons = {c.conn: c.body["reason"] for c in controls(r, "raw:conn", "closed")}
    for rot in rotated:
        assert reasons[rot.conn] == "rotated"
        # the new connection had delivered before the old one was closed
        new_first = next(f for f in logged if f.conn == rot.body["new_conn"])
        assert new_first.recv_ts <= rot.recv_ts


async def test_redis_killed_and_restarted_keeps_the_websocket_and_accounts_for_every_frame(
        exchange: TinyExchange, tmp_path: Path) -> None:
    # AOF with fsync always: what Redis acknowledged survives the kill, as the SPEC promises
    server = LocalRedis(tmp_path / "aof", args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    r = server.client()
    try:
        settings = settings_for(server.url, f"ws://127.0.0.1:{exchange.port}",
                                PIPELINE_BUFFER_FRAMES="30")
        exchange.interval = 0.005
        async with ingesting(settings) as ingest:
            await eventually(lambda: r.xlen("raw:market:aggTrade") >= 20)
            server.kill()
            await eventually(lambda: ingest.writer.buffer.dropped >= 50)
            server.start()
            await eventually(lambda: _xlen_or_zero(r, "raw:market:aggTrade") > 0
                             and controls(r, "raw:market:aggTrade", "gap"))
        opened = controls(r, "raw:conn", "opened")
        closed = controls(r, "raw:conn", "closed")
        gaps = controls(r, "raw:market:aggTrade", "gap")
        logged = frames(r, "raw:market:aggTrade")
    finally:
        r.close()
        server.stop()
    assert len(opened) == 1 and len(closed) == 1  # the websocket stayed up throughout
    conn = opened[0].conn
    seqs = {f.seq for f in logged if f.conn == conn}  # a retried batch may add duplicates
    dropped = sum(g.body["by_conn"].get(conn, 0) for g in gaps)
    assert dropped >= 50
    assert len(seqs) + dropped == closed[0].body["frames"]  # every frame: logged or counted
    assert max(seqs) == closed[0].body["frames"]  # the final flush wrote the last ones
    assert gaps[0].body["first_recv_ts"] <= gaps[0].body["last_recv_ts"]


def _xlen_or_zero(r: redis.Redis, key: str) -> int:
    try:
        return int(r.xlen(key))
    except redis.ConnectionError:
        return 0


async def test_retention_trims_each_key_by_count_or_age(redis_server: LocalRedis,
                                                        r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, "ws://127.0.0.1:1",
                            PIPELINE_RETENTION="aggTrade=100,markPrice=age:60")
    writer = LogWriter(make_client(redis_server.url), settings.retention, max_batch=50)
    for i in range(250):  # entries from 1970: older than any age limit
        r.xadd("raw:market:markPrice", {"frame": b"old"}, id=f"{1_000_000 + i}-0")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(3000):
            writer.append_frame("raw:market:aggTrade", b"x", 1.0, "c", i + 1)
        writer.append_frame("raw:market:markPrice", b"new", 1.0, "c", 1)
        await writer.flush()
        nursery.cancel_scope.cancel()
    # `~`: Redis trims whole nodes of the stream (100 entries each), never the newest
    assert 100 <= r.xlen("raw:market:aggTrade") < 1000
    kept = [f[b"frame"] for _, f in r.xrange("raw:market:markPrice")]
    assert kept[-1] == b"new" and len(kept) <= 51


# --- the command line --------------------------------------------------------------------------

def test_unreachable_redis_stops_the_command_with_one_line_and_exit_2() -> None:
    from pipeline.localredis import free_port
    proc = run_cli("ingest", "market", env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()]  # one line
    assert "REDIS_URL" in proc.stderr


@pytest.mark.parametrize(("env", "setting"), [
    ({"PIPELINE_MARKET_STREAMS": "depth7@100ms"}, "PIPELINE_MARKET_STREAMS"),
    ({"PIPELINE_SYMBOLS": "btc-usdt"}, "PIPELINE_SYMBOLS"),
    ({"PIPELINE_BUFFER_FRAMES": "lots"}, "PIPELINE_BUFFER_FRAMES"),
])
def test_bad_setting_stops_the_command_with_one_line_naming_it(env: dict[str, str],
                                                               setting: str) -> None:
    proc = run_cli("ingest", "market", env=env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert setting in proc.stderr


async def test_sigterm_closes_the_connections_flushes_and_exits_0(
        exchange: TinyExchange, redis_server: LocalRedis, r: redis.Redis) -> None:
    env = {"REDIS_URL": redis_server.url, "BINANCE_WS_URL": f"ws://127.0.0.1:{exchange.port}",
           "PIPELINE_SYMBOLS": "BTCUSDT", "PIPELINE_MARKET_STREAMS": "aggTrade"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "market"], env={
        **_clean_env(), **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 10, timeout=20)
        proc.send_signal(signal.SIGTERM)
        _, err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=20))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    closed, = controls(r, "raw:conn", "closed")
    assert closed.body["reason"] == "shutdown"
    assert max(f.seq for f in frames(r, "raw:market:aggTrade")) == closed.body["frames"]


def _clean_env() -> dict[str, str]:
    import os
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
