"""Market ingest shards: `PIPELINE_SHARD=i/n` splits the symbols so that n ingestors cover the
list exactly once, each on connections named for its shard, and `pipeline status` shows the
shards and the one that is missing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import orjson
import pytest
import redis
import trio

from pipeline.config import load_settings
from pipeline.errors import SettingsError
from pipeline.eventlog import FrameEntry, decode_entry
from pipeline.ingest_market import MarketIngest, market_specs, run_market_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.simulator.listings import market_symbols
from pipeline.status import collect
from pipeline.streams import MarketPlan, Shard, parse_shard, parse_stream_kinds, shard_of
from tests.conftest import run_cli
from tests.test_ingest_market import FAST, eventually

WHOLE_MARKET = (*market_symbols(("BTCUSDT",), 550), "BTCUSDT_261225", "ETHUSDT_270326")


def test_three_shards_cover_a_symbol_list_exactly_once() -> None:
    parts = [Shard(i, 3).take(WHOLE_MARKET) for i in (1, 2, 3)]
    assert sorted(s for part in parts for s in part) == sorted(WHOLE_MARKET)  # no hole...
    assert sum(len(p) for p in parts) == len(set(WHOLE_MARKET))  # ...and no overlap
    assert all(len(p) > len(WHOLE_MARKET) / 6 for p in parts)  # none is nearly empty
    # each keeps the list's order
    assert all(list(p) == [s for s in WHOLE_MARKET if s in p] for p in parts)


def test_a_symbols_shard_depends_on_its_name_alone() -> None:
    before = {s: shard_of(s, 3) for s in WHOLE_MARKET}
    grown = ("NEWUSDT", *WHOLE_MARKET[:100], "OTHERUSDT", *WHOLE_MARKET[100:])
    # a listing (anywhere in the list) moves no other symbol, in any process, on any host
    assert {s: shard_of(s, 3) for s in WHOLE_MARKET} == before
    assert all(Shard(shard_of(s, 3), 3).owns(s) for s in grown)
    assert shard_of("btcusdt", 3) == shard_of("BTCUSDT", 3)
    assert {shard_of("BTCUSDT", 3), shard_of("ETHUSDT", 3), shard_of("SOLUSDT", 3)} <= {1, 2, 3}


@pytest.mark.parametrize("bad", ["0/3", "4/3", "3", "a/b", "1/257", "-1/3", "1/0"])
def test_a_shard_is_i_of_n(bad: str) -> None:
    assert parse_shard("2/3") == Shard(2, 3) and parse_shard(" 1 / 1 ") == Shard(1, 1)
    assert parse_shard("") is None
    with pytest.raises(SettingsError, match="PIPELINE_SHARD"):
        parse_shard(bad)


def test_a_bad_shard_stops_the_command_with_one_line() -> None:
    done = run_cli("ingest", "market", "--shard", "4/3", env={"REDIS_URL": "redis://127.0.0.1:1"})
    assert done.returncode == 2
    assert done.stderr.startswith("pipeline: bad setting PIPELINE_SHARD:")
    assert len(done.stderr.splitlines()) == 1


def test_the_first_shard_alone_carries_the_all_market_streams_and_names_carry_the_shard() -> None:
    kinds = parse_stream_kinds("!markPrice@arr@1s,aggTrade,depth20@100ms")
    symbols = WHOLE_MARKET[:30]
    plans = {i: MarketPlan.of(symbols, kinds, shard=Shard(i, 3)) for i in (1, 2, 3)}
    carried = {i: [n for c in p.connections for n in c.names] for i, p in plans.items()}
    assert [i for i, names in carried.items() if "!markPrice@arr@1s" in names] == [1]
    assert {c.name for c in plans[2].connections} == {"mkt-s2of3-1", "mkt-s2of3-2"}
    every = sorted(n for names in carried.values() for n in names)
    unsharded = MarketPlan.of(symbols, kinds)
    assert every == sorted(n for c in unsharded.connections for n in c.names)
    assert {c.name for c in unsharded.connections} == {"mkt-1", "mkt-2"}  # as before
    in_sessions = MarketPlan.of(symbols, kinds, shard=Shard(3, 3), sessions=symbols[:9])
    assert {c.name for c in in_sessions.connections if c.sessions} <= {
        "mkt-sessions-s3of3-1", "mkt-sessions-s3of3-2"}
    settings = load_settings(env={"PIPELINE_SHARD": "3/3", "PIPELINE_MARKET_STREAMS": "aggTrade",
                                  "BINANCE_WS_URL": "ws://127.0.0.1:1"})
    spec, = market_specs(settings, symbols)
    assert spec.name == "mkt-s3of3-1"
    assert spec.streams_now is not None
    assert {n.split("@")[0].upper() for n in spec.streams_now()} == set(
        Shard(3, 3).take(symbols))


# --- three ingestors on one Redis --------

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "BNBUSDT", "ADAUSDT",
           "LINKUSDT", "AVAXUSDT")


@asynccontextmanager
async def shard_ingestors(sim: Simulator, server: LocalRedis, count: int
                          ) -> AsyncIterator[list[MarketIngest]]:
    clients = [make_client(server.url) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        ingests = []
        for i, client in enumerate(clients, start=1):
            settings = load_settings(env={
                "REDIS_URL": server.url, "BINANCE_WS_URL": sim.ws_url,
                "PIPELINE_SYMBOLS": ",".join(SYMBOLS), "PIPELINE_MARKET_STREAMS": "aggTrade",
                "PIPELINE_SHARD": f"{i}/{count}"})
            ingests.append(await nursery.start(partial(
                run_market_ingest, settings, client, SYMBOLS, timing=FAST)))
        yield ingests
        for ingest in ingests:
            ingest.stop()
    for client in clients:
        client.close()


def symbols_by_conn(r: redis.Redis) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for entry_id, fields in r.xrange("raw:market:aggTrade"):  # type: ignore[union-attr]
        entry = decode_entry(entry_id, fields)
        assert isinstance(entry, FrameEntry)
        out.setdefault(entry.conn, set()).add(orjson.loads(entry.frame)["data"]["s"])
    return out


async def test_three_shard_ingestors_log_every_symbol_once_and_status_shows_the_shards(
        nursery: trio.Nursery, redis_server: LocalRedis, r: redis.Redis) -> None:
    sim = Simulator(SimConfig(symbols=SYMBOLS, rate=200))
    await nursery.start(sim.run)
    async with shard_ingestors(sim, redis_server, 3) as ingests:
        await eventually(lambda: set().union(*symbols_by_conn(r).values()) == set(SYMBOLS),
                         within=20)
        report = collect(r, prefix="websocket", max_lag=10_000, silence_timeout=30.0)
        ingests[1].stop()  # shard 2 goes away
        await eventually(lambda: not [c for c in collect(
            r, prefix="websocket", max_lag=10_000, silence_timeout=30.0).connections
            if c.shard == "2/3"])
        missing = collect(r, prefix="websocket", max_lag=10_000, silence_timeout=30.0)
    by_conn = symbols_by_conn(r)
    for conn, symbols in by_conn.items():
        index = int(conn.split("-")[1][1])  # mkt-s{i}of3-1-<hex>
        assert conn.startswith(f"mkt-s{index}of3-1-")
        assert all(shard_of(s, 3) == index for s in symbols), (conn, symbols)
    owners = {s: {c for c, syms in by_conn.items() if s in syms} for s in SYMBOLS}
    # one connection of one shard per symbol, all three shards at work
    assert all(len(conns) == 1 for conns in owners.values()), owners
    assert {int(c.split("-")[1][1]) for c in by_conn} == {1, 2, 3}
    assert sorted(c.shard for c in report.connections) == ["1/3", "2/3", "3/3"]
    assert not [p for p in report.problems if "shard" in p]
    assert [p for p in missing.problems if "shard" in p] == [
        "market shard 2/3: no open connection while other shards of 3 run: its symbols get "
        "no data"]


def test_status_prints_the_shard_of_each_connection(redis_server: LocalRedis,
                                                     r: redis.Redis) -> None:
    from pipeline.eventlog import control_entry

    now = time.time()
    for i in (1, 2):
        r.xadd("raw:conn:market", control_entry(  # type: ignore[arg-type]
            "opened", {"path": "market", "url": "ws://x", "streams": 3,
                       "name": f"mkt-s{i}of2-1"}, now, f"mkt-s{i}of2-1-abcdef"))
    done = run_cli("status", "--json", env={"REDIS_URL": redis_server.url})
    report = orjson.loads(done.stdout)
    assert {c["name"]: c["shard"] for c in report["connections"]} == {
        "mkt-s1of2-1": "1/2", "mkt-s2of2-1": "2/2"}
    table = run_cli("status", env={"REDIS_URL": redis_server.url})
    assert "mkt-s2of2-1-abcdef" in table.stdout and "2/2" in table.stdout
