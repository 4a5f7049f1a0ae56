"""Reading market frames: the combined wrapper, then only the fields each view needs.

Pure: imports neither trio nor redis.

Why no attrs/cattrs models here: this is the hot path of the projector. Every market frame of
every symbol passes through it, tens of thousands a second per process, and one projector
process must fold >= 100,000 events/s, Redis round trips included. So a frame is parsed once
with orjson and each view picks the handful of fields it stores into a plain tuple; unknown
fields are never looked at, so new fields Binance adds cost nothing and break nothing
(`bench/bench_folds.py` measures it). Prices and quantities stay the strings Binance sent.

Payloads (Binance USDⓈ-M futures, 2026), all inside `{"stream": name, "data": payload}`:
- markPriceUpdate: e, E, s, p (mark), i (index), P, r (funding rate), T (next funding);
  `!markPrice@arr` sends a list of them.
- depthUpdate (partial `@depth{5,10,20}` and diff `@depth`): e, E, T, s, U, u, pu, b, a.
- aggTrade: e, E, s, a (agg trade id), p, q, f, l, T (trade time), m.
- kline: e, E, s, k{t, T, s, i, f, L, o, c, h, l, v, n, x, q, V, Q, B}.
- bookTicker: e, u, E, T, s, b, B, a, A.
- REST `GET /fapi/v1/depth`: lastUpdateId, E, T, bids, asks.

Each picker raises `PoisonEntry` naming the event when a needed field is missing or of the
wrong kind (an update id that is not an integer would break the forward-only comparison).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from pipeline.eventlog import stream_name
from projections.core.outputs import PoisonEntry


def unwrap(frame: bytes) -> tuple[str, Any] | None:
    """`(stream name, payload)` of a market frame, or None for a frame that carries no market
    event (a SUBSCRIBE reply `{"result": null, "id": 1}`, an error message).

    The raw form without the wrapper (`/ws/<stream>`) is accepted with an empty stream name.
    """
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise PoisonEntry("frame is not JSON") from None
    if type(doc) is dict:
        data = doc.get("data")
        if data is not None:
            stream = doc.get("stream")
            if type(stream) is not str or not (type(data) is dict or type(data) is list):
                raise PoisonEntry("combined wrapper without a stream name or a payload")
            return stream, data
        if "e" in doc:
            return "", doc
        return None
    if type(doc) is list:
        return "", doc
    raise PoisonEntry("frame is neither an object nor a list")


def wrapped_stream(frame: bytes) -> bytes | None:
    """The stream name of a well-formed combined frame `{"stream":"<name>","data":{...}}`,
    read from its bytes without parsing (`pipeline.eventlog.stream_name`, the name the ingestor
    routes by); None for anything else: no wrapper, a list payload, a frame that does not end
    like a complete wrapper (a truncated one).

    Used to find the frames of a batch that a later frame of the same stream supersedes
    (`last_value_key` of the stateless folds): only the newest one is parsed. The checks are
    byte checks only, so a frame that passes them may still be poison; it is then parsed and
    dead-lettered only when it is the last of its stream in its batch.
    """
    return stream_name(frame, True)


def event_type(payload: Any) -> Any:
    """The `e` field of a payload object, None for anything else."""
    return payload.get("e") if type(payload) is dict else None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}"[:80])
    return value


def _sym(value: Any) -> str:
    if type(value) is not str or not value:
        raise TypeError(f"expected a symbol, got {value!r}"[:80])
    return value


def _poison(event: str, exc: Exception) -> PoisonEntry:
    reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)[:80]
    return PoisonEntry(f"{event}: {reason}")


def _bad_kinds(event: str, symbol: Any, *ints: Any) -> PoisonEntry:
    """Why a picked tuple was refused: the symbol must be a non-empty string and ids and
    times integers (an id sent as text would break the forward-only version comparison)."""
    try:
        _sym(symbol)
        for value in ints:
            _int(value)
    except TypeError as exc:
        return _poison(event, exc)
    return PoisonEntry(f"{event}: a field has the wrong type")


# The pickers of the stateless views return plain tuples that the caller unpacks into names:
# a NamedTuple costs ~0.3 µs more per frame to build, a tenth of a whole fold. The comment
# over each type names its fields in order. The checks are inline for the same reason.

# (symbol, event_time ms, mark_price, index_price, funding_rate, next_funding_time ms)
MarkPrice = tuple[str, int, str, str, str, int]


def mark_price(d: Any) -> MarkPrice:
    try:
        out = (d["s"], d["E"], d["p"], d["i"], d["r"], d["T"])
    except (KeyError, TypeError) as exc:
        raise _poison("markPriceUpdate", exc) from None
    if type(out[0]) is not str or type(out[1]) is not int or type(out[5]) is not int:
        raise _bad_kinds("markPriceUpdate", out[0], out[1], out[5])
    return out


# (symbol, event_time ms, u, bids, asks); bids and asks are [[price, qty], ...] as sent
PartialDepth = tuple[str, int, int, list[Any], list[Any]]


def partial_depth(d: Any) -> PartialDepth:
    try:
        out = (d["s"], d["E"], d["u"], d["b"], d["a"])
    except (KeyError, TypeError) as exc:
        raise _poison("depthUpdate", exc) from None
    if type(out[0]) is not str or type(out[1]) is not int or type(out[2]) is not int:
        raise _bad_kinds("depthUpdate", out[0], out[1], out[2])
    if type(out[3]) is not list or type(out[4]) is not list:
        raise PoisonEntry("depthUpdate: b and a must be lists")
    return out


# (symbol, event_time ms, agg_trade_id, price, qty, trade_time ms)
AggTrade = tuple[str, int, int, str, str, int]


def agg_trade(d: Any) -> AggTrade:
    try:
        out = (d["s"], d["E"], d["a"], d["p"], d["q"], d["T"])
    except (KeyError, TypeError) as exc:
        raise _poison("aggTrade", exc) from None
    if (type(out[0]) is not str or type(out[1]) is not int or type(out[2]) is not int
            or type(out[5]) is not int):
        raise _bad_kinds("aggTrade", out[0], out[1], out[2], out[5])
    return out


# (symbol, event_time ms, update_id, bid, bid_qty, ask, ask_qty)
BookTicker = tuple[str, int, int, str, str, str, str]


def book_ticker(d: Any) -> BookTicker:
    try:
        out = (d["s"], d["E"], d["u"], d["b"], d["B"], d["a"], d["A"])
    except (KeyError, TypeError) as exc:
        raise _poison("bookTicker", exc) from None
    if type(out[0]) is not str or type(out[1]) is not int or type(out[2]) is not int:
        raise _bad_kinds("bookTicker", out[0], out[1], out[2])
    return out


# (symbol, event_time ms, interval, open_time ms, close_time ms, open, high, low, close,
#  volume, quote_volume, trades, closed)
Kline = tuple[str, int, str, int, int, str, str, str, str, str, str, int, bool]


def kline(d: Any) -> Kline:
    try:
        k = d["k"]
        out = (d["s"], d["E"], k["i"], k["t"], k["T"], k["o"], k["h"], k["l"], k["c"], k["v"],
               k["q"], k["n"], k["x"])
    except (KeyError, TypeError) as exc:
        raise _poison("kline", exc) from None
    if type(out[2]) is not str or type(out[12]) is not bool:
        raise PoisonEntry("kline: interval must be a string and x a boolean")
    if (type(out[0]) is not str or type(out[1]) is not int or type(out[3]) is not int
            or type(out[4]) is not int or type(out[11]) is not int):
        raise _bad_kinds("kline", out[0], out[1], out[3], out[4], out[11])
    return out


# --- the diff-depth book: every level is parsed, so readable records cost little here -------

# A level of the local book: (sort key, price as sent, qty as sent, removes the level).
# The sort key is the price as a float, negated for bids, so both sides sort best first.
Level = tuple[float, str, str, bool]


def levels(raw: Any, bids: bool) -> list[Level]:
    """Parse `[[price, qty], ...]` for the local book; raises TypeError/ValueError when bad
    (a level that is not a pair, a price that is not a number)."""
    if type(raw) is not list:
        raise TypeError("levels must be a list")
    if bids:
        return [(-float(price), price, qty, float(qty) == 0.0) for price, qty in raw]
    return [(float(price), price, qty, float(qty) == 0.0) for price, qty in raw]


class DiffDepth(NamedTuple):
    symbol: str
    event_time: int
    first_id: int  # U
    final_id: int  # u
    prev_final_id: int  # pu: the u of the previous event of this symbol
    bids: list[Level]
    asks: list[Level]


def diff_depth(d: Any) -> DiffDepth:
    try:
        return DiffDepth(_sym(d["s"]), _int(d["E"]), _int(d["U"]), _int(d["u"]), _int(d["pu"]),
                         levels(d["b"], True), levels(d["a"], False))
    except (KeyError, TypeError, ValueError) as exc:
        raise _poison("depthUpdate", exc) from None


class DepthSnapshot(NamedTuple):
    symbol: str
    last_update_id: int
    event_time: int | None  # ms; None when the response has no E
    bids: list[Level]
    asks: list[Level]


def depth_snapshot(body: Any) -> DepthSnapshot:
    """The body of a `snapshot` control entry: {"symbol": "BTCUSDT", "response": {...}}."""
    try:
        resp = body["response"]
        e_time = resp.get("E")
        return DepthSnapshot(_sym(body["symbol"]), _int(resp["lastUpdateId"]),
                             e_time if type(e_time) is int else None,
                             levels(resp["bids"], True), levels(resp["asks"], False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _poison("depth snapshot", exc) from None
