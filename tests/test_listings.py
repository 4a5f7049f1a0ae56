"""Listings that change while the market ingestor runs (`PIPELINE_SYMBOLS=ALL`): exchangeInfo
is read again every `PIPELINE_LISTINGS_EVERY` s, a new TRADING symbol of the shard is
SUBSCRIBEd (on a connection with room, paced under the control-message limit), a delisted one
UNSUBSCRIBEd, each a `listed` / `delisted` control entry in `raw:conn:market`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
import redis
import trio
import trio.testing

from pipeline.config import load_settings
from pipeline.eventlog import ControlEntry, FrameEntry, decode_entry
from pipeline.ingest_market import (
    MarketIngest,
    conn_spec,
    listing_changes,
    run_market_ingest,
)
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.streams import MarketPlan, PlannedConnection, Shard, parse_stream_kinds, shard_of
from pipeline.wsconn import Timing
from projections.core.keys import KEY_CONN_MARKET
from tests.recorder import Recorder
from tests.test_ingest_market import FAST, NO_REDIS, connected, eventually, simulated

KINDS = parse_stream_kinds("aggTrade,bookTicker")  # one stream on /market, one on /public


def info(*rows: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """An exchangeInfo answer: (symbol, status[, contract type])."""
    return {"symbols": [{"symbol": r[0], "status": r[1],
                         "contractType": r[2] if len(r) > 2 else "PERPETUAL"} for r in rows]}


# --- pure: what an exchangeInfo answer changes --------

def test_a_new_trading_symbol_is_added_and_one_no_longer_trading_is_removed() -> None:
    plan = MarketPlan.of(("BTCUSDT", "ETHUSDT", "SOLUSDT"), KINDS)
    added, removed = listing_changes(plan, info(
        ("BTCUSDT", "TRADING"), ("ETHUSDT", "SETTLING"), ("NEWUSDT", "TRADING"),
        ("TSLAUSDT", "TRADING", "TRADIFI_PERPETUAL"), ("PENDUSDT", "PENDING_TRADING"),
        ("bad symbol!", "TRADING")))
    # SOLUSDT is no longer listed at all: gone too; the malformed name is never subscribed
    assert added == [("NEWUSDT", False), ("TSLAUSDT", True)]
    assert removed == ["ETHUSDT", "SOLUSDT"]


def test_an_answer_with_no_trading_symbol_delists_nothing() -> None:
    plan = MarketPlan.of(("BTCUSDT", "ETHUSDT"), KINDS)
    assert listing_changes(plan, info(("BTCUSDT", "BREAK"))) == ([], [])
    assert listing_changes(plan, {"symbols": []}) == ([], [])
    assert listing_changes(plan, {}) == ([], [])


def test_a_shard_takes_only_the_listings_of_its_own_shard() -> None:
    new = [f"N{i:02d}USDT" for i in range(30)]
    plan = MarketPlan.of(("BTCUSDT",), KINDS, shard=Shard(2, 3))
    added, _ = listing_changes(plan, info(*((s, "TRADING") for s in ("BTCUSDT", *new))))
    assert [s for s, _ in added] == sorted(s for s in new if shard_of(s, 3) == 2)


def test_a_listing_goes_where_there_is_room_and_a_delisting_empties_what_it_must() -> None:
    plan = MarketPlan.of(("BTCUSDT",), KINDS, max_per_connection=2)
    assert [(c.name, c.names) for c in plan.connections] == [
        ("mkt-1", ["btcusdt@aggTrade"]), ("mkt-2", ["btcusdt@bookTicker"])]
    placed = plan.add("ETHUSDT")
    assert [(c.name, names, new) for c, names, new in placed] == [
        ("mkt-1", ["ethusdt@aggTrade"], False), ("mkt-2", ["ethusdt@bookTicker"], False)]
    placed = plan.add("SOLUSDT")  # both full: new connections, numbered on
    assert [(c.name, c.path.value, new) for c, _, new in placed] == [
        ("mkt-3", "market", True), ("mkt-4", "public", True)]
    assert plan.add("SOLUSDT") == []  # already there
    taken = plan.remove("SOLUSDT")
    assert [(c.name, names, c.names) for c, names in taken] == [
        ("mkt-3", ["solusdt@aggTrade"], []), ("mkt-4", ["solusdt@bookTicker"], [])]
    assert [c.name for c in plan.connections] == ["mkt-1", "mkt-2"]  # the empty ones left
    assert plan.remove("SOLUSDT") == []
    taken = plan.remove("BTCUSDT")
    assert plan.connections[0].names == ["ethusdt@aggTrade"]
    assert plan.add("TSLAUSDT", sessions=True)[0][0].name == "mkt-sessions-1"


# --- pacing: live SUBSCRIBEs never pass the exchange's limit --------

async def served_becomes(sim: Simulator, names: set[str]) -> None:
    """Until the simulator's one open connection is subscribed to exactly `names` (the guard
    only stops a hung test)."""
    with trio.fail_after(30):
        # the state is the simulator's, changed by what it reads off the socket
        while [set(c.protocol.streams) for c in sim.connections.values()] != [names]:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_a_burst_of_listings_is_subscribed_at_five_messages_a_second(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    names = [f"s{i:02d}usdt@aggTrade" for i in range(40)]
    async with simulated(SimConfig(symbols=("BTCUSDT",), rate=5)) as sim:
        settings = load_settings(env={"REDIS_URL": NO_REDIS, "BINANCE_WS_URL": sim.ws_url})
        planned = PlannedConnection("mkt-1", KINDS[0].path, ["btcusdt@aggTrade"])
        spec = conn_spec(settings, planned, params_per_message=1)  # one stream a message
        async with connected(spec, rec) as conn:
            await rec.until(lambda: rec.frames(), within=30)
            started = trio.current_time()
            planned.names.extend(names)
            await conn.change_streams(names, ())
            took = trio.current_time() - started
            await served_becomes(sim, {"btcusdt@aggTrade", *names})
            planned.names.remove("btcusdt@aggTrade")
            await conn.change_streams((), ["btcusdt@aggTrade"])
            await served_becomes(sim, set(names))
    # 40 messages, each 0.2 s after the one before: the exchange (10 a second) never closed it
    assert took >= 39 * Timing().control_interval
    assert {c.body["reason"] for c in rec.controls("closed")} <= {"shutdown"}
    assert len(rec.controls("opened")) == 1


async def test_a_link_that_opens_after_a_change_carries_what_the_plan_holds_now(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with simulated(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=5)) as sim:
        settings = load_settings(env={"REDIS_URL": NO_REDIS, "BINANCE_WS_URL": sim.ws_url})
        planned = PlannedConnection("mkt-1", KINDS[0].path, ["btcusdt@aggTrade"])
        spec = conn_spec(settings, planned, url_streams=1)
        async with connected(spec, rec) as conn:
            await rec.until(lambda: rec.frames(), within=30)
            planned.names[:] = ["ethusdt@aggTrade", "solusdt@aggTrade"]
            await conn.change_streams(["ethusdt@aggTrade", "solusdt@aggTrade"],
                                      ["btcusdt@aggTrade"])
            await served_becomes(sim, {"ethusdt@aggTrade", "solusdt@aggTrade"})
            sim.drop()  # the next link names ethusdt in its URL and SUBSCRIBEs solusdt
            await rec.until(lambda: len(rec.controls("opened")) == 2, within=60)
            await served_becomes(sim, {"ethusdt@aggTrade", "solusdt@aggTrade"})
            served = next(iter(sim.connections.values())).protocol.streams
    assert list(served) == ["ethusdt@aggTrade", "solusdt@aggTrade"]  # URL first, then SUBSCRIBE
    assert rec.controls("opened")[1].body["streams"] == 2


# --- the whole ingestor, on the simulator and a real Redis --------

@asynccontextmanager
async def following(sim: Simulator, server: LocalRedis, **env: str
                    ) -> AsyncIterator[MarketIngest]:
    settings = load_settings(env={
        "REDIS_URL": server.url, "BINANCE_WS_URL": sim.ws_url, "BINANCE_REST_URL": sim.rest_url,
        "PIPELINE_SYMBOLS": "ALL", "PIPELINE_MARKET_STREAMS": "aggTrade",
        "PIPELINE_LISTINGS_EVERY": "1", **env})
    client = make_client(server.url)
    async with trio.open_nursery() as nursery:
        ingest = await nursery.start(partial(run_market_ingest, settings, client,
                                             ("BTCUSDT", "ETHUSDT"), timing=FAST))
        yield ingest
        ingest.stop()
    client.close()


def conn_log(r: redis.Redis, ctl: str) -> list[ControlEntry]:
    entries = [decode_entry(i, f) for i, f in r.xrange(KEY_CONN_MARKET)]  # type: ignore[union-attr]
    return [e for e in entries if isinstance(e, ControlEntry) and e.ctl == ctl]


def frames_of(r: redis.Redis, symbol: str) -> list[FrameEntry]:
    out = []
    for entry_id, fields in r.xrange("raw:market:aggTrade"):  # type: ignore[union-attr]
        entry = decode_entry(entry_id, fields)
        if isinstance(entry, FrameEntry) and orjson.loads(entry.frame)["data"]["s"] == symbol:
            out.append(entry)
    return out


async def test_a_symbol_listed_and_one_delisted_while_running(
        nursery: trio.Nursery, redis_server: LocalRedis, r: redis.Redis) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=50))
    await nursery.start(sim.run)
    async with following(sim, redis_server) as ingest:
        await eventually(lambda: frames_of(r, "ETHUSDT") and frames_of(r, "BTCUSDT"))
        sim.list_symbol("NEWUSDT")
        sim.delist("ETHUSDT")
        await eventually(lambda: conn_log(r, "listed") and conn_log(r, "delisted"))
        await eventually(lambda: len(frames_of(r, "NEWUSDT")) >= 5)
        # what the exchange holds for the connection: ETHUSDT's stream unsubscribed
        await eventually(lambda: [set(c.protocol.streams) for c in sim.connections.values()]
                         == [{"btcusdt@aggTrade", "newusdt@aggTrade"}])
        assert ingest.listings is not None and ingest.listings.checks >= 1
    listed, = conn_log(r, "listed")
    delisted, = conn_log(r, "delisted")
    assert listed.body == {"symbol": "NEWUSDT", "streams": ["newusdt@aggTrade"],
                           "conns": ["mkt-1"]}
    assert delisted.body == {"symbol": "ETHUSDT", "streams": ["ethusdt@aggTrade"],
                             "conns": ["mkt-1"]}
    # on the connection that was open, without a reconnect
    opened = conn_log(r, "opened")
    assert len(opened) == 1
    assert {f.conn for f in frames_of(r, "NEWUSDT")} == {opened[0].conn}


async def test_a_listing_with_no_room_opens_a_connection_and_a_delisting_that_empties_one_closes_it(
        nursery: trio.Nursery, redis_server: LocalRedis, r: redis.Redis) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=50))
    await nursery.start(sim.run)
    client = make_client(redis_server.url)
    settings = load_settings(env={
        "REDIS_URL": redis_server.url, "BINANCE_WS_URL": sim.ws_url,
        "BINANCE_REST_URL": sim.rest_url, "PIPELINE_SYMBOLS": "ALL",
        "PIPELINE_MARKET_STREAMS": "aggTrade", "PIPELINE_LISTINGS_EVERY": "1"})
    async with trio.open_nursery() as inner:
        ingest = await inner.start(partial(run_market_ingest, settings, client,
                                           ("BTCUSDT", "ETHUSDT"), timing=FAST,
                                           max_per_connection=1))
        await eventually(lambda: len(conn_log(r, "opened")) == 2)
        sim.list_symbol("NEWUSDT")
        await eventually(lambda: frames_of(r, "NEWUSDT"))
        sim.delist("ETHUSDT")
        await eventually(lambda: conn_log(r, "delisted") and conn_log(r, "closed"))
        names = sorted(c.spec.name for c in ingest.connections)
        ingest.stop()
    client.close()
    opened = {e.conn: e.body["name"] for e in conn_log(r, "opened")}
    assert sorted(opened.values()) == ["mkt-1", "mkt-2", "mkt-3"]
    assert {opened[f.conn] for f in frames_of(r, "NEWUSDT")} == {"mkt-3"}
    closed = conn_log(r, "closed")
    ethusdt_conn = next(c for c, name in opened.items() if name == "mkt-2")
    assert [e.body["reason"] for e in closed if e.conn == ethusdt_conn] == ["shutdown"]
    assert names == ["mkt-1", "mkt-3"]  # and /healthz no longer looks at it
