"""The view store: every write is atomic and only moves a view forward (real redis-server)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import pytest
import redis

from projections.core.outputs import (
    WRITE_TYPES,
    ListMerge,
    ListPushIfNewer,
    ViewWrite,
    check_output,
)
from projections.core.plausible import Bounds
from projections.shell.viewstore import PERFORMERS, ViewStore, write_results


def _now_ms() -> int:
    return int(time.time() * 1000)


def mark(version: float, price: str, expire_at_ms: int | None = None) -> ViewWrite:
    value = orjson.dumps({"mark_price": price, "timestamp": version, "source": "websocket"})
    return ViewWrite("websocket:mark_price:btcusdt", value, version, "timestamp",
                     _now_ms() + 60_000 if expire_at_ms is None else expire_at_ms)


def perform(r: redis.Redis, outputs: Sequence[object], per_call: int = 500) -> list[object]:
    """The result of each write, in order (1 written, 0 not newer, -1 expired)."""
    store = ViewStore(r, per_call=per_call)
    pipe = r.pipeline(transaction=False)
    store.queue_all(pipe, outputs)
    results: list[object] = []
    for reply in pipe.execute():
        results.extend(reply if isinstance(reply, list) else [reply])
    return results


def stored(r: redis.Redis, key: str = "websocket:mark_price:btcusdt") -> dict[str, object]:
    raw = r.get(key)
    assert raw is not None
    return orjson.loads(raw)


def test_newer_version_replaces_and_older_is_refused(r: redis.Redis) -> None:
    assert perform(r, [mark(100.5, "1"), mark(101.25, "2"), mark(99.0, "0")]) == [1, 1, 0]
    assert stored(r)["mark_price"] == "2"


def test_writes_split_over_several_script_calls_keep_their_order(r: redis.Redis) -> None:
    assert perform(r, [mark(100.5, "1"), mark(101.25, "2"), mark(99.0, "0"), mark(102.0, "3")],
                   per_call=2) == [1, 1, 0, 1]
    assert stored(r)["mark_price"] == "3"


def test_version_field_found_inside_a_large_value(r: redis.Redis) -> None:
    key = "websocket:orderbook:btcusdt:20"
    levels = [["64000.1", "1.000"]] * 20

    def book(u: int) -> ViewWrite:
        return ViewWrite(key, orjson.dumps({"bids": levels, "asks": levels, "timestamp": 1.0,
                                            "last_update_id": u, "source": "websocket"}),
                         u, "last_update_id", _now_ms() + 60_000)

    assert perform(r, [book(7), book(6), book(8)]) == [1, 0, 1]


def test_same_version_again_is_a_no_op(r: redis.Redis) -> None:
    assert perform(r, [mark(100.0, "1"), mark(100.0, "changed")]) == [1, 0]
    assert stored(r)["mark_price"] == "1"


def test_expiry_is_set_at_the_given_instant(r: redis.Redis) -> None:
    at = _now_ms() + 30_000
    perform(r, [mark(1.0, "1", expire_at_ms=at)])
    assert r.pexpiretime("websocket:mark_price:btcusdt") == at


def test_write_already_expired_creates_no_key(r: redis.Redis) -> None:
    assert perform(r, [mark(1.0, "1", expire_at_ms=_now_ms() - 1)]) == [-1]
    assert r.exists("websocket:mark_price:btcusdt") == 0


def test_zero_expiry_means_kept(r: redis.Redis) -> None:
    perform(r, [mark(1.0, "1", expire_at_ms=0)])
    assert r.pttl("websocket:mark_price:btcusdt") == -1


def test_large_update_ids_compare_exactly(r: redis.Redis) -> None:
    key = "websocket:orderbook:btcusdt:20"

    def book(u: int) -> ViewWrite:
        return ViewWrite(key, orjson.dumps({"last_update_id": u}), u, "last_update_id",
                         _now_ms() + 60_000)

    assert perform(r, [book(9_123_456_789_013), book(9_123_456_789_012)]) == [1, 0]
    assert stored(r, key)["last_update_id"] == 9_123_456_789_013


def test_unreadable_stored_value_is_overwritten(r: redis.Redis) -> None:
    r.set("websocket:mark_price:btcusdt", b"not json")
    assert perform(r, [mark(1.0, "1")]) == [1]


def candle(open_time: int) -> ListPushIfNewer:
    return ListPushIfNewer("websocket:klines:btcusdt:1m",
                           orjson.dumps({"open_time": open_time}), open_time, "open_time", 3)


def test_closed_candles_are_pushed_newest_first_and_capped(r: redis.Redis) -> None:
    perform(r, [candle(t) for t in (60, 120, 120, 60, 180, 240)])
    assert [orjson.loads(v)["open_time"] for v in r.lrange("websocket:klines:btcusdt:1m", 0, -1)
            ] == [240, 180, 120]


@attrs.frozen
class Custom:
    key: str


def test_an_output_type_nothing_performs_fails_its_entry_not_the_batch(r: redis.Redis) -> None:
    with pytest.raises(TypeError):
        check_output(Custom("k"))  # the fold of the entry that produced it fails
    with pytest.raises(TypeError):
        perform(r, [mark(1.0, "1"), Custom("k")])
    assert r.get("k") is None


def test_every_write_type_of_the_core_has_a_performer() -> None:
    assert {ViewWrite, ListPushIfNewer, ListMerge} | set(PERFORMERS) >= WRITE_TYPES


# --- views that cannot be right: refused, or repaired instead of obeyed ------------------------

BOOK = "websocket:orderbook:btcusdt:20"
IN_2100_S = 4_102_444_800.0


def book(u: int, ts: float) -> ViewWrite:
    value = orjson.dumps({"bids": [["1.0", "2.0"]] * 20, "asks": [], "timestamp": ts,
                          "last_update_id": u, "source": "websocket"})
    return ViewWrite(BOOK, value, u, "last_update_id", _now_ms() + 60_000, ts, True)


def test_a_held_view_from_a_clock_far_ahead_is_overwritten_by_the_next_write(
        r: redis.Redis) -> None:
    r.set("websocket:mark_price:btcusdt", orjson.dumps(
        {"mark_price": "1.0", "timestamp": IN_2100_S, "source": "websocket"}))
    now = time.time()
    assert perform(r, [mark(now, "64000.1")]) == [2]  # 2: written over a held value
    assert stored(r)["mark_price"] == "64000.1"
    assert perform(r, [mark(now - 1, "63000")]) == [0]  # and forward-only again from there


def test_a_held_id_ahead_while_a_newer_event_brings_a_lower_one_is_overwritten(
        r: redis.Redis) -> None:
    now = time.time()
    assert perform(r, [book(2**52, now - 5)]) == [1]  # e.g. written before the checks
    assert perform(r, [book(1_000, now - 4.5)]) == [0]  # within the 1 s slack: obeyed
    assert perform(r, [book(1_000, now)]) == [2]  # 5 s newer: the held id cannot be right
    assert stored(r, BOOK)["last_update_id"] == 1_000
    assert perform(r, [book(999, now)]) == [0]


def test_an_id_jump_no_stream_can_make_is_refused_and_the_view_kept(r: redis.Redis) -> None:
    now = time.time()
    perform(r, [book(100, now)])
    # 10,000,000 ids a second (PIPELINE_MAX_ID_RATE) over 0.5 s, plus one second's worth
    assert perform(r, [book(100 + 16_000_000, now + 0.5)]) == [-2]
    assert stored(r, BOOK)["last_update_id"] == 100
    assert perform(r, [book(100 + 14_000_000, now + 0.5)]) == [1]
    assert perform(r, [book(2**53 - 1, now + 86_400)]) == [-2]  # not even after a day


def test_the_bounds_come_from_the_settings(r: redis.Redis) -> None:
    now = time.time()
    store = ViewStore(r, bounds=Bounds(max_ahead_ms=1_000, max_id_rate=1e12))
    for write, expected in ((book(100, now), 1), (book(100 + 10**11, now), 1)):
        pipe = r.pipeline(transaction=False)
        store.queue(pipe, write)
        assert pipe.execute() == [[expected]]
    r.set("websocket:mark_price:btcusdt", orjson.dumps({"timestamp": now + 5}))
    pipe = r.pipeline(transaction=False)
    store.queue(pipe, mark(now, "1"))  # held 5 s ahead: more than this deployment's 1 s
    assert pipe.execute() == [[2]]


def test_list_heads_that_cannot_be_right_are_dropped_before_the_push(r: redis.Redis) -> None:
    key = "websocket:klines:btcusdt:1m"
    now = time.time()
    r.rpush(key, orjson.dumps({"open_time": 60_000, "timestamp": now - 120}))
    for t in (4_102_444_800_000, 4_102_444_860_000):  # two closed candles of 2100
        r.lpush(key, orjson.dumps({"open_time": t, "timestamp": now - 10}))
    push = ListPushIfNewer(key, orjson.dumps({"open_time": 120_000, "timestamp": now}),
                           120_000, "open_time", 500, now)
    assert perform(r, [push]) == [2]
    assert [orjson.loads(v)["open_time"] for v in r.lrange(key, 0, -1)] == [120_000, 60_000]


def test_results_follow_the_writes_across_calls_and_order_writes(r: redis.Redis) -> None:
    from projections.core.orderwrites import OrderWrite

    order = OrderWrite(prefix="websocket", symbol="BTCUSDT", order_id=1, status="NEW",
                       version=(_now_ms(), 0, "0"), allowed_from=("",), fields={}, rest={})
    now = time.time()
    writes: list[Any] = [book(100, now), book(100 + 10**15, now), order, mark(now, "1"),
                         mark(now, "1")]
    store = ViewStore(r, per_call=1)
    pipe = r.pipeline(transaction=False)
    plan = store.queue_all(pipe, writes)
    assert plan == [1, 1, 1, 1, 1]
    assert write_results(plan, pipe.execute()) == [1, -2, 1, 1, 0]
