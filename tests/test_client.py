"""The consumer library as the analyzer and the order listener use it (real Redis)."""

from __future__ import annotations

import json
import time

import orjson
import redis

from projections.client import (
    MarketReader,
    OrderEvent,
    OrdersConsumer,
    open_algo_orders,
    open_orders,
)


def _mark(ts: float, price: str = "100.5") -> bytes:
    return orjson.dumps({"mark_price": price, "index_price": "100.4", "funding_rate": "0.0001",
                         "next_funding_time": 1, "timestamp": ts, "source": "websocket"})


def test_fresh_mark_price_comes_from_the_view(r: redis.Redis) -> None:
    r.set("websocket:mark_price:btcusdt", _mark(time.time()))
    reader = MarketReader(r, rest_url="http://127.0.0.1:1", fallback=True)
    mp = reader.mark_price("BTCUSDT", max_age=5)
    assert mp is not None and mp["mark_price"] == "100.5" and mp["source"] == "websocket"


def test_stale_view_without_fallback_is_none(r: redis.Redis) -> None:
    r.set("websocket:mark_price:btcusdt", _mark(time.time() - 60))
    reader = MarketReader(r, fallback=False)
    assert reader.mark_price("BTCUSDT", max_age=5) is None


def test_unreachable_rest_returns_the_stale_view_rather_than_raising(r: redis.Redis) -> None:
    r.set("websocket:orderbook:btcusdt:20", orjson.dumps(
        {"bids": [["1", "2"]], "asks": [["3", "4"]], "timestamp": time.time() - 60,
         "last_update_id": 7, "source": "websocket"}))
    reader = MarketReader(r, rest_url="http://127.0.0.1:1")
    book = reader.order_book("BTCUSDT", 20, max_age=5)
    assert book is not None and book["last_update_id"] == 7


def test_open_orders_reads_every_symbol_sorted_by_order_id(r: redis.Redis) -> None:
    r.hset("websocket:open_orders:ethusdt", "9", json.dumps({"orderId": 9, "symbol": "ETHUSDT"}))
    r.hset("websocket:open_orders:btcusdt", mapping={
        "12": json.dumps({"orderId": 12, "symbol": "BTCUSDT"}),
        "3": json.dumps({"orderId": 3, "symbol": "BTCUSDT"})})
    assert [o["orderId"] for o in open_orders(r)] == [3, 9, 12]
    assert [o["orderId"] for o in open_orders(r, "BTCUSDT")] == [3, 12]
    assert open_algo_orders(r) == []


def _emit(r: redis.Redis, order_id: int, status: str) -> bytes:
    return r.xadd("websocket:orders", {"order_id": str(order_id), "status": status,
                                       "symbol": "BTCUSDT", "kind": "order",
                                       "source": "stream", "data": json.dumps({"i": order_id})})


def test_listener_crashing_mid_handler_gets_the_entry_again(r: redis.Redis) -> None:
    seen: list[tuple[str, str]] = []
    crash = {"armed": True}

    def handler(ev: OrderEvent) -> None:
        if crash["armed"]:
            crash["armed"] = False
            raise RuntimeError("listener bug")
        seen.append((ev.order_id, ev.status))

    consumer = OrdersConsumer(r, group="listener", consumer="a", handler=handler, block_ms=10,
                              start_id="0")
    _emit(r, 1, "FILLED")
    assert consumer.poll_once() == 0  # the handler raised: nothing acknowledged
    assert r.xpending("websocket:orders", "listener")["pending"] == 1
    consumer.poll_once()
    assert seen == [("1", "FILLED")]
    assert r.xpending("websocket:orders", "listener")["pending"] == 0


def test_entries_of_a_dead_consumer_are_taken_over(r: redis.Redis) -> None:
    OrdersConsumer(r, group="listener", consumer="dead", handler=lambda ev: None, start_id="0")
    _emit(r, 5, "CANCELED")
    # the "dead" consumer read the entry and was killed before acknowledging it
    r.xreadgroup("listener", "dead", {"websocket:orders": ">"}, count=10)
    assert r.xpending("websocket:orders", "listener")["pending"] == 1
    seen: list[str] = []
    alive = OrdersConsumer(r, group="listener", consumer="alive", block_ms=10, claim_idle_ms=0,
                           handler=lambda ev: seen.append(ev.order_id))
    alive.poll_once()
    assert seen == ["5"]
    assert r.xpending("websocket:orders", "listener")["pending"] == 0


def test_handler_sees_the_order_fields(r: redis.Redis) -> None:
    got: list[OrderEvent] = []
    consumer = OrdersConsumer(r, group="g", consumer="c", handler=got.append, block_ms=10,
                              start_id="0")
    _emit(r, 77, "PARTIALLY_FILLED")
    consumer.poll_once()
    assert got[0].order_id == "77" and got[0].status == "PARTIALLY_FILLED"
    assert got[0].symbol == "BTCUSDT" and got[0].data == {"i": 77} and got[0].source == "stream"


async def test_stale_view_falls_back_to_the_exchange_and_respects_weight(r: redis.Redis) -> None:
    import trio

    from pipeline.simulator import SimConfig, Simulator
    from pipeline.weight import WeightBudget

    r.set("websocket:mark_price:btcusdt", _mark(time.time() - 60, price="1.0"))
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(Simulator(SimConfig(symbols=("BTCUSDT",))).run)
        reader = MarketReader(r, rest_url=rest_url)
        mp = await trio.to_thread.run_sync(reader.mark_price, "BTCUSDT", 5.0)
        book = await trio.to_thread.run_sync(reader.order_book, "BTCUSDT", 5, 5.0)
        last = await trio.to_thread.run_sync(reader.last_price, "BTCUSDT", 5.0)
        # a budget that is already spent: no call, the stale view is what the caller gets
        spent = MarketReader(r, rest_url=rest_url, budget=WeightBudget(ceiling=0))
        stale = await trio.to_thread.run_sync(spent.mark_price, "BTCUSDT", 5.0)
        for rd in (reader, spent):
            rd.close()
        nursery.cancel_scope.cancel()
    assert mp is not None and mp["source"] == "rest" and float(mp["mark_price"]) > 1.0
    assert abs(mp["timestamp"] - time.time()) < 5
    assert book is not None and book["source"] == "rest" and len(book["bids"]) == 5
    assert last is not None and last["source"] == "rest" and float(last["price"]) > 0
    # premiumIndex 1 + depth(limit 5) 2 + ticker/price 1, as the exchange reported it
    assert reader.budget.used >= 1 + 2 + 1
    assert stale is not None and stale["mark_price"] == "1.0"


def test_order_events_carry_fill_quantities_prices_and_the_triggered_order(
        r: redis.Redis) -> None:
    from projections.shell import functions
    from tests.test_orderstore import perform, story

    functions.DEFAULT.ensure(r)  # the library the order writes call (the projector loads it)
    got: list[OrderEvent] = []
    consumer = OrdersConsumer(r, group="g", consumer="c", handler=got.append, block_ms=10,
                              start_id="0")
    perform(r, story())  # through orders.lua, as the projector writes them
    consumer.poll_once()
    by = {(ev.kind, ev.order_id, ev.status, ev.source): ev for ev in got}

    new = by["order", "7", "NEW", "stream"]
    assert (new.filled_qty, new.avg_price) == ("0", "0")
    partial = by["order", "7", "PARTIALLY_FILLED", "stream"]
    assert (partial.filled_qty, partial.avg_price) == ("0.001", "50000.10")
    assert (partial.last_filled_qty, partial.last_filled_price) == ("0.001", "50000.10")
    filled = by["order", "7", "FILLED", "stream"]
    assert (filled.filled_qty, filled.avg_price) == ("0.003", "50000.16667")
    assert (filled.last_filled_qty, filled.last_filled_price) == ("0.002", "50000.20")
    assert filled.fields["S"] == "BUY" and filled.actual_order_id is None

    assert by["algo", "500", "NEW", "stream"].actual_order_id is None
    triggered = by["algo", "500", "TRIGGERED", "stream"]
    assert triggered.actual_order_id == "9001" and triggered.filled_qty is None
    assert by["order", "9001", "FILLED", "stream"].filled_qty == "0.003"

    # REST reports totals, not the last fill
    closed = by["order", "10", "CANCELED", "reconciliation"]
    assert (closed.filled_qty, closed.avg_price) == ("0", "0")
    assert closed.last_filled_qty is None and closed.last_filled_price is None


def test_freshness_is_judged_on_the_clock_the_reader_is_given(r: redis.Redis) -> None:
    written = 1_800_000_000.0
    r.set("websocket:mark_price:btcusdt", _mark(written))
    now = [written + 4.9]
    reader = MarketReader(r, fallback=False, clock=lambda: now[0])
    assert reader.mark_price("BTCUSDT", max_age=5) is not None
    now[0] = written + 5.1
    assert reader.mark_price("BTCUSDT", max_age=5) is None
    reader.close()


async def test_a_spent_weight_budget_makes_no_call_until_the_next_minute(
        r: redis.Redis) -> None:
    import httpx
    import trio

    from pipeline.simulator import SimConfig, Simulator
    from pipeline.weight import WeightBudget

    r.set("websocket:mark_price:btcusdt", _mark(0.0, price="1.0"))  # long stale
    now = [1_800_000_000.0]  # the start of a minute, on the reader's clock
    sent: list[str] = []
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(Simulator(SimConfig(symbols=("BTCUSDT",))).run)
        http = httpx.Client(base_url=rest_url, timeout=5.0,
                            event_hooks={"request": [lambda req: sent.append(req.url.path)]})
        reader = MarketReader(r, http=http, clock=lambda: now[0],
                              budget=WeightBudget(ceiling=2))  # two premiumIndex calls a minute

        async def source() -> str | None:
            mp = await trio.to_thread.run_sync(reader.mark_price, "BTCUSDT", 5.0)
            return None if mp is None else str(mp["source"])

        got = [await source(), await source(), await source()]
        calls_in_first_minute = len(sent)
        now[0] += 60
        got.append(await source())
        reader.close()
        nursery.cancel_scope.cancel()
    assert got == ["rest", "rest", "websocket", "rest"]  # the third: the stale view, no call
    assert calls_in_first_minute == 2
    assert sent == ["/fapi/v1/premiumIndex"] * 3
