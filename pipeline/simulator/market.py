"""The market side of the simulated exchange: stream names, payloads, REST bodies, faults.

Pure: no trio, no sockets; the server (`pipeline.simulator.server`) owns the I/O and the clock.

Hot path. With `rate=0` the simulator must outrun any client, so payloads are never built as
dicts and serialised: each is one f-string over pre-formatted pieces (a book level's wire text
is cached when the level changes, see `book.py`; a symbol's `"s":…,"ps":…` head and `"st"`
tail are formatted once), and the combined wrapper is a prefix and a suffix computed once per
subscription. The field order is Binance's own, as its 2026 frames show it.

Binance's 2026 payloads (after the COIN-M migration of 2026-06-30):
- markPriceUpdate: e, E, s, p, ap (mark price moving average, added 2026-03-16; equal to `p` in
  every frame Binance has been seen to send), P, i, r, T, st (1 = USDⓈ-M, 2 = COIN-M). A
  delivery contract sends `"r":""` and `"T":0`. `!markPrice@arr` sends one list of the crypto
  symbols, COIN-M ones included (`BTCUSD_PERP`, st 2), and the TradFi symbols in a second
  message of their own.
- depthUpdate (diff and partial): e, E, T, s, ps (the pair), U, u, pu, b, a, st.
- bookTicker: e, u, s, ps, b, B, a, A, T, E, st.
- aggTrade: e, E, a, s, p, q, nq (the quantity without RPI orders, since 2025-12-31), f, l, T,
  m, st.
- kline: e, E, s, k{t, T, s, i, f, L, o, c, h, l, v, n, x, q, V, Q, B}: no `st`.
- forceOrder: e, E, o{s, S, o, f, q, p, ap, X, l, z, T}.
- tradingSession: e (EquityUpdate, CommodityUpdate, KR_EquityUpdate), E, t, T, S: one message
  per underlying market (`tradfi.py`).

Stream names. Depth speeds are `@100ms`, `@500ms` or none (250 ms); any other name (an unknown
speed such as `@250ms`, an unknown kind, a symbol not trading) is acknowledged by SUBSCRIBE and
then never sent, which is what Binance does. Paths: `/public` serves depth and bookTicker,
`/market` the rest; the unrouted legacy `/ws` and `/stream` serve the `/public` streams only
since 2026-04-23 (`serves`).

Each stream name has one `Feed` of events shared by every connection on it (Binance broadcasts);
per connection, each subscribed stream has a `StreamState` (its place in the feed). Events are
made in one of two ways: on demand, when a connection's pacer (`session.py`) finds the stream
due and no other connection has made the next event yet (`frame`); or, in cadence mode, on the
exchange's own clock whoever listens (`advance`, see `cadence.py`), each event then queued in
the `Outbox` of every connection that reads the stream (`take`), which the server writes out
when the clock's turn ends (`Outbox.flush`).
"""

from __future__ import annotations

import functools
import math
import random
from collections import deque
from collections.abc import Callable, Container, Iterable

import attrs

from pipeline.simulator import cadence, listings
from pipeline.simulator.book import Book, SymbolSpec, symbol_spec
from pipeline.simulator.candles import INTERVALS, CandleSeries, kline_event
from pipeline.simulator.tradfi import TradingHours

PUBLIC = "public"
MARKET = "market"
LEGACY = "legacy"  # the unrouted /ws and /stream paths

_SPEEDS = {"100ms": 0.1, "500ms": 0.5}
FUNDING_MS = 8 * 3_600_000
MULTI_MESSAGE = ("markPrice_arr", "tradingSession")
BOOK_KINDS = ("depth", "partial", "bookTicker")


def serves(conn_path: str, stream_path: str) -> bool:
    """Whether a connection on `conn_path` gets the frames of a stream routed to `stream_path`:
    only its own path; a legacy connection only `/public` streams. Others are accepted, silent."""
    return conn_path == stream_path or (conn_path == LEGACY and stream_path == PUBLIC)


# --- stream names ----------------------------------------------------------------------------

@attrs.frozen
class StreamSpec:
    """A stream name understood: what it carries, for whom, on which path, how often."""

    name: str
    # markPrice, markPrice_arr, depth, partial, aggTrade, kline, bookTicker, forceOrder,
    # tradingSession
    kind: str
    symbol: str | None
    path: str  # PUBLIC or MARKET
    interval: float  # Binance's own seconds between frames
    levels: int = 0  # partial depth: 5, 10 or 20
    kline: str = ""  # kline interval, e.g. "1m"
    jitter: bool = False  # irregular streams (trades, liquidations)
    multi: bool = False  # one tick may send several messages (see MULTI_MESSAGE)


def parse_stream(name: str, symbols: Container[str]) -> StreamSpec | None:
    """The spec of a stream this exchange serves to symbols trading now (`symbols`), or None:
    an unknown name or symbol, which Binance acknowledges and never sends."""
    if name in ("!markPrice@arr", "!markPrice@arr@1s"):
        return StreamSpec(name, "markPrice_arr", None, MARKET,
                          1.0 if name.endswith("1s") else 3.0, multi=True)
    if name == "tradingSession":
        return StreamSpec(name, "tradingSession", None, MARKET, 1.0, multi=True)
    sym, _, rest = name.partition("@")
    if sym != sym.lower() or sym.upper() not in symbols:
        return None
    kind, _, speed = rest.partition("@")
    symbol = sym.upper()
    if kind == "markPrice" and speed in ("", "1s"):
        return StreamSpec(name, "markPrice", symbol, MARKET, 1.0 if speed else 3.0)
    if kind in ("depth", "depth5", "depth10", "depth20") and (speed == "" or speed in _SPEEDS):
        interval = _SPEEDS.get(speed, 0.25)
        if kind == "depth":
            return StreamSpec(name, "depth", symbol, PUBLIC, interval)
        return StreamSpec(name, "partial", symbol, PUBLIC, interval, levels=int(kind[5:]))
    if speed:
        return None
    if kind == "aggTrade":
        return StreamSpec(name, "aggTrade", symbol, MARKET, 0.2, jitter=True)
    if kind == "bookTicker":
        return StreamSpec(name, "bookTicker", symbol, PUBLIC, 0.1, jitter=True)
    if kind == "forceOrder":
        return StreamSpec(name, "forceOrder", symbol, MARKET, 10.0, jitter=True)
    if kind.startswith("kline_") and kind[6:] in INTERVALS:
        return StreamSpec(name, "kline", symbol, MARKET, 0.25, kline=kind[6:])
    return None


def streams_of_query(query: str) -> list[str]:
    """`streams=a/b/c` (already URL-decoded) -> ["a", "b", "c"]."""
    return [s for s in query.split("/") if s]


# --- per-symbol state ------------------------------------------------------------------------

class SymbolMarket:
    """Everything one symbol's streams read: the book, trade ids, funding, candles."""

    def __init__(self, spec: SymbolSpec, rng: random.Random, listing: listings.Listing | None,
                 symbol_type: int = 1) -> None:
        self.spec = spec
        self.rng = rng
        self.listing = listing
        self.book = Book(spec, rng)
        self.agg_id = rng.randrange(100_000_000, 900_000_000)
        self.trade_id = self.agg_id * 3
        self.funding_bp = rng.uniform(-1.0, 3.0)  # funding rate in basis points
        self.candles: dict[str, CandleSeries] = {}
        self.last_trade: tuple[int, int] | None = None  # (price units, time ms)
        self.frozen_index: int | None = None  # an equity's index outside its sessions
        self.delivery = listing is not None and listing.contract_type in listings.QUARTERS
        self.feeds = 0  # live feeds reading this symbol (cadence: it trades meanwhile)
        self.book_feeds = 0  # of which depth and bookTicker (cadence: the book moves fast)
        self.trade_feed: Feed | None = None  # cadence: where its trades are published
        self.epoch = 0  # cadence: bumped when its clocks (re)start; older clocks then stop
        pair = listing.pair if listing is not None else spec.symbol
        self.head = f'"s":"{spec.symbol}","ps":"{pair}"'
        self.equity = listing is not None and listing.tradfi_market == "EQUITY"
        self._long: dict[int, str] = {}  # `long_price` texts seen lately
        self.tail = f',"st":{symbol_type}}}'

    def mark_units(self) -> int:
        return self.book.mid_units() + (int(self.rng.random() * 5) - 2) * self.spec.tick

    def long_price(self, units: int) -> str:
        """Mark and index prices carry 8 decimals on the wire, e.g. "95000.10000000"."""
        text = self._long.get(units)
        if text is None:
            if len(self._long) >= 4096:
                self._long.clear()
            text = self.spec.price_text(units) + "0" * (8 - self.spec.price_decimals)
            self._long[units] = text
        return text


def next_funding_ms(now_ms: int) -> int:
    return now_ms - now_ms % FUNDING_MS + FUNDING_MS


@attrs.define(eq=False)
class Feed:
    """The events of one stream name, shared by every connection subscribed to it.

    Binance broadcasts: two connections on the same stream (say, during a 24-hour rotation)
    receive the same events, byte for byte. A connection that needs its next frame first sends
    the events another connection already made and it has not sent; only when it is level does
    it make a new one. Also holds the stream's place in the diff-depth chain and, for klines,
    the open time of the candle it last sent.
    """

    spec: StreamSpec
    cursor: int = 0  # depth streams: the update id the last event ended at
    breaks: int = 0  # the book's forced-break count this feed has accounted for
    events: deque[str] = attrs.field(factory=deque)  # payloads not yet sent to every reader
    first: int = 0  # sequence number of events[0]
    next: int = 0  # sequence number the next new event gets
    readers: list[StreamState] = attrs.field(factory=list)
    kline_open: int = -1
    kline_version: int = -1  # cadence: the candle's version this stream last pushed
    clock: cadence.BurstClock | cadence.PoissonClock | None = None  # cadence, irregular kinds
    closed: bool = False  # no reader left: its cadence stops


class Outbox:
    """Cadence mode: the events made for one connection, in the order the exchange made them
    (each entry names the stream whose next event is due). Bounded: a connection that does not
    keep up loses the oldest, as it would on Binance. When a clock's turn made some, `advance`
    calls `flush` (the server writes them at once, if it can: True) or else `wake`."""

    __slots__ = ("flush", "pending", "wake")

    def __init__(self, wake: Callable[[], None], limit: int = 200_000,
                 flush: Callable[[], bool] | None = None) -> None:
        self.pending: deque[StreamState] = deque(maxlen=limit)
        self.wake = wake
        self.flush = flush


@attrs.define(eq=False)
class StreamState:
    """One subscribed stream on one connection: its feed, wrapper, and place in the feed."""

    spec: StreamSpec
    prefix: str  # '{"stream":"<name>","data":' in combined form, '' in raw form
    suffix: str
    feed: Feed
    seq: int = 0  # the feed's sequence number of the next event this connection sends
    outbox: Outbox | None = None
    active: bool = True  # False once unsubscribed: what its outbox still names is dropped


FEED_HISTORY = 1024  # a reader further behind than this skips ahead (a gap, as on Binance)


class Market:
    """All symbols' state and the payload makers. One per simulator, shared by connections."""

    def __init__(self, symbols: Iterable[str], seed: int, *, coinm: Iterable[str] = (),
                 tradfi: Iterable[str] = (), tradfi_hours: str = "weekly",
                 off_hours: str = "thin", cadence_mode: bool = False,
                 crash: cadence.Crash | None = None, now_ms: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.base_ms = now_ms - now_ms % 1000  # market time 0 (cadence mode)
        self.tick = 0.0  # cadence: the market clock's tick (see `stamp`), set by the server
        self._stamped: tuple[float, float, int] = (math.nan, 0.0, 0)  # (due, tick, E) last
        self.listings: dict[str, listings.Listing] = {}
        for s in symbols:
            self.listings[s] = listings.new_listing(s, None, now_ms)
        for s in tradfi:
            self.listings[s] = listings.new_listing(s, listings.TRADIFI, now_ms)
        self._streaming = {s for s, x in self.listings.items() if x.status == listings.TRADING}
        self._tradfi = any(x.contract_type == listings.TRADIFI for x in self.listings.values())
        self.coinm = tuple(coinm)
        self.hours = TradingHours(tradfi_hours)
        self.off_hours = off_hours
        self.cadence = cadence_mode
        self.crash = crash or cadence.Crash(5.0, None, 60.0)
        self.schedule = cadence.Schedule()
        self._rates = cadence.trade_rates(self.listings)
        self._symbols: dict[str, SymbolMarket] = {}
        self._specs: dict[str, SymbolSpec] = {}
        self._feeds: dict[str, Feed] = {}
        self._spill: list[str] = []  # further messages of a multi-message tick
        self._woken: dict[int, Outbox] = {}
        self._makers: dict[str, Callable[[Feed, int], str | None]] = {
            "markPrice": self._mark_price, "markPrice_arr": self._mark_price_arr,
            "depth": self._diff_depth, "partial": self._partial_depth,
            "aggTrade": self._agg_trade, "kline": self._kline,
            "bookTicker": self._book_ticker, "forceOrder": self._force_order,
            "tradingSession": self._trading_session,
        }

    # -- listings --

    @property
    def symbols(self) -> tuple[str, ...]:
        """Every symbol whose streams run (status TRADING), in listing order."""
        return tuple(s for s in self.listings if s in self._streaming)

    def streaming(self) -> Container[str]:
        return self._streaming

    def is_listed(self, symbol: str) -> bool:
        return symbol in self.listings

    def list_symbol(self, symbol: str, contract_type: str | None, now_ms: int
                    ) -> listings.Listing:
        """A new listing: TRADING from now, its streams start (history: none before now)."""
        if symbol in self.listings:
            raise ValueError(f"{symbol} is already listed")
        listing = listings.new_listing(symbol, contract_type, now_ms, onboard_ms=now_ms)
        self.listings[symbol] = listing
        self._streaming.add(symbol)
        self._tradfi |= listing.contract_type == listings.TRADIFI
        self._rates[symbol] = cadence.trade_rates([*self._rates, symbol])[symbol]
        return listing

    def delist(self, symbol: str, now_ms: int) -> listings.Listing:
        """SETTLING from now: no more events; its candles end with the one open now."""
        listing = self.listings.get(symbol)
        if listing is None or listing.status != listings.TRADING:
            raise ValueError(f"{symbol} is not trading")
        listing.status = listings.SETTLING
        listing.delivery_ms = now_ms
        self._streaming.discard(symbol)
        sm = self._symbols.get(symbol)
        if sm is not None:
            for series in sm.candles.values():
                series.roll(now_ms)
                series.until = series.current.end + 1
        return listing

    def spec_of(self, symbol: str) -> SymbolSpec:
        spec = self._specs.get(symbol)
        if spec is None:
            listing = self.listings.get(symbol)
            pair = listing.pair if listing is not None else symbol
            if symbol.endswith("USD_PERP"):
                pair = symbol.removesuffix("_PERP") + "T"  # COIN-M: priced like its USDT pair
            spec = attrs.evolve(symbol_spec(pair), symbol=symbol)
            self._specs[symbol] = spec
        return spec

    def symbol(self, symbol: str) -> SymbolMarket:
        """Created on first use, so a simulator with hundreds of symbols starts at once; seeded
        by the symbol's name, so its prices do not depend on which symbol was used first."""
        sm = self._symbols.get(symbol)
        if sm is None:
            listing = self.listings.get(symbol)
            rng = random.Random(f"{self.seed}:{symbol}")
            sm = SymbolMarket(self.spec_of(symbol), rng, listing, 1 if listing else 2)
            self._symbols[symbol] = sm
        return sm

    def mid_price(self, symbol: str) -> str | None:
        """The book's mid price as text (None for a symbol this exchange does not list)."""
        if symbol not in self.listings:
            return None
        sm = self.symbol(symbol)
        return sm.spec.price_text(sm.book.mid_units())

    # -- TradFi sessions --

    def in_session(self, symbol: str, now_ms: int) -> bool:
        if not self._tradfi:
            return True
        listing = self.listings.get(symbol)
        market = listing.tradfi_market if listing is not None else None
        return market is None or self.hours.in_session(market, now_ms)

    def activity(self, symbol: str | None, now_ms: int) -> float:
        """How busy a symbol's trading is now: a TradFi symbol outside its session trades
        thinly (1.0 otherwise)."""
        if symbol is None or self.in_session(symbol, now_ms):
            return 1.0
        return cadence.OFF_HOURS_ACTIVITY

    def _quiet(self, symbol: str | None, now_ms: int) -> bool:
        return (self.off_hours == "quiet" and symbol is not None
                and not self.in_session(symbol, now_ms))

    # -- subscriptions --

    def open_stream(self, spec: StreamSpec, combined: bool, outbox: Outbox | None = None,
                    at: float = 0.0) -> StreamState:
        """A reader of `spec`; in cadence mode `outbox` gets its events and `at` is the market
        time, from which a new feed's clock runs."""
        feed = self._feeds.get(spec.name)
        if feed is None:
            feed = self._feeds[spec.name] = Feed(spec)
            if spec.symbol is not None:
                sm = self.symbol(spec.symbol)
                sm.feeds += 1
                sm.book_feeds += spec.kind in BOOK_KINDS
                if spec.kind in ("depth", "partial"):
                    feed.cursor, feed.breaks = sm.book.reader_cursor(), sm.book.breaks
                if self.cadence and sm.feeds == 1:
                    sm.epoch += 1
                    self._start_book(sm, at)
                    self._start_trades(sm, at)
            if self.cadence:
                self._start_feed(feed, at)
        prefix, suffix = (f'{{"stream":"{spec.name}","data":', "}") if combined else ("", "")
        state = StreamState(spec, prefix, suffix, feed, feed.next, outbox)
        if spec.kind == "depth" and feed.events:
            # start with the latest diff event: its u is the book's last id or older, so a
            # snapshot taken after subscribing passes the first-event check U <= lastUpdateId
            state.seq = feed.next - 1
            if outbox is not None:
                outbox.pending.append(state)
                outbox.wake()
        feed.readers.append(state)
        return state

    def close_stream(self, state: StreamState) -> None:
        feed = state.feed
        state.active = False
        feed.readers.remove(state)
        if not feed.readers and self._feeds.get(feed.spec.name) is feed:
            del self._feeds[feed.spec.name]
            feed.closed = True
            if feed.spec.symbol is not None:
                sm = self.symbol(feed.spec.symbol)
                sm.feeds -= 1
                sm.book_feeds -= feed.spec.kind in BOOK_KINDS
                if sm.trade_feed is feed:
                    sm.trade_feed = None

    # -- events on demand (a connection's pacer) --

    def frame(self, state: StreamState, now_ms: int) -> str | None:
        """The next frame of `state`'s stream, made now if no other reader made it yet; None
        when the stream has nothing to send (a TradFi symbol outside its session, "quiet")."""
        feed = state.feed
        if state.seq < feed.next:
            # another connection on this stream already made events this one has not sent
            idx = max(state.seq, feed.first) - feed.first
            state.seq = feed.first + idx + 1
            return state.prefix + feed.events[idx] + state.suffix
        if self._quiet(feed.spec.symbol, now_ms):
            return None
        payload = self._makers[feed.spec.kind](feed, now_ms)
        if payload is None:
            return None
        self._append(feed, payload)
        state.seq = feed.next
        if self._spill:
            # the tick's further messages wait in the feed for this reader too
            for extra in self._spill:
                self._append(feed, extra)
            self._spill.clear()
        self._trim(feed)
        return state.prefix + payload + state.suffix

    def _append(self, feed: Feed, payload: str) -> None:
        feed.events.append(payload)
        feed.next += 1

    def _trim(self, feed: Feed) -> None:
        readers = feed.readers
        low = readers[0].seq if len(readers) == 1 else min((r.seq for r in readers),
                                                            default=feed.next)
        events = feed.events
        while len(events) > 1 and (feed.first < low or len(events) > FEED_HISTORY):
            events.popleft()
            feed.first += 1

    # -- events on the exchange's clock (cadence mode) --

    def advance(self, t: float, limit: float = math.inf) -> int:
        """Make every event due by market time `t`, in time order, and flush (or else wake) the
        outbox of each connection that got some. Returns how many clocks fired. With `limit`,
        stop after that many clocks (the next call goes on where this one stopped, in the same
        order), their frames flushed: the server writes a big tick's frames chunk by chunk."""
        fired = self.schedule.run_until(t, limit)
        if self._woken:
            woken = list(self._woken.values())
            self._woken.clear()
            for box in woken:
                if box.flush is None or not box.flush():
                    box.wake()
        return fired

    def take(self, state: StreamState) -> str | None:
        """The next frame of `state` that the exchange already made (cadence mode)."""
        feed = state.feed
        if state.seq >= feed.next:
            return None
        idx = max(state.seq, feed.first) - feed.first
        state.seq = feed.first + idx + 1
        return state.prefix + feed.events[idx] + state.suffix

    def ms(self, t: float) -> int:
        return self.base_ms + round(t * 1000)

    def stamp(self, due: float) -> int:
        """The event time (E, ms) of an event due at market time `due`: the tick of the
        market's clock it is made in (`tick` seconds; 0: exactly `due`), so frames leave as
        soon as they are stamped and fixed cadences stay on whole seconds."""
        tick = self.tick
        if due == self._stamped[0] and tick == self._stamped[1]:
            return self._stamped[2]  # a grid time: hundreds of feeds in a row stamp it
        at = due
        if tick:
            at = math.ceil(round(due / tick, 6)) * tick
        ms = self.base_ms + round(at * 1000)
        self._stamped = (due, tick, ms)
        return ms

    def _start_feed(self, feed: Feed, at: float) -> None:
        spec = feed.spec
        if spec.kind == "aggTrade":
            # the symbol trades on its own clock (`_start_trades`); this stream publishes it
            self.symbol(spec.symbol or "").trade_feed = feed
            return
        rng = random.Random(f"{self.seed}:{spec.name}")
        if spec.kind in cadence.BURSTY:
            feed.clock = cadence.BurstClock(rng)
        elif spec.kind == "forceOrder":
            feed.clock = cadence.PoissonClock(rng, min_gap=1.0)
        first = (cadence.aligned(at, spec.interval) if feed.clock is None
                 else at + self._gap(feed, at))
        fire: Callable[[float], float | None] = functools.partial(self._fire_feed, feed)
        if spec.kind == "kline":
            fire = self._kline_clock(feed, fire)
        elif spec.kind == "markPrice":
            fire = self._mark_clock(feed)
        self.schedule.add(first, fire)

    def _mark_clock(self, feed: Feed) -> Callable[[float], float | None]:
        """A markPrice stream's clock: `_fire_feed` and `_mark_price` in one (a whole market's
        mark prices fall on the same whole second, and the first of them wait for the last)."""
        symbol, period = feed.spec.symbol or "", feed.spec.interval
        sm = self.symbol(symbol)

        def mark(due: float) -> float | None:
            if feed.closed:
                return None
            now_ms = self.stamp(due)
            if not (self._tradfi and self._quiet(symbol, now_ms)):
                self._publish(feed, self._mark_payload(sm, now_ms))
            return round(due + period, 6)  # stays on the grid, as `_fire_feed` keeps it
        return mark

    def _kline_clock(self, feed: Feed, fire: Callable[[float], float | None]
                     ) -> Callable[[float], float | None]:
        """A kline stream's clock: every 250 ms, though most ticks its candle has not changed
        and nothing is sent (a whole market's klines fire 2,200 times a second). That case is
        told apart first, without side effects; any other goes to `fire` (`_fire_feed`)."""
        sm = self.symbol(feed.spec.symbol or "")
        interval, period = feed.spec.kline, feed.spec.interval

        def quiet_or_fire(due: float) -> float | None:
            series = sm.candles.get(interval)
            if (series is not None and not feed.closed and feed.kline_version == series.version
                    and feed.kline_open == series.current.start
                    and self.stamp(due) <= series.current.end):
                return round(due + period, 6)  # what `_kline` would find: nothing to send
            return fire(due)
        return quiet_or_fire

    def _gap(self, feed: Feed, t: float) -> float:
        spec = feed.spec
        assert feed.clock is not None and spec.symbol is not None
        rate = self._rates.get(spec.symbol, cadence.MIN_TRADES_PER_S)
        if spec.kind == "bookTicker":
            rate *= 2
        elif spec.kind == "forceOrder":
            rate = cadence.LIQUIDATIONS_PER_S * rate ** 0.5
        rate *= self.crash.factor(t)
        if self._tradfi:
            rate *= self.activity(spec.symbol, self.ms(t))
        return feed.clock.gap(rate)

    def _fire_feed(self, feed: Feed, due: float) -> float | None:
        # the hot path of cadence mode (thousands a second): calls inlined where it counts
        if feed.closed:
            return None
        spec = feed.spec
        now_ms = self.stamp(due)
        if not (self._tradfi and self._quiet(spec.symbol, now_ms)):
            payload = self._makers[spec.kind](feed, now_ms)
            if payload is not None:
                self._publish(feed, payload)
        if feed.clock is None:
            return round(due + spec.interval, 6)  # stays on the grid: no drift in a day
        return due + self._gap(feed, due)

    def _publish(self, feed: Feed, payload: str) -> None:
        events = feed.events
        events.append(payload)
        made = 1
        if self._spill:
            events.extend(self._spill)
            made += len(self._spill)
            self._spill.clear()
        feed.next += made
        readers = feed.readers
        for reader in readers:
            box = reader.outbox
            if box is not None:
                if made == 1:
                    box.pending.append(reader)
                else:
                    box.pending.extend([reader] * made)
                self._woken[id(box)] = box
        if len(readers) == 1:
            # one reader, the usual case: drop what it has already taken
            drop = readers[0].seq - feed.first
            while drop > 0 and len(events) > 1:
                events.popleft()
                feed.first += 1
                drop -= 1
            if len(events) > FEED_HISTORY:
                self._trim(feed)
        else:
            self._trim(feed)

    def _start_book(self, sm: SymbolMarket, at: float) -> None:
        """The symbol's book changes on its own clock while any of its streams is read; at
        `cadence.book_rate` while someone reads the book itself, slowly otherwise (the mid
        price still moves under mark prices, trades and candles)."""
        clock = cadence.PoissonClock(random.Random(f"{self.seed}:{sm.spec.symbol}:book"))
        full = cadence.book_rate(self._rates.get(sm.spec.symbol, cadence.MIN_TRADES_PER_S))
        epoch = sm.epoch

        def step(due: float) -> float | None:
            if sm.feeds <= 0 or sm.epoch != epoch:
                return None
            sm.book.step()
            rate = full if sm.book_feeds > 0 else cadence.IDLE_BOOK_CHANGES_PER_S
            factor = self.crash.factor(due)
            if self._tradfi:  # 1.0 otherwise
                factor *= self.activity(sm.spec.symbol, self.ms(due))
            return due + clock.gap(rate * factor)

        self.schedule.add(at + clock.gap(full), step)

    def _start_trades(self, sm: SymbolMarket, at: float) -> None:
        """The symbol trades on its own clock while any of its streams is read, whoever reads
        its trades: candles and the last price move with them; an aggTrade stream, if one is
        read, publishes each."""
        symbol = sm.spec.symbol
        clock = cadence.BurstClock(random.Random(f"{self.seed}:{symbol}:trades"))
        base = self._rates.get(symbol, cadence.MIN_TRADES_PER_S)
        epoch = sm.epoch

        def trade(due: float) -> float | None:
            if sm.feeds <= 0 or sm.epoch != epoch:
                return None
            now_ms = self.stamp(due)
            if not (self._tradfi and self._quiet(symbol, now_ms)):
                payload = self._trade(sm, now_ms)
                if sm.trade_feed is not None:
                    self._publish(sm.trade_feed, payload)
            rate = base * self.crash.factor(due)
            if self._tradfi:
                rate *= self.activity(symbol, now_ms)
            return due + clock.gap(rate)

        self.schedule.add(at + clock.gap(base), trade)

    def set_crash(self, on: bool | None, multiplier: float | None = None) -> None:
        """Start (True) or stop (False) the crash phase; None returns to the configured
        schedule."""
        if multiplier is not None:
            if multiplier <= 0:
                raise ValueError("multiplier must be > 0")
            self.crash.multiplier = float(multiplier)
        self.crash.manual = on

    def sequence_break(self, symbol: str) -> None:
        """The next diff-depth event of `symbol` on every connection skips one event."""
        self.symbol(symbol).book.breaks += 1

    # -- payloads (field order as Binance sends them) --

    def _index_units(self, sm: SymbolMarket, mark: int, now_ms: int) -> int:
        if sm.equity and not self.hours.in_session("EQUITY", now_ms):
            # outside its session an equity's index stays where the market closed
            if sm.frozen_index is None:
                sm.frozen_index = mark
            return sm.frozen_index
        sm.frozen_index = None
        return mark + (int(sm.rng.random() * 7) - 3) * sm.spec.tick

    def _mark_payload(self, sm: SymbolMarket, now_ms: int) -> str:
        mark = sm.mark_units()
        index = self._index_units(sm, mark, now_ms)
        p, i = sm.long_price(mark), sm.long_price(index)
        if sm.delivery:
            return (f'{{"e":"markPriceUpdate","E":{now_ms},"s":"{sm.spec.symbol}","p":"{p}",'
                    f'"ap":"{p}","P":"{i}","i":"{i}","r":"","T":0{sm.tail}')
        sm.funding_bp = min(7.5, max(-7.5, sm.funding_bp + sm.rng.random() * 0.02 - 0.01))
        return (f'{{"e":"markPriceUpdate","E":{now_ms},"s":"{sm.spec.symbol}","p":"{p}",'
                f'"ap":"{p}","P":"{i}","i":"{i}","r":"{sm.funding_bp / 10_000:.8f}",'
                f'"T":{next_funding_ms(now_ms)}{sm.tail}')

    def _mark_price(self, feed: Feed, now_ms: int) -> str:
        return self._mark_payload(self.symbol(feed.spec.symbol or ""), now_ms)

    def _mark_price_arr(self, _feed: Feed, now_ms: int) -> str:
        crypto: list[str] = []
        tradfi: list[str] = []
        for s in self.symbols:
            if self._quiet(s, now_ms):
                continue
            row = self._mark_payload(self.symbol(s), now_ms)
            (tradfi if self.listings[s].contract_type == listings.TRADIFI else crypto).append(row)
        for s in self.coinm:
            crypto.append(self._mark_payload(self.symbol(s), now_ms))
        if tradfi:
            self._spill.append("[" + ",".join(tradfi) + "]")
        return "[" + ",".join(crypto) + "]"

    def _trading_session(self, _feed: Feed, now_ms: int) -> str:
        first, *rest = self.hours.events(now_ms)
        self._spill.extend(rest)
        return first

    def _diff_depth(self, feed: Feed, now_ms: int) -> str | None:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        if feed.breaks != book.breaks:
            # forced gap: one event happens that this connection never gets
            feed.breaks = book.breaks
            book.step()
            feed.cursor = book.update_id
        if not self.cadence:
            book.step()
        elif book.update_id == feed.cursor:
            return None  # nothing changed since the last event: Binance sends nothing
        first, last, prev, bids, asks = book.diff_since(feed.cursor)
        feed.cursor = last
        return (f'{{"e":"depthUpdate","E":{now_ms},"T":{now_ms - 1},{sm.head},'
                f'"U":{first},"u":{last},"pu":{prev},"b":{bids},"a":{asks}{sm.tail}')

    def _partial_depth(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        if not self.cadence:
            book.step()
        prev, feed.cursor = feed.cursor, book.update_id
        first = prev + 1 if book.update_id > prev else book.update_id
        n = feed.spec.levels
        return (f'{{"e":"depthUpdate","E":{now_ms},"T":{now_ms - 1},{sm.head},'
                f'"U":{first},"u":{book.update_id},"pu":{prev},'
                f'"b":{book.bids.levels_json(n)},"a":{book.asks.levels_json(n)}{sm.tail}')

    def _agg_trade(self, feed: Feed, now_ms: int) -> str:
        return self._trade(self.symbol(feed.spec.symbol or ""), now_ms)

    def _trade(self, sm: SymbolMarket, now_ms: int) -> str:
        """One aggregated trade of `sm` at the best price of a side: ids, candles, last price
        move; its aggTrade payload."""
        rng, spec = sm.rng, sm.spec
        maker = rng.random() < 0.5
        price = sm.book.bids.best() if maker else sm.book.asks.best()
        qty = spec.step * (1 + int(rng.random() * 2000))
        # a few trades involve RPI orders, which the normal quantity leaves out
        normal = qty if rng.random() >= 0.05 else int(qty * rng.random())
        sm.agg_id += 1
        first = sm.trade_id + 1
        sm.trade_id += 1 + int(rng.random() * 4)
        self._kline_trade(sm, now_ms, price, qty, not maker, sm.trade_id - first + 1)
        sm.last_trade = (price, now_ms - 1)
        return (f'{{"e":"aggTrade","E":{now_ms},"a":{sm.agg_id},"s":"{spec.symbol}",'
                f'"p":"{spec.price_text(price)}","q":"{spec.qty_text(qty)}",'
                f'"nq":"{spec.qty_text(normal)}","f":{first},"l":{sm.trade_id},'
                f'"T":{now_ms - 1},"m":{"true" if maker else "false"}{sm.tail}')

    def _kline_trade(self, sm: SymbolMarket, now_ms: int, price: int, qty: int, taker_buy: bool,
                     trades: int) -> None:
        for series in sm.candles.values():
            series.trade(now_ms, price, qty, taker_buy, trades, sm.trade_id)

    def candles(self, sm: SymbolMarket, interval: str, now_ms: int) -> CandleSeries:
        series = sm.candles.get(interval)
        if series is None:
            listing = sm.listing
            onboard = listing.onboard_ms if listing is not None else listings.DEFAULT_ONBOARD_MS
            series = CandleSeries(sm.spec, interval, now_ms, sm.book.mid_units(), sm.trade_id,
                                  f"{self.seed}:{sm.spec.symbol}", onboard)
            sm.candles[interval] = series
        series.roll(now_ms)
        return series

    def _kline(self, feed: Feed, now_ms: int) -> str | None:
        sm = self.symbol(feed.spec.symbol or "")
        interval = feed.spec.kline
        series = self.candles(sm, interval, now_ms)
        k = series.current
        if feed.kline_open != k.start:
            sent, feed.kline_open = feed.kline_open, k.start
            done = series.closed_at(sent) if sent >= 0 else None
            if done is not None:
                # the candle this stream showed last has closed: its final values, once
                feed.kline_version = series.version
                return kline_event(sm.spec, done, interval, now_ms, True)
        elif self.cadence and feed.kline_version == series.version:
            return None  # "every 250 ms (if existing)": nothing changed, nothing sent
        if not self.cadence:
            series.follow(sm.book.mid_units())
        feed.kline_version = series.version
        return kline_event(sm.spec, k, interval, now_ms, False)

    def _book_ticker(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        if not self.cadence:
            book.step()
        bid, ask = book.bids.best(), book.asks.best()
        t = sm.spec.price_text
        q = sm.spec.qty_text
        return (f'{{"e":"bookTicker","u":{book.update_id},{sm.head},'
                f'"b":"{t(bid)}","B":"{q(book.bids.qty[bid])}",'
                f'"a":"{t(ask)}","A":"{q(book.asks.qty[ask])}",'
                f'"T":{now_ms - 1},"E":{now_ms}{sm.tail}')

    def _force_order(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        sell = sm.rng.random() < 0.5
        price = (sm.book.bids.nth(5) if sell else sm.book.asks.nth(5))
        qty = sm.spec.qty_text(sm.spec.step * sm.rng.randint(1, 500))
        px = sm.spec.price_text(price)
        return (f'{{"e":"forceOrder","E":{now_ms},"o":{{"s":"{sm.spec.symbol}",'
                f'"S":"{"SELL" if sell else "BUY"}","o":"LIMIT","f":"IOC","q":"{qty}",'
                f'"p":"{px}","ap":"{px}","X":"FILLED","l":"{qty}","z":"{qty}","T":{now_ms}}}}}')

    # -- REST bodies --

    def depth_snapshot(self, symbol: str, limit: int, now_ms: int) -> str:
        return self.symbol(symbol).book.snapshot_json(limit, now_ms)

    def klines(self, symbol: str, interval: str, start: int | None, end: int | None,
               limit: int, now_ms: int) -> str:
        """The body of `GET /fapi/v1/klines` (the candles the kline stream shows)."""
        series = self.candles(self.symbol(symbol), interval, now_ms)
        return "[" + ",".join(series.rows(start, end, limit)) + "]"

    def premium_index(self, symbol: str, now_ms: int) -> dict[str, object]:
        sm = self.symbol(symbol)
        mark = sm.mark_units()
        index = mark + sm.rng.randint(-3, 3) * sm.spec.tick
        rate = "" if sm.delivery else f"{sm.funding_bp / 10_000:.8f}"
        return {"symbol": symbol, "markPrice": sm.long_price(mark),
                "indexPrice": sm.long_price(index), "estimatedSettlePrice": sm.long_price(index),
                "lastFundingRate": rate, "interestRate": "" if sm.delivery else "0.00010000",
                "nextFundingTime": 0 if sm.delivery else next_funding_ms(now_ms),
                "time": now_ms}

    def ticker_price(self, symbol: str, now_ms: int) -> dict[str, object]:
        """GET /fapi/v1/ticker/price: the last trade (the book's mid before any trade)."""
        sm = self.symbol(symbol)
        price, at = sm.last_trade or (sm.book.mid_units(), now_ms)
        return {"symbol": symbol, "price": sm.spec.price_text(price), "time": at}

    def exchange_info(self, now_ms: int) -> dict[str, object]:
        return {
            "timezone": "UTC", "serverTime": now_ms, "futuresType": "U_MARGINED",
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                 "limit": 2400},
                {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1,
                 "limit": 1200},
            ],
            "exchangeFilters": [],
            "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
            "symbols": [listings.symbol_info(x, self.spec_of(s))
                        for s, x in self.listings.items()],
        }


DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)


def depth_weight(limit: int) -> int:
    """Binance: limit 5-50 -> 2, 100 -> 5, 500 -> 10, 1000 -> 20."""
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


# --- faults ----------------------------------------------------------------------------------

OVERSIZED_BYTES = 2 * 1024 * 1024
_OVERSIZED: str | None = None


def malformed_frames(count: int, now_ms: int) -> list[str | bytes]:
    """`count` bad frames cycling through five kinds a reader must survive."""
    global _OVERSIZED
    if _OVERSIZED is None:
        head = '{"e":"oversized","pad":"'
        _OVERSIZED = head + "x" * (OVERSIZED_BYTES - len(head) - 2) + '"}'
    truncated = f'{{"stream":"btcusdt@markPrice@1s","data":{{"e":"markPriceUpdate","E":{now_ms}'
    kinds: list[str | bytes] = [
        "this is not json {",
        b"\x00\x01binary\xfe\xff",
        _OVERSIZED,
        # valid JSON, unknown stream, and not ASCII: a byte-exact log must keep all of it
        f'{{"stream":"btcusdt@noSuchStream","data":{{"e":"noSuchEvent","E":{now_ms},'
        f'"note":"ünïcödé ✓ 比特币"}}}}',
        truncated[: len(truncated) // 2],
    ]
    return [kinds[i % len(kinds)] for i in range(count)]
