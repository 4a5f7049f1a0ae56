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
wrong kind (an update id that is not an integer would break the forward-only comparison), and
when the frame could freeze, fake or stale a view (`projections.core.plausible`): a payload
symbol that is not the one its stream names, a time later than the entry's receipt time plus
PIPELINE_MAX_CLOCK_AHEAD_S, an id outside [0, 2^53), book levels that are not decimal strings.
The symbol of a view always comes from the stream name, which is what the ingestor subscribed
to, never from the payload alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from pipeline.eventlog import stream_name
from projections.core.outputs import PoisonEntry
from projections.core.plausible import MAX_SAFE_ID, is_id, is_symbol, is_time, levels_ok


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


def routed_as(frame: bytes, stream: str) -> bool:
    """Does the frame's first `"stream"` (the name the ingestor routed it by, read from the
    bytes) equal `stream`, the one the JSON parser kept? A frame holding the key twice is
    routed by the first and parsed by the last: it could write another symbol's view."""
    return frame.startswith(b'{"stream":"%s"' % stream.encode())


def event_type(payload: Any) -> Any:
    """The `e` field of a payload object, None for anything else."""
    return payload.get("e") if type(payload) is dict else None


def stream_symbol(stream: str) -> str | None:
    """`btcusdt@markPrice@1s` -> `BTCUSDT`: the symbol a per-symbol stream names, None when
    the name holds no well-formed symbol (`plausible.SYMBOL_RE`)."""
    at = stream.find("@")
    symbol = stream[:at].upper() if at > 0 else ""
    return symbol if is_symbol(symbol) else None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}"[:80])
    return value


def _sym(value: Any) -> str:
    if not is_symbol(value):
        raise TypeError(f"expected a symbol, got {value!r}"[:80])
    return value


def _id(value: Any) -> int:
    if not is_id(_int(value)):
        raise TypeError(f"id {value} is outside [0, 2^53)")
    return value


def _time(value: Any, limit_ms: int) -> int:
    if not is_time(_int(value), limit_ms):
        raise TypeError(_time_reason(value, limit_ms))
    return value


def _time_reason(value: int, limit_ms: int) -> str:
    if value <= 0:
        return f"time {value} is not after 1970"
    ahead = (value - limit_ms) / 1000
    return (f"time {value} is {ahead:.0f} s beyond the receipt time + "
            "PIPELINE_MAX_CLOCK_AHEAD_S")


def _poison(event: str, exc: Exception) -> PoisonEntry:
    reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)[:120]
    return PoisonEntry(f"{event}: {reason}")


def _refused(event: str, symbol: str, got_symbol: Any, limit_ms: int,
             times: dict[str, Any], ids: dict[str, Any]) -> PoisonEntry:
    """Why a picked tuple was refused (the slow path, once the inline checks failed): the
    payload's symbol must be the stream's, times integers in (0, receipt + bound], ids and
    counts integers in [0, 2^53)."""
    if got_symbol != symbol:
        return PoisonEntry(f"{event}: payload symbol {str(got_symbol)[:40]!r} is not the "
                           f"stream's {symbol}")
    try:
        for name, value in times.items():
            try:
                _time(value, limit_ms)
            except TypeError as exc:
                raise TypeError(f"{name}: {exc}") from None
        for name, value in ids.items():
            try:
                _id(value)
            except TypeError as exc:
                raise TypeError(f"{name}: {exc}") from None
    except TypeError as exc:
        return _poison(event, exc)
    return PoisonEntry(f"{event}: a field has the wrong type")


# The pickers of the stateless views return plain tuples that the caller unpacks into names:
# a NamedTuple costs ~0.3 µs more per frame to build, a tenth of a whole fold. The comment
# over each type names its fields in order. The checks are inline for the same reason: each
# picker checks the symbol (the stream's, passed in), the times (against `limit_ms`, the
# entry's receipt time + PIPELINE_MAX_CLOCK_AHEAD_S) and the ids; the fold checks the decimal
# strings in the JSON it builds (`projections.core.market`), one regex per view.

# (symbol, event_time ms, mark_price, index_price, funding_rate, next_funding_time ms)
MarkPrice = tuple[str, int, Any, Any, Any, int]


def mark_price(d: Any, symbol: str, limit_ms: int) -> MarkPrice:
    try:
        out = (d["s"], d["E"], d["p"], d["i"], d["r"], d["T"])
    except (KeyError, TypeError) as exc:
        raise _poison("markPriceUpdate", exc) from None
    e, t = out[1], out[5]
    if (out[0] != symbol or type(e) is not int or not 0 < e <= limit_ms or type(t) is not int
            or not 0 <= t < MAX_SAFE_ID):
        raise _refused("markPriceUpdate", symbol, out[0], limit_ms, {"E": e}, {"T": t})
    return out


# (symbol, event_time ms, u, bids, asks); bids and asks are [[price, qty], ...] as sent
PartialDepth = tuple[str, int, int, list[Any], list[Any]]


def partial_depth(d: Any, symbol: str, limit_ms: int) -> PartialDepth:
    try:
        out = (d["s"], d["E"], d["u"], d["b"], d["a"])
    except (KeyError, TypeError) as exc:
        raise _poison("depthUpdate", exc) from None
    e, u = out[1], out[2]
    if (out[0] != symbol or type(e) is not int or not 0 < e <= limit_ms or type(u) is not int
            or not 0 <= u < MAX_SAFE_ID):
        raise _refused("depthUpdate", symbol, out[0], limit_ms, {"E": e}, {"u": u})
    if type(out[3]) is not list or type(out[4]) is not list:
        raise PoisonEntry("depthUpdate: b and a must be lists")
    return out


# (symbol, event_time ms, agg_trade_id, price, qty, trade_time ms)
AggTrade = tuple[str, int, int, Any, Any, int]


def agg_trade(d: Any, symbol: str, limit_ms: int) -> AggTrade:
    try:
        out = (d["s"], d["E"], d["a"], d["p"], d["q"], d["T"])
    except (KeyError, TypeError) as exc:
        raise _poison("aggTrade", exc) from None
    e, a, t = out[1], out[2], out[5]
    if (out[0] != symbol or type(e) is not int or not 0 < e <= limit_ms or type(a) is not int
            or not 0 <= a < MAX_SAFE_ID or type(t) is not int or not 0 < t <= limit_ms):
        raise _refused("aggTrade", symbol, out[0], limit_ms, {"E": e, "T": t}, {"a": a})
    return out


# (symbol, event_time ms, update_id, bid, bid_qty, ask, ask_qty)
BookTicker = tuple[str, int, int, Any, Any, Any, Any]


def book_ticker(d: Any, symbol: str, limit_ms: int) -> BookTicker:
    try:
        out = (d["s"], d["E"], d["u"], d["b"], d["B"], d["a"], d["A"])
    except (KeyError, TypeError) as exc:
        raise _poison("bookTicker", exc) from None
    e, u = out[1], out[2]
    if (out[0] != symbol or type(e) is not int or not 0 < e <= limit_ms or type(u) is not int
            or not 0 <= u < MAX_SAFE_ID):
        raise _refused("bookTicker", symbol, out[0], limit_ms, {"E": e}, {"u": u})
    return out


# (symbol, event_time ms, interval, open_time ms, close_time ms, open, high, low, close,
#  volume, quote_volume, trades, closed)
Kline = tuple[str, int, str, int, int, Any, Any, Any, Any, Any, Any, int, bool]


def kline(d: Any, symbol: str, interval: str, span_ms: int, limit_ms: int) -> Kline:
    """`interval` is the stream's (`btcusdt@kline_1m`: "1m"), `span_ms` its longest length
    (31 days for 1M). The candle must be the stream's, have opened by its event time and
    last at most one interval: a candle opening in 2100 can then never head `P:klines`."""
    try:
        k = d["k"]
        out = (d["s"], d["E"], k["i"], k["t"], k["T"], k["o"], k["h"], k["l"], k["c"], k["v"],
               k["q"], k["n"], k["x"])
        k_symbol = k["s"]
    except (KeyError, TypeError) as exc:
        raise _poison("kline", exc) from None
    if out[2] != interval or type(out[12]) is not bool:
        raise PoisonEntry(f"kline: interval must be the stream's {interval} and x a boolean")
    e, t, t_close, n = out[1], out[3], out[4], out[11]
    if (out[0] != symbol or k_symbol != symbol or type(e) is not int or not 0 < e <= limit_ms
            or type(t) is not int or type(t_close) is not int or not 0 < t <= e
            or not t < t_close < t + span_ms or type(n) is not int or not 0 <= n < MAX_SAFE_ID):
        raise _kline_refused(out, k_symbol, symbol, span_ms, limit_ms)
    return out


def _kline_refused(out: Kline, k_symbol: Any, symbol: str, span_ms: int,
                   limit_ms: int) -> PoisonEntry:
    e, t, t_close = out[1], out[3], out[4]
    why = _refused("kline", symbol, out[0] if out[0] != symbol else k_symbol, limit_ms,
                   {"E": e, "t": t}, {"T": t_close, "n": out[11]})
    if str(why) != "kline: a field has the wrong type":
        return why
    if t > e:
        return PoisonEntry(f"kline: the candle opens at {t}, after its event time {e}")
    return PoisonEntry(f"kline: a candle from {t} to {t_close} is longer than its interval")


# --- the diff-depth book: every level is parsed, so readable records cost little here -------

# A level of the local book: (sort key, price as sent, qty as sent, removes the level).
# The sort key is the price as a float, negated for bids, so both sides sort best first.
Level = tuple[float, str, str, bool]


def levels(raw: Any, bids: bool) -> list[Level]:
    """Parse `[[price, qty], ...]` for the local book; raises TypeError when a level is not a
    pair of decimal strings or the side holds more than `plausible.MAX_LEVELS`."""
    if not levels_ok(raw):
        raise TypeError("levels must be at most 5000 pairs of decimal strings")
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


def diff_depth(d: Any, symbol: str, limit_ms: int) -> DiffDepth:
    """`symbol`: the stream's; `limit_ms`: the entry's receipt time + the clock bound."""
    try:
        e, first, last, prev = d["E"], d["U"], d["u"], d["pu"]
        if (d["s"] != symbol or type(e) is not int or not 0 < e <= limit_ms
                or type(first) is not int or type(last) is not int or type(prev) is not int
                or not 0 <= first < MAX_SAFE_ID or not 0 <= last < MAX_SAFE_ID
                or not 0 <= prev < MAX_SAFE_ID):
            raise _refused("depthUpdate", symbol, d["s"], limit_ms, {"E": e},
                           {"U": first, "u": last, "pu": prev})
        return DiffDepth(symbol, e, first, last, prev, levels(d["b"], True),
                         levels(d["a"], False))
    except (KeyError, TypeError, ValueError) as exc:
        raise _poison("depthUpdate", exc) from None


class DepthSnapshot(NamedTuple):
    symbol: str
    last_update_id: int
    event_time: int | None  # ms; None when the response has no E
    bids: list[Level]
    asks: list[Level]


def depth_snapshot(body: Any, limit_ms: int) -> DepthSnapshot:
    """The body of a `snapshot` control entry: {"symbol": "BTCUSDT", "response": {...}};
    `limit_ms`: the entry's receipt time + the clock bound."""
    try:
        resp = body["response"]
        e_time = resp.get("E")
        return DepthSnapshot(_sym(body["symbol"]), _id(resp["lastUpdateId"]),
                             None if e_time is None else _time(e_time, limit_ms),
                             levels(resp["bids"], True), levels(resp["asks"], False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _poison("depth snapshot", exc) from None
