"""The market side of the simulated exchange: stream names, payloads, REST bodies, faults.

Pure: no trio, no sockets; the server (`pipeline.simulator.server`) owns the I/O and the clock.

Hot path. With `rate=0` the simulator must outrun any client, so payloads are never built as
dicts and serialised: each is one f-string over pre-formatted pieces (a book level's wire text
is cached when the level changes, see `book.py`), and the combined wrapper is a prefix and a
suffix computed once per subscription. The field order is Binance's own.

Each stream name has one `Feed` of events shared by every connection on it (Binance broadcasts);
per connection, each subscribed stream has a `StreamState` (its place in the feed). What else a
connection holds (its SUBSCRIBE protocol, its pacing) is in `session.py`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable

import attrs

from pipeline.simulator.book import Book, SymbolSpec, symbol_spec

PUBLIC = "public"
MARKET = "market"

_SPEEDS = {"100ms": 0.1, "250ms": 0.25, "500ms": 0.5}
KLINE_MS = {
    "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
    "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000, "6h": 21_600_000, "8h": 28_800_000,
    "12h": 43_200_000, "1d": 86_400_000, "3d": 259_200_000, "1w": 604_800_000,
    "1M": 2_592_000_000,
}
FUNDING_MS = 8 * 3_600_000


# --- stream names ----------------------------------------------------------------------------

@attrs.frozen
class StreamSpec:
    """A stream name understood: what it carries, for whom, on which path, how often."""

    name: str
    kind: str  # markPrice, markPrice_arr, depth, partial, aggTrade, kline, bookTicker, forceOrder
    symbol: str | None
    path: str  # PUBLIC or MARKET
    interval: float  # Binance's own seconds between frames
    levels: int = 0  # partial depth: 5, 10 or 20
    kline: str = ""  # kline interval, e.g. "1m"
    jitter: bool = False  # irregular streams (trades, liquidations)


def parse_stream(name: str, symbols: Iterable[str]) -> StreamSpec | None:
    """The spec of a stream this exchange serves, or None (unknown name or symbol: silence)."""
    if name in ("!markPrice@arr", "!markPrice@arr@1s"):
        return StreamSpec(name, "markPrice_arr", None, MARKET, 1.0 if name.endswith("1s") else 3.0)
    sym, _, rest = name.partition("@")
    if sym != sym.lower() or sym.upper() not in set(symbols):
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
    if kind.startswith("kline_") and kind[6:] in KLINE_MS:
        return StreamSpec(name, "kline", symbol, MARKET, 0.25, kline=kind[6:])
    return None


def streams_of_query(query: str) -> list[str]:
    """`streams=a/b/c` (already URL-decoded) -> ["a", "b", "c"]."""
    return [s for s in query.split("/") if s]


# --- per-symbol state ------------------------------------------------------------------------

@attrs.define
class Kline:
    start: int  # open time, ms
    first_trade: int
    open: int = 0
    high: int = 0
    low: int = 0
    close: int = 0
    volume: int = 0  # qty units
    taker_volume: int = 0
    trades: int = 0
    last_trade: int = 0


class SymbolMarket:
    """Everything one symbol's streams read: the book, trade ids, funding, klines."""

    def __init__(self, spec: SymbolSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.book = Book(spec, rng)
        self.agg_id = rng.randrange(100_000_000, 900_000_000)
        self.trade_id = self.agg_id * 3
        self.funding_bp = rng.uniform(-1.0, 3.0)  # funding rate in basis points
        self.klines: dict[str, Kline] = {}
        self.last_trade: tuple[int, int] | None = None  # (price units, time ms)

    def mark_units(self) -> int:
        return self.book.mid_units() + (int(self.rng.random() * 5) - 2) * self.spec.tick

    def long_price(self, units: int) -> str:
        """Mark and index prices carry 8 decimals on the wire, e.g. "95000.10000000"."""
        return self.spec.price_text(units) + "0" * (8 - self.spec.price_decimals)


def next_funding_ms(now_ms: int) -> int:
    return now_ms - now_ms % FUNDING_MS + FUNDING_MS


@attrs.define(eq=False)
class Feed:
    """The events of one stream name, shared by every connection subscribed to it.

    Binance broadcasts: two connections on the same stream (say, during a 24-hour rotation)
    receive the same events, byte for byte. A connection that needs its next frame first sends
    the events another connection already made and it has not sent; only when it is level does
    it make a new one. Also holds the stream's place in the diff-depth chain.
    """

    spec: StreamSpec
    cursor: int = 0  # depth streams: the update id the last event ended at
    breaks: int = 0  # the book's forced-break count this feed has accounted for
    events: deque[str] = attrs.field(factory=deque)  # payloads not yet sent to every reader
    first: int = 0  # sequence number of events[0]
    next: int = 0  # sequence number the next new event gets
    readers: list[StreamState] = attrs.field(factory=list)


@attrs.define(eq=False)
class StreamState:
    """One subscribed stream on one connection: its feed, wrapper, and place in the feed."""

    spec: StreamSpec
    prefix: str  # '{"stream":"<name>","data":' in combined form, '' in raw form
    suffix: str
    feed: Feed
    seq: int = 0  # the feed's sequence number of the next event this connection sends


FEED_HISTORY = 1024  # a reader further behind than this skips ahead (a gap, as on Binance)


class Market:
    """All symbols' state and the payload makers. One per simulator, shared by connections."""

    def __init__(self, symbols: Iterable[str], seed: int) -> None:
        self.symbols = tuple(symbols)
        self.rng = random.Random(seed)
        self._symbols: dict[str, SymbolMarket] = {}
        self._feeds: dict[str, Feed] = {}
        self._makers: dict[str, Callable[[Feed, int], str]] = {
            "markPrice": self._mark_price, "markPrice_arr": self._mark_price_arr,
            "depth": self._diff_depth, "partial": self._partial_depth,
            "aggTrade": self._agg_trade, "kline": self._kline,
            "bookTicker": self._book_ticker, "forceOrder": self._force_order,
        }

    def symbol(self, symbol: str) -> SymbolMarket:
        """Created on first use, so a simulator with hundreds of symbols starts at once."""
        sm = self._symbols.get(symbol)
        if sm is None:
            seed = self.rng.random()
            sm = self._symbols[symbol] = SymbolMarket(symbol_spec(symbol), random.Random(seed))
        return sm

    def mid_price(self, symbol: str) -> str | None:
        """The book's mid price as text (None for a symbol this exchange does not list)."""
        if symbol not in self.symbols:
            return None
        sm = self.symbol(symbol)
        return sm.spec.price_text(sm.book.mid_units())

    def open_stream(self, spec: StreamSpec, combined: bool) -> StreamState:
        feed = self._feeds.get(spec.name)
        if feed is None:
            feed = self._feeds[spec.name] = Feed(spec)
            if spec.symbol is not None and spec.kind in ("depth", "partial"):
                book = self.symbol(spec.symbol).book
                feed.cursor, feed.breaks = book.reader_cursor(), book.breaks
        prefix, suffix = (f'{{"stream":"{spec.name}","data":', "}") if combined else ("", "")
        state = StreamState(spec, prefix, suffix, feed, feed.next)
        if spec.kind == "depth" and feed.events:
            # start with the latest diff event: its u is the book's last id or older, so a
            # snapshot taken after subscribing passes the first-event check U <= lastUpdateId
            state.seq = feed.next - 1
        feed.readers.append(state)
        return state

    def close_stream(self, state: StreamState) -> None:
        feed = state.feed
        feed.readers.remove(state)
        if not feed.readers and self._feeds.get(feed.spec.name) is feed:
            del self._feeds[feed.spec.name]

    def frame(self, state: StreamState, now_ms: int) -> str:
        feed = state.feed
        if state.seq < feed.next:
            # another connection on this stream already made events this one has not sent
            idx = max(state.seq, feed.first) - feed.first
            state.seq = feed.first + idx + 1
            return state.prefix + feed.events[idx] + state.suffix
        payload = self._makers[feed.spec.kind](feed, now_ms)
        feed.events.append(payload)
        feed.next += 1
        state.seq = feed.next
        low = min(r.seq for r in feed.readers) if len(feed.readers) > 1 else feed.next
        events = feed.events
        while len(events) > 1 and (feed.first < low or len(events) > FEED_HISTORY):
            events.popleft()
            feed.first += 1
        return state.prefix + payload + state.suffix

    def sequence_break(self, symbol: str) -> None:
        """The next diff-depth event of `symbol` on every connection skips one event."""
        self.symbol(symbol).book.breaks += 1

    # -- payloads (field order as Binance sends them) --

    def _mark_payload(self, sm: SymbolMarket, now_ms: int) -> str:
        mark = sm.mark_units()
        index = mark + (int(self.rng.random() * 7) - 3) * sm.spec.tick
        sm.funding_bp = min(7.5, max(-7.5, sm.funding_bp + self.rng.random() * 0.02 - 0.01))
        return (f'{{"e":"markPriceUpdate","E":{now_ms},"s":"{sm.spec.symbol}",'
                f'"p":"{sm.long_price(mark)}","i":"{sm.long_price(index)}",'
                f'"P":"{sm.long_price(index)}","r":"{sm.funding_bp / 10_000:.8f}",'
                f'"T":{next_funding_ms(now_ms)}}}')

    def _mark_price(self, feed: Feed, now_ms: int) -> str:
        return self._mark_payload(self.symbol(feed.spec.symbol or ""), now_ms)

    def _mark_price_arr(self, _state: Feed, now_ms: int) -> str:
        return "[" + ",".join(self._mark_payload(self.symbol(s), now_ms)
                              for s in self.symbols) + "]"

    def _diff_depth(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        if feed.breaks != book.breaks:
            # forced gap: one event happens that this connection never gets
            feed.breaks = book.breaks
            book.step()
            feed.cursor = book.update_id
        book.step()
        first, last, prev, bids, asks = book.diff_since(feed.cursor)
        feed.cursor = last
        return (f'{{"e":"depthUpdate","E":{now_ms},"T":{now_ms - 1},"s":"{sm.spec.symbol}",'
                f'"U":{first},"u":{last},"pu":{prev},"b":{bids},"a":{asks}}}')

    def _partial_depth(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        book.step()
        prev, feed.cursor = feed.cursor, book.update_id
        n = feed.spec.levels
        return (f'{{"e":"depthUpdate","E":{now_ms},"T":{now_ms - 1},"s":"{sm.spec.symbol}",'
                f'"U":{prev + 1},"u":{book.update_id},"pu":{prev},'
                f'"b":{book.bids.levels_json(n)},"a":{book.asks.levels_json(n)}}}')

    def _agg_trade(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        maker = sm.rng.random() < 0.5
        price = sm.book.bids.best() if maker else sm.book.asks.best()
        qty = sm.spec.step * (1 + int(sm.rng.random() * 2000))
        sm.agg_id += 1
        first = sm.trade_id + 1
        sm.trade_id += 1 + int(sm.rng.random() * 4)
        self._kline_trade(sm, now_ms, price, qty, not maker, sm.trade_id - first + 1)
        sm.last_trade = (price, now_ms - 1)
        return (f'{{"e":"aggTrade","E":{now_ms},"s":"{sm.spec.symbol}","a":{sm.agg_id},'
                f'"p":"{sm.spec.price_text(price)}","q":"{sm.spec.qty_text(qty)}",'
                f'"f":{first},"l":{sm.trade_id},"T":{now_ms - 1},'
                f'"m":{"true" if maker else "false"}}}')

    def _kline_trade(self, sm: SymbolMarket, now_ms: int, price: int, qty: int, taker_buy: bool,
                     trades: int) -> None:
        for k in sm.klines.values():
            if k.start <= now_ms:
                k.high, k.low, k.close = max(k.high, price), min(k.low, price), price
                k.volume += qty
                k.taker_volume += qty if taker_buy else 0
                k.trades += trades
                k.last_trade = sm.trade_id

    def _kline(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        interval = feed.spec.kline
        span = KLINE_MS[interval]
        start = now_ms - now_ms % span
        k = sm.klines.get(interval)
        closing = k is not None and k.start < start
        if k is None or (closing and k.start + span + 1000 < now_ms):
            k = self._new_kline(sm, interval, start)
            closing = False
        elif not closing:
            # the candle follows the book even when no trade stream is subscribed
            mid = sm.book.mid_units()
            k.high, k.low, k.close = max(k.high, mid), min(k.low, mid), mid
        text = self._kline_text(sm, k, interval, span, now_ms, closing)
        if closing:
            self._new_kline(sm, interval, start)
        return text

    def _new_kline(self, sm: SymbolMarket, interval: str, start: int) -> Kline:
        price = sm.book.mid_units()
        k = Kline(start, sm.trade_id + 1, price, price, price, price, last_trade=sm.trade_id)
        sm.klines[interval] = k
        return k

    def _kline_text(self, sm: SymbolMarket, k: Kline, interval: str, span: int, now_ms: int,
                    closing: bool) -> str:
        spec = sm.spec
        p = spec.price_text
        scale = 10 ** (spec.price_decimals + spec.qty_decimals)
        quote = k.volume * k.close / scale
        taker_quote = k.taker_volume * k.close / scale
        return (f'{{"e":"kline","E":{now_ms},"s":"{spec.symbol}","k":{{"t":{k.start},'
                f'"T":{k.start + span - 1},"s":"{spec.symbol}","i":"{interval}",'
                f'"f":{k.first_trade},"L":{k.last_trade},"o":"{p(k.open)}","c":"{p(k.close)}",'
                f'"h":"{p(k.high)}","l":"{p(k.low)}","v":"{spec.qty_text(k.volume)}",'
                f'"n":{k.trades},"x":{"true" if closing else "false"},"q":"{quote:.4f}",'
                f'"V":"{spec.qty_text(k.taker_volume)}","Q":"{taker_quote:.4f}","B":"0"}}}}')

    def _book_ticker(self, feed: Feed, now_ms: int) -> str:
        sm = self.symbol(feed.spec.symbol or "")
        book = sm.book
        book.step()
        bid, ask = book.bids.best(), book.asks.best()
        t = sm.spec.price_text
        q = sm.spec.qty_text
        return (f'{{"e":"bookTicker","u":{book.update_id},"E":{now_ms},"T":{now_ms - 1},'
                f'"s":"{sm.spec.symbol}","b":"{t(bid)}","B":"{q(book.bids.qty[bid])}",'
                f'"a":"{t(ask)}","A":"{q(book.asks.qty[ask])}"}}')

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

    def premium_index(self, symbol: str, now_ms: int) -> dict[str, object]:
        sm = self.symbol(symbol)
        mark = sm.mark_units()
        index = mark + self.rng.randint(-3, 3) * sm.spec.tick
        return {"symbol": symbol, "markPrice": sm.long_price(mark),
                "indexPrice": sm.long_price(index), "estimatedSettlePrice": sm.long_price(index),
                "lastFundingRate": f"{sm.funding_bp / 10_000:.8f}", "interestRate": "0.00010000",
                "nextFundingTime": next_funding_ms(now_ms), "time": now_ms}

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
            "symbols": [_symbol_info(symbol_spec(s)) for s in self.symbols],
        }


def _symbol_info(spec: SymbolSpec) -> dict[str, object]:
    base = spec.symbol.removesuffix("USDT")
    return {
        "symbol": spec.symbol, "pair": spec.symbol, "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000, "onboardDate": 1569398400000, "status": "TRADING",
        "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
        "baseAsset": base, "quoteAsset": "USDT", "marginAsset": "USDT",
        "pricePrecision": spec.price_decimals, "quantityPrecision": spec.qty_decimals,
        "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
        "underlyingSubType": [], "triggerProtect": "0.0500", "liquidationFee": "0.012500",
        "marketTakeBound": "0.05",
        "filters": [
            {"filterType": "PRICE_FILTER", "tickSize": spec.price_text(spec.tick),
             "minPrice": spec.price_text(spec.tick), "maxPrice": "10000000"},
            {"filterType": "LOT_SIZE", "stepSize": spec.qty_text(spec.step),
             "minQty": spec.qty_text(spec.step), "maxQty": "1000000"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                       "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
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
