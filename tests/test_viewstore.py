"""The view store: every write is atomic and only moves a view forward (real redis-server)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
import orjson
import pytest
import redis

from projections.core.outputs import WRITE_TYPES, ListPushIfNewer, ViewWrite, check_output
from projections.shell.viewstore import PERFORMERS, ViewStore


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
    assert {ViewWrite, ListPushIfNewer} | set(PERFORMERS) >= WRITE_TYPES
