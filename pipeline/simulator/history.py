"""Which orders and trades Binance's REST still returns, and in what windows. Pure: no trio, no I/O.

Binance's rules (USDⓈ-M futures documentation, 2026):
- GET /fapi/v1/order, /fapi/v1/allOrders and /fapi/v1/algoOrder no longer find an order that is
  CANCELED or EXPIRED with no filled trade once `created + 3 days < now`, nor any order once
  `created + 90 days < now` (`still_found`); GET /fapi/v1/order then answers -2013.
- GET /fapi/v1/allOrders (weight 5): `symbol` optional since 2026-08-25; with `orderId` the
  orders from that id on, otherwise the most recent ones; `startTime`/`endTime` at most 7 days
  apart, the last 7 days when neither (nor `orderId`) is sent; `limit` 500 by default, 1000 at
  most.
- GET /fapi/v1/userTrades (weight 5): `symbol` mandatory; `fromId` cannot be combined with
  `startTime`/`endTime`; the same 7-day window and limits; only the past 3 months (since
  2026-08-26; 90 days here).

Where the documentation leaves a case open, the choice is the simplest consistent one: a window
with only `startTime` runs 7 days from it, with only `endTime` 7 days up to it; an id parameter
(`orderId`, `fromId`) without times means no time window at all; rows come in ascending id order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from pipeline.simulator.ledger import LedgerError, Order, Trade

DAY_MS = 86_400_000
UNFILLED_END_KEPT_MS = 3 * DAY_MS
ORDER_KEPT_MS = 90 * DAY_MS
TRADES_KEPT_MS = 90 * DAY_MS
MAX_WINDOW_MS = 7 * DAY_MS
DEFAULT_LIMIT = 500
MAX_LIMIT = 1000
ENDED_UNFILLED = frozenset({"CANCELED", "EXPIRED"})

Row = TypeVar("Row")


def still_found(status: str, filled: bool, created_ms: int, now_ms: int) -> bool:
    """Binance still returns this order (see module doc)."""
    if created_ms + ORDER_KEPT_MS < now_ms:
        return False
    return not (status in ENDED_UNFILLED and not filled
                and created_ms + UNFILLED_END_KEPT_MS < now_ms)


def order_found(order: Order, now_ms: int) -> bool:
    return still_found(order.status, order.executed > 0, order.time, now_ms)


def _int(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise LedgerError(-1102, f"Parameter '{name}' was malformed.") from None


def _limit(query: Mapping[str, str]) -> int:
    limit = _int(query, "limit")
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise LedgerError(-1130, "Data sent for parameter 'limit' is not valid.")
    return limit


def window(query: Mapping[str, str], now_ms: int, *, by_id: bool) -> tuple[int, int] | None:
    """(start, end) in ms, inclusive; None when an id parameter alone selects the rows."""
    start, end = _int(query, "startTime"), _int(query, "endTime")
    if start is None and end is None:
        return None if by_id else (now_ms - MAX_WINDOW_MS, now_ms)
    if start is None:
        start = end - MAX_WINDOW_MS  # type: ignore[operator]
    if end is None:
        end = start + MAX_WINDOW_MS
    if start > end or end - start > MAX_WINDOW_MS:
        raise LedgerError(-1127, "More than 168 hours between startTime and endTime.")
    return start, end


def _pick(rows: list[Row], limit: int, from_id: bool) -> list[Row]:
    return rows[:limit] if from_id else rows[-limit:]


def all_orders(orders: Iterable[Order], symbol: str | None, query: Mapping[str, str],
               now_ms: int) -> list[Order]:
    """The orders GET /fapi/v1/allOrders returns for `query`."""
    from_id = _int(query, "orderId")
    limit, span = _limit(query), window(query, now_ms, by_id=from_id is not None)
    rows = sorted((o for o in orders
                   if symbol in (None, o.symbol) and order_found(o, now_ms)
                   and (from_id is None or o.order_id >= from_id)
                   and (span is None or span[0] <= o.time <= span[1])),
                  key=lambda o: o.order_id)
    return _pick(rows, limit, from_id is not None)


def user_trades(trades: Iterable[Trade], symbol: str, query: Mapping[str, str],
                now_ms: int) -> list[Trade]:
    """The trades GET /fapi/v1/userTrades returns for `query`."""
    from_id, order_id = _int(query, "fromId"), _int(query, "orderId")
    if from_id is not None and (query.get("startTime") or query.get("endTime")):
        raise LedgerError(-1128, "Combination of optional parameters invalid.")
    limit = _limit(query)
    span = window(query, now_ms, by_id=from_id is not None or order_id is not None)

    def keep(t: Trade) -> bool:
        return (t.symbol == symbol and t.time + TRADES_KEPT_MS >= now_ms
                and (from_id is None or t.trade_id >= from_id)
                and (order_id is None or t.order_id == order_id)
                and (span is None or span[0] <= t.time <= span[1]))

    rows = sorted(filter(keep, trades), key=lambda t: t.trade_id)
    return _pick(rows, limit, from_id is not None)
