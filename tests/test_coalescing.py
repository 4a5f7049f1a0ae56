"""Coalescing inside a batch (`projections.shell.groups.fold_batch`): only the newest event of a
view is written, a closed candle is never skipped, and what a later frame supersedes is
acknowledged without being parsed. Pure: no Redis is touched."""

from __future__ import annotations

import time

import orjson

from pipeline.eventlog import format_ts
from projections.core.batch import RawEntry, fold_batch
from projections.core.market import KlineProjection, MarkPriceProjection
from projections.core.outputs import ListPushIfNewer, ViewWrite

NOW = time.time()


def raw(key: str, n: int, stream: str, data: dict[str, object] | bytes) -> RawEntry:
    body = data if isinstance(data, bytes) else orjson.dumps({"stream": stream, "data": data})
    return (key, b"%d-0" % n, {b"frame": body, b"recv_ts": format_ts(NOW), b"conn": b"c",
                               b"seq": b"%d" % n})


def mark(n: int, price: str, symbol: str = "BTCUSDT") -> RawEntry:
    data = {"e": "markPriceUpdate", "E": int(NOW * 1000) + n, "s": symbol, "p": price,
            "i": "1", "P": "1", "r": "0.0001", "T": 1}
    return raw("raw:market:markPrice", n, f"{symbol.lower()}@markPrice@1s", data)


def kline(n: int, open_time: int, closed: bool) -> RawEntry:
    k = {"t": open_time, "T": open_time + 59_999, "s": "BTCUSDT", "i": "1m", "f": 1, "L": 2,
         "o": "1", "c": "2", "h": "3", "l": "0.5", "v": "10", "n": 2, "x": closed, "q": "20",
         "V": "5", "Q": "10", "B": "0"}
    data = {"e": "kline", "E": int(NOW * 1000) + n, "s": "BTCUSDT", "k": k}
    return raw("raw:market:kline_1m", n, "btcusdt@kline_1m", data)


def test_only_the_newest_mark_price_per_symbol_is_written_and_every_entry_is_acked() -> None:
    batch = [mark(1, "1.0"), mark(2, "2.0"), mark(3, "9.0", "ETHUSDT"), mark(4, "3.0")]
    folded = fold_batch(MarkPriceProjection("websocket"), batch)
    writes = {w.key: orjson.loads(w.value)["mark_price"] for w in folded.writes
              if isinstance(w, ViewWrite)}
    assert writes == {"websocket:mark_price:btcusdt": "3.0", "websocket:mark_price:ethusdt": "9.0"}
    assert folded.applied == 4 and not folded.failures
    assert folded.acks == {"raw:market:markPrice": [b"1-0", b"2-0", b"3-0", b"4-0"]}


def test_a_closed_candle_in_the_middle_of_a_batch_still_reaches_the_closed_list() -> None:
    minute = 1_764_000_000_000 - 1_764_000_000_000 % 60_000
    batch = [kline(1, minute, False), kline(2, minute, True), kline(3, minute + 60_000, False),
             kline(4, minute + 60_000, False)]
    folded = fold_batch(KlineProjection("websocket"), batch)
    pushes = [w for w in folded.writes if isinstance(w, ListPushIfNewer)]
    latest = [w for w in folded.writes if isinstance(w, ViewWrite)]
    assert [orjson.loads(p.value)["open_time"] for p in pushes] == [minute]
    assert [orjson.loads(w.value)["open_time"] for w in latest] == [minute + 60_000]


def test_a_superseded_poison_frame_is_acked_unparsed_but_a_last_one_fails() -> None:
    # byte-wise a complete wrapper, but its payload lacks the price: poison when parsed
    bad = {"e": "markPriceUpdate", "E": int(NOW * 1000), "s": "BTCUSDT"}
    superseded = fold_batch(MarkPriceProjection("websocket"),
                            [raw("raw:market:markPrice", 1, "btcusdt@markPrice@1s", bad),
                             mark(2, "2.0")])
    assert not superseded.failures and superseded.applied == 2
    last = fold_batch(MarkPriceProjection("websocket"),
                      [mark(1, "1.0"), raw("raw:market:markPrice", 2, "btcusdt@markPrice@1s", bad)])
    assert len(last.failures) == 1 and last.acks["raw:market:markPrice"] == [b"1-0"]


def test_a_truncated_frame_is_always_parsed_and_fails_even_when_followed() -> None:
    truncated = b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUp'
    folded = fold_batch(MarkPriceProjection("websocket"),
                        [raw("raw:market:markPrice", 1, "", truncated), mark(2, "2.0")])
    assert len(folded.failures) == 1
    assert folded.acks["raw:market:markPrice"] == [b"2-0"]


def test_without_coalescing_every_event_is_parsed_and_written() -> None:
    folded = fold_batch(MarkPriceProjection("websocket"), [mark(1, "1.0"), mark(2, "2.0")],
                        coalescing=False)
    assert [orjson.loads(w.value)["mark_price"] for w in folded.writes
            if isinstance(w, ViewWrite)] == ["1.0", "2.0"]
