"""The stateless market folds: one frame in, the view writes it implies out.

Pure: imports neither trio nor redis. Each class is a `projections.core.Projection`:
`apply(entry)` turns one log entry into `ViewWrite`s (and, for closed candles,
`ListPushIfNewer`s); the shell performs them atomically and forward-only. None of these folds
keeps state between entries, so they run in every projector process side by side
(`exclusive = False`) and a replay yields exactly what the live run wrote.

Each view carries its order key as a version (event time for mark price and klines, update id
for books and tickers, aggregate trade id for trades) and expires a fixed time after the frame
was *received* (`recv_ts`), so replaying old frames brings back no stale key.

Symbols are lower case in keys. Prices and quantities are the strings Binance sent. Control
entries (connection opened/closed, gaps) do not concern these folds, except the kline
history snapshots the market ingestor logs (`KlineProjection`); frames of another event type
(a SUBSCRIBE reply, an event Binance adds one day) give no write.

Pre-coalescing (`last_value_key`): the views here hold only the newest event of a stream, so
of the frames of one stream in a batch only the last matters; the shell
(`projections.shell.groups.fold_batch`) parses only that one, finding the stream name in the
wrapper's first bytes (`frames.wrapped_stream`). Entries of one raw key are in exchange order
per symbol, so the last is the newest. Consequences, by design: a frame superseded in its batch
is not parsed (if it was poison it is acknowledged, not dead-lettered; a frame whose wrapper is
not well-formed is always parsed); in a connection rotation's overlap an older duplicate may
come last, which the forward-only write refuses, leaving the view one event behind until the
stream's next event. Klines publish a closed candle (`"x":true`) to a list, so only open-candle
frames (`"x":false`) are skipped; mark price frames of `!markPrice@arr` (a list of symbols)
and the diff-depth book (projections.core.depthbook) are never skipped.

What a frame must be to be written (`projections.core.plausible`, poison otherwise): its
first `"stream"` in the bytes (what the ingestor routed it by) is the one the parser kept; the
stream names a well-formed symbol and the payload's `s` is that symbol (so the view's key comes
from what was subscribed, never from the payload alone); times are integers no later than
the entry's receipt time + PIPELINE_MAX_CLOCK_AHEAD_S (a candle opens by its event time and
lasts at most its interval; a kline names its stream's interval); ids are integers in
[0, 2^53); prices and quantities are decimal strings, checked with one regex over the JSON the
fold builds (per-field checks cost several times more on a book). A frame of a symbol that is
not configured writes nothing and is counted (`Unrecognized`); in `!markPrice@arr` only
configured USD-M items get a view (COIN-M items, `st` 2, never do; with `PIPELINE_SYMBOLS=ALL`
any well-formed symbol).

Options: every class takes `prefix` (Settings.view_prefix) and keyword options; options a
class does not use are ignored, so a registry may pass the same ones to all:
- `families`: the configured market stream families (`StreamKind.family`, e.g. "depth20",
  "kline_1m"); a class reads only those it folds. None: every family it can fold.
- `symbols`: the configured symbols (upper case); None (`ALL`): any well-formed symbol.
- `bounds`: `plausible.Bounds` (the settings' clock bound; the id rate is the store's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from pipeline.eventlog import ControlEntry, FrameEntry
from pipeline.streams import KLINE_INTERVALS, PARTIAL_DEPTHS
from projections.core import frames
from projections.core.keys import Keys, market_key
from projections.core.outputs import (
    Entry,
    ListMerge,
    ListPushIfNewer,
    Output,
    PoisonEntry,
    Unrecognized,
    ViewWrite,
)
from projections.core.plausible import DECIMAL_JSON, LEVELS_JSON, Bounds, bad_field, is_symbol

SOURCE = "websocket"  # the seed service's readers look for this in every market view
TTL_MS = 60_000  # mark price, books, last price, book ticker: 60 s after receipt
KLINE_LIST_CAP = 500
STREAM_CACHE_MAX = 10_000  # stream names remembered per fold (a bound against junk names)

_INTERVAL_S = {"m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400, "M": 31 * 86_400}


def kline_ttl_ms(interval: str) -> int:
    """Two intervals plus a minute: a quiet symbol's open candle (klines are pushed only when
    something changed) stays visible for its whole interval and the next one."""
    return (2 * interval_ms(interval) // 1000 + 60) * 1000


def interval_ms(interval: str) -> int:
    """The longest a candle of `interval` lasts (a month: 31 days)."""
    return int(interval[:-1]) * _INTERVAL_S[interval[-1]] * 1000


def _payload(entry: Entry) -> tuple[str, Any] | None:
    if type(entry) is not FrameEntry:
        return None  # control entries: nothing for a stateless fold
    return frames.unwrap(entry.frame)


def _expiry(entry: FrameEntry, ttl_ms: int) -> int:
    return int(entry.recv_ts * 1000) + ttl_ms


def _chosen(families: Iterable[str] | None, foldable: Iterable[str]) -> list[str]:
    if families is None:
        return list(foldable)
    wanted = set(families)
    return [f for f in foldable if f in wanted]


def _value_re(*decimals: str, head: bytes = b"", optional: tuple[str, ...] = ()
              ) -> re.Pattern[bytes]:
    """The start of a view's JSON up to its last decimal field: `head` (a pattern for the
    fields before the first decimal), then each of `decimals` a decimal string (those in
    `optional` may also be empty), in the order the fold writes them."""
    parts = [b'"%s":(?:%s%s)' % (name.encode(), DECIMAL_JSON,
                                  b'|""' if name in optional else b"") for name in decimals]
    return re.compile(rb"\{" + head + b",".join(parts) + b",")


_NOT_CONFIGURED = None  # cached for a stream whose symbol is not configured


class LastValueFold:
    """What the stateless folds share: the raw keys of the configured families they fold, the
    head of their view keys, the batch's last-value key (the stream name), and the checks of
    the stream name (module docstring). A subclass names its view, the families it folds and
    its event type, and implements `fold`; `stream_extra` reads what else it needs from the
    stream name (a book's depth, a kline's interval)."""

    name: str
    view: str  # view family in the key: P:{view}:{symbol}...
    foldable: tuple[str, ...]  # stream families it can fold
    event: str  # the payload's "e"
    exclusive = False

    def __init__(self, prefix: str, *, families: Iterable[str] | None = None,
                 symbols: Iterable[str] | None = None, bounds: Bounds | None = None,
                 **_unused: object) -> None:
        self.sources = [market_key(f) for f in _chosen(families, self.foldable)]
        self._key = Keys(prefix).view_head(self.view)
        self.bounds = bounds or Bounds()
        self._ahead_ms = self.bounds.max_ahead_ms
        self._symbols = frozenset(symbols) if symbols is not None else None
        # stream name -> (symbol, the wrapper's first bytes, stream_extra) or _NOT_CONFIGURED
        self._streams: dict[str, tuple[str, bytes, Any] | None] = {}
        self._unconfigured = Unrecognized(f"{self.event}: symbol not in PIPELINE_SYMBOLS")

    @staticmethod
    def last_value_key(frame: bytes) -> bytes | None:
        """Frames with the same key: only the batch's last needs folding (module docstring)."""
        return frames.wrapped_stream(frame)

    def configured(self, symbol: Any) -> bool:
        """Does `symbol` (as a payload writes it) get views here?"""
        if self._symbols is None:
            return is_symbol(symbol)
        return type(symbol) is str and symbol in self._symbols

    def apply(self, entry: Entry) -> list[Output]:
        got = _payload(entry)
        if got is None or frames.event_type(got[1]) != self.event:
            return []
        assert type(entry) is FrameEntry
        return self._checked(got[0], got[1], entry)

    def _checked(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        """The stream name's checks (module docstring), then `fold`."""
        known = self._streams.get(stream)
        if known is None:
            if stream in self._streams:
                return [self._unconfigured]
            known = self._learn(stream)
            if known is None:
                return [self._unconfigured]
        symbol, head, extra = known
        if not entry.frame.startswith(head):
            raise PoisonEntry(f"{self.event}: the frame names a stream before "
                              f"{stream[:60]!r}; it was routed by that one")
        return self.fold(symbol, extra, data, entry, int(entry.recv_ts * 1000) + self._ahead_ms)

    def _learn(self, stream: str) -> tuple[str, bytes, Any] | None:
        symbol = frames.stream_symbol(stream)
        if symbol is None:
            raise PoisonEntry(f"{self.event}: stream {stream[:60]!r} names no symbol")
        if len(self._streams) >= STREAM_CACHE_MAX:
            self._streams.clear()
        if not self.configured(symbol):
            self._streams[stream] = _NOT_CONFIGURED
            return None
        known = (symbol, b'{"stream":"%s"' % stream.encode(), self.stream_extra(stream))
        self._streams[stream] = known
        return known

    def stream_extra(self, stream: str) -> Any:
        """What the fold reads from a (well-formed) stream name; PoisonEntry if it is not one
        of the fold's streams."""
        return None

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        """`symbol`: the stream's (the payload must agree); `limit_ms`: the latest plausible
        time of this entry (its receipt time + PIPELINE_MAX_CLOCK_AHEAD_S)."""
        raise NotImplementedError


_MARK_VALUE = _value_re("mark_price", "index_price", "funding_rate",
                        optional=("funding_rate",))  # delivery contracts send "r": ""


class MarkPriceProjection(LastValueFold):
    """`P:mark_price:{symbol}` from `@markPrice` and `!markPrice@arr` (a list per frame)."""

    name = "mark_price"
    view = "mark_price"
    foldable = ("markPrice", "markPrice_arr")
    event = "markPriceUpdate"

    def apply(self, entry: Entry) -> list[Output]:
        got = _payload(entry)
        if got is None:
            return []
        assert type(entry) is FrameEntry
        stream, data = got
        if type(data) is not list:
            if data.get("e") != "markPriceUpdate":
                return []
            return self._checked(stream, data, entry)
        if not stream.startswith("!markPrice@arr") or not frames.routed_as(entry.frame, stream):
            raise PoisonEntry(f"markPriceUpdate: a list on stream {stream[:60]!r}")
        limit_ms = int(entry.recv_ts * 1000) + self._ahead_ms
        return [self._write(frames.mark_price(d, d["s"], limit_ms), entry) for d in data
                if self._usd_m_item(d)]

    def _usd_m_item(self, d: Any) -> bool:
        """An `!markPrice@arr` item that gets a view: a mark price of a configured symbol of
        USD-M (COIN-M items carry `st` 2 since 2026-06-30; any `st` but 1 is not USD-M)."""
        if type(d) is not dict or d.get("e") != "markPriceUpdate":
            return False
        st = d.get("st")
        return (st is None or st == 1) and self.configured(d.get("s"))

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        return [self._write(frames.mark_price(data, symbol, limit_ms), entry)]

    def _write(self, picked: frames.MarkPrice, entry: FrameEntry) -> ViewWrite:
        symbol, e_time, mark, index, rate, next_funding = picked
        ts = e_time / 1000
        value = orjson.dumps({
            "mark_price": mark, "index_price": index, "funding_rate": rate,
            "next_funding_time": next_funding, "timestamp": ts, "source": SOURCE,
        })
        if _MARK_VALUE.match(value) is None:
            raise PoisonEntry(bad_field("markPriceUpdate", {
                "p": mark, "i": index, "r": "0" if rate == "" else rate}))
        return ViewWrite(self._key + symbol.lower(), value, ts, "timestamp",
                         _expiry(entry, TTL_MS), ts)


_BOOK_VALUE = re.compile(rb'\{"bids":' + LEVELS_JSON + rb',"asks":' + LEVELS_JSON + rb",")
_PARTIAL_DEPTHS = {str(n) for n in PARTIAL_DEPTHS}


class PartialBookProjection(LastValueFold):
    """`P:orderbook:{symbol}:{depth}` from the partial depth streams `@depth{5,10,20}`.

    The depth is read from the stream name in the wrapper (the payload does not say it).
    """

    name = "orderbook"
    view = "orderbook"
    foldable = tuple(f"depth{n}" for n in PARTIAL_DEPTHS)
    event = "depthUpdate"

    def stream_extra(self, stream: str) -> Any:
        parts = stream.split("@")
        kind = parts[1] if len(parts) > 1 else ""
        depth = kind[len("depth"):]
        if not kind.startswith("depth") or depth not in _PARTIAL_DEPTHS:
            raise PoisonEntry(f"partial depth frame on stream {stream[:60]!r}")
        return depth

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        _, e_time, u, bids, asks = frames.partial_depth(data, symbol, limit_ms)
        ts = e_time / 1000
        value = orjson.dumps({
            "bids": bids, "asks": asks, "timestamp": ts, "last_update_id": u,
            "source": SOURCE,
        })
        if _BOOK_VALUE.match(value) is None:
            raise PoisonEntry("depthUpdate: b and a must be at most 5000 [price, qty] pairs "
                              "of decimal strings")
        return [ViewWrite(f"{self._key}{symbol.lower()}:{extra}", value, u, "last_update_id",
                          _expiry(entry, TTL_MS), ts, True)]


_KLINE_VALUE = _value_re("open", "high", "low", "close", "volume", "quote_volume",
                         head=rb'"open_time":\d+,"close_time":\d+,')


class KlineProjection(LastValueFold):
    """`P:kline:{symbol}:{interval}` (the latest candle, versioned by event time) and, for
    each closed candle, `P:klines:{symbol}:{interval}` (newest first, capped at 500 or
    `kline_history` if more, versioned by open time).

    History: the market ingestor logs the last closed candles of each kline stream from REST
    (`GET /fapi/v1/klines`) at start and after a gap, as a `snapshot` control entry in the
    stream's raw key (`symbol`, `interval`, `fetched_at_ms`, `weight_used_1m`, `response`: the
    rows as REST sent them, oldest first, the last one the candle still open). Its closed rows
    are merged into the list (`ListMerge`): those the list lacks land in order, none twice, so
    the list is whole within seconds of start and across a gap, and a replay rebuilds it from
    the log alone. A row becomes the candle JSON a closed stream frame gives, with
    `event_time` its close time and `source: "rest"`. Poison: a symbol that is not configured
    or not well-formed, an interval the fold does not read, rows that are not Binance's 12
    fields (integer times and count, decimal strings), a candle longer than its interval or
    closing after the entry's receipt time + PIPELINE_MAX_CLOCK_AHEAD_S."""

    name = "kline"
    view = "kline"
    foldable = tuple(f"kline_{i}" for i in KLINE_INTERVALS)
    event = "kline"

    def __init__(self, prefix: str, *, kline_history: int = KLINE_LIST_CAP,
                 **options: Any) -> None:
        super().__init__(prefix, **options)
        self._closed = Keys(prefix).view_head("klines")
        self.cap = max(KLINE_LIST_CAP, kline_history)
        self._intervals = frozenset(src[len(market_key("kline_")):] for src in self.sources)

    def apply(self, entry: Entry) -> list[Output]:
        if type(entry) is ControlEntry:
            return self._history(entry) if entry.ctl == "snapshot" else []
        return super().apply(entry)

    def _history(self, entry: ControlEntry) -> list[Output]:
        """A REST history snapshot -> one ListMerge of its closed candles (class docstring)."""
        body = entry.body
        if not isinstance(body, dict) or body.get("kind") != "klines":
            return []
        symbol, interval, rows = body.get("symbol"), body.get("interval"), body.get("response")
        if interval not in self._intervals:
            raise PoisonEntry(f"kline history: interval {str(interval)[:20]!r} not folded here")
        if not isinstance(symbol, str) or not self.configured(symbol):
            raise PoisonEntry(f"kline history: symbol {str(symbol)[:40]!r} is not configured")
        if not isinstance(rows, list) or len(rows) > 1500:
            raise PoisonEntry("kline history: response is not a list of at most 1500 rows")
        limit_ms = int(entry.recv_ts * 1000) + self._ahead_ms
        span = interval_ms(interval)
        values = [history_candle(row, span, limit_ms) for row in rows[:-1]]  # last: still open
        if not values:
            return []
        newest = max(orjson.loads(v)["close_time"] for v in values) / 1000
        return [ListMerge(f"{self._closed}{symbol.lower()}:{interval}", tuple(values),
                          "open_time", self.cap, newest)]

    @staticmethod
    def last_value_key(frame: bytes) -> bytes | None:
        """Open candles only (`"x":false`; a closed one also goes to the list, it must never be
        skipped): of these, only the batch's last per stream needs folding."""
        return frames.wrapped_stream(frame) if b'"x":false' in frame else None

    def stream_extra(self, stream: str) -> Any:
        """(interval, its longest length in ms, the view's TTL in ms)."""
        parts = stream.split("@")
        interval = parts[1][len("kline_"):] if len(parts) == 2 else ""
        if not parts[1].startswith("kline_") or interval not in KLINE_INTERVALS:
            raise PoisonEntry(f"kline: unknown interval on stream {stream[:60]!r}")
        return interval, interval_ms(interval), kline_ttl_ms(interval)

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        interval, span_ms, ttl = extra
        (_, e_time, _, open_time, close_time, open_, high, low, close, volume,
         quote_volume, trades, closed) = frames.kline(data, symbol, interval, span_ms, limit_ms)
        ts = e_time / 1000
        value = orjson.dumps({
            "open_time": open_time, "close_time": close_time, "open": open_, "high": high,
            "low": low, "close": close, "volume": volume, "quote_volume": quote_volume,
            "trades": trades, "closed": closed, "event_time": e_time,
            "timestamp": ts, "source": SOURCE,
        })
        if _KLINE_VALUE.match(value) is None:
            raise PoisonEntry(bad_field("kline", {"o": open_, "h": high, "l": low, "c": close,
                                                  "v": volume, "q": quote_volume}))
        suffix = f"{symbol.lower()}:{interval}"
        out: list[Output] = [ViewWrite(self._key + suffix, value, e_time, "event_time",
                                       _expiry(entry, ttl), ts)]
        if closed:
            out.append(ListPushIfNewer(self._closed + suffix, value, open_time, "open_time",
                                       self.cap, ts))
        return out


def history_candle(row: Any, span_ms: int, limit_ms: int) -> bytes:
    """One closed `GET /fapi/v1/klines` row as the candle JSON of `P:klines` (open time, open,
    high, low, close, volume, close time, quote volume, trades, ...), or PoisonEntry."""
    if not isinstance(row, list) or len(row) < 9:
        raise PoisonEntry("kline history: a row is not a list of Binance's kline fields")
    open_time, close_time, trades = row[0], row[6], row[8]
    if not (type(open_time) is int and type(close_time) is int and type(trades) is int
            and 0 < open_time < close_time < open_time + span_ms and close_time <= limit_ms
            and trades >= 0):
        raise PoisonEntry(f"kline history: row {str(row)[:80]} has implausible times")
    value = orjson.dumps({
        "open_time": open_time, "close_time": close_time, "open": row[1], "high": row[2],
        "low": row[3], "close": row[4], "volume": row[5], "quote_volume": row[7],
        "trades": trades, "closed": True, "event_time": close_time,
        "timestamp": close_time / 1000, "source": "rest",
    })
    if _KLINE_VALUE.match(value) is None:
        raise PoisonEntry(bad_field("kline history", {"o": row[1], "h": row[2], "l": row[3],
                                                      "c": row[4], "v": row[5], "q": row[7]}))
    return value


_TRADE_VALUE = _value_re("price", "qty")


class TradeProjection(LastValueFold):
    """`P:last_price:{symbol}` from `@aggTrade`, versioned by the aggregate trade id."""

    name = "last_price"
    view = "last_price"
    foldable = ("aggTrade",)
    event = "aggTrade"

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        _, e_time, agg_id, price, qty, trade_time = frames.agg_trade(data, symbol, limit_ms)
        ts = e_time / 1000
        value = orjson.dumps({
            "price": price, "qty": qty, "agg_trade_id": agg_id, "trade_time": trade_time,
            "timestamp": ts, "source": SOURCE,
        })
        if _TRADE_VALUE.match(value) is None:
            raise PoisonEntry(bad_field("aggTrade", {"p": price, "q": qty}))
        return [ViewWrite(self._key + symbol.lower(), value, agg_id, "agg_trade_id",
                          _expiry(entry, TTL_MS), ts, True)]


_TICKER_VALUE = _value_re("bid", "bid_qty", "ask", "ask_qty")


class BookTickerProjection(LastValueFold):
    """`P:book_ticker:{symbol}` from `@bookTicker`, versioned by the book update id."""

    name = "book_ticker"
    view = "book_ticker"
    foldable = ("bookTicker",)
    event = "bookTicker"

    def fold(self, symbol: str, extra: Any, data: Any, entry: FrameEntry,
             limit_ms: int) -> list[Output]:
        _, e_time, update_id, bid, bid_qty, ask, ask_qty = frames.book_ticker(data, symbol,
                                                                              limit_ms)
        ts = e_time / 1000
        value = orjson.dumps({
            "bid": bid, "bid_qty": bid_qty, "ask": ask, "ask_qty": ask_qty,
            "update_id": update_id, "timestamp": ts, "source": SOURCE,
        })
        if _TICKER_VALUE.match(value) is None:
            raise PoisonEntry(bad_field("bookTicker", {"b": bid, "B": bid_qty, "a": ask,
                                                       "A": ask_qty}))
        return [ViewWrite(self._key + symbol.lower(), value, update_id, "update_id",
                          _expiry(entry, TTL_MS), ts, True)]
