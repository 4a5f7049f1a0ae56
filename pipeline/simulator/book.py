"""One true order book per symbol, moved by a seeded random walk. Pure: no trio, no I/O.

Theory of operation. Prices and quantities are integers in units of the symbol's precision
(`10**-price_decimals`, `10**-qty_decimals`), so a level's wire text is formatted once, the first
time it is read after it changed, and cached as the JSON fragment `["95000.10","1.234"]` (a
whole market of books changes thousands of times a second, and most levels are never read
between two changes). Every `step()` changes a
few levels and moves `update_id` forward; it records which prices it touched in a bounded
history. A diff-depth event for a reader whose last event ended at `cursor` is the union of the
prices touched since then, each with its quantity now (0: gone): exactly Binance's rule "only
changed levels, latest quantity". A reader that fell further behind than the history gets an
event whose `pu` does not match its last `u`, which is what Binance does after a gap: the client
must resync from a snapshot. Partial depth frames and REST snapshots read the same book, so a
client following Binance's documented sequencing ends equal to a fresh snapshot.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque

import attrs

HISTORY_STEPS = 20_000
TARGET_LEVELS = 400  # per side; a limit=1000 snapshot holds the whole book
_DEPTH_LOW, _DEPTH_HIGH = TARGET_LEVELS - 20, TARGET_LEVELS + 20  # kept within these
_log = math.log


@attrs.frozen
class SymbolSpec:
    """Exchange facts of one symbol, as exchangeInfo states them."""

    symbol: str
    base_price: int  # in price units
    price_decimals: int
    tick: int  # in price units
    qty_decimals: int
    step: int  # in qty units

    # the wire text of each price and quantity seen lately: the hot path formats the same few
    # hundred prices and the same few thousand quantities again and again (a dict look-up is
    # half the cost of a cached call); emptied when it holds TEXTS_KEPT
    _prices: dict[int, str] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    _qtys: dict[int, str] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def price_text(self, units: int) -> str:
        text = self._prices.get(units)
        if text is None:
            text = _remember(self._prices, units, self.price_decimals)
        return text

    def qty_text(self, units: int) -> str:
        text = self._qtys.get(units)
        if text is None:
            text = _remember(self._qtys, units, self.qty_decimals)
        return text


TEXTS_KEPT = 1 << 14  # per symbol and kind (kline volumes are new numbers every time)


def _remember(texts: dict[int, str], units: int, decimals: int) -> str:
    if len(texts) >= TEXTS_KEPT:
        texts.clear()
    text = texts[units] = _fixed(units, decimals)
    return text


def _fixed(units: int, decimals: int) -> str:
    if decimals == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**decimals)
    return f"{sign}{whole}.{frac:0{decimals}d}"


_KNOWN: dict[str, tuple[float, int, int, int, int]] = {
    # symbol: (price, price decimals, tick units, qty decimals, step units)
    "BTCUSDT": (95_000.0, 2, 10, 3, 1),
    "ETHUSDT": (3_500.0, 2, 1, 3, 1),
    "SOLUSDT": (200.0, 3, 10, 2, 1),
    "BNBUSDT": (650.0, 3, 10, 2, 1),
    "XRPUSDT": (2.5, 4, 1, 1, 1),
    # TradFi perpetuals: equities and metals
    "TSLAUSDT": (430.0, 2, 1, 2, 1),
    "NVDAUSDT": (180.0, 2, 1, 2, 1),
    "AAPLUSDT": (270.0, 2, 1, 2, 1),
    "XAUUSDT": (4_000.0, 2, 1, 3, 1),
    "XAGUSDT": (50.0, 3, 1, 2, 1),
}


def symbol_spec(symbol: str) -> SymbolSpec:
    """Realistic precision for well-known symbols; any other gets a price from its name."""
    if symbol in _KNOWN:
        price, pd, tick, qd, step = _KNOWN[symbol]
    else:
        rng = random.Random(symbol)
        price, pd, tick, qd, step = round(rng.uniform(0.5, 50.0), 4), 4, 1, 0, 1
    return SymbolSpec(symbol, round(price * 10**pd), pd, tick, qd, step)


class BookSide:
    """One side: price -> quantity, prices kept sorted ascending, wire fragments cached."""

    def __init__(self, spec: SymbolSpec, descending: bool) -> None:
        self.spec = spec
        self.descending = descending
        self.qty: dict[int, int] = {}
        self.frag: dict[int, str] = {}  # the levels read since they last changed
        self.prices: list[int] = []  # ascending

    def fill(self, levels: dict[int, int]) -> None:
        """Start with `levels` (price -> quantity), all at once."""
        self.qty = dict(levels)
        self.frag = {}
        self.prices = sorted(levels)

    def set(self, price: int, qty: int) -> None:
        qtys = self.qty
        if qty <= 0:
            if price in qtys:
                del qtys[price]
                self.frag.pop(price, None)
                del self.prices[bisect.bisect_left(self.prices, price)]
            return
        if price not in qtys:
            bisect.insort(self.prices, price)
        qtys[price] = qty
        self.frag.pop(price, None)

    def _format(self, price: int) -> str:
        text = f'["{self.spec.price_text(price)}","{self.spec.qty_text(self.qty[price])}"]'
        self.frag[price] = text
        return text

    def best(self) -> int:
        return self.prices[-1] if self.descending else self.prices[0]

    def worst(self) -> int:
        return self.prices[0] if self.descending else self.prices[-1]

    def nth(self, n: int) -> int:
        """The n-th best price (0 = best), clamped to the book's depth."""
        n = min(n, len(self.prices) - 1)
        return self.prices[-1 - n] if self.descending else self.prices[n]

    def top(self, n: int) -> list[int]:
        if self.descending:
            return self.prices[: -n - 1 : -1] if n < len(self.prices) else self.prices[::-1]
        return self.prices[:n]

    def levels_json(self, n: int) -> str:
        get = self.frag.get
        return "[" + ",".join([get(p) or self._format(p) for p in self.top(n)]) + "]"

    def level_json(self, price: int) -> str:
        frag = self.frag.get(price)
        if frag is not None:
            return frag
        if price in self.qty:
            return self._format(price)
        return f'["{self.spec.price_text(price)}","{self.spec.qty_text(0)}"]'


class Book:
    """The true book of one symbol. `step()` mutates it; readers take top-N, diffs, snapshots."""

    def __init__(self, spec: SymbolSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.bids = BookSide(spec, descending=True)
        self.asks = BookSide(spec, descending=False)
        self.update_id = rng.randrange(1_000_000_000, 2_000_000_000)
        # (first id, last id, prices touched on the bid side, on the ask side)
        self.history: deque[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = deque(
            maxlen=HISTORY_STEPS)
        self.breaks = 0  # bumped by a forced sequence break; see market.DepthCursor
        mid = spec.base_price - spec.base_price % spec.tick
        levels = range(1, TARGET_LEVELS + 1)
        bids = [(mid - i * spec.tick, self._random_qty()) for i in levels]
        asks = [(mid + i * spec.tick, self._random_qty()) for i in levels]
        self.bids.fill(dict(bids))
        self.asks.fill(dict(asks))
        self.step()  # so that the history always holds the step that led to `update_id`

    def _random_qty(self) -> int:
        return self.spec.step * (1 + int(self.rng.random() * 5000))

    def mid_units(self) -> int:
        return (self.bids.best() + self.asks.best()) // 2

    def step(self) -> None:
        """One random change of the book: a new quantity, a level gone or added, a price move."""
        bid_touched: list[int] = []
        ask_touched: list[int] = []
        rng, tick = self.rng, self.spec.tick
        side_is_bid = rng.random() < 0.5
        side, touched = (self.bids, bid_touched) if side_is_bid else (self.asks, ask_touched)
        sign = -1 if side_is_bid else 1
        roll = rng.random()
        # `rng.expovariate(x)` and `_random_qty()` written out (the same draws and arithmetic):
        # a whole market of books steps thousands of times a second
        if roll < 0.6:
            p = side.nth(int(-_log(1.0 - rng.random()) / 0.25))
            side.set(p, self.spec.step * (1 + int(rng.random() * 5000)))
            touched.append(p)
        elif roll < 0.75 and len(side.prices) > 20:
            p = side.nth(1 + int(-_log(1.0 - rng.random()) / 0.2))
            side.set(p, 0)
            touched.append(p)
        elif roll < 0.9:
            p = side.best() + sign * tick * rng.randint(1, 30)
            side.set(p, self.spec.step * (1 + int(rng.random() * 5000)))
            touched.append(p)
        else:
            self._move_price(side_is_bid, bid_touched, ask_touched)
        if not _DEPTH_LOW <= len(self.bids.prices) <= _DEPTH_HIGH:
            self._keep_depth(self.bids, bid_touched, -1)
        if not _DEPTH_LOW <= len(self.asks.prices) <= _DEPTH_HIGH:
            self._keep_depth(self.asks, ask_touched, 1)
        first = self.update_id + 1
        self.update_id += 1 + int(rng.random() * 4)
        self.history.append((first, self.update_id, tuple(bid_touched), tuple(ask_touched)))

    def _move_price(self, up: bool, bid_touched: list[int], ask_touched: list[int]) -> None:
        """The best level of one side is taken out and the other side steps into the gap."""
        if up:
            p = self.asks.best()
            self.asks.set(p, 0)
            ask_touched.append(p)
            self.bids.set(p, self._random_qty())
            bid_touched.append(p)
        else:
            p = self.bids.best()
            self.bids.set(p, 0)
            bid_touched.append(p)
            self.asks.set(p, self._random_qty())
            ask_touched.append(p)

    def _keep_depth(self, side: BookSide, touched: list[int], sign: int) -> None:
        while len(side.prices) > _DEPTH_HIGH:
            p = side.worst()
            side.set(p, 0)
            touched.append(p)
        if len(side.prices) < _DEPTH_LOW:
            p = side.worst() + sign * self.spec.tick
            side.set(p, self._random_qty())
            touched.append(p)

    def reader_cursor(self) -> int:
        """Where a new diff-depth reader starts: just before the last step, so that its first
        event has `U <= update_id` and a snapshot taken any time after subscribing passes
        Binance's first-event check `U <= lastUpdateId <= u` (re-sending the last step's levels
        is harmless: they carry the quantities of now)."""
        return self.update_id - 1

    def diff_since(self, cursor: int) -> tuple[int, int, int, str, str]:
        """(U, u, pu, bids json, asks json) with every level changed after update id `cursor`.

        When `cursor` is older than the history, `pu` is not `cursor`: the reader sees a gap.
        """
        bid_set: dict[int, None] = {}
        ask_set: dict[int, None] = {}
        first_u = self.update_id + 1
        for first, last, bids, asks in reversed(self.history):
            if last <= cursor:
                break
            first_u = first
            bid_set.update(dict.fromkeys(bids))
            ask_set.update(dict.fromkeys(asks))
        covered = first_u <= cursor + 1
        pu = cursor if covered else first_u - 1
        bids_json = "[" + ",".join([self.bids.level_json(p) for p in bid_set]) + "]"
        asks_json = "[" + ",".join([self.asks.level_json(p) for p in ask_set]) + "]"
        return first_u, self.update_id, pu, bids_json, asks_json

    def snapshot_json(self, limit: int, now_ms: int) -> str:
        return (f'{{"lastUpdateId":{self.update_id},"E":{now_ms},"T":{now_ms},'
                f'"bids":{self.bids.levels_json(limit)},"asks":{self.asks.levels_json(limit)}}}')
