"""Kline history: `P:klines:{symbol}:{interval}` is whole within seconds of start and across a
gap in the kline stream, in order, with no candle twice and none missing where stream and REST
overlap.

The fold and the store's merge on a real Redis; the ingestor's fetcher against the
simulator's REST on Trio's MockClock; the whole path (simulator, `ingest market`, the kline
projector, a real Redis) with the simulator's clock running 30 times faster, an hour behind
the wall (a 1m candle lasts two seconds; every event stays in the past of its receipt)."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import redis
import trio

from pipeline.config import Settings, load_settings
from pipeline.eventlog import ControlEntry
from pipeline.ingest_market import MarketIngest, cached_router, run_market_ingest
from pipeline.klinehistory import KlineHistory
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.rest import RestClient
from pipeline.simulator import SimConfig, Simulator
from pipeline.weight import WeightBudget, klines_weight
from pipeline.wsconn import Timing
from projections.client import MarketReader
from projections.core.market import KlineProjection
from projections.core.outputs import ListMerge, ListPushIfNewer, PoisonEntry
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from projections.shell.viewstore import ViewStore, write_results
from tests.conftest import run_cli
from tests.recorder import Recorder
from tests.simulator_support import fast_clock

MINUTE = 60_000
LIST = "websocket:klines:btcusdt:1m"


def rows(first_open: int, n: int, *, price: str = "100.5") -> list[list[Any]]:
    """`GET /fapi/v1/klines` rows, oldest first, one minute apart."""
    return [[t, price, price, price, price, "12.5", t + MINUTE - 1, "1256.25", 7, "6", "603",
             "0"] for t in range(first_open, first_open + n * MINUTE, MINUTE)]


def history(response: Any, *, symbol: str = "BTCUSDT", interval: str = "1m",
            recv_s: float | None = None) -> ControlEntry:
    recv = time.time() if recv_s is None else recv_s
    return ControlEntry(b"1-0", "snapshot", {
        "kind": "klines", "symbol": symbol, "interval": interval, "limit": len(response),
        "fetched_at_ms": int(recv * 1000), "weight_used_1m": 5, "response": response}, recv, "")


def kline_fold(**options: Any) -> KlineProjection:
    return KlineProjection("websocket", families=["kline_1m"], symbols=["BTCUSDT"], **options)


def test_a_history_snapshot_merges_its_closed_candles_not_the_open_one() -> None:
    now = int(time.time() * 1000) // MINUTE * MINUTE
    [merge] = kline_fold().apply(history(rows(now - 4 * MINUTE, 5)))
    assert isinstance(merge, ListMerge) and merge.key == LIST and merge.cap == 500
    candles = [orjson.loads(v) for v in merge.values]
    assert [c["open_time"] for c in candles] == [now - (4 - i) * MINUTE for i in range(4)]
    assert candles[0] == {
        "open_time": now - 4 * MINUTE, "close_time": now - 3 * MINUTE - 1, "open": "100.5",
        "high": "100.5", "low": "100.5", "close": "100.5", "volume": "12.5",
        "quote_volume": "1256.25", "trades": 7, "closed": True,
        "event_time": now - 3 * MINUTE - 1, "timestamp": (now - 3 * MINUTE - 1) / 1000,
        "source": "rest"}
    assert kline_fold(kline_history=1000).apply(history(rows(now - 2 * MINUTE, 2)))[0].cap == 1000


@pytest.mark.parametrize("entry", [
    history(rows(MINUTE, 3), symbol="ETHUSDT"),  # not configured
    history(rows(MINUTE, 3), interval="5m"),  # not a stream this fold reads
    history([[1, "1", "1", "1", "1", "1", 2 * MINUTE, "1", 1, "1", "1", "0"]] * 2),  # too long
    history([[MINUTE, "1", "1", "x", "1", "1", 2 * MINUTE - 1, "1", 1, "1", "1", "0"]] * 2),
    history(rows(int(time.time() * 1000) + 3_600_000, 3)),  # closes an hour from now
    history({"code": -1121}),
], ids=["symbol", "interval", "span", "decimal", "future", "not-a-list"])
def test_implausible_history_is_poison(entry: ControlEntry) -> None:
    with pytest.raises(PoisonEntry):
        kline_fold().apply(entry)


def perform(r: redis.Redis, *writes: Any) -> list[Any]:
    store = ViewStore(r)
    with r.pipeline(transaction=False) as pipe:
        plan = store.queue_all(pipe, writes)
        return write_results(plan, pipe.execute(raise_on_error=False))


def opens(r: redis.Redis, key: str = LIST) -> list[int]:
    return [orjson.loads(v)["open_time"] for v in r.lrange(key, 0, -1)]


def test_the_merge_puts_older_candles_in_order_under_the_stream_s_without_duplicates(
        r: redis.Redis) -> None:
    now = int(time.time() * 1000) // MINUTE * MINUTE
    fold = kline_fold()
    stream = [orjson.dumps({"open_time": t, "close_time": t + MINUTE - 1, "closed": True,
                            "timestamp": (t + MINUTE) / 1000, "source": "websocket"})
              for t in (now - 3 * MINUTE, now - 2 * MINUTE)]
    for v in stream:  # the stream closed two candles before the history came in
        perform(r, ListPushIfNewer(LIST, v, orjson.loads(v)["open_time"], "open_time", 500,
                                   orjson.loads(v)["timestamp"]))
    [merge] = fold.apply(history(rows(now - 10 * MINUTE, 10)))  # 9 closed, overlapping two
    assert perform(r, merge) == [1]
    assert opens(r) == [now - i * MINUTE for i in range(2, 11)]  # newest first, contiguous
    sources = [orjson.loads(v)["source"] for v in r.lrange(LIST, 0, -1)]
    assert sources[:2] == ["websocket", "websocket"]  # the stream's candles kept
    assert perform(r, merge) == [0]  # again: nothing new, nothing written
    # the next closed candle of the stream lands on top, as before
    nxt = orjson.dumps({"open_time": now - MINUTE, "timestamp": now / 1000})
    assert perform(r, ListPushIfNewer(LIST, nxt, now - MINUTE, "open_time", 500,
                                      now / 1000)) == [1]
    assert opens(r)[:2] == [now - MINUTE, now - 2 * MINUTE]


def test_the_merge_keeps_the_newest_cap_candles(r: redis.Redis) -> None:
    now = int(time.time() * 1000) // MINUTE * MINUTE
    [merge] = kline_fold().apply(history(rows(now - 700 * MINUTE, 700)))
    assert perform(r, merge) == [1]
    got = opens(r)
    assert len(got) == 500 and got[0] == now - 2 * MINUTE
    assert all(a - b == MINUTE for a, b in itertools.pairwise(got))


# --- the fetcher, on Trio's MockClock ----------------------------------------------------------

@attrs.define
class Drops:
    """What the fetcher reads of the writer's drop account (`pipeline.buffer.DropLedger`)."""

    recorded: int = 0
    unreported: int = 0


async def test_history_is_fetched_per_stream_paced_by_weight_retried_and_asked_again_after_drops(
        autojump_clock: trio.testing.MockClock) -> None:
    base = 1_795_000_000.0  # the exchange's clock: a real date, moved by the trio clock
    sim = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT")),
                    clock=lambda: base + trio.current_time())
    rec = Recorder()
    drops = Drops()
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(sim.run)
        # a budget of 15 a minute: 12 before the ceiling, two calls of weight 5 a minute
        rest = RestClient(rest_url, clock=lambda: base + trio.current_time(),
                          budget=WeightBudget.for_limit(15))
        streams = ["btcusdt@kline_1m", "ethusdt@kline_1m"]
        fetcher = KlineHistory(rest, rec, streams, 500, clock=trio.current_time)
        nursery.start_soon(fetcher.run)
        nursery.start_soon(fetcher.watch_drops, drops)
        sim.accounts.control("rest_fault", {"kind": "5xx", "path": "/fapi/v1/klines",
                                            "count": 1})
        await fetcher.on_connected(streams)("mkt-1-abcdef")  # the connection came up
        await rec.until(lambda: len(rec.controls("snapshot")) == 2, within=120)
        first = rec.controls("snapshot")
        assert [s.key for s in first] == ["raw:market:kline_1m"] * 2
        assert [s.body["symbol"] for s in first] == ["BTCUSDT", "ETHUSDT"]
        assert all(len(s.body["response"]) == 501 and s.body["limit"] == 501 for s in first)
        assert first[0].at >= 0.5  # the failed call was retried after its backoff
        assert rest.weight_spent["/fapi/v1/klines"] == 3 * klines_weight(501) == 15
        # the third call of weight 5 waited for the next minute of the weight window
        minute = [int((base + s.at) // 60) for s in first]
        assert minute[1] == minute[0] + 1

        drops.recorded, drops.unreported = 40, 40  # frames dropped, their gap not yet written
        await trio.sleep(5)
        assert len(rec.controls("snapshot")) == 2
        drops.unreported = 0  # the gap is in the log: every stream is asked again
        await rec.until(lambda: len(rec.controls("snapshot")) == 4, within=180)
        nursery.cancel_scope.cancel()
    await rest.aclose()


@attrs.define
class HeldClock:
    """The simulator's clock (unix seconds), moved only by the test."""

    t: float

    def __call__(self) -> float:
        return self.t


def kline_frame(open_time: int, *, closed: bool = False) -> bytes:
    """A combined `btcusdt@kline_1m` frame showing the candle that opened at `open_time`."""
    return orjson.dumps({"stream": "btcusdt@kline_1m", "data": {
        "e": "kline", "E": open_time + 1000, "s": "BTCUSDT", "k": {
            "t": open_time, "T": open_time + MINUTE - 1, "s": "BTCUSDT", "i": "1m",
            "o": "1", "c": "1", "h": "1", "l": "1", "v": "0", "n": 0, "x": closed}}})


async def test_an_answer_older_than_the_stream_s_first_frame_is_fetched_again(
        autojump_clock: trio.testing.MockClock) -> None:
    """The first frame after a connect judges the history (pipeline.klinehistory): REST
    answered while candle A was open, the stream's first frame shows B, so A is in neither
    and the stream is fetched again; a first frame not newer than the answer's open row asks
    nothing more. The first frame here comes in while the call is under way."""
    boundary = 1_795_000_020 // 60 * 60
    a, b = (boundary - 60) * 1000, boundary * 1000
    clock = HeldClock(boundary - 5.0)  # the exchange's clock, moved by the test
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)), clock=clock)
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(sim.run)
        rest = RestClient(rest_url, clock=clock)
        fetcher = KlineHistory(rest, rec, ["btcusdt@kline_1m"], 500, clock=trio.current_time)
        nursery.start_soon(fetcher.run)
        route = cached_router(history=fetcher)

        def open_rows() -> list[int]:
            return [s.body["response"][-1][0] for s in rec.controls("snapshot")]

        fetcher.connected(["btcusdt@kline_1m"])  # the call starts; the stream's first frame:
        assert route(kline_frame(b)) == "raw:market:kline_1m" and fetcher.awaiting == set()
        await rec.until(lambda: open_rows() == [a], within=10)  # answered as of A's time
        clock.t = boundary + 1.0
        await rec.until(lambda: open_rows() == [a, b], within=120)  # asked again: A is there
        await trio.sleep(300)
        assert open_rows() == [a, b]  # and no more

        for shown in (b, b - MINUTE):  # a first frame of the open row's candle, or older
            before = len(open_rows())
            fetcher.connected(["btcusdt@kline_1m"])  # a reconnect: answered first this time
            await rec.until(functools.partial(lambda n: len(open_rows()) == n, before + 1),
                            within=10)
            route(b'{"stream":"btcusdt@kline_1m","data":{"e":"other"}}')  # shows no candle
            assert fetcher.awaiting == {b"btcusdt@kline_1m"}
            route(kline_frame(shown, closed=shown < b))
            route(kline_frame(b + MINUTE))  # not a first frame: not judged
            assert fetcher.awaiting == set() and fetcher.shown == {"btcusdt@kline_1m": shown}
            await trio.sleep(300)
            assert open_rows()[before:] == [b]  # nothing more asked
        nursery.cancel_scope.cancel()
    await rest.aclose()


# --- the whole path ----------------------------------------------------------------------------

FAST = Timing(connect_timeout=3.0, disconnect_timeout=0.5, backoff_base=0.05, backoff_cap=0.2,
              control_interval=0.01, ack_timeout=2.0, max_overlap=1.0)
SLOW_RECONNECT = attrs.evolve(FAST, backoff_base=5.0, backoff_cap=5.0)  # 1.25 to 2.5 candles


def settings_for(redis_url: str, ws_url: str, rest_url: str) -> Settings:
    return load_settings(env={"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url,
                              "BINANCE_REST_URL": rest_url, "PIPELINE_SYMBOLS": "BTCUSDT",
                              "PIPELINE_MARKET_STREAMS": "kline_1m"})


async def until(check: Any, r: redis.Redis, within: float = 10.0) -> Any:
    """Wait for state in Redis that other tasks' threads bring about; on a timeout, say what
    the list holds."""
    try:
        with trio.fail_after(within):
            while not (value := check()):  # noqa: ASYNC110 - the state is in Redis
                await trio.sleep(0.05)
    except trio.TooSlowError:
        candles = [orjson.loads(v) for v in r.lrange(LIST, 0, -1)]
        holes = [(a["open_time"], b["open_time"]) for a, b in itertools.pairwise(candles)
                 if a["open_time"] - b["open_time"] != MINUTE]
        raise AssertionError(f"not reached: {len(candles)} candles, holes {holes[:5]}, head "
                             f"{candles[0] if candles else None}") from None
    return value


def whole(r: redis.Redis, sim: Simulator, n: int = 500) -> list[dict[str, Any]]:
    """The list when it holds `n` contiguous candles, newest first, up to the last one the
    simulator closed (else [])."""
    candles = [orjson.loads(v) for v in r.lrange(LIST, 0, -1)]
    times = [c["open_time"] for c in candles]
    now = int(sim.clock() * 1000)
    last_closed = now - now % MINUTE - MINUTE
    if len(times) < n or not all(a - b == MINUTE for a, b in itertools.pairwise(times)):
        return []
    return candles if last_closed - times[0] <= 2 * MINUTE else []


def kline_frames(r: redis.Redis) -> list[dict[str, Any]]:
    """The kline payloads of the stream in the log, oldest first."""
    return [orjson.loads(f[b"frame"])["data"]["k"]
            for _, f in r.xrange("raw:market:kline_1m") if b"frame" in f]


@asynccontextmanager
async def klines_running(redis_server: LocalRedis, sim: Simulator, timing: Timing
                         ) -> AsyncIterator[MarketIngest]:
    """The simulator, a kline projector and a market ingestor for BTCUSDT's kline_1m, all on
    `redis_server`; the ingestor stopped on leaving."""
    client = make_client(redis_server.url)
    try:
        async with trio.open_nursery() as nursery:
            ws_url, rest_url = await nursery.start(sim.run)
            settings = settings_for(redis_server.url, ws_url, rest_url)
            nursery.start_soon(functools.partial(
                run_projector, settings, choose(settings, "kline"), RunOptions(block_ms=50)))
            async with trio.open_nursery() as ingesting:
                ingest = await ingesting.start(functools.partial(
                    run_market_ingest, settings, client, ("BTCUSDT",), timing=timing))
                yield ingest
                ingest.stop()
            nursery.cancel_scope.cancel()
    finally:
        client.close()


async def test_a_candle_that_closes_between_the_history_and_the_stream_s_first_frame_is_fetched(
        redis_server: LocalRedis) -> None:
    """The race of every (re)connect, made explicit: REST answers while candle A is open, A
    closes before the stream's first frame, which shows the next candle B. The stream never
    sends A (it did not show it) and the history took it as the open row: without a second
    look, A is a hole for good."""
    boundary = (int(time.time()) - 3600) // 60 * 60  # a minute an hour ago, seconds
    a, b = (boundary - 60) * 1000, boundary * 1000
    clock = HeldClock(boundary - 5.0)
    sim = Simulator(SimConfig(symbols=("BTCUSDT",), rate=20), clock=clock)
    sim.set_silence()  # the connection opens and the stream is quiet: no first frame yet
    r = redis_server.client()
    async with klines_running(redis_server, sim, FAST) as ingest:
        history = ingest.history
        assert history is not None
        await until(lambda: history.logged == 1, r)  # answered while A is open
        [snapshot] = [orjson.loads(f[b"body"]) for _, f in r.xrange("raw:market:kline_1m")
                      if f.get(b"ctl") == b"snapshot"]
        assert snapshot["response"][-1][0] == a
        clock.t = boundary + 1.0  # A closes; then the stream's first frame shows B
        sim.set_silence(False)
        first = await until(lambda: kline_frames(r), r)
        assert first[0]["t"] == b and first[0]["x"] is False
        clock.t = boundary + 61.0  # the stream closes B, the one it showed
        got = await until(lambda: (got := whole(r, sim)) and got[0]["open_time"] == b
                          and got, r)
    assert got[0]["source"] == "websocket" and got[1]["open_time"] == a
    assert got[1]["source"] == "rest"  # A came from the second look at REST
    assert history.logged == 2
    r.close()


async def test_klines_are_whole_at_start_and_across_a_gap_in_the_stream(
        redis_server: LocalRedis) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",), rate=20),
                    clock=fast_clock(30, start=time.time() - 3600))
    r = redis_server.client()
    async with klines_running(redis_server, sim, SLOW_RECONNECT) as ingest:
        await until(lambda: whole(r, sim), r, within=10)  # "within seconds of start"
        # once; twice when a candle closed between the answer and the stream's first
        # frame (a minute is 2 s here: the first frame judges the answer)
        assert ingest.history is not None and ingest.history.logged in (1, 2)
        # the stream's own closed candles go on top of the history
        await until(lambda: [c for c in whole(r, sim)[:2] if c["source"] == "websocket"], r)
        gap_from = whole(r, sim)[0]["open_time"]

        assert sim.drop("market") == 1  # the exchange sends nothing to a closed connection
        after = await until(lambda: ingest.history.logged >= 2 and (got := whole(r, sim))
                            and got[0]["source"] == "websocket"
                            and got[0]["open_time"] >= gap_from + 5 * MINUTE and got,
                            r, within=40)
    # the candles that closed while no connection was open came from REST, in their place
    assert [c for c in after if c["open_time"] > gap_from and c["source"] == "rest"]

    # what the stream pushed and what REST filled in are the exchange's candles, one by one
    series = sim.market.klines("BTCUSDT", "1m", after[-1]["open_time"], after[0]["open_time"],
                               1500, int(sim.clock() * 1000))
    truth = {row[0]: row for row in orjson.loads(series)}
    for c in after:
        row = truth[c["open_time"]]
        assert (c["open"], c["high"], c["low"], c["close"], c["volume"], c["trades"]) == (
            row[1], row[2], row[3], row[4], row[5], row[8])
    reader = MarketReader(r, fallback=False, clock=sim.clock)
    oldest_first = reader.klines("BTCUSDT", "1m", 500)
    assert [c["open_time"] for c in oldest_first] == [c["open_time"] for c in after[:500]][::-1]

    # the log alone rebuilds the same list: no REST in a replay
    held = r.lrange(LIST, 0, -1)
    replay = run_cli("replay", "--only", "kline", "--reset", env={
        "REDIS_URL": redis_server.url, "PIPELINE_SYMBOLS": "BTCUSDT",
        "PIPELINE_MARKET_STREAMS": "kline_1m", "BINANCE_REST_URL": "http://127.0.0.1:1"})
    assert replay.returncode == 0, replay.stderr
    assert r.lrange(LIST, 0, -1) == held
    r.close()
