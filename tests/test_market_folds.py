"""The stateless market folds: what each view holds after a realistic Binance frame.

Pure: no Redis, no trio. The frames are shaped as Binance USDⓈ-M futures sends them (2026),
inside the combined wrapper `{"stream": ..., "data": ...}`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from pipeline.eventlog import ControlEntry, FrameEntry, route_frame, stream_name
from projections.core import frames
from projections.core.market import (
    BookTickerProjection,
    KlineProjection,
    MarkPriceProjection,
    PartialBookProjection,
    TradeProjection,
)
from projections.core.outputs import ListPushIfNewer, PoisonEntry, Unrecognized, ViewWrite, coalesce

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


# --- the wrapper's bytes: what the ingestor routes by is what the projector coalesces by -----

@pytest.mark.parametrize("data", [mark_price_data(), depth_data(), kline_data(), {}])
def test_a_well_formed_frame_is_keyed_by_the_stream_name_it_is_routed_by(data: dict) -> None:
    raw = orjson.dumps({"stream": "btcusdt@depth20@100ms", "data": data})
    assert frames.wrapped_stream(raw) == stream_name(raw) == b"btcusdt@depth20@100ms"
    assert route_frame(raw) == "raw:market:depth20"


@pytest.mark.parametrize("raw", [
    b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","a":1',  # truncated
    b'{"stream":"!markPrice@arr@1s","data":[{"e":"markPriceUpdate"}]}',  # a list payload
    b'{"stream":"btcusdt@aggTrade","data":null}',
    b'{"stream":"btcusdt@aggTrade","d":{"e":"aggTrade"}}',
    b'{"data":{"e":"aggTrade"},"stream":"btcusdt@aggTrade"}',  # not Binance's field order
    b'{"e":"aggTrade","s":"BTCUSDT"}',  # no wrapper (/ws/<stream>)
])
def test_a_frame_that_is_not_a_complete_wrapper_is_never_coalesced_away(raw: bytes) -> None:
    assert frames.wrapped_stream(raw) is None
# --- poison: a frame that could freeze, fake or stale a view (projections.core.plausible) ---

AHEAD_MS = 10_000  # the default PIPELINE_MAX_CLOCK_AHEAD_S
LIMIT = int(RECV * 1000) + AHEAD_MS


def poison_reason(cls: type, stream: str, data: object, **options: object) -> str:
    with pytest.raises(PoisonEntry) as err:
        cls("w", **options).apply(frame(stream, data))
    return str(err.value)


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_an_event_time_beyond_the_receipt_time_and_the_bound_is_poison(
        cls: type, stream: str, data: dict) -> None:
    at_limit = {**data, "E": LIMIT}
    if cls is KlineProjection:
        at_limit = {**at_limit, "k": {**data["k"], "t": LIMIT - 50_000,
                                      "T": LIMIT + 9_999}}
    assert cls("w").apply(frame(stream, at_limit))  # receipt + 10 s: still plausible
    assert "PIPELINE_MAX_CLOCK_AHEAD_S" in poison_reason(cls, stream, {**data, "E": LIMIT + 1})
    assert "not after 1970" in poison_reason(cls, stream, {**data, "E": -5000})


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_payload_symbol_other_than_the_streams_is_poison(cls: type, stream: str,
                                                          data: dict) -> None:
    for symbol in ("ETHUSDT", "*", "A" * 100_000, None):
        assert "is not the stream's BTCUSDT" in poison_reason(cls, stream, {**data, "s": symbol})


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_stream_name_that_names_no_symbol_is_poison(cls: type, stream: str,
                                                      data: dict) -> None:
    for bad in ("*@" + stream.split("@", 1)[1], "@" + stream, stream.split("@", 1)[1],
                "b" * 40 + "@" + stream.split("@", 1)[1]):
        poison_reason(cls, bad, data)


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_frame_routed_by_another_stream_name_is_poison(cls: type, stream: str,
                                                         data: dict) -> None:
    """`"stream"` twice: the ingestor routes by the first, the parser keeps the last."""
    other = "ethusdt@" + stream.split("@", 1)[1]
    payload = {**data, "s": "ETHUSDT"}
    raw = (f'{{"stream":"{stream}","stream":"{other}","data":'.encode()
           + orjson.dumps(payload) + b"}")
    with pytest.raises(PoisonEntry, match="routed by"):
        cls("w").apply(FrameEntry(b"1-0", raw, RECV, "c", 1))


@pytest.mark.parametrize(("cls", "stream", "data"), CASES)
def test_a_symbol_that_is_not_configured_writes_nothing_and_is_counted(
        cls: type, stream: str, data: dict) -> None:
    fold = cls("w", symbols=["ETHUSDT"])
    [out] = fold.apply(frame(stream, data))
    assert isinstance(out, Unrecognized) and "PIPELINE_SYMBOLS" in out.event_type
    assert cls("w", symbols=["BTCUSDT"]).apply(frame(stream, data))  # the configured one


@pytest.mark.parametrize(("cls", "stream", "data", "field"), [
    (MarkPriceProjection, "btcusdt@markPrice@1s", mark_price_data(), "p"),
    (MarkPriceProjection, "btcusdt@markPrice@1s", mark_price_data(), "i"),
    (MarkPriceProjection, "btcusdt@markPrice@1s", mark_price_data(), "r"),
    (TradeProjection, "btcusdt@aggTrade", agg_trade_data(), "p"),
    (TradeProjection, "btcusdt@aggTrade", agg_trade_data(), "q"),
    (BookTickerProjection, "btcusdt@bookTicker", book_ticker_data(), "b"),
    (BookTickerProjection, "btcusdt@bookTicker", book_ticker_data(), "A"),
])
def test_a_price_or_quantity_that_is_not_a_decimal_string_is_poison(
        cls: type, stream: str, data: dict, field: str) -> None:
    for bad in (None, 95100.1, 7, {"p": "1"}, ["1"], "1e5", "NaN", " 1", "1.", ".5", "--1",
                "1" * 33, "1,5"):
        assert "not a decimal string" in poison_reason(cls, stream, {**data, field: bad}), bad


def test_a_delivery_contract_mark_price_without_funding_is_written() -> None:
    w = only_write(MarkPriceProjection("w").apply(frame(
        "btcusdt_261225@markPrice@1s", {**mark_price_data("BTCUSDT_261225"), "r": "", "T": 0})))
    assert orjson.loads(w.value)["funding_rate"] == ""


@pytest.mark.parametrize("levels", [
    [[95100.1, "1.0"]], [["95100.1", None]], [["95100.1"]], [["95100.1", "1.0", "2.0"]],
    [{"p": "95100.1", "q": "1.0"}], ["95100.1"], [["95100.1", "1e3"]],
    [["95100.1", "1.0"]] * 5001])
def test_book_levels_that_are_not_pairs_of_decimal_strings_are_poison(levels: list) -> None:
    with pytest.raises(PoisonEntry, match="decimal strings"):
        PartialBookProjection("w").apply(frame("btcusdt@depth20@100ms",
                                               {**depth_data(), "b": levels}))


@pytest.mark.parametrize(("cls", "stream", "data", "field"), [
    (PartialBookProjection, "btcusdt@depth20@100ms", depth_data(), "u"),
    (TradeProjection, "btcusdt@aggTrade", agg_trade_data(), "a"),
    (BookTickerProjection, "btcusdt@bookTicker", book_ticker_data(), "u"),
])
def test_an_id_outside_what_lua_compares_exactly_is_poison(cls: type, stream: str, data: dict,
                                                           field: str) -> None:
    assert cls("w").apply(frame(stream, {**data, field: 2**53 - 1}))
    for bad in (2**53, 2**63 - 1, -1):
        assert "outside [0, 2^53)" in poison_reason(cls, stream, {**data, field: bad})


def test_id_views_carry_the_event_time_and_say_their_version_is_an_id() -> None:
    book = only_write(PartialBookProjection("w").apply(frame("btcusdt@depth20@100ms",
                                                             depth_data())))
    assert (book.event_s, book.ids) == (E / 1000, True)
    mark = only_write(MarkPriceProjection("w").apply(frame("btcusdt@markPrice@1s",
                                                           mark_price_data())))
    assert (mark.event_s, mark.ids) == (E / 1000, False)


def test_a_candle_must_be_of_its_stream_open_by_its_event_time_and_one_interval_long() -> None:
    def reason(**k: object) -> str:
        data = kline_data(True)
        return poison_reason(KlineProjection, "btcusdt@kline_1m", {**data, "k": {**data["k"],
                                                                                **k}})
    assert "PIPELINE_MAX_CLOCK_AHEAD_S" in reason(t=4_102_444_800_000, T=4_102_444_859_999)
    assert "opens at" in reason(t=E + 1_000, T=E + 60_999)  # after its own event time
    assert "longer than its interval" in reason(T=1_764_000_000_000 + 60_000)
    assert "interval must be the stream's 1m" in reason(i="1h")
    assert "is not the stream's BTCUSDT" in reason(s="ETHUSDT")
    with pytest.raises(PoisonEntry, match="unknown interval"):
        KlineProjection("w").apply(frame("btcusdt@kline_7m", kline_data()))


def test_all_market_mark_prices_give_views_only_to_configured_usd_m_symbols() -> None:
    arr = [mark_price_data("BTCUSDT"), mark_price_data("XRPUSDT"),
           {**mark_price_data("BTCUSD_PERP"), "st": 2},
           {**mark_price_data("ETHUSDT"), "st": 2},  # a COIN-M item is never a USD-M view
           mark_price_data("*"), {**mark_price_data("A" * 100), "st": 1}]
    fold = MarkPriceProjection("w", symbols=["BTCUSDT", "ETHUSDT"])
    assert [w.key for w in fold.apply(frame("!markPrice@arr@1s", arr))] == [  # type: ignore[union-attr]
        "w:mark_price:btcusdt"]
    every = MarkPriceProjection("w")  # PIPELINE_SYMBOLS=ALL: any well-formed symbol
    assert [w.key for w in every.apply(frame("!markPrice@arr@1s", arr))] == [  # type: ignore[union-attr]
        "w:mark_price:btcusdt", "w:mark_price:xrpusdt"]


def test_an_all_market_item_with_a_bad_price_poisons_its_frame() -> None:
    arr = [mark_price_data("BTCUSDT"), mark_price_data("ETHUSDT", p=None)]  # type: ignore[arg-type]
    with pytest.raises(PoisonEntry, match="not a decimal string"):
        MarkPriceProjection("w").apply(frame("!markPrice@arr@1s", arr))


def test_a_list_payload_on_a_per_symbol_stream_is_poison() -> None:
    with pytest.raises(PoisonEntry, match="a list on stream"):
        MarkPriceProjection("w").apply(frame("btcusdt@markPrice@1s", [mark_price_data()]))
