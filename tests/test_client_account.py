"""The consumer library's new reads and consumers (issue #13), as an analyzer and a risk
listener use them, on a real Redis and the simulator's REST: best bid/ask, candles, the
account's event streams."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import redis
import trio

from pipeline.simulator import SimConfig, Simulator
from projections.client import (
    AccountEvent,
    AccountEventsConsumer,
    MarketReader,
    OrdersConsumer,
    PositionEvent,
    PositionEventsConsumer,
    StreamConsumer,
)

MINUTE = 60_000


def candle(open_ms: int, source: str = "websocket") -> bytes:
    return orjson.dumps({"open_time": open_ms, "close_time": open_ms + MINUTE - 1,
                         "open": "1", "high": "2", "low": "0.5", "close": "1.5",
                         "volume": "10", "quote_volume": "15", "trades": 3, "closed": True,
                         "event_time": open_ms + MINUTE, "timestamp": (open_ms + MINUTE) / 1000,
                         "source": source})


def test_book_ticker_from_the_view_and_the_stale_view_when_rest_refuses(
        r: redis.Redis) -> None:
    view = {"bid": "99.9", "bid_qty": "1", "ask": "100.1", "ask_qty": "2", "update_id": 9,
            "timestamp": time.time(), "source": "websocket"}
    r.set("websocket:book_ticker:btcusdt", orjson.dumps(view))
    reader = MarketReader(r, rest_url="http://127.0.0.1:1")
    assert reader.book_ticker("BTCUSDT") == view
    r.set("websocket:book_ticker:btcusdt", orjson.dumps({**view, "timestamp": 1.0}))
    assert reader.book_ticker("BTCUSDT")["update_id"] == 9  # type: ignore[index]
    assert MarketReader(r, fallback=False).book_ticker("BTCUSDT") is None
    reader.close()


def test_klines_are_the_newest_n_oldest_first_while_fresh(r: redis.Redis) -> None:
    now = int(time.time() * 1000) // MINUTE * MINUTE
    for t in range(now - 10 * MINUTE, now, MINUTE):  # pushed as the stream closes them
        r.lpush("websocket:klines:btcusdt:1m", candle(t))
    reader = MarketReader(r, fallback=False)
    got = reader.klines("BTCUSDT", "1m", 4)
    assert [c["open_time"] for c in got] == [now - 4 * MINUTE, now - 3 * MINUTE,
                                             now - 2 * MINUTE, now - MINUTE]
    assert len(reader.klines("BTCUSDT", "1m")) == 10
    late = MarketReader(r, fallback=False, clock=lambda: time.time() + 600)
    assert len(late.klines("BTCUSDT", "1m", 4)) == 4  # stale, no REST: still the view's


async def test_stale_klines_come_from_rest_without_the_open_candle(r: redis.Redis) -> None:
    r.lpush("websocket:klines:btcusdt:1m", candle(MINUTE))  # from 1970: stale
    async with trio.open_nursery() as nursery:
        sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
        _, rest_url = await nursery.start(sim.run)
        reader = MarketReader(r, rest_url=rest_url)
        got = await trio.to_thread.run_sync(reader.klines, "BTCUSDT", "1m", 100)
        reader.close()
        now = int(sim.clock() * 1000)
        nursery.cancel_scope.cancel()
    assert len(got) == 100 and {c["source"] for c in got} == {"rest"}
    assert got[-1]["open_time"] == now - now % MINUTE - MINUTE  # the last closed one
    assert all(b["open_time"] - a["open_time"] == MINUTE for a, b in itertools.pairwise(got))
    assert reader.budget.used >= 2  # 101 rows: weight 2


def test_the_three_consumers_are_one_machine() -> None:
    for cls in (OrdersConsumer, AccountEventsConsumer, PositionEventsConsumer):
        assert issubclass(cls, StreamConsumer)
        assert "poll_once" not in vars(cls) and "_handle" not in vars(cls)


def emit(r: redis.Redis, key: str, **fields: Any) -> None:
    r.xadd(key, {k: (orjson.dumps(v) if isinstance(v, dict | list) else str(v))
                 for k, v in fields.items()})


def test_account_events_consumer_hands_over_each_entry_and_retries_a_failed_one(
        r: redis.Redis) -> None:
    seen: list[AccountEvent] = []
    crash = {"armed": True}

    def handler(ev: AccountEvent) -> None:
        if crash["armed"]:
            crash["armed"] = False
            raise RuntimeError("risk bug")
        seen.append(ev)

    consumer = AccountEventsConsumer(r, group="risk", consumer="a", handler=handler,
                                     block_ms=10, start_id="0")
    emit(r, "websocket:account_events", event_key="MARGIN_CALL:1:ab", type="MARGIN_CALL",
         symbol="BTCUSDT", data={"e": "MARGIN_CALL", "E": 1, "cw": "3", "p": [
             {"s": "BTCUSDT", "ps": "BOTH", "pa": "1", "mm": "0.4"}]})
    emit(r, "websocket:account_events", event_key="ACCOUNT_CONFIG_UPDATE:2:cd",
         type="ACCOUNT_CONFIG_UPDATE", data={"e": "ACCOUNT_CONFIG_UPDATE", "E": 2, "T": 2,
                                             "ai": {"j": True}})
    assert consumer.poll_once() == 1  # the first raised: pending, not acknowledged
    consumer.poll_once()
    assert [e.type for e in seen] == ["ACCOUNT_CONFIG_UPDATE", "MARGIN_CALL"]
    config, call = seen
    assert (config.symbol, config.multi_assets_margin, config.leverage) == (None, True, None)
    assert call.margin_call_positions[0]["mm"] == "0.4" and call.event_time == 1
    assert r.xpending("websocket:account_events", "risk")["pending"] == 0


def test_position_events_say_what_closed_a_position(r: redis.Redis) -> None:
    seen: list[PositionEvent] = []
    consumer = PositionEventsConsumer(r, group="risk", consumer="a", handler=seen.append,
                                      block_ms=10, start_id="0")
    data = {"kind": "closed", "symbol": "BTCUSDT", "position_side": "BOTH",
            "amount_before": "0.01", "amount_after": "0", "entry_price": "0",
            "realized_profit": "-3.2", "order_id": 901, "algo_id": 77,
            "algo_type": "STOP_MARKET", "source": "websocket"}
    emit(r, "websocket:position_events", event_key="k", kind="closed", symbol="BTCUSDT",
         position_side="BOTH", source="websocket", data=data)
    consumer.poll_once()
    [ev] = seen
    assert (ev.kind, ev.by_stop_loss, ev.by_take_profit, ev.algo_id, ev.order_id) == (
        "closed", True, False, 77, 901)
    assert (ev.amount_before, ev.amount_after, ev.realized_profit) == ("0.01", "0", "-3.2")
