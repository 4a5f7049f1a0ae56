"""No single frame can freeze, fake or stale a view (issue #11, items 3 and 4), end to end.

The simulator sends crafted frames between its real ones over real websockets; `pipeline ingest
market` (or `ingest user`) logs them as received; the projector folds the log into a real
redis-server; the checks are what a reader sees (`MarketReader`, `open_orders`, the view keys)
and what an operator finds in `dlq:{projection}`. Each test is one observation of the issue:
before the checks, each failed (a view frozen, faked, or created for a symbol nobody wanted).

The market tests run the projector without pre-coalescing: with it, a poison frame that a later
frame of its stream supersedes within one batch is acknowledged unparsed (by design,
docs/architecture.md), so whether it reaches the dead letters would depend on batch timing.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import redis
import trio

from pipeline.config import Settings, load_settings
from pipeline.errors import SettingsError
from pipeline.eventlog import route_frame
from pipeline.ingest_market import run_market_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.simulator.market import MARKET, PUBLIC
from projections.client import MarketReader, open_orders
from projections.core.plausible import Bounds
from projections.shell import project as runner
from projections.shell.registry import available, bounds_from, choose
from tests.projector_support import drained, groups_of, wait_for

SYMBOLS = ("BTCUSDT", "ETHUSDT")
IN_2100_MS = 4_102_444_800_000
REAL = b'{"stream":"btcusdt@'  # what every real frame of the symbol watched here starts with


def now_ms() -> int:
    return int(time.time() * 1000)


@attrs.define
class Live:
    sim: Simulator
    settings: Settings
    r: redis.Redis
    only: str

    def dead(self, projection: str) -> list[bytes]:
        """The frames `dlq:{projection}` holds."""
        rows: Any = self.r.xrange(f"dlq:{projection}")
        return [fields[b"frame"] for _, fields in rows]

    def view(self, key: str) -> dict[str, Any]:
        raw = self.r.get(f"websocket:{key}")
        assert raw is not None, key
        return dict(json.loads(raw))

    def last_real(self, family: str) -> dict[str, Any]:
        """The payload of the newest BTCUSDT frame the simulator itself sent on a stream."""
        rows: Any = self.r.xrevrange(f"raw:market:{family}", count=200)
        for _, fields in rows:
            if _real(fields):
                return dict(orjson.loads(fields[b"frame"])["data"])
        raise AssertionError(f"no {family} frame")

    def real_since(self, family: str, after: bytes, field: str) -> set[Any]:
        """`field` of every BTCUSDT payload the simulator itself sent after entry `after`."""
        rows: Any = self.r.xrange(f"raw:market:{family}", min=b"(" + after)
        return {orjson.loads(f[b"frame"])["data"][field] for _, f in rows if _real(f)}


def _real(fields: dict[bytes, bytes]) -> bool:
    frame = fields.get(b"frame", b"")
    return frame.startswith(REAL) and b"poison" not in frame


@asynccontextmanager
async def live(redis_server: LocalRedis, streams: str, only: str) -> AsyncIterator[Live]:
    """The simulator (two symbols, 20 frames/s a connection), the market ingestor and the
    projector for `only`, until the block ends."""
    sim = Simulator(SimConfig(symbols=SYMBOLS, rate=20))
    r = redis_server.client()
    ingest_client = make_client(redis_server.url)
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = load_settings(env={
            "REDIS_URL": redis_server.url, "BINANCE_WS_URL": ws_url, "BINANCE_REST_URL": rest_url,
            "PIPELINE_SYMBOLS": ",".join(SYMBOLS), "PIPELINE_MARKET_STREAMS": streams})
        nursery.start_soon(runner.run, settings, choose(settings, only),
                           runner.RunOptions(block_ms=50, coalescing=False))
        async with trio.open_nursery() as ingesting:
            ingest = await ingesting.start(functools.partial(
                run_market_ingest, settings, ingest_client, SYMBOLS))
            try:
                yield Live(sim, settings, r, only)
            finally:
                ingest.stop()
        nursery.cancel_scope.cancel()
    ingest_client.close()
    r.close()


def inject(run: Live, frames: Iterable[str]) -> None:
    """The simulator sends `frames` on one market connection, between its real frames."""
    conn = next(c for c in run.sim.connections.values() if c.path in (MARKET, PUBLIC))
    conn.bad.extend(frames)
    conn.poke()


def logged(r: redis.Redis, frame: str) -> bytes | None:
    """The entry id of `frame` in the log, None until the ingestor has written it."""
    rows: Any = r.xrevrange(route_frame(frame.encode()), count=2000)
    raw = frame.encode()
    return next((eid for eid, f in rows if f.get(b"frame") == raw), None)


def real_after(r: redis.Redis, key: str, after: bytes) -> int:
    rows: Any = r.xrange(key, min=b"(" + after)
    return sum(1 for _, f in rows if _real(f))


async def crafted(run: Live, frames: list[str], *, follow: Iterable[str] = ()) -> bytes:
    """Send `frames`, then wait until they are logged, two real frames of each raw key in
    `follow` came after them, and the projector has folded everything (dead letters
    included). Returns the entry id of the last crafted frame."""
    await wait_for(lambda: run.r.xlen(route_frame(frames[0].encode())) > 2 or None)
    inject(run, frames)
    await wait_for(lambda: all(logged(run.r, f) for f in frames))
    last = max((logged(run.r, f) or b"0-0" for f in frames),
               key=lambda eid: tuple(int(p) for p in eid.split(b"-")))
    for key in follow:
        await wait_for(lambda key=key: real_after(run.r, key, last) >= 2)
    specs = choose(run.settings, run.only)
    await wait_for(lambda: drained(run.r, groups_of(specs)))
    return last


def mark(symbol: str = "BTCUSDT", **data: Any) -> str:
    """A markPriceUpdate frame; fields given replace the plausible ones. The word "poison"
    in the index price marks it as crafted."""
    e = now_ms()
    body = {"e": "markPriceUpdate", "E": e, "s": symbol, "p": "64000.10", "i": "64000.00",
            "P": "64000.00", "r": "0.00010000", "T": (e // 28_800_000 + 1) * 28_800_000,
            "poison": 1, **data}
    return orjson.dumps({"stream": f"{symbol.lower()}@markPrice@1s", "data": body}).decode()


def wrapped(stream: str, data: dict[str, Any]) -> str:
    return orjson.dumps({"stream": stream, "data": {**data, "poison": 1}}).decode()


# --- item 3: versions far ahead ---------------------------------------------------------------

async def test_a_mark_price_from_2100_is_dead_lettered_and_the_reader_gets_the_real_price(
        redis_server: LocalRedis) -> None:
    async with live(redis_server, "markPrice@1s", "mark_price") as run:
        poison = [mark(E=IN_2100_MS, p="1.0"), mark(E=-5000, p="2.0")]
        last = await crafted(run, poison, follow=["raw:market:markPrice"])
        reader = MarketReader(run.r, fallback=False)
        got = reader.mark_price("BTCUSDT", max_age=5)
        assert got is not None and got["mark_price"] in run.real_since("markPrice", last, "p")
        assert 0 < got["timestamp"] <= time.time() + 1
        assert sorted(run.dead("mark_price")) == sorted(f.encode() for f in poison)


async def test_a_book_id_no_stream_can_reach_does_not_freeze_the_book(
        redis_server: LocalRedis) -> None:
    async with live(redis_server, "depth20@100ms,bookTicker,aggTrade",
                    "orderbook,book_ticker,last_price") as run:
        await wait_for(lambda: run.r.exists("websocket:orderbook:btcusdt:20",
                                            "websocket:last_price:btcusdt") == 2)
        book, trade = run.last_real("depth20"), run.last_real("aggTrade")
        levels = [["64000.10", "1.000"]]
        poison = [
            wrapped("btcusdt@depth20@100ms", {**book, "E": now_ms(), "u": 2**63 - 1}),
            # in range for Lua, but further than any stream goes in a second: the store says no
            wrapped("btcusdt@depth20@100ms", {**book, "E": now_ms(), "u": book["u"] + 2**52,
                                              "b": levels, "a": levels}),
            wrapped("btcusdt@bookTicker", {"e": "bookTicker", "u": 2**63 - 1, "E": now_ms(),
                                           "T": now_ms(), "s": "BTCUSDT", "b": "1.0",
                                           "B": "1", "a": "1.1", "A": "1"}),
            wrapped("btcusdt@aggTrade", {**trade, "E": now_ms(), "a": trade["a"] + 2**52,
                                         "p": "1.0"}),
        ]
        last = await crafted(run, poison, follow=["raw:market:depth20", "raw:market:bookTicker",
                                                  "raw:market:aggTrade"])
        assert run.view("orderbook:btcusdt:20")["last_update_id"] in run.real_since(
            "depth20", last, "u")
        assert run.view("book_ticker:btcusdt")["update_id"] in run.real_since(
            "bookTicker", last, "u")
        assert run.view("last_price:btcusdt")["agg_trade_id"] in run.real_since(
            "aggTrade", last, "a")
        assert sorted(run.dead("orderbook")) == sorted(f.encode() for f in poison[:2])
        assert run.dead("book_ticker") == [poison[2].encode()]
        assert run.dead("last_price") == [poison[3].encode()]


def candle(t: int, *, e: int, closed: bool = True, close: str = "64000.10") -> str:
    return wrapped("btcusdt@kline_1m", {"e": "kline", "E": e, "s": "BTCUSDT", "k": {
        "t": t, "T": t + 59_999, "s": "BTCUSDT", "i": "1m", "f": 1, "L": 2, "o": "64000.00",
        "c": close, "h": "64001.00", "l": "63999.00", "v": "1.5", "n": 2, "x": closed,
        "q": "96000.15", "V": "0.7", "Q": "44800.07", "B": "0"}})


async def test_a_closed_candle_opening_in_2100_does_not_block_later_candles(
        redis_server: LocalRedis) -> None:
    async with live(redis_server, "kline_1m", "kline") as run:
        previous = now_ms() // 60_000 * 60_000 - 60_000
        future, plausible = candle(IN_2100_MS, e=now_ms()), candle(previous, e=now_ms())
        await crafted(run, [future, plausible], follow=["raw:market:kline_1m"])
        heads: Any = run.r.lrange("websocket:klines:btcusdt:1m", 0, -1)
        opens = [json.loads(h)["open_time"] for h in heads]
        # the list also holds the REST history before it (tests/test_kline_history.py); a
        # minute may have closed since `previous`, and its candle is then the head
        last_closed = now_ms() // 60_000 * 60_000 - 60_000
        assert previous <= opens[0] <= last_closed and IN_2100_MS not in opens
        assert run.dead("kline") == [future.encode()]


# --- item 4: payload fields unchecked ---------------------------------------------------------

async def test_prices_that_are_not_decimal_strings_never_reach_a_view(
        redis_server: LocalRedis) -> None:
    async with live(redis_server, "markPrice@1s,aggTrade,depth20@100ms",
                    "mark_price,last_price,orderbook") as run:
        await wait_for(lambda: run.r.exists("websocket:orderbook:btcusdt:20",
                                            "websocket:last_price:btcusdt") == 2)
        book, trade = run.last_real("depth20"), run.last_real("aggTrade")
        # newer than the real frames for a while: a view that took one would keep it
        soon = now_ms() + 5_000
        poison = [mark(E=soon, p=None), mark(E=soon, p=64000.1), mark(E=soon, p={"x": "1"}),
                  mark(E=soon, r=["0.1"]),
                  wrapped("btcusdt@aggTrade", {**trade, "a": trade["a"] + 5_000, "q": None}),
                  wrapped("btcusdt@depth20@100ms", {**book, "u": book["u"] + 50_000,
                                                    "b": [[64000.1, "1.0"]]}),
                  wrapped("btcusdt@depth20@100ms", {**book, "u": book["u"] + 50_001,
                                                    "a": [["64000.1", "1.0", "x"]]})]
        await crafted(run, poison, follow=["raw:market:markPrice", "raw:market:aggTrade",
                                           "raw:market:depth20"])
        mark_view, trade_view = run.view("mark_price:btcusdt"), run.view("last_price:btcusdt")
        assert all(isinstance(mark_view[k], str) for k in ("mark_price", "funding_rate"))
        assert isinstance(trade_view["qty"], str)
        levels = [lv for side in ("bids", "asks") for lv in run.view("orderbook:btcusdt:20")[side]]
        assert levels and all(len(lv) == 2 and all(isinstance(x, str) for x in lv)
                              for lv in levels)
        assert sorted(run.dead("mark_price")) == sorted(f.encode() for f in poison[:4])
        assert run.dead("last_price") == [poison[4].encode()]
        assert sorted(run.dead("orderbook")) == sorted(f.encode() for f in poison[5:])


async def test_views_exist_only_for_subscribed_symbols_named_by_the_stream(
        redis_server: LocalRedis) -> None:
    async with live(redis_server, "markPrice@1s,!markPrice@arr@1s", "mark_price") as run:
        data = orjson.loads(mark("ETHUSDT", p="1.0"))["data"]
        twice = ('{"stream":"btcusdt@markPrice@1s","stream":"ethusdt@markPrice@1s","data":'
                 + orjson.dumps(data).decode() + "}")
        poison = [mark(s="XRPUSDT"), mark(s="*"), mark(s="A" * 100_000), twice]
        item = orjson.loads(mark())["data"]
        arr = orjson.dumps({"stream": "!markPrice@arr@1s", "data": [
            {**item, "s": "XRPUSDT"}, {**item, "s": "*"},
            {**item, "s": "BTCUSD_PERP", "st": 2}, {**item, "s": "BTCUSD_260626", "st": 2}]}
        ).decode()
        unsubscribed = mark("XRPUSDT")
        await crafted(run, [*poison, arr, unsubscribed], follow=["raw:market:markPrice"])
        keys = sorted(k.decode() for k in run.r.scan_iter(match="websocket:mark_price:*"))
        assert keys == ["websocket:mark_price:btcusdt", "websocket:mark_price:ethusdt"]
        assert run.view("mark_price:ethusdt")["mark_price"] != "1.0"
        assert sorted(run.dead("mark_price")) == sorted(f.encode() for f in poison)


# --- held views written before the checks -----------------------------------------------------

async def test_views_poisoned_before_the_checks_are_repaired_by_the_next_real_frames(
        redis_server: LocalRedis) -> None:
    r = redis_server.client()
    soon, before = now_ms() / 1000 + 60, now_ms() / 1000 - 5
    r.set("websocket:mark_price:btcusdt", orjson.dumps(
        {"mark_price": "1.0", "timestamp": IN_2100_MS / 1000, "source": "websocket"}),
        pxat=int(soon * 1000))
    r.set("websocket:orderbook:btcusdt:20", orjson.dumps(
        {"bids": [], "asks": [], "timestamp": before, "last_update_id": 2**63 - 1,
         "source": "websocket"}), pxat=int(soon * 1000))
    r.lpush("websocket:klines:btcusdt:1m", orjson.dumps(
        {"open_time": IN_2100_MS, "close": "1.0", "timestamp": before, "source": "websocket"}))
    async with live(redis_server, "markPrice@1s,depth20@100ms,kline_1m",
                    "mark_price,orderbook,kline") as run:
        previous = now_ms() // 60_000 * 60_000 - 60_000
        last = await crafted(run, [candle(previous, e=now_ms())],
                             follow=["raw:market:markPrice", "raw:market:depth20"])
        got = MarketReader(run.r, fallback=False).mark_price("BTCUSDT", max_age=5)
        assert got is not None and got["mark_price"] in run.real_since("markPrice", last, "p")
        assert run.view("orderbook:btcusdt:20")["last_update_id"] in run.real_since(
            "depth20", last, "u")
        heads: Any = run.r.lrange("websocket:klines:btcusdt:1m", 0, -1)
        opens = [json.loads(h)["open_time"] for h in heads]
        # the head is a real closed candle (a minute may have closed since `previous`), the
        # REST history under it, and the candle of 2100 is gone
        last_closed = now_ms() // 60_000 * 60_000 - 60_000
        assert previous <= opens[0] <= last_closed and IN_2100_MS not in opens
    r.close()


# --- user data: orders and positions ---------------------------------------------------------

async def test_an_order_event_from_2100_does_not_keep_the_order_open(
        redis_server: LocalRedis) -> None:
    from tests.test_ingest_user import events, place, running, snapshots_after, until

    async with running(redis_server) as run, trio.open_nursery() as projector:
        projector.start_soon(functools.partial(
            runner.run, run.settings, choose(run.settings, "orders,account"),
            runner.RunOptions(consumer="poison-test", block_ms=50, lease_ttl_ms=2000)))
        await snapshots_after(run, 1)
        order = place(run.sim, type="LIMIT", price="50000", quantity="0.010")
        await until(lambda: [o["orderId"] for o in open_orders(run.r)] == [order["orderId"]])
        [new] = [e for e in events(run.r, "ORDER_TRADE_UPDATE")
                 if e["o"]["i"] == order["orderId"]]
        run.sim.account._push([
            {**new, "E": IN_2100_MS, "T": IN_2100_MS,
             "o": {**new["o"], "X": "PARTIALLY_FILLED", "x": "TRADE", "T": IN_2100_MS,
                   "z": "0.001", "l": "0.001", "L": "50000"}},
            {"e": "ACCOUNT_UPDATE", "E": IN_2100_MS, "T": IN_2100_MS, "a": {
                "m": "ORDER", "B": [], "P": [{"s": "BTCUSDT", "pa": "999", "ep": "1",
                                              "bep": "1", "cr": "0", "up": "0", "mt": "cross",
                                              "iw": "0", "ps": "BOTH"}]}}])
        await until(lambda: any(e["E"] == IN_2100_MS for e in events(run.r, "ACCOUNT_UPDATE")))
        run.sim.account.control("fill", {"orderId": order["orderId"]})
        await until(lambda: open_orders(run.r) == [], within=15)
        await until(lambda: run.r.exists("websocket:position:btcusdt")
                    and b'"999"' not in (run.r.get("websocket:position:btcusdt") or b""))
        rows: Any = run.r.xrange("websocket:orders")
        statuses = [f[b"status"] for _, f in rows if f[b"order_id"] == b"%d" % order["orderId"]]
        assert statuses == [b"NEW", b"FILLED"]
        # the account fold reads the order event too (for the position events): both are its
        await until(lambda: run.r.xlen("dlq:orders") == 1 and run.r.xlen("dlq:account") == 2)
        projector.cancel_scope.cancel()


# --- the bounds are settings ------------------------------------------------------------------

def test_the_bounds_are_settings_and_reach_every_fold() -> None:
    defaults = load_settings(env={})
    assert (defaults.max_clock_ahead_s, defaults.max_id_rate, defaults.repair_slack_s) == (
        10.0, 10_000_000.0, 1.0)
    assert bounds_from(defaults) == Bounds()  # the folds' own defaults are the same
    settings = load_settings(env={"PIPELINE_MAX_CLOCK_AHEAD_S": "2.5",
                                  "PIPELINE_MAX_ID_RATE": "5000",
                                  "PIPELINE_REPAIR_SLACK_S": "0.2",
                                  "PIPELINE_MARKET_STREAMS": "markPrice@1s,depth@100ms"})
    expected = Bounds(max_ahead_ms=2_500, max_id_rate=5_000.0, repair_slack_ms=200)
    for spec in available(settings).values():
        assert spec.bounds == expected
        assert getattr(spec.factory(), "bounds", None) == expected, spec.name


def test_a_bad_bound_is_a_bad_setting() -> None:
    for name, value in (("PIPELINE_MAX_CLOCK_AHEAD_S", "0"), ("PIPELINE_MAX_ID_RATE", "fast"),
                        ("PIPELINE_REPAIR_SLACK_S", "-1")):
        with pytest.raises(SettingsError) as err:
            load_settings(env={name: value})
        assert str(err.value).startswith(name)
