"""The stateless market folds: what each view holds after a realistic Binance frame.

Pure: no Redis, no trio. The frames are shaped as Binance USDⓈ-M futures sends them (2026),
inside the combined wrapper `{"stream": ..., "data": ...}`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.market import (
    BookTickerProjection,
    KlineProjection,
    MarkPriceProjection,
    PartialBookProjection,
    TradeProjection,
)
from projections.core.outputs import ListPushIfNewer, PoisonEntry, ViewWrite, coalesce

RECV = 1_764_000_000.123456  # receipt time of every frame below, unix seconds
E = 1_764_000_000_050  # event time, ms


def frame(stream: str, data: Any, recv_ts: float = RECV, seq: int = 1) -> FrameEntry:
    raw = orjson.dumps({"stream": stream, "data": data})
    return FrameEntry(b"1-0", raw, recv_ts, "conn-1", seq)


def mark_price_data(symbol: str = "BTCUSDT", e: int = E, p: str = "95123.40000000") -> dict:
    return {"e": "markPriceUpdate", "E": e, "s": symbol, "p": p, "i": "95110.12345678",
            "P": "95120.00000000", "r": "0.00010000", "T": 1_764_028_800_000}


def depth_data(u: int = 8_000_000_123, e: int = E) -> dict:
    return {"e": "depthUpdate", "E": e, "T": e - 2, "s": "BTCUSDT", "U": u - 40, "u": u,
            "pu": u - 41, "b": [["95100.10", "1.250"], ["95100.00", "0.004"]],
            "a": [["95100.20", "3.100"], ["95100.30", "0.500"]]}


def kline_data(closed: bool = False, e: int = E, t: int = 1_764_000_000_000) -> dict:
    return {"e": "kline", "E": e, "s": "BTCUSDT", "k": {
        "t": t, "T": t + 59_999, "s": "BTCUSDT", "i": "1m", "f": 100, "L": 200,
        "o": "95000.0", "c": "95100.5", "h": "95150.0", "l": "94990.1", "v": "123.456",
        "n": 101, "x": closed, "q": "11734567.89", "V": "60.1", "Q": "5712345.6", "B": "0"}}


def agg_trade_data(a: int = 5_933_014) -> dict:
    return {"e": "aggTrade", "E": E, "s": "BTCUSDT", "a": a, "p": "95100.10", "q": "0.015",
            "f": 100, "l": 105, "T": E - 3, "m": True}


def book_ticker_data(u: int = 400_900_217) -> dict:
    return {"e": "bookTicker", "u": u, "E": E, "T": E - 1, "s": "BTCUSDT", "b": "95100.10",
            "B": "31.21", "a": "95100.20", "A": "40.66"}


def only_write(outputs: list) -> ViewWrite:
    assert len(outputs) == 1
    assert isinstance(outputs[0], ViewWrite)
    return outputs[0]


# --- mark price ---------------------------------------------------------------------------

def test_mark_price_view_holds_the_seed_services_fields_with_prices_as_sent() -> None:
    w = only_write(MarkPriceProjection("websocket").apply(
        frame("btcusdt@markPrice@1s", mark_price_data())))
    assert w.key == "websocket:mark_price:btcusdt"
    assert orjson.loads(w.value) == {
        "mark_price": "95123.40000000", "index_price": "95110.12345678",
        "funding_rate": "0.00010000", "next_funding_time": 1_764_028_800_000,
        "timestamp": E / 1000, "source": "websocket"}
    assert (w.version, w.version_field) == (E / 1000, "timestamp")
    assert w.expire_at_ms == int(RECV * 1000) + 60_000


def test_seed_reader_accepts_a_fresh_mark_price() -> None:
    now = time.time()
    w = only_write(MarkPriceProjection("websocket").apply(
        frame("btcusdt@markPrice@1s", mark_price_data(e=int(now * 1000)), recv_ts=now)))
    data = orjson.loads(w.value)
    assert time.time() - data["timestamp"] < 5
    assert float(data["mark_price"]) == 95123.4


def test_all_market_mark_price_array_writes_one_view_per_symbol() -> None:
    arr = [mark_price_data("BTCUSDT"), mark_price_data("ETHUSDT", p="3400.1"),
           {"e": "somethingNew", "s": "XRPUSDT"}]
    out = [only_write([o]) for o in
           MarkPriceProjection("pfx").apply(frame("!markPrice@arr@1s", arr))]
    assert [w.key for w in out] == ["pfx:mark_price:btcusdt", "pfx:mark_price:ethusdt"]
    assert orjson.loads(out[1].value)["mark_price"] == "3400.1"


def test_mark_price_reads_only_the_configured_families() -> None:
    assert MarkPriceProjection("w").sources == ["raw:market:markPrice",
                                                "raw:market:markPrice_arr"]
    assert MarkPriceProjection("w", families=["markPrice", "depth20"]).sources == [
        "raw:market:markPrice"]


# --- partial book ---------------------------------------------------------------------------

def test_partial_book_view_is_keyed_by_the_streams_depth_and_versioned_by_u() -> None:
    w = only_write(PartialBookProjection("websocket").apply(
        frame("btcusdt@depth20@100ms", depth_data())))
    assert w.key == "websocket:orderbook:btcusdt:20"
    assert orjson.loads(w.value) == {
        "bids": [["95100.10", "1.250"], ["95100.00", "0.004"]],
        "asks": [["95100.20", "3.100"], ["95100.30", "0.500"]],
        "timestamp": E / 1000, "last_update_id": 8_000_000_123, "source": "websocket"}
    assert (w.version, w.version_field) == (8_000_000_123, "last_update_id")
    assert w.expire_at_ms == int(RECV * 1000) + 60_000
    w5 = only_write(PartialBookProjection("websocket").apply(frame("btcusdt@depth5",
                                                                   depth_data())))
    assert w5.key == "websocket:orderbook:btcusdt:5"  # the stream's depth names the book


def test_partial_book_reads_only_configured_depths() -> None:
    assert PartialBookProjection("w", families=["depth10", "markPrice"]).sources == [
        "raw:market:depth10"]
    assert len(PartialBookProjection("w").sources) == 3


# --- klines ---------------------------------------------------------------------------------

def test_open_candle_updates_the_latest_kline_only() -> None:
    out = KlineProjection("websocket").apply(frame("btcusdt@kline_1m", kline_data()))
    w = only_write(out)
    assert w.key == "websocket:kline:btcusdt:1m"
    assert orjson.loads(w.value) == {
        "open_time": 1_764_000_000_000, "close_time": 1_764_000_059_999, "open": "95000.0",
        "high": "95150.0", "low": "94990.1", "close": "95100.5", "volume": "123.456",
        "quote_volume": "11734567.89", "trades": 101, "closed": False, "event_time": E,
        "timestamp": E / 1000, "source": "websocket"}
    assert (w.version, w.version_field) == (E, "event_time")
    assert w.expire_at_ms == int(RECV * 1000) + (2 * 60 + 60) * 1000


def test_closed_candle_is_also_pushed_to_the_capped_list_by_open_time() -> None:
    out = KlineProjection("websocket").apply(frame("btcusdt@kline_1m", kline_data(True)))
    assert isinstance(out[0], ViewWrite)
    push = out[1]
    assert isinstance(push, ListPushIfNewer)
    assert push.key == "websocket:klines:btcusdt:1m"
    assert (push.version, push.version_field, push.cap) == (1_764_000_000_000, "open_time", 500)
    assert orjson.loads(push.value)["closed"] is True


def test_kline_sources_follow_configured_intervals() -> None:
    assert KlineProjection("w", families=["kline_1m", "kline_1h", "aggTrade"]).sources == [
        "raw:market:kline_1m", "raw:market:kline_1h"]


# --- last price, book ticker ----------------------------------------------------------------

def test_last_price_comes_from_the_aggregate_trade() -> None:
    w = only_write(TradeProjection("websocket").apply(frame("btcusdt@aggTrade",
                                                            agg_trade_data())))
    assert w.key == "websocket:last_price:btcusdt"
    assert orjson.loads(w.value) == {"price": "95100.10", "qty": "0.015",
                                     "agg_trade_id": 5_933_014, "trade_time": E - 3,
                                     "timestamp": E / 1000, "source": "websocket"}
    assert (w.version, w.version_field) == (5_933_014, "agg_trade_id")


def test_book_ticker_holds_best_bid_and_ask() -> None:
    w = only_write(BookTickerProjection("websocket").apply(frame("btcusdt@bookTicker",
                                                                 book_ticker_data())))
    assert w.key == "websocket:book_ticker:btcusdt"
    assert orjson.loads(w.value) == {"bid": "95100.10", "bid_qty": "31.21",
                                     "ask": "95100.20", "ask_qty": "40.66",
                                     "update_id": 400_900_217, "timestamp": E / 1000,
                                     "source": "websocket"}
    assert (w.version, w.version_field) == (400_900_217, "update_id")


# --- robustness -------------------------------------------------------------------------------

CASES = [
    (MarkPriceProjection, "btcusdt@markPrice@1s", mark_price_data()),
    (PartialBookProjection, "btcusdt@depth20@100ms", depth_data()),
    (KlineProjection, "btcusdt@kline_1m", kline_data()),
    (TradeProjection, "btcusdt@aggTrade", agg_trade_data()),
    (BookTickerProjection, "btcusdt@bookTicker", book_ticker_data()),
]


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_unknown_fields_do_not_change_the_view(cls: type, stream: str, data: dict) -> None:
    plain = cls("w").apply(frame(stream, data))
    extended = cls("w").apply(frame(stream, {**data, "zz": [1, {"new": True}], "Q9": "x"}))
    assert extended == plain


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_other_event_types_subscribe_replies_and_control_entries_write_nothing(
    cls: type, stream: str, data: dict
) -> None:
    fold = cls("w")
    assert fold.apply(frame(stream, {**data, "e": "somethingBinanceAddsOneDay"})) == []
    assert fold.apply(FrameEntry(b"1-0", b'{"result":null,"id":1}', RECV, "c", 1)) == []
    assert fold.apply(ControlEntry(b"1-0", "opened", {"path": "market"}, RECV, "c")) == []


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_frame_missing_a_needed_field_is_poison(cls: type, stream: str, data: dict) -> None:
    needed = "k" if cls is KlineProjection else "s"
    broken = {k: v for k, v in data.items() if k != needed}
    with pytest.raises(PoisonEntry, match="missing field"):
        cls("w").apply(frame(stream, broken))


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_version_that_is_not_an_integer_is_poison(cls: type, stream: str, data: dict) -> None:
    with pytest.raises(PoisonEntry, match="integer"):
        cls("w").apply(frame(stream, {**data, "E": "1764000000050"}))


@pytest.mark.parametrize(
    "raw", [b"not json", b'{"stream":"btcusdt@aggTrade","data":', b"42",
            b'{"stream":"btcusdt@aggTrade","data":"text"}'])
def test_unparseable_frames_are_poison(raw: bytes) -> None:
    with pytest.raises(PoisonEntry):
        TradeProjection("w").apply(FrameEntry(b"1-0", raw, RECV, "c", 1))


def test_partial_book_on_a_stream_that_names_no_depth_is_poison() -> None:
    with pytest.raises(PoisonEntry, match="partial depth"):
        PartialBookProjection("w").apply(frame("btcusdt@depth@100ms", depth_data()))


def test_coalesce_keeps_the_newest_write_per_view() -> None:
    fold = PartialBookProjection("w")
    outs = []
    for u in (105, 103, 110, 108):
        outs += fold.apply(frame("btcusdt@depth20@100ms", depth_data(u=u)))
    outs += KlineProjection("w").apply(frame("btcusdt@kline_1m", kline_data(True)))
    merged = coalesce(outs)
    books = [o for o in merged if isinstance(o, ViewWrite) and ":orderbook:" in o.key]
    assert [b.version for b in books] == [110]
    assert orjson.loads(books[0].value)["last_update_id"] == 110
    assert sum(isinstance(o, ListPushIfNewer) for o in merged) == 1
