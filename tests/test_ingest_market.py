"""`pipeline ingest market` against a real redis-server and a websocket server over real sockets.

What a user of the log checks: every frame the exchange sent is in its `raw:` key byte for byte,
connections come and go with control entries in `raw:conn:market`, nothing is missed across a
rotation, a Redis outage loses only what it must and says how much.

The tests about time (SUBSCRIBE pacing, silence, reconnect backoff, rotation) run one
`WsConnection` with the production timing against the in-process simulator on Trio's MockClock
with autojump, writing to an in-memory sink: everything is Trio tasks and loopback sockets, so
the clock jumps only when every task waits for a deadline, and a 24-hour rotation takes a few
seconds. Nothing there waits on Redis, whose calls run in threads that the clock would jump
under.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path as FsPath
from typing import Any, cast

import attrs
import orjson
import pytest
import redis
import trio

from pipeline import metrics
from pipeline.config import Settings, load_settings
from pipeline.eventlog import (
    STREAM_NAME_SCAN,
    ControlEntry,
    FrameEntry,
    decode_entry,
    route_frame,
    stream_name,
)
from pipeline.ingest_market import (
    MarketIngest,
    cached_router,
    market_specs,
    resolve_symbols,
    run_market_ingest,
)
from pipeline.localredis import LocalRedis, free_port
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.simulator.market import malformed_frames
from pipeline.streams import Path
from pipeline.writer import LogWriter
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from projections.core.keys import KEY_CONN_MARKET, KEY_OTHER
from tests.conftest import ROOT, run_cli
from tests.hostile_ws import HostileServer, Peer
from tests.recorder import Recorder

# The tests through `run_market_ingest` log to a real redis-server from the writer's thread, so
# they run on the real clock (a MockClock would jump while that thread waits on Redis); these
# short timings keep their reconnects quick.
FAST = Timing(connect_timeout=3.0, disconnect_timeout=0.5, backoff_base=0.05, backoff_cap=0.2,
              control_interval=0.01, ack_timeout=2.0, max_overlap=1.0)


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


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Wait until `check()` returns something truthy (the guard only stops a hung test).

    Polls: what it waits for is state in Redis or in another process, which no event reports."""
    with trio.fail_after(within):
        while not (result := check()):  # noqa: ASYNC110
            await trio.sleep(0.02)
    return result


def xrange(r: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(key))


def entries(r: redis.Redis, key: str) -> list[FrameEntry | ControlEntry]:
    return [decode_entry(i, f) for i, f in xrange(r, key)]


def frames(r: redis.Redis, key: str) -> list[FrameEntry]:
    return [e for e in entries(r, key) if isinstance(e, FrameEntry)]


def controls(r: redis.Redis, key: str, ctl: str) -> list[ControlEntry]:
    return [e for e in entries(r, key) if isinstance(e, ControlEntry) and e.ctl == ctl]


def stream_names(r: redis.Redis, key: str) -> set[str]:
    return {orjson.loads(f.frame)["stream"] for f in frames(r, key)}


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Simulator:
    simulator = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"), rate=200),
                          record=50_000)
    await nursery.start(simulator.run)
    return simulator


# --- on the MockClock: one connection, an in-memory sink ------------------------------------------

NO_REDIS = "redis://127.0.0.1:1/0"  # settings need a URL; the MockClock tests never connect


@asynccontextmanager
async def simulated(config: SimConfig, record: int = 0) -> AsyncIterator[Simulator]:
    simulator = Simulator(config, record=record)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        yield simulator
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(spec: ConnSpec, sink: Recorder) -> AsyncIterator[WsConnection]:
    """The connection with the production `Timing` and the jitter at its top (`rand` 1.0):
    every backoff is the full step, 0.5 s, 1 s, 2 s, ... up to 30 s."""
    conn = WsConnection(spec, sink, conn_key=KEY_CONN_MARKET, rand=lambda: 1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        yield conn
        nursery.cancel_scope.cancel()


def one_spec(ws_url: str, streams: str) -> ConnSpec:
    """The ingestor's spec for BTCUSDT's `streams`, with the default settings otherwise."""
    settings = settings_for(NO_REDIS, ws_url, PIPELINE_MARKET_STREAMS=streams)
    spec, = market_specs(settings, ("BTCUSDT",))
    return spec


# --- the tests ---------------------------------------------------------------------------------

async def test_frames_are_logged_byte_exact_in_the_order_sent_including_non_ascii(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url)
    async with ingesting(settings) as ingest:
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 20)
        sim.send_malformed(5)  # one of them is valid JSON with non-ASCII text
        await eventually(lambda: r.xlen("raw:market:other") >= 4)
        n = r.xlen("raw:market:aggTrade")
        await eventually(lambda: r.xlen("raw:market:aggTrade") > n + 5)
        await ingest.writer.flush()
    assert sim.sent is not None
    sent = [payload for _, payload in sim.sent]
    logged = sorted((f for key in r.scan_iter("raw:market:*") for f in frames(r, key)),
                    key=lambda f: f.seq)
    assert [f.seq for f in logged] == list(range(1, len(logged) + 1))
    assert [f.frame for f in logged] == sent[:len(logged)]  # same bytes, same order, none lost
    assert any("ünïcödé ✓ 比特币".encode() in f.frame for f in logged)
    assert len({f.conn for f in logged}) == 1


async def test_each_stream_is_read_on_its_path_and_logged_in_its_family_key(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SYMBOLS="BTCUSDT,ETHUSDT",
                            PIPELINE_MARKET_STREAMS="depth20@100ms,markPrice@1s")
    async with ingesting(settings, ("BTCUSDT", "ETHUSDT")):
        await eventually(lambda: r.xlen("raw:market:depth20") >= 4
                         and r.xlen("raw:market:markPrice") >= 4)
    opened = controls(r, KEY_CONN_MARKET, "opened")
    assert sorted(c.body["path"] for c in opened) == ["market", "public"]
    conn_of = {c.body["path"]: c.conn for c in opened}
    assert {f.conn for f in frames(r, "raw:market:depth20")} == {conn_of["public"]}
    assert {f.conn for f in frames(r, "raw:market:markPrice")} == {conn_of["market"]}
    assert stream_names(r, "raw:market:depth20") == {"btcusdt@depth20@100ms",
                                                     "ethusdt@depth20@100ms"}
    assert stream_names(r, "raw:market:markPrice") == {"btcusdt@markPrice@1s",
                                                       "ethusdt@markPrice@1s"}
    assert r.xlen("raw:market:other") == 0


async def test_streams_beyond_the_url_are_subscribed_paced_and_their_replies_logged_as_other(
        autojump_clock: trio.testing.MockClock) -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    rec = Recorder()
    async with simulated(SimConfig(symbols=symbols)) as sim:
        settings = settings_for(NO_REDIS, sim.ws_url, PIPELINE_SYMBOLS=",".join(symbols))
        spec, = market_specs(settings, symbols, url_streams=1, params_per_message=1)
        assert spec.streams_now is not None and spec.streams_now() == (
            "btcusdt@aggTrade", "ethusdt@aggTrade", "solusdt@aggTrade")
        assert spec.url() == f"{sim.ws_url}/market/stream?streams=btcusdt@aggTrade"
        async with connected(spec, rec):
            await rec.until(lambda: {orjson.loads(f.frame)["stream"]
                                     for f in rec.frames("raw:market:aggTrade")} == {
                "btcusdt@aggTrade", "ethusdt@aggTrade", "solusdt@aggTrade"}, within=60)
    first, second = rec.frames(KEY_OTHER)
    assert [orjson.loads(first.frame), orjson.loads(second.frame)] == [
        {"result": None, "id": 1}, {"result": None, "id": 2}]
    # one SUBSCRIBE every 0.2 s: Binance drops a connection past 10 incoming messages a second
    assert second.at - first.at == pytest.approx(0.2)
    assert len(rec.controls("opened")) == 1


async def test_more_streams_than_one_connection_takes_are_spread_over_several(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SYMBOLS=",".join(symbols),
                            PIPELINE_MARKET_STREAMS="aggTrade,markPrice@1s")
    async with ingesting(settings, symbols, max_per_connection=2):
        await eventually(lambda: len(stream_names(r, "raw:market:markPrice")) == 3
                         and len(stream_names(r, "raw:market:aggTrade")) == 3)
    opened = controls(r, KEY_CONN_MARKET, "opened")
    assert [c.body["streams"] for c in opened] == [2, 2, 2]  # a symbol's streams stay together
    assert len({c.conn for c in opened}) == 3


async def test_malformed_frames_are_logged_as_received_and_the_ingestor_keeps_going(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_MARKET_STREAMS="markPrice@1s")
    bad = malformed_frames(5, 0)
    before = metrics.BAD_FRAMES._value.get()
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:markPrice") >= 3)
        sim.send_malformed(5)
        await eventually(lambda: r.xlen("raw:market:other") >= 4)
        n = r.xlen("raw:market:markPrice")
        await eventually(lambda: r.xlen("raw:market:markPrice") >= n + 10)
    other = [f.frame for f in frames(r, "raw:market:other")]
    kinds = [b"this is not json {", b"\x00\x01binary\xfe\xff", b'{"e":"oversized"',
             b'{"stream":"btcusdt@noSuchStream"']
    assert [next(f for f in other if f.startswith(k)) for k in kinds]  # each one, as sent
    assert max(len(f) for f in other) == len(bad[2])  # the 2 MiB frame, whole
    # the truncated frame names its stream completely: routed there, the projector rejects it
    truncated = [f for f in frames(r, "raw:market:markPrice") if not f.frame.endswith(b"}}")]
    assert len(truncated) == 1
    assert metrics.BAD_FRAMES._value.get() - before == 4
    assert len(controls(r, KEY_CONN_MARKET, "opened")) == 1  # never reconnected


async def test_silent_connection_is_recorded_and_replaced(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:  # markPrice@1s: 1 a second
        spec = one_spec(sim.ws_url, "markPrice@1s")  # PIPELINE_SILENCE_TIMEOUT: 30 s
        async with connected(spec, rec):
            await rec.until(lambda: len(rec.frames()) >= 3, within=10)
            sim.set_silence(True)
            await rec.until(lambda: rec.controls("silent"), within=60)
            sim.set_silence(False)
            await rec.until(lambda: len(rec.controls("opened")) == 2
                            and rec.frames()[-1].conn == rec.controls("opened")[1].conn,
                            within=10)
    first, second = rec.controls("opened")
    silent, = rec.controls("silent")
    last_frame = [f for f in rec.frames() if f.conn == first.conn][-1]
    assert silent.conn == first.conn and silent.body["seconds"] >= 30
    # noticed within a watchdog tick (1 s) of the timeout
    assert 30 <= silent.at - last_frame.at <= 31.001
    assert rec.reasons()[first.conn] == "silent"
    # it had delivered data: reconnect after the first backoff step
    assert second.at - silent.at == pytest.approx(0.5)
    assert "wrong path" in caplog.text


async def test_stream_on_the_wrong_path_is_noticed_as_silence(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:
        settings = settings_for(NO_REDIS, sim.ws_url)
        kind = attrs.evolve(settings.market_streams[0], path=Path.PUBLIC, ticks_every_second=True)
        settings = attrs.evolve(settings, market_streams=(kind,))  # aggTrade asked on /public
        spec, = market_specs(settings, ("BTCUSDT",))
        async with connected(spec, rec):
            await rec.until(lambda: rec.controls("silent"), within=60)
    opened, silent = rec.controls("opened")[0], rec.controls("silent")[0]
    assert silent.conn == opened.conn and 30 <= silent.at - opened.at <= 31.001
    assert rec.frames() == []


async def test_dropped_connection_reconnects_with_a_new_connection_id_after_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:
        spec = one_spec(sim.ws_url, "aggTrade")
        async with connected(spec, rec):
            await rec.until(lambda: len(rec.frames()) >= 3, within=10)
            sim.drop("market")
            await rec.until(lambda: len(rec.controls("opened")) == 2, within=10)
            n = len(rec.frames())
            await rec.until(lambda: len(rec.frames()) > n, within=10)
    first, second = rec.controls("opened")
    closed = rec.controls("closed")[0]
    assert first.conn != second.conn and first.conn.startswith("mkt-1-")
    assert closed.conn == first.conn and closed.body["reason"].startswith("server_closed")
    assert second.at - closed.at == pytest.approx(0.5)  # had delivered data: the first step
    assert rec.frames()[-1].conn == second.conn
    assert rec.reasons()[second.conn] == "shutdown"


async def test_reconnects_back_off_doubling_to_30_s_and_start_over_once_data_came(
        autojump_clock: trio.testing.MockClock) -> None:
    refused = f"ws://127.0.0.1:{free_port()}/market/stream?streams=btcusdt@aggTrade"
    attempts: list[float] = []
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:
        reachable = f"{sim.ws_url}/market/stream?streams=btcusdt@aggTrade"

        def url() -> str:  # called once per connect: the exchange is away for 9 attempts
            attempts.append(trio.current_time())
            return refused if len(attempts) <= 9 else reachable

        async with connected(ConnSpec("mkt-1", "market", url, route_frame), rec):
            await rec.until(lambda: len(rec.frames()) >= 3, within=300)
            sim.drop("market")
            await rec.until(lambda: len(rec.controls("opened")) == 2, within=60)
    waits = [b - a for a, b in itertools.pairwise(attempts[:10])]
    assert waits == pytest.approx([0.5, 1, 2, 4, 8, 16, 30, 30, 30])
    failed = rec.controls("closed")[:9]  # each refused attempt is recorded
    assert {c.body["reason"] for c in failed} == {"connect_failed: ConnectionRefusedError"}
    opened = rec.controls("opened")[0]
    closed = next(c for c in rec.controls("closed") if c.conn == opened.conn)
    assert attempts[10] - closed.at == pytest.approx(0.5)  # it had delivered: the first step


async def test_a_server_that_accepts_and_closes_at_once_is_retried_with_doubling_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:
        # the simulator accepts a private stream on an unknown key, then closes it (4001)
        url = f"{sim.ws_url}/private/ws?listenKey=no-such-key&events=ORDER_TRADE_UPDATE"
        async with connected(ConnSpec("usr", "private", lambda: url, route_frame), rec):
            await rec.until(lambda: len(rec.controls("closed")) >= 8, within=300)
    assert set(rec.reasons().values()) == {"server_closed: 4001"}
    closes, opens = rec.controls("closed"), rec.controls("opened")
    waits = [o.at - c.at for c, o in zip(closes, opens[1:], strict=False)]
    # not a reconnect every 0.5 s for ever: Binance limits connections per IP
    assert waits[:7] == pytest.approx([0.5, 1, 2, 4, 8, 16, 30])


async def test_rotation_at_23_h_50_opens_the_new_connection_first_and_misses_no_frame(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    # a frame every 20 s: few frames over the day, each seen by both during the overlap
    config = SimConfig(symbols=("BTCUSDT",), rate=0.05)
    async with simulated(config, record=10_000) as sim:
        spec = one_spec(sim.ws_url, "aggTrade")  # PIPELINE_ROTATE_AFTER: 85,800 s
        async with connected(spec, rec):
            await rec.until(lambda: rec.controls("rotated"), within=90_000)
            n = len(rec.frames())
            await rec.until(lambda: len(rec.frames()) > n, within=60)
    assert sim.sent is not None
    old, new = rec.controls("opened")
    rotated, = rec.controls("rotated")
    assert new.at - old.at == pytest.approx(85_800)  # 23 h 50 min after the old one opened
    assert rotated.conn == old.conn and rotated.body["new_conn"] == new.conn
    assert rotated.body["age_s"] >= 85_800
    # the server's 24 h close never came: the old connection ended by our rotation
    assert rec.reasons()[old.conn] == "rotated"
    assert rotated.at - old.at < config.lifetime
    assert [c["reason"] for c in sim.closed][:1] == ["closed by client"]
    # the new connection had delivered before the old one was told to go
    first_new = next(i for i, e in enumerate(rec.seen) if not e.ctl and e.conn == new.conn)
    assert first_new < rec.seen.index(rotated)
    logged = rec.frames("raw:market:aggTrade")
    assert {p for cid, p in sim.sent if cid == "sim-1"} <= {f.frame for f in logged}
    agg_ids = sorted({orjson.loads(f.frame)["data"]["a"] for f in logged})
    assert agg_ids == list(range(agg_ids[0], agg_ids[-1] + 1))  # and no id missing between
    assert len(agg_ids) < len(logged)  # the overlap logged a frame twice


async def test_a_quiet_stream_rotates_on_connect_when_its_spec_says_so(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT",))) as sim:
        sim.set_silence(True)  # like a user-data stream with nothing to say
        url = f"{sim.ws_url}/market/stream?streams=btcusdt@aggTrade"
        spec = ConnSpec("usr", "market", lambda: url, route_frame, rotate_after=3600,
                        handover_on_connect=True)
        async with connected(spec, rec):
            await rec.until(lambda: len(rec.controls("rotated")) >= 2, within=10_000)
    opened = rec.controls("opened")
    for old, new, rot in zip(opened, opened[1:], rec.controls("rotated"), strict=False):
        assert (rot.conn, rot.body["new_conn"]) == (old.conn, new.conn)
        assert new.at - old.at == pytest.approx(3600)
        assert rot.at == pytest.approx(new.at)  # handed over as soon as it was up
        assert rec.reasons()[old.conn] == "rotated"


async def test_redis_killed_and_restarted_keeps_the_websocket_and_accounts_for_every_frame(
        sim: Simulator, tmp_path: FsPath) -> None:
    # Real clock: the outage is a real redis-server killed and restarted under the writer's
    # thread. AOF with fsync always: what Redis acknowledged survives the kill, as the SPEC
    # promises.
    server = LocalRedis(tmp_path / "aof", args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    r = server.client()
    try:
        settings = settings_for(server.url, sim.ws_url, PIPELINE_BUFFER_FRAMES="30")
        async with ingesting(settings) as ingest:
            await eventually(lambda: r.xlen("raw:market:aggTrade") >= 20)
            server.kill()
            await eventually(lambda: ingest.writer.buffer.dropped >= 50)
            server.start()
            await eventually(lambda: _xlen_or_zero(r, "raw:market:aggTrade") > 0
                             and controls(r, "raw:market:aggTrade", "gap"))
            n = r.xlen("raw:market:aggTrade")
            await eventually(lambda: r.xlen("raw:market:aggTrade") > n + 10)  # flowing again
        opened = controls(r, KEY_CONN_MARKET, "opened")
        closed = controls(r, KEY_CONN_MARKET, "closed")
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


async def test_all_symbols_are_the_trading_symbols_of_exchange_info(sim: Simulator) -> None:
    settings = load_settings(env={"PIPELINE_SYMBOLS": "ALL", "BINANCE_REST_URL": sim.rest_url})
    assert settings.symbols is None
    assert await resolve_symbols(settings) == ("BTCUSDT", "ETHUSDT", "SOLUSDT")


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
    kept = [f[b"frame"] for _, f in xrange(r, "raw:market:markPrice")]
    assert kept[-1] == b"new" and len(kept) <= 51


async def test_a_key_redis_keeps_refusing_does_not_stall_the_other_keys(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    r.set("raw:market:markPrice", "not a stream")  # every XADD to it: WRONGTYPE
    # real clock: the writer's thread retries against Redis (its retry rule: test_buffer.py)
    writer = LogWriter(make_client(redis_server.url), backoff=(0.001, 0.002))
    dropped = metrics.FRAMES_DROPPED.labels("raw:market:markPrice")._value.get()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(50):
            writer.append_frame("raw:market:markPrice", b"m", 1.0, "c", 2 * i + 1)
            writer.append_frame("raw:market:aggTrade", b"a", 1.0, "c", 2 * i + 2)
        with trio.fail_after(10):
            await writer.flush()
        nursery.cancel_scope.cancel()
    assert r.xlen("raw:market:aggTrade") == 50
    assert metrics.FRAMES_DROPPED.labels("raw:market:markPrice")._value.get() - dropped >= 50


@pytest.mark.parametrize(("frame", "name"), [
    (b'{"stream":"btcusdt@depth20@100ms","data":{"e":"depthUpdate"}}', b"btcusdt@depth20@100ms"),
    (b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPr', b"btcusdt@markPrice@1s"),
    (b'{"stream":"btcusdt@aggTrade', None),  # the name itself is cut
    (b'{"result":null,"id":1}', None),
    (b'{"stream": "btcusdt@aggTrade","data":{}}', None),  # not Binance's bytes
    (b'{"stream":"' + b"x" * STREAM_NAME_SCAN + b'","data":{}}', None),
])
def test_the_stream_name_is_read_from_the_wrappers_first_bytes(frame: bytes,
                                                               name: bytes | None) -> None:
    assert stream_name(frame) == name


def test_a_truncated_frame_that_names_its_stream_is_routed_to_that_streams_key() -> None:
    assert route_frame(b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPr') == \
        "raw:market:markPrice"
    assert route_frame(b'{"stream":"btcusdt@aggTrade') == KEY_OTHER


def test_cached_routing_gives_the_same_key_as_route_frame_for_every_kind_of_frame() -> None:
    frames_ = [b'{"stream":"btcusdt@aggTrade","data":{}}', b'{"stream":"ethusdt@depth20@100ms",',
               b'{"stream":"!markPrice@arr@1s","data":[]}', b'{"stream":"btcusdt@nosuch","d":1}',
               b'{"stream":"btcusdt@aggTrade', b'{"result":null,"id":1}', b"\x00binary",
               b"not json", *malformed_frames(5, 0)[:2]]
    frames_ = [f if isinstance(f, bytes) else f.encode() for f in frames_]
    routed = cached_router()
    for _ in range(2):  # the second time from the cache
        assert [routed(f) for f in frames_] == [route_frame(f) for f in frames_]


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_healthz_is_503_while_a_ticking_connection_delivers_nothing_and_200_once_it_does(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    # real clock, real sockets, the ingestor's own /healthz over HTTP
    flowing = [True]

    async def frames_while_flowing(peer: Peer) -> None:
        await peer.accept()
        for i in itertools.count(1):
            if flowing[0]:
                await peer.text(b'{"stream":"btcusdt@markPrice@1s","data":{"E":%d}}' % i)
            await trio.sleep(0.05)

    server = HostileServer(lambda n: frames_while_flowing)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.run)
        settings = settings_for(redis_server.url, url, PIPELINE_MARKET_STREAMS="markPrice@1s",
                                PIPELINE_SILENCE_TIMEOUT="1")
        async with ingesting(settings) as ingest:
            http = metrics.serve(0, ingest.healthy, host="127.0.0.1")
            port = http.server_port
            try:
                await eventually(lambda: r.xlen("raw:market:markPrice") >= 5)
                assert await trio.to_thread.run_sync(healthz, port) == 200
                flowing[0] = False  # connected, and nothing comes
                await trio.sleep(1.5)
                codes = []
                for _ in range(8):  # across reconnects to a server that stays silent
                    codes.append(await trio.to_thread.run_sync(healthz, port))
                    await trio.sleep(0.25)
                assert codes == [503] * 8
                flowing[0] = True
                with trio.fail_after(10):
                    # the answer comes from another thread's HTTP server: poll it
                    while await trio.to_thread.run_sync(healthz, port) != 200:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            finally:
                http.shutdown()
                http.server_close()
        nursery.cancel_scope.cancel()
    assert controls(r, KEY_CONN_MARKET, "silent")


# --- the command line --------------------------------------------------------------------------

def test_unreachable_redis_stops_the_command_with_one_line_and_exit_2() -> None:
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
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis, tmp_path: FsPath) -> None:
    env = {"REDIS_URL": redis_server.url, "BINANCE_WS_URL": sim.ws_url,
           "PIPELINE_SYMBOLS": "BTCUSDT", "PIPELINE_MARKET_STREAMS": "aggTrade"}
    with (tmp_path / "stderr").open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "pipeline", "ingest", "market"], env={**_clean_env(), **env},
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            await eventually(lambda: r.xlen("raw:market:aggTrade") >= 10, within=20)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 0, (tmp_path / "stderr").read_text()
    closed, = controls(r, KEY_CONN_MARKET, "closed")
    assert closed.body["reason"] == "shutdown"
    assert max(f.seq for f in frames(r, "raw:market:aggTrade")) == closed.body["frames"]


def _clean_env() -> dict[str, str]:
    import os
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
