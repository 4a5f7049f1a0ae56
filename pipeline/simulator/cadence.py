"""The whole-market cadence (issue #16): when each stream's next event happens. Pure.

Theory of operation. In cadence mode the exchange makes its events on its own clock, whoever
listens, as Binance does: one heap holds the next due time of every live feed and of every
symbol's book, and `Market.advance(t)` pops them in time order, so every piece of shared state
(a symbol's book, its candles) changes in the same order in every run. Times are market seconds
since the simulator started.

- Fixed cadences, aligned to their period on the market clock: markPrice@1s once a second,
  markPrice every 3 s, kline every 250 ms when its candle changed ("every 250 milliseconds
  (if existing)", Binance's words: a quiet symbol's candle is sent when it trades and when it
  closes), depth@100ms ten times a second when the book changed, depth (no suffix) every
  250 ms, depth@500ms twice a second, !markPrice@arr and tradingSession on their periods.
- Each symbol trades on its own clock while any of its streams is read (its candles and last
  price move whoever reads its trades; an aggTrade stream publishes them), in clusters:
  clusters arrive as a Poisson process and each holds a
  Pareto-distributed number of trades (alpha 1.5: mean ~2.5, unbounded variance, capped at
  300) about a millisecond apart, so a second can hold a handful of trades or hundreds.
  The symbol's rate falls with its rank in the listing, `TOP_TRADES_PER_S / rank` (Zipf):
  BTCUSDT ~100 a second, the 500th symbol one every five seconds.
- bookTicker follows the same cluster process at twice the trade rate; the book itself changes
  `3 x trades + 5` times a second (a Poisson process) while a depth or bookTicker stream of the
  symbol is read, once a second otherwise (its mid price still moves under mark prices, trades
  and candles, and a whole market of books costs little); forceOrder at most once a second.
- The crash phase multiplies trades, book changes, book tickers and liquidations by
  `multiplier` (default 5): from `crash_after` seconds for `crash_seconds`, or while switched
  on over HTTP (`/sim/market/crash`).

Every clock draws from its own `random.Random(f"{seed}:{name}")`, so the same seed and the same
subscriptions, made at the same market times, give the same events. A change of rate (a crash
starting) takes effect from each clock's next gap.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable

TOP_TRADES_PER_S = 100.0
MIN_TRADES_PER_S = 0.2
CLUSTER_ALPHA = 1.5
CLUSTER_CAP = 300
CLUSTER_GAP_S = 0.001
# mean of min(CLUSTER_CAP, floor(Pareto(alpha))) = sum of P(size >= k)
MEAN_CLUSTER = sum(k ** -CLUSTER_ALPHA for k in range(1, CLUSTER_CAP + 1))
LIQUIDATIONS_PER_S = 0.02
IDLE_BOOK_CHANGES_PER_S = 1.0
OFF_HOURS_ACTIVITY = 0.1  # TradFi outside a session: weekend volume is a tenth or less
BURSTY = ("aggTrade", "bookTicker")
Fire = Callable[[float], float | None]
_CLUSTER_RATE = 1 / CLUSTER_GAP_S
_PARETO_EXP = -1.0 / CLUSTER_ALPHA
_log = math.log


class Crash:
    """The crash phase: scheduled by the configuration, or switched over HTTP."""

    def __init__(self, multiplier: float, after: float | None, seconds: float) -> None:
        self.multiplier = multiplier
        self.window = None if after is None else (after, after + seconds)
        self.manual: bool | None = None  # None: follow the schedule

    def on(self, t: float) -> bool:
        if self.manual is not None:
            return self.manual
        return self.window is not None and self.window[0] <= t < self.window[1]

    def factor(self, t: float) -> float:
        return self.multiplier if self.on(t) else 1.0


def trade_rates(symbols: Iterable[str]) -> dict[str, float]:
    """Trades a second of each symbol by its rank: heavy-tailed across the market."""
    return {s: max(MIN_TRADES_PER_S, TOP_TRADES_PER_S / rank)
            for rank, s in enumerate(symbols, start=1)}


def book_rate(trades_per_s: float) -> float:
    """Changes a second of a book someone reads."""
    return 3 * trades_per_s + 5


class BurstClock:
    """Clustered arrivals: Poisson clusters of Pareto-many events about a millisecond apart."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.left = 0

    def gap(self, rate: float) -> float:
        # `rng.expovariate` and `rng.paretovariate` written out: the same arithmetic, so the
        # same floats, without two calls a trade
        rng = self.rng
        if self.left > 0:
            self.left -= 1
            return -_log(1.0 - rng.random()) / _CLUSTER_RATE
        self.left = min(CLUSTER_CAP, int((1.0 - rng.random()) ** _PARETO_EXP)) - 1
        return -_log(1.0 - rng.random()) / (rate / MEAN_CLUSTER)


class PoissonClock:
    def __init__(self, rng: random.Random, min_gap: float = 0.0) -> None:
        self.rng = rng
        self.min_gap = min_gap

    def gap(self, rate: float) -> float:
        # `rng.expovariate(rate)` written out (the same arithmetic, so the same floats): a
        # whole market of books steps thousands of times a second
        return max(self.min_gap, -_log(1.0 - self.rng.random()) / rate)


def aligned(t: float, period: float) -> float:
    """The first multiple of `period` at or after `t` (fixed cadences run on the grid)."""
    return math.ceil(round(t / period, 9)) * period


class Schedule:
    """Due times of everything that fires on its own. `fire(due)` makes what is due and answers
    when it is due next, at or after `due` (None: it stopped).

    Fired in time order and, at one time, in the order added (a fire that answers its own
    `due` again goes last). Kept as a heap of the distinct due times and, for each, what is due
    then: one fire (the random clocks: books, trades, book tickers) or a list of them (the
    fixed cadences share their grid times: at a whole second 550 mark prices, 550 klines, the
    depth streams), so a grid time costs one heap operation, not one per stream, and a random
    clock's heap compares floats, not tuples.
    """

    def __init__(self) -> None:
        self._times: list[float] = []  # a heap of the distinct due times
        self._due: dict[float, Fire | list[Fire]] = {}
        self._done = 0  # entries of the earliest list fired already (`run_until`'s `limit`)

    def add(self, due: float, fire: Fire) -> None:
        there = self._due.get(due)
        if there is None:
            self._due[due] = fire
            heapq.heappush(self._times, due)
        elif isinstance(there, list):
            there.append(fire)
        else:
            self._due[due] = [there, fire]

    def next_due(self) -> float:
        return self._times[0] if self._times else math.inf

    def run_until(self, t: float, limit: float = math.inf) -> int:
        """Fire everything due by `t`, in order; returns how many fired. With `limit`, stop
        after that many (the rest is fired by the next call, in the same order)."""
        times, due_at, add = self._times, self._due, self.add
        fired = 0
        while times and times[0] <= t:
            due = times[0]
            there = due_at[due]
            if not isinstance(there, list):
                if fired >= limit:
                    return fired
                heapq.heappop(times)
                del due_at[due]
                fired += 1
                nxt = there(due)
                if nxt is not None:
                    add(nxt, there)
                continue
            i = self._done
            while i < len(there):
                if fired >= limit:
                    self._done = i
                    return fired
                fire = there[i]
                i += 1
                fired += 1
                nxt = fire(due)
                if nxt is not None:
                    add(nxt, fire)  # at `due` again: appended to `there`, fired in this loop
            self._done = 0
            del due_at[due]
            if times[0] == due:
                heapq.heappop(times)
            else:  # a fire answered a time before its own (a broken clock): keep the heap whole
                times.remove(due)
                heapq.heapify(times)
        return fired
