"""REST request weight: Binance allows 2400 a minute per IP and reports the weight used so far
in `X-MBX-USED-WEIGHT-1M`. Keep going past the limit and it answers 429, then bans with 418.

Pure: `WeightBudget` takes the clock readings it needs; the async client (`pipeline.rest`) and
the consumer library's sync fallback (`projections.client`) both consult it before each call.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

LIMIT_PER_MINUTE = 2400

# Weights of the endpoints this project calls (Binance's documentation, 2026).
WEIGHTS: dict[str, int] = {
    "/fapi/v1/exchangeInfo": 1,
    "/fapi/v1/premiumIndex": 1,
    "/fapi/v1/time": 1,
    "/fapi/v1/listenKey": 1,
    "/fapi/v1/order": 1,
    "/fapi/v1/algoOrder": 1,
    "/fapi/v3/positionRisk": 5,
    "/fapi/v2/balance": 5,
}


def depth_weight(limit: int) -> int:
    """`GET /fapi/v1/depth`: 2 up to 50 levels, 5 to 100, 10 to 500, 20 above."""
    return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20


def open_orders_weight(symbol: str | None) -> int:
    """`GET /fapi/v1/openOrders` and `openAlgoOrders`: 1 for one symbol, 40 for all."""
    return 1 if symbol else 40


@attrs.define
class WeightBudget:
    """Stops callers before `ceiling` (default 80 % of the limit) in the current minute."""

    ceiling: int = int(LIMIT_PER_MINUTE * 0.8)
    used: int = 0
    minute: int = -1  # the minute `used` belongs to (unix minutes)
    banned_until: float = 0.0

    def _roll(self, now: float) -> None:
        m = int(now // 60)
        if m != self.minute:
            self.minute, self.used = m, 0

    def delay_before(self, weight: int, now: float) -> float:
        """Seconds to wait before spending `weight`; 0 when it fits now."""
        if now < self.banned_until:
            return self.banned_until - now
        self._roll(now)
        if self.used + weight <= self.ceiling:
            return 0.0
        return (self.minute + 1) * 60 - now + 0.05

    def spend(self, weight: int, now: float) -> None:
        self._roll(now)
        self.used += weight

    def take(self, weight: int, now: float) -> float:
        """Spend `weight` and return 0 when it fits now; else spend nothing and return the
        seconds to wait (the async client sleeps and asks again, a sync reader gives up)."""
        delay = self.delay_before(weight, now)
        if delay <= 0:
            self.spend(weight, now)
        return delay

    def observe_response(self, headers: Mapping[str, str], status: int, now: float) -> None:
        """`observe` with the answer's `X-MBX-USED-WEIGHT-1M` and `Retry-After` headers."""
        self.observe(headers.get("X-MBX-USED-WEIGHT-1M"), status, now,
                     headers.get("Retry-After"))

    def observe(self, header: str | None, status: int, now: float,
                retry_after: str | None = None) -> None:
        """Take the exchange's own count (it is the truth; ours only fills the gaps)."""
        self._roll(now)
        if header is not None and header.isdigit():
            self.used = max(self.used, int(header))
        if status in (418, 429):
            wait = float(retry_after) if retry_after and retry_after.isdigit() else 60.0
            self.banned_until = now + wait
