"""Candles: one series per (symbol, interval), shared by the kline stream and REST klines. Pure.

Theory of operation. A series holds the candle now open and the candles closed since the series
began (the last `KEPT_CLOSED` of them). Whoever reads it (a kline stream frame, a trade, a REST
call) first rolls it to its time: the open candle closes when its span is over, and a span with
no activity becomes a flat candle at the last close, so open times are contiguous, as Binance's
are. A closed candle never changes again: what the stream sent with `"x":true` is exactly what
`GET /fapi/v1/klines` returns for that open time, so a client that takes REST history and then
the stream sees no hole and no second version of a candle.

Candles before the series began are synthesized from the seed and the open time alone
(`history_candle`): a smooth price path that ends at the first real candle's open, so paging
back through REST gives the same, continuous history every time, back to the listing's
`onboardDate`.

Interval boundaries are Binance's: fixed spans from the epoch, weeks from Monday 00:00 UTC,
months from the first of the calendar month.
"""

from __future__ import annotations

import math
import random
from collections import deque
from datetime import UTC, datetime

import attrs

from pipeline.simulator.book import SymbolSpec

FIXED_MS = {
    "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
    "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000, "6h": 21_600_000, "8h": 28_800_000,
    "12h": 43_200_000, "1d": 86_400_000, "3d": 259_200_000, "1w": 604_800_000,
}
INTERVALS = (*FIXED_MS, "1M")
_WEEK_OFFSET = 4 * 86_400_000  # the epoch was a Thursday; weeks start on Mondays
KEPT_CLOSED = 10_000  # closed candles kept per series (7 days of 1m candles)
MAX_ROWS = 1500


def candle_start(interval: str, t_ms: int) -> int:
    """Open time of the candle of `interval` holding the instant `t_ms`."""
    if interval == "1M":
        d = datetime.fromtimestamp(t_ms / 1000, UTC)
        return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp() * 1000)
    span = FIXED_MS[interval]
    offset = _WEEK_OFFSET if interval == "1w" else 0
    return t_ms - (t_ms - offset) % span


def candle_next(interval: str, start_ms: int) -> int:
    if interval == "1M":
        d = datetime.fromtimestamp(start_ms / 1000, UTC)
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)
    return start_ms + FIXED_MS[interval]


def candle_prev(interval: str, start_ms: int) -> int:
    if interval == "1M":
        return candle_start("1M", start_ms - 1)
    return start_ms - FIXED_MS[interval]


@attrs.define
class Kline:
    """One candle; prices in price units, volumes in quantity units (see `book.SymbolSpec`)."""

    start: int  # open time, ms
    end: int  # close time, ms: the next open time minus 1
    first_trade: int
    open: int
    high: int
    low: int
    close: int
    volume: int = 0
    taker_volume: int = 0
    trades: int = 0
    last_trade: int = 0


def _quote(spec: SymbolSpec, volume: int, price: int) -> str:
    return f"{volume * price / 10 ** (spec.price_decimals + spec.qty_decimals):.4f}"


def kline_event(spec: SymbolSpec, k: Kline, interval: str, now_ms: int, closed: bool) -> str:
    """The `<symbol>@kline_<interval>` payload (no `st`: Binance's kline event has none)."""
    p, q = spec.price_text, spec.qty_text
    return (f'{{"e":"kline","E":{now_ms},"s":"{spec.symbol}","k":{{"t":{k.start},'
            f'"T":{k.end},"s":"{spec.symbol}","i":"{interval}",'
            f'"f":{k.first_trade},"L":{k.last_trade},"o":"{p(k.open)}","c":"{p(k.close)}",'
            f'"h":"{p(k.high)}","l":"{p(k.low)}","v":"{q(k.volume)}",'
            f'"n":{k.trades},"x":{"true" if closed else "false"},'
            f'"q":"{_quote(spec, k.volume, k.close)}","V":"{q(k.taker_volume)}",'
            f'"Q":"{_quote(spec, k.taker_volume, k.close)}","B":"0"}}}}')


def kline_row(spec: SymbolSpec, k: Kline) -> str:
    """One row of `GET /fapi/v1/klines`, in Binance's order: open time, open, high, low, close,
    volume, close time, quote volume, trades, taker buy volume, taker buy quote volume, ignore."""
    p, q = spec.price_text, spec.qty_text
    return (f'[{k.start},"{p(k.open)}","{p(k.high)}","{p(k.low)}","{p(k.close)}",'
            f'"{q(k.volume)}",{k.end},"{_quote(spec, k.volume, k.close)}",{k.trades},'
            f'"{q(k.taker_volume)}","{_quote(spec, k.taker_volume, k.close)}","0"]')


# --- history before the series began ---------------------------------------------------------

_WAVES_S = (86_400.0, 7 * 86_400.0, 30 * 86_400.0)  # periods of the synthetic price path
_AMPLITUDES = (0.01, 0.03, 0.08)


def _log_level(phases: tuple[float, ...], t_ms: int) -> float:
    t = t_ms / 1000
    return sum(a * math.sin(2 * math.pi * t / w + ph)
               for a, w, ph in zip(_AMPLITUDES, _WAVES_S, phases, strict=True))


def history_candle(spec: SymbolSpec, interval: str, start: int, seed: str, anchor_ms: int,
                   anchor_price: int) -> Kline:
    """The candle opening at `start` (< `anchor_ms`), a pure function of its arguments: its
    price path passes through `anchor_price` at `anchor_ms`, where the real candles begin."""
    phases = tuple(random.Random(f"{seed}:waves").uniform(0, 2 * math.pi) for _ in _WAVES_S)
    base = _log_level(phases, anchor_ms)
    end = candle_next(interval, start)

    def price(t_ms: int) -> int:
        units = anchor_price * math.exp(_log_level(phases, t_ms) - base)
        return max(spec.tick, round(units / spec.tick) * spec.tick)

    rng = random.Random(f"{seed}:{interval}:{start}")
    o, c = price(start), price(end)
    wick = anchor_price * 0.002 * math.sqrt((end - start) / 60_000) * rng.random()
    h = max(o, c) + round(wick / spec.tick) * spec.tick
    low = max(spec.tick, min(o, c) - round(wick * rng.random() / spec.tick) * spec.tick)
    volume = spec.step * int(1 + rng.random() * 5000 * (end - start) / 60_000)
    trades = int(1 + rng.random() * 50 * (end - start) / 60_000)
    return Kline(start, end - 1, -1, o, h, low, c, volume, int(volume * rng.random()), trades, -1)


# --- one series --------------------------------------------------------------------------------

class CandleSeries:
    """The candles of one symbol at one interval: the open one, the closed ones, the history."""

    def __init__(self, spec: SymbolSpec, interval: str, now_ms: int, price: int, trade_id: int,
                 seed: str, onboard_ms: int) -> None:
        self.spec = spec
        self.interval = interval
        self.seed = seed
        start = candle_start(interval, now_ms)
        self.birth = start  # open time of the first real candle
        self.birth_price = price
        self.onboard = candle_start(interval, onboard_ms)
        self.until: int | None = None  # no candle opens at or after this (a delisted symbol)
        self.current = self._flat(start, price, trade_id)
        self.closed: deque[Kline] = deque(maxlen=KEPT_CLOSED)
        self.version = 0  # bumped by every change: a kline stream pushes only after one

    def _flat(self, start: int, price: int, trade_id: int) -> Kline:
        return Kline(start, candle_next(self.interval, start) - 1, trade_id + 1, price, price,
                     price, price, last_trade=trade_id)

    def roll(self, now_ms: int) -> None:
        """Close every candle whose span ended by `now_ms`; each empty span a flat candle."""
        if self.until is not None:
            now_ms = min(now_ms, self.until - 1)
        k = self.current
        if now_ms <= k.end:
            return
        while now_ms > k.end:
            self.closed.append(k)
            k = self._flat(k.end + 1, k.close, k.last_trade)
        self.current = k
        self.version += 1

    def trade(self, now_ms: int, price: int, qty: int, taker_buy: bool, trades: int,
              last_trade: int) -> None:
        self.roll(now_ms)
        k = self.current
        if now_ms < k.start or now_ms > k.end:
            return  # a trade older than the open candle: closed candles never change
        k.high, k.low, k.close = max(k.high, price), min(k.low, price), price
        k.volume += qty
        if taker_buy:
            k.taker_volume += qty
        k.trades += trades
        k.last_trade = last_trade
        self.version += 1

    def follow(self, price: int) -> None:
        """The open candle follows the book's mid even when nothing trades."""
        k = self.current
        k.high, k.low, k.close = max(k.high, price), min(k.low, price), price
        self.version += 1

    def closed_at(self, start: int) -> Kline | None:
        """The closed candle that opened at `start`, if it is still kept."""
        closed = self.closed
        if not closed or start < closed[0].start:
            return None
        if self.interval == "1M":
            return next((k for k in closed if k.start == start), None)
        # closed candles are contiguous, so the open time gives the place
        idx = (start - closed[0].start) // FIXED_MS[self.interval]
        return closed[idx] if idx < len(closed) and closed[idx].start == start else None

    def candle(self, start: int) -> Kline | None:
        if start == self.current.start:
            return self.current
        if start >= self.birth:
            return self.closed_at(start)
        if start < self.onboard:
            return None
        return history_candle(self.spec, self.interval, start, self.seed, self.birth,
                              self.birth_price)

    def rows(self, start_ms: int | None, end_ms: int | None, limit: int) -> list[str]:
        """`GET /fapi/v1/klines` rows: open times in [start, end], at most `limit`, oldest
        first; without `start`, the latest `limit` up to `end` (or up to the open candle)."""
        last = self.current.start
        if end_ms is not None:
            last = min(last, candle_start(self.interval, end_ms))
        opens: list[int] = []
        if start_ms is None:
            t = last
            while len(opens) < limit and t >= self.onboard:
                opens.append(t)
                t = candle_prev(self.interval, t)
            opens.reverse()
        else:
            t = max(candle_start(self.interval, start_ms), self.onboard)
            if t < start_ms:
                t = candle_next(self.interval, t)
            while len(opens) < limit and t <= last:
                opens.append(t)
                t = candle_next(self.interval, t)
        out = []
        for t in opens:
            k = self.candle(t)
            if k is not None:
                out.append(kline_row(self.spec, k))
        return out


def klines_weight(limit: int) -> int:
    """Binance's documented weight of `GET /fapi/v1/klines` by limit: [1,100) 1, [100,500) 2,
    [500,1000] 5, above 1000 10."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10
