"""REST request weight: Binance allows 2400 a minute per IP and reports the weight used so far
in `X-MBX-USED-WEIGHT-1M`. Keep going past the limit and it answers 429, then bans with 418.

Binance's rules for those answers (USDⓈ-M futures "General Info", 2026): both carry
`Retry-After`, the seconds to wait: for a 429 to avoid a ban, for a 418 until the ban is over;
bans scale for repeat offenders from 2 minutes to 3 days; the limits are per IP, not per key.
Since 2026-06-30 the IP's budget is shared with COIN-M, so the limit is a setting
(`PIPELINE_REST_WEIGHT_LIMIT`, default 2400).

Here, within documented bounds (`backoff_for`):
- a 429 stops the calls that spend weight for what `Retry-After` says, but never longer than
  the weight window itself (60 s: the count starts again with the next minute), 60 s when it
  says nothing;
- a 418 stops every call until the ban's end, at most 3 days, 2 minutes when it says nothing;
- an `essential` call (the listenKey's POST and PUT, weight 1, without which the private
  stream dies) is held back by a ban only: neither a 429 back-off nor the 80 % ceiling, both
  meant for the heavy calls, can starve it.

Pure: `WeightBudget` takes the clock readings it needs; the async client (`pipeline.rest`) and
the consumer library's sync fallback (`projections.client`) both consult it before each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import attrs

LIMIT_PER_MINUTE = 2400
CEILING_FRACTION = 0.8
WEIGHT_WINDOW_S = 60.0  # X-MBX-USED-WEIGHT-1M counts by clock minute
DEFAULT_429_WAIT_S = 60.0
DEFAULT_418_WAIT_S = 120.0  # the shortest ban Binance documents
MAX_BAN_S = 3 * 86400.0  # the longest ban Binance documents

# Weights of the endpoints this project calls (Binance's documentation, 2026).
WEIGHTS: dict[str, int] = {
    "/fapi/v1/exchangeInfo": 1,
    "/fapi/v1/premiumIndex": 1,
    "/fapi/v1/time": 1,
    "/fapi/v1/listenKey": 1,
    "/fapi/v1/order": 1,
    "/fapi/v1/algoOrder": 1,
    "/fapi/v1/allOrders": 5,
    "/fapi/v1/userTrades": 5,
    "/fapi/v3/positionRisk": 5,
    "/fapi/v2/balance": 5,
}


def depth_weight(limit: int) -> int:
    """`GET /fapi/v1/depth`: 2 up to 50 levels, 5 to 100, 10 to 500, 20 above."""
    return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20


def klines_weight(limit: int) -> int:
    """`GET /fapi/v1/klines`: 1 below 100 rows, 2 below 500, 5 up to 1000, 10 above."""
    return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10


def open_orders_weight(symbol: str | None) -> int:
    """`GET /fapi/v1/openOrders` and `openAlgoOrders`: 1 for one symbol, 40 for all."""
    return 1 if symbol else 40


def utc_text(unix_s: float) -> str:
    """A back-off's end for logs and `pipeline status`: `2026-12-01T12:00:00Z`."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (Binance sends an integer); None when absent or not a number."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None  # NaN is not a wait


def backoff_for(status: int, retry_after: str | None) -> float:
    """Seconds to stop for after a 429 or a 418 answer (module doc)."""
    told = parse_retry_after(retry_after)
    if status == 418:
        return min(MAX_BAN_S, DEFAULT_418_WAIT_S if told is None else told)
    return min(WEIGHT_WINDOW_S, DEFAULT_429_WAIT_S if told is None else told)


@attrs.define
class WeightBudget:
    """Stops callers before `ceiling` (default 80 % of `limit`) in the current minute, and
    after a 429 or 418 for as long as `backoff_for` says."""

    limit: int = LIMIT_PER_MINUTE
    ceiling: int = attrs.field(
        default=attrs.Factory(lambda self: int(self.limit * CEILING_FRACTION), takes_self=True))
    used: int = 0
    minute: int = -1  # the minute `used` belongs to (unix minutes)
    banned_until: float = 0.0  # 418: no call at all before this
    backoff_until: float = 0.0  # 429: no call that is not essential before this

    @classmethod
    def for_limit(cls, limit: int) -> WeightBudget:
        return cls(limit=limit)

    def _roll(self, now: float) -> None:
        m = int(now // 60)
        if m != self.minute:
            self.minute, self.used = m, 0

    def delay_before(self, weight: int, now: float, *, essential: bool = False) -> float:
        """Seconds to wait before spending `weight`; 0 when it fits now."""
        if now < self.banned_until:
            return self.banned_until - now
        if not essential and now < self.backoff_until:
            return self.backoff_until - now
        self._roll(now)
        if self.used + weight <= (self.limit if essential else self.ceiling):
            return 0.0
        return (self.minute + 1) * 60 - now + 0.05

    def spend(self, weight: int, now: float) -> None:
        self._roll(now)
        self.used += weight

    def take(self, weight: int, now: float, *, essential: bool = False) -> float:
        """Spend `weight` and return 0 when it fits now; else spend nothing and return the
        seconds to wait (the async client sleeps and asks again, a sync reader gives up)."""
        delay = self.delay_before(weight, now, essential=essential)
        if delay <= 0:
            self.spend(weight, now)
        return delay

    def observe_response(self, headers: Mapping[str, str], status: int, now: float) -> float:
        """`observe` with the answer's `X-MBX-USED-WEIGHT-1M` and `Retry-After` headers."""
        return self.observe(headers.get("X-MBX-USED-WEIGHT-1M"), status, now,
                            headers.get("Retry-After"))

    def observe(self, header: str | None, status: int, now: float,
                retry_after: str | None = None) -> float:
        """Take the exchange's own count (it is the truth; ours only fills the gaps); after a
        429 or 418 start its back-off. Returns the back-off started, in seconds (0: none)."""
        self._roll(now)
        if header is not None and header.isdigit():
            self.used = max(self.used, int(header))
        if status not in (418, 429):
            return 0.0
        wait = backoff_for(status, retry_after)
        if status == 418:
            self.banned_until = max(self.banned_until, now + wait)
        else:
            self.backoff_until = max(self.backoff_until, now + wait)
        return wait

    def paused_until(self, now: float) -> float | None:
        """When calls that spend weight may go again, if they are stopped now."""
        until = max(self.banned_until, self.backoff_until)
        return until if until > now else None
