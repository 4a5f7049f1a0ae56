"""Symbols that trade in sessions (TradFi perpetuals, contract type TRADIFI_PERPETUAL) are quiet
outside their session: neither the ingestor nor `pipeline status` may call them silent, while
every other connection keeps the silence rule. The plan on plain values; the ingestor on real
sockets with the simulator gone quiet; status on a real Redis seeded as the ingestor writes."""

from __future__ import annotations

import json
import time

import redis
import trio

from pipeline.eventlog import control_entry
from pipeline.health import Connection, mark_silent, trades_in_sessions
from pipeline.ingest_market import market_specs, session_symbols
from pipeline.localredis import LocalRedis
from pipeline.simulator import SimConfig, Simulator
from projections.core.keys import KEY_CONN_MARKET
from tests.conftest import run_cli
from tests.test_ingest_market import controls, eventually, ingesting, settings_for

INFO = {"symbols": [
    {"symbol": "BTCUSDT", "contractType": "PERPETUAL", "status": "TRADING"},
    {"symbol": "AAPLUSDT", "contractType": "TRADIFI_PERPETUAL", "status": "TRADING",
     "underlyingType": "EQUITY", "underlyingSubType": ["TradFi"]},
    {"symbol": "XAUUSDT", "contractType": "TRADIFI_PERPETUAL", "status": "TRADING"},
    {"symbol": "BTCUSDT_261225", "contractType": "CURRENT_QUARTER", "status": "TRADING"},
]}


def test_exchange_info_names_the_symbols_that_trade_in_sessions() -> None:
    assert session_symbols(INFO) == {"AAPLUSDT", "XAUUSDT"}
    assert session_symbols({"symbols": "?"}) == frozenset()


def test_symbols_in_sessions_get_connections_of_their_own_without_the_silence_rule() -> None:
    settings = settings_for("redis://127.0.0.1:1/0", "ws://127.0.0.1:1",
                            PIPELINE_MARKET_STREAMS="markPrice@1s,depth20@100ms")
    specs = market_specs(settings, ("BTCUSDT", "AAPLUSDT", "ETHUSDT", "XAUUSDT"),
                         session_symbols=frozenset({"AAPLUSDT", "XAUUSDT"}))
    by_name = {s.name: s for s in specs}
    assert sorted(by_name) == ["mkt-1", "mkt-2", "mkt-sessions-1", "mkt-sessions-2"]
    for name in ("mkt-1", "mkt-2"):
        assert by_name[name].silence_timeout == settings.silence_timeout
        url = by_name[name].url()
        assert isinstance(url, str) and "aaplusdt" not in url
    for name in ("mkt-sessions-1", "mkt-sessions-2"):
        assert by_name[name].silence_timeout is None
        url = by_name[name].url()
        assert isinstance(url, str) and "aaplusdt" in url and "btcusdt" not in url


def test_status_does_not_call_a_session_connection_silent() -> None:
    conns = [Connection("mkt-1-aaaaaa", "mkt-1", "market", 100.0, 3),
             Connection("mkt-sessions-1-bbbbbb", "mkt-sessions-1", "market", 100.0, 3)]
    flagged = {c.name: c.silent for c in mark_silent(conns, [], 30.0)}
    assert flagged == {"mkt-1": True, "mkt-sessions-1": False}
    assert trades_in_sessions(conns[1]) and not trades_in_sessions(conns[0])


async def test_a_quiet_session_symbol_is_not_replaced_while_others_are(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=50))
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        settings = settings_for(redis_server.url, sim.ws_url, PIPELINE_SILENCE_TIMEOUT="0.3",
                                PIPELINE_MARKET_STREAMS="markPrice@1s")
        async with ingesting(settings, ("BTCUSDT", "ETHUSDT"),
                             session_symbols=frozenset({"ETHUSDT"})):
            await eventually(lambda: len(controls(r, KEY_CONN_MARKET, "opened")) == 2)
            sim.set_silence(True)  # ETHUSDT's session over, and BTCUSDT wrongly quiet
            await eventually(lambda: len(controls(r, KEY_CONN_MARKET, "silent")) >= 2)
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    opened = {c.conn: c.body["name"] for c in controls(r, KEY_CONN_MARKET, "opened")}
    silent = {opened[c.conn] for c in controls(r, KEY_CONN_MARKET, "silent")}
    assert silent == {"mkt-1"}
    assert list(opened.values()).count("mkt-sessions-1") == 1  # never replaced


def test_pipeline_status_flags_a_silent_crypto_connection_not_a_session_one(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    long_ago = time.time() - 120
    for cid, name in (("mkt-1-aaaaaa", "mkt-1"), ("mkt-sessions-1-bbbbbb", "mkt-sessions-1")):
        r.xadd(KEY_CONN_MARKET, control_entry("opened", {"path": "market", "streams": 1,
                                                         "name": name}, long_ago, cid))
    done = run_cli("status", "--json", env={"REDIS_URL": redis_server.url})
    report = json.loads(done.stdout)
    silent = [p for p in report["problems"] if "is silent" in p]
    assert silent == ["connection mkt-1-aaaaaa (market) is silent: no frame on its path for "
                      "its whole silence timeout"]
