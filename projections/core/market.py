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
entries (connection opened/closed, gaps, snapshots) do not concern these folds; frames of
another event type (a SUBSCRIBE reply, an event Binance adds one day) give no write.

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

Options: every class takes `prefix` (Settings.view_prefix) and keyword options; options a
class does not use are ignored, so a registry may pass the same ones to all:
- `families`: the configured market stream families (`StreamKind.family`, e.g. "depth20",
  "kline_1m"); a class reads only those it folds. None: every family it can fold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from pipeline.eventlog import FrameEntry
from pipeline.streams import KLINE_INTERVALS, PARTIAL_DEPTHS
from projections.core import frames
from projections.core.keys import Keys, market_key
from projections.core.outputs import Entry, ListPushIfNewer, Output, PoisonEntry, ViewWrite

SOURCE = "websocket"  # the seed service's readers look for this in every market view
TTL_MS = 60_000  # mark price, books, last price, book ticker: 60 s after receipt
KLINE_LIST_CAP = 500

_INTERVAL_S = {"m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400, "M": 31 * 86_400}


def kline_ttl_ms(interval: str) -> int:
    """Two intervals plus a minute: a quiet symbol's open candle (klines are pushed only when
    something changed) stays visible for its whole interval and the next one."""
    return (2 * int(interval[:-1]) * _INTERVAL_S[interval[-1]] + 60) * 1000


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


class LastValueFold:
    """What the stateless folds share: the raw keys of the configured families they fold, the
    head of their view keys, and the batch's last-value key (the stream name). A subclass
    names its view, the families it folds and its event type, and implements `fold`."""

    name: str
    view: str  # view family in the key: P:{view}:{symbol}...
    foldable: tuple[str, ...]  # stream families it can fold
    event: str  # the payload's "e"
    exclusive = False

    def __init__(self, prefix: str, *, families: Iterable[str] | None = None,
                 **_unused: object) -> None:
        self.sources = [market_key(f) for f in _chosen(families, self.foldable)]
        self._key = Keys(prefix).view_head(self.view)

    @staticmethod
    def last_value_key(frame: bytes) -> bytes | None:
        """Frames with the same key: only the batch's last needs folding (module docstring)."""
        return frames.wrapped_stream(frame)

    def apply(self, entry: Entry) -> list[Output]:
        got = _payload(entry)
        if got is None or frames.event_type(got[1]) != self.event:
            return []
        assert type(entry) is FrameEntry
        return self.fold(got[0], got[1], entry)

    def fold(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        raise NotImplementedError


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
        data = got[1]
        if type(data) is list:
            return [self._write(frames.mark_price(d), entry) for d in data
                    if frames.event_type(d) == "markPriceUpdate"]
        if data.get("e") != "markPriceUpdate":
            return []
        return [self._write(frames.mark_price(data), entry)]

    def _write(self, picked: frames.MarkPrice, entry: FrameEntry) -> ViewWrite:
        symbol, e_time, mark, index, rate, next_funding = picked
        ts = e_time / 1000
        value = orjson.dumps({
            "mark_price": mark, "index_price": index, "funding_rate": rate,
            "next_funding_time": next_funding, "timestamp": ts, "source": SOURCE,
        })
        return ViewWrite(self._key + symbol.lower(), value, ts, "timestamp",
                         _expiry(entry, TTL_MS))


class PartialBookProjection(LastValueFold):
    """`P:orderbook:{symbol}:{depth}` from the partial depth streams `@depth{5,10,20}`.

    The depth is read from the stream name in the wrapper (the payload does not say it).
    """

    name = "orderbook"
    view = "orderbook"
    foldable = tuple(f"depth{n}" for n in PARTIAL_DEPTHS)
    event = "depthUpdate"

    def __init__(self, prefix: str, *, families: Iterable[str] | None = None,
                 **_unused: object) -> None:
        super().__init__(prefix, families=families)
        self._depths: dict[str, str] = {}  # stream name -> "20"; at most one per stream

    def fold(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        depth = self._depths.get(stream) or self._depth_of(stream)
        symbol, e_time, u, bids, asks = frames.partial_depth(data)
        value = orjson.dumps({
            "bids": bids, "asks": asks, "timestamp": e_time / 1000, "last_update_id": u,
            "source": SOURCE,
        })
        return [ViewWrite(f"{self._key}{symbol.lower()}:{depth}", value, u, "last_update_id",
                          _expiry(entry, TTL_MS))]

    def _depth_of(self, stream: str) -> str:
        parts = stream.split("@")
        kind = parts[1] if len(parts) > 1 else ""
        depth = kind[len("depth"):]
        if not kind.startswith("depth") or depth not in {str(n) for n in PARTIAL_DEPTHS}:
            raise PoisonEntry(f"partial depth frame on stream {stream[:60]!r}")
        self._depths[stream] = depth
        return depth


class KlineProjection(LastValueFold):
    """`P:kline:{symbol}:{interval}` (the latest candle, versioned by event time) and, for
    each closed candle, `P:klines:{symbol}:{interval}` (newest first, capped at 500,
    versioned by open time)."""

    name = "kline"
    view = "kline"
    foldable = tuple(f"kline_{i}" for i in KLINE_INTERVALS)
    event = "kline"

    def __init__(self, prefix: str, *, families: Iterable[str] | None = None,
                 **_unused: object) -> None:
        super().__init__(prefix, families=families)
        self._closed = Keys(prefix).view_head("klines")
        self._ttl: dict[str, int] = {}

    @staticmethod
    def last_value_key(frame: bytes) -> bytes | None:
        """Open candles only (`"x":false`; a closed one also goes to the list, it must never be
        skipped): of these, only the batch's last per stream needs folding."""
        return frames.wrapped_stream(frame) if b'"x":false' in frame else None

    def fold(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        (symbol, e_time, interval, open_time, close_time, open_, high, low, close, volume,
         quote_volume, trades, closed) = frames.kline(data)
        ttl = self._ttl.get(interval) or self._ttl_of(interval)
        value = orjson.dumps({
            "open_time": open_time, "close_time": close_time, "open": open_, "high": high,
            "low": low, "close": close, "volume": volume, "quote_volume": quote_volume,
            "trades": trades, "closed": closed, "event_time": e_time,
            "timestamp": e_time / 1000, "source": SOURCE,
        })
        suffix = f"{symbol.lower()}:{interval}"
        out: list[Output] = [ViewWrite(self._key + suffix, value, e_time, "event_time",
                                       _expiry(entry, ttl))]
        if closed:
            out.append(ListPushIfNewer(self._closed + suffix, value, open_time, "open_time",
                                       KLINE_LIST_CAP))
        return out

    def _ttl_of(self, interval: str) -> int:
        if interval not in KLINE_INTERVALS:
            raise PoisonEntry(f"kline: unknown interval {interval[:10]!r}")
        self._ttl[interval] = ttl = kline_ttl_ms(interval)
        return ttl


class TradeProjection(LastValueFold):
    """`P:last_price:{symbol}` from `@aggTrade`, versioned by the aggregate trade id."""

    name = "last_price"
    view = "last_price"
    foldable = ("aggTrade",)
    event = "aggTrade"

    def fold(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        symbol, e_time, agg_id, price, qty, trade_time = frames.agg_trade(data)
        value = orjson.dumps({
            "price": price, "qty": qty, "agg_trade_id": agg_id, "trade_time": trade_time,
            "timestamp": e_time / 1000, "source": SOURCE,
        })
        return [ViewWrite(self._key + symbol.lower(), value, agg_id, "agg_trade_id",
                          _expiry(entry, TTL_MS))]


class BookTickerProjection(LastValueFold):
    """`P:book_ticker:{symbol}` from `@bookTicker`, versioned by the book update id."""

    name = "book_ticker"
    view = "book_ticker"
    foldable = ("bookTicker",)
    event = "bookTicker"

    def fold(self, stream: str, data: Any, entry: FrameEntry) -> list[Output]:
        symbol, e_time, update_id, bid, bid_qty, ask, ask_qty = frames.book_ticker(data)
        value = orjson.dumps({
            "bid": bid, "bid_qty": bid_qty, "ask": ask, "ask_qty": ask_qty,
            "update_id": update_id, "timestamp": e_time / 1000, "source": SOURCE,
        })
        return [ViewWrite(self._key + symbol.lower(), value, update_id, "update_id",
                          _expiry(entry, TTL_MS))]
