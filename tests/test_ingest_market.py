"""`pipeline ingest market` against a real redis-server and a websocket server over real sockets.

What a user of the log checks: every frame the exchange sent is in its `raw:` key byte for byte,
connections come and go with control entries in `raw:conn:market`, nothing is missed across a
rotation, a Redis outage loses only what it must and says how much.
"""

from __future__ import annotations

import signal
import subprocess
import sys
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
from pipeline.eventlog import ControlEntry, FrameEntry, decode_entry, route_frame
from pipeline.ingest_market import (
    MarketIngest,
    cached_router,
    market_specs,
    resolve_symbols,
    run_market_ingest,
)
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.simulator.market import malformed_frames
from pipeline.streams import Path
from pipeline.writer import LogWriter
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from tests.conftest import ROOT, run_cli

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
    opened = controls(r, "raw:conn:market", "opened")
    assert sorted(c.body["path"] for c in opened) == ["market", "public"]
    conn_of = {c.body["path"]: c.conn for c in opened}
    assert {f.conn for f in frames(r, "raw:market:depth20")} == {conn_of["public"]}
    assert {f.conn for f in frames(r, "raw:market:markPrice")} == {conn_of["market"]}
    assert stream_names(r, "raw:market:depth20") == {"btcusdt@depth20@100ms",
                                                     "ethusdt@depth20@100ms"}
    assert stream_names(r, "raw:market:markPrice") == {"btcusdt@markPrice@1s",
                                                       "ethusdt@markPrice@1s"}
    assert r.xlen("raw:market:other") == 0


async def test_streams_beyond_the_url_are_subscribed_and_their_replies_logged_as_other(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.ingest_market.URL_STREAMS", 1)
    monkeypatch.setattr("pipeline.wsconn.PARAMS_PER_MESSAGE", 1)  # one SUBSCRIBE per stream
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SYMBOLS=",".join(symbols))
    spec, = market_specs(settings, symbols)
    assert spec.subscribe == ("ethusdt@aggTrade", "solusdt@aggTrade")
    async with ingesting(settings, symbols):
        await eventually(lambda: len(stream_names(r, "raw:market:aggTrade")) == 3)
    replies = [orjson.loads(f.frame) for f in frames(r, "raw:market:other")]
    assert replies == [{"result": None, "id": replies[0]["id"]},
                       {"result": None, "id": replies[0]["id"] + 1}]


async def test_more_streams_than_one_connection_takes_are_spread_over_several(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SYMBOLS=",".join(symbols),
                            PIPELINE_MARKET_STREAMS="aggTrade,markPrice@1s")
    async with ingesting(settings, symbols, max_per_connection=2):
        await eventually(lambda: len(stream_names(r, "raw:market:markPrice")) == 3
                         and len(stream_names(r, "raw:market:aggTrade")) == 3)
    opened = controls(r, "raw:conn:market", "opened")
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
    assert len(controls(r, "raw:conn:market", "opened")) == 1  # never reconnected


async def test_silent_connection_is_recorded_and_replaced(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_MARKET_STREAMS="markPrice@1s",
                            PIPELINE_SILENCE_TIMEOUT="0.3")
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:markPrice") >= 3)
        sim.set_silence(True)
        await eventually(lambda: controls(r, "raw:conn:market", "silent"))
        sim.set_silence(False)
        await eventually(lambda: len(controls(r, "raw:conn:market", "opened")) >= 2)
        n = r.xlen("raw:market:markPrice")
        await eventually(lambda: r.xlen("raw:market:markPrice") > n)
    silent = controls(r, "raw:conn:market", "silent")[0]
    first = controls(r, "raw:conn:market", "opened")[0]
    assert silent.conn == first.conn and silent.body["seconds"] >= 0.3
    closed = {c.conn: c.body["reason"] for c in controls(r, "raw:conn:market", "closed")}
    assert closed[first.conn] == "silent"
    assert frames(r, "raw:market:markPrice")[-1].conn != first.conn
    assert "wrong path" in caplog.text


async def test_stream_on_the_wrong_path_is_noticed_as_silence(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SILENCE_TIMEOUT="0.3")
    kind = attrs.evolve(settings.market_streams[0], path=Path.PUBLIC, ticks_every_second=True)
    settings = attrs.evolve(settings, market_streams=(kind,))  # aggTrade asked on /public
    async with ingesting(settings):
        await eventually(lambda: controls(r, "raw:conn:market", "silent"))
    assert r.xlen("raw:market:aggTrade") == 0


async def test_dropped_connection_reconnects_with_a_new_connection_id(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url)
    async with ingesting(settings):
        await eventually(lambda: r.xlen("raw:market:aggTrade") >= 3)
        sim.drop("market")
        await eventually(lambda: len(controls(r, "raw:conn:market", "opened")) >= 2)
        n = r.xlen("raw:market:aggTrade")
        await eventually(lambda: r.xlen("raw:market:aggTrade") > n)
    first, second = controls(r, "raw:conn:market", "opened")[:2]
    assert first.conn != second.conn and first.conn.startswith("mkt-1-")
    reasons = {c.conn: c.body["reason"] for c in controls(r, "raw:conn:market", "closed")}
    assert reasons[first.conn].startswith("server_closed")
    assert reasons[second.conn] == "shutdown"


async def test_rotation_opens_the_new_connection_first_and_misses_no_frame(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_ROTATE_AFTER="0.3")
    async with ingesting(settings) as ingest:
        await eventually(lambda: len([c for c in sim.closed
                                      if c["reason"] == "closed by client"]) >= 3)
        await ingest.writer.flush()
    logged = frames(r, "raw:market:aggTrade")
    assert sim.sent is not None
    reasons = {c.conn: c.body["reason"] for c in controls(r, "raw:conn:market", "closed")}
    # our n-th connection is the simulator's `sim-n`: they were opened one after the other
    ours = [c.conn for c in controls(r, "raw:conn:market", "opened")]
    rotated_away = {f"sim-{n}" for n, conn in enumerate(ours, 1) if reasons[conn] == "rotated"}
    assert len(rotated_away) >= 3
    sent_there = [payload for cid, payload in sim.sent if cid in rotated_away]
    assert set(sent_there) <= {f.frame for f in logged}  # every frame of every old connection
    agg_ids = sorted({orjson.loads(f.frame)["data"]["a"] for f in logged})
    assert agg_ids == list(range(agg_ids[0], agg_ids[-1] + 1))  # and no id missing between
    assert len(agg_ids) < len(logged)  # the overlaps logged some frames twice
    for rot in controls(r, "raw:conn:market", "rotated"):
        assert reasons[rot.conn] == "rotated"
        # the new connection had delivered before the old one was told to go
        assert next(f for f in logged if f.conn == rot.body["new_conn"]).recv_ts <= rot.recv_ts


async def test_a_quiet_stream_rotates_on_connect_when_its_spec_says_so(
        sim: Simulator, redis_server: LocalRedis, r: redis.Redis) -> None:
    sim.set_silence(True)  # like a user-data stream with nothing to say
    url = f"{sim.ws_url}/market/stream?streams=btcusdt@aggTrade"
    spec = ConnSpec("usr", "market", lambda: url, route_frame, rotate_after=0.2,
                    handover_on_connect=True)
    writer = LogWriter(make_client(redis_server.url))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.start_soon(WsConnection(spec, writer, conn_key="raw:conn:market", timing=FAST).run)
        await eventually(lambda: len(controls(r, "raw:conn:market", "rotated")) >= 2)
        nursery.cancel_scope.cancel()
    reasons = {c.conn: c.body["reason"] for c in controls(r, "raw:conn:market", "closed")}
    for rot in controls(r, "raw:conn:market", "rotated")[:2]:
        assert reasons[rot.conn] == "rotated"


async def test_redis_killed_and_restarted_keeps_the_websocket_and_accounts_for_every_frame(
        sim: Simulator, tmp_path: FsPath) -> None:
    # AOF with fsync always: what Redis acknowledged survives the kill, as the SPEC promises
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
        opened = controls(r, "raw:conn:market", "opened")
        closed = controls(r, "raw:conn:market", "closed")
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


def test_cached_routing_gives_the_same_key_as_route_frame_for_every_kind_of_frame() -> None:
    frames_ = [b'{"stream":"btcusdt@aggTrade","data":{}}', b'{"stream":"ethusdt@depth20@100ms",',
               b'{"stream":"!markPrice@arr@1s","data":[]}', b'{"stream":"btcusdt@nosuch","d":1}',
               b'{"stream":"btcusdt@aggTrade', b'{"result":null,"id":1}', b"\x00binary",
               b"not json", *malformed_frames(5, 0)[:2]]
    frames_ = [f if isinstance(f, bytes) else f.encode() for f in frames_]
    routed = cached_router()
    for _ in range(2):  # the second time from the cache
        assert [routed(f) for f in frames_] == [route_frame(f) for f in frames_]


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
    closed, = controls(r, "raw:conn:market", "closed")
    assert closed.body["reason"] == "shutdown"
    assert max(f.seq for f in frames(r, "raw:market:aggTrade")) == closed.body["frames"]


def _clean_env() -> dict[str, str]:
    import os
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
