"""Trading sessions of the markets under TradFi perpetuals (contractType TRADIFI_PERPETUAL). Pure.

Binance (2026): the `tradingSession` stream (path `/market`) sends, every second and one message
per underlying market, `{"e":"EquityUpdate","E":…,"t":<session start>,"T":<session end>,
"S":<session type>}` (`CommodityUpdate` for commodities, `KR_EquityUpdate` for Korean equities
since 2026-06-02); `GET /fapi/v1/tradingSchedule` (weight 5, no parameters) answers
`{"updateTime":…,"marketSchedules":{"EQUITY":{"sessions":[{"startTime","endTime","type"}…]},…}}`
for 7 days before and 7 days after the day before the query. US equity sessions are
PRE_MARKET, REGULAR, AFTER_MARKET, OVERNIGHT and NO_TRADING; commodity and Korean equity ones
REGULAR and NO_TRADING. The perpetuals themselves trade around the clock: outside a session
their underlying is closed, the index of an equity stays fixed, and little trades.

The weekly schedule here is a fixed UTC week (no daylight saving time, no holidays), with US
equity hours as Binance's own example states them (OVERNIGHT 00:00-08:00, PRE_MARKET
08:00-13:30, REGULAR 13:30-20:00, AFTER_MARKET 20:00-24:00, Monday to Friday), commodities
REGULAR 13:30-20:00 and Korean equities REGULAR 00:00-06:30 on weekdays. A forced session (the
`/sim/market/session` control) starts when it is set and lasts until it is cleared; the
schedule then resumes, so the stream and tradingSchedule always agree.
"""

from __future__ import annotations

import itertools

import attrs

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
_MONDAY_MS = 4 * DAY_MS  # the epoch was a Thursday
NO_TRADING = "NO_TRADING"
EVENT_TYPES = {"EQUITY": "EquityUpdate", "COMMODITY": "CommodityUpdate",
               "KR_EQUITY": "KR_EquityUpdate"}
SESSION_TYPES = {
    "EQUITY": ("PRE_MARKET", "REGULAR", "AFTER_MARKET", "OVERNIGHT", NO_TRADING),
    "COMMODITY": ("REGULAR", NO_TRADING),
    "KR_EQUITY": ("REGULAR", NO_TRADING),
}
_COMMODITIES = frozenset(("XAU", "XAG", "XPT", "XPD", "COPPER", "CL", "BZ", "NATGAS"))


def _weekdays(*day: tuple[int, str]) -> tuple[tuple[int, str], ...]:
    """(minute of the week, session type that starts there) for Monday to Friday, then the
    weekend."""
    out = [(d * 1440 + minute, kind) for d in range(5) for minute, kind in day]
    return (*out, (5 * 1440, NO_TRADING))


WEEKLY: dict[str, tuple[tuple[int, str], ...]] = {
    "EQUITY": _weekdays((0, "OVERNIGHT"), (480, "PRE_MARKET"), (810, "REGULAR"),
                        (1200, "AFTER_MARKET")),
    "COMMODITY": _weekdays((0, NO_TRADING), (810, "REGULAR"), (1200, NO_TRADING)),
    "KR_EQUITY": _weekdays((0, "REGULAR"), (390, NO_TRADING)),
}


def underlying_market(symbol: str) -> str:
    """EQUITY or COMMODITY for a TradFi perpetual, from its base asset (XAUUSDT: gold)."""
    return "COMMODITY" if symbol.removesuffix("USDT") in _COMMODITIES else "EQUITY"


@attrs.frozen
class Session:
    start: int  # ms
    end: int  # ms, exclusive
    type: str


def _template(market: str, hours: str) -> tuple[tuple[int, str], ...]:
    if hours == "open":
        return ((0, "REGULAR"),)
    if hours == "closed":
        return ((0, NO_TRADING),)
    return WEEKLY[market]


def scheduled(market: str, hours: str, lo: int, hi: int) -> list[Session]:
    """The sessions of the weekly template overlapping [lo, hi), adjacent equal types merged."""
    template = _template(market, hours)
    week0 = lo - (lo - _MONDAY_MS) % WEEK_MS
    bounds: list[tuple[int, str]] = []
    week = week0 - WEEK_MS
    while week < hi + WEEK_MS:
        bounds += [(week + minute * 60_000, kind) for minute, kind in template]
        week += WEEK_MS
    out: list[Session] = []
    for (start, kind), (end, _) in itertools.pairwise(bounds):
        if out and out[-1].type == kind:
            out[-1] = Session(out[-1].start, end, kind)
        else:
            out.append(Session(start, end, kind))
    return [s for s in out if s.end > lo and s.start < hi]


@attrs.define
class Override:
    start: int
    end: int | None  # None: until cleared
    type: str


def paint(sessions: list[Session], overrides: list[Override], hi: int) -> list[Session]:
    """`sessions` with each override laid over them (later overrides win)."""
    out = sessions
    for o in overrides:
        end = hi if o.end is None else o.end
        if end <= o.start:
            continue
        cut: list[Session] = []
        for s in out:
            if s.end <= o.start or s.start >= end:
                cut.append(s)
                continue
            if s.start < o.start:
                cut.append(Session(s.start, o.start, s.type))
            if s.end > end:
                cut.append(Session(end, s.end, s.type))
        cut.append(Session(o.start, end, o.type))
        out = sorted(cut, key=lambda s: s.start)
    return out


class TradingHours:
    """Sessions of every underlying market: the template, forced sessions, the current one."""

    def __init__(self, hours: str) -> None:
        self.hours = hours
        self.overrides: dict[str, list[Override]] = {m: [] for m in EVENT_TYPES}
        self._current: dict[str, Session] = {}

    def force(self, market: str, session_type: str | None, now_ms: int) -> None:
        """From `now_ms`, `market` is in `session_type` until cleared (None clears)."""
        if market not in EVENT_TYPES:
            raise ValueError(f"market must be one of {', '.join(EVENT_TYPES)}, not {market!r}")
        if session_type is not None and session_type not in SESSION_TYPES[market]:
            raise ValueError(f"{market} sessions are {', '.join(SESSION_TYPES[market])}, "
                             f"not {session_type!r}")
        for o in self.overrides[market]:
            if o.end is None:
                o.end = now_ms
        if session_type is not None:
            self.overrides[market].append(Override(now_ms, None, session_type))
        self._current.pop(market, None)

    def sessions(self, market: str, lo: int, hi: int) -> list[Session]:
        timeline = paint(scheduled(market, self.hours, lo, hi), self.overrides[market], hi)
        return [s for s in timeline if s.end > lo and s.start < hi]

    def current(self, market: str, now_ms: int) -> Session:
        """The session holding `now_ms` (cached until it ends: this runs for every frame of a
        TradFi symbol)."""
        s = self._current.get(market)
        if s is not None and s.start <= now_ms < s.end:
            return s
        s = next(x for x in self.sessions(market, now_ms - WEEK_MS, now_ms + WEEK_MS)
                 if x.start <= now_ms < x.end)
        self._current[market] = s
        return s

    def in_session(self, market: str, now_ms: int) -> bool:
        return self.current(market, now_ms).type != NO_TRADING

    def schedule(self, now_ms: int) -> dict[str, object]:
        """The body of `GET /fapi/v1/tradingSchedule`."""
        anchor = now_ms - now_ms % DAY_MS - DAY_MS  # the day before the query
        lo, hi = anchor - 7 * DAY_MS, anchor + 7 * DAY_MS
        return {"updateTime": now_ms, "marketSchedules": {
            market: {"sessions": [{"startTime": s.start, "endTime": s.end, "type": s.type}
                                  for s in self.sessions(market, lo, hi)]}
            for market in EVENT_TYPES}}

    def events(self, now_ms: int) -> list[str]:
        """One `tradingSession` payload per market."""
        out = []
        for market, event in EVENT_TYPES.items():
            s = self.current(market, now_ms)
            out.append(f'{{"e":"{event}","E":{now_ms},"t":{s.start},"T":{s.end},'
                       f'"S":"{s.type}"}}')
        return out
