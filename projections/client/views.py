"""The analyzer's reads: market views with a freshness limit, and the open orders. Plain
redis-py, no Trio.

Both read the views that `pipeline project` keeps (see docs/contract.md):

- `MarketReader`: mark price, order book, last price, best bid/ask and closed candles with a
  freshness limit, falling back to REST (httpx) when the view is stale or missing, within the
  exchange's request weight.
- `open_orders()` / `open_algo_orders()`: what `futures_get_open_orders()` and the algo
  equivalent return, from the views, with no REST call.

The account's views are `projections.client.account`'s, the listeners' consumers
`projections.client.consumers`'.

Several accounts: every reader takes `account=` (the label an account's ingestor runs with,
`PIPELINE_ACCOUNT`; None, the default, is the unlabelled account). It picks that account's
positions, open orders and orders stream (`P:acct:{label}:...`); market views are shared by
every account and read the same whatever the label.

Example (the analyzer)::

    import redis
    from projections.client import MarketReader

    reader = MarketReader(redis.Redis.from_url("redis://localhost:6379/0"))
    mp = reader.mark_price("BTCUSDT", max_age=5)   # dict or None
    if mp is not None:
        print(mp["mark_price"], mp["source"])       # "websocket", or "rest" after a fallback
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import redis

from pipeline.redisconn import is_cluster
from pipeline.weight import WeightBudget, depth_weight, klines_weight
from projections.core.keys import DEFAULT_PREFIX, Keys

log = logging.getLogger("projections.client")

_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
_INTERVAL_S = {"m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400, "M": 31 * 86_400}
KLINES_MAX = 1499  # GET /fapi/v1/klines gives 1500 rows at most, the last one still open


def interval_seconds(interval: str) -> int:
    """`1m` -> 60, `4h` -> 14400, `1M` -> 31 days (the longest month)."""
    return int(interval[:-1]) * _INTERVAL_S[interval[-1]]


def parse_view(raw: bytes | str | None) -> dict[str, Any] | None:
    """A view's JSON object, or None for a missing key or a value that is not one."""
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


class MarketReader:
    """Fresh market facts from the views; REST only when a view is stale or missing.

    `fallback=False` never calls REST (returns None instead). When the weight budget says the
    next call would come too close to the exchange's limit (2400 a minute, read back from
    `X-MBX-USED-WEIGHT-1M`), the reader does not call: it returns the stale view if there is one,
    else None, and logs it. A REST answer carries `"source": "rest"`.

    `account`: whose positions `position` reads (market views are every account's).

    Example::

        reader = MarketReader(r, rest_url="https://fapi.binance.com")
        book = reader.order_book("ETHUSDT", depth=20, max_age=2)
        best_bid = book["bids"][0][0] if book else None
        hedge = MarketReader(r, account="a2").position("BTCUSDT")  # account a2's position
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        rest_url: str = "https://fapi.binance.com",
        fallback: bool = True,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        budget: WeightBudget | None = None,
        account: str | None = None,
    ) -> None:
        self.r = r
        self.keys = Keys(prefix, account=account, cluster=is_cluster(r))
        self.fallback = fallback
        self.clock = clock
        self.budget = budget or WeightBudget()
        self._http = http or httpx.Client(base_url=rest_url.rstrip("/"), timeout=5.0)

    def close(self) -> None:
        self._http.close()

    # --- the three reads ------------------------------------------------------------------

    def mark_price(self, symbol: str, max_age: float = 5.0) -> dict[str, Any] | None:
        """`{"mark_price", "index_price", "funding_rate", "next_funding_time", "timestamp",
        "source"}`, or None. Example: `reader.mark_price("BTCUSDT")["mark_price"]`."""
        return self._read(self.keys.mark_price(symbol), max_age,
                          lambda: self._rest_mark_price(symbol))

    def order_book(
        self, symbol: str, depth: int = 20, max_age: float = 5.0
    ) -> dict[str, Any] | None:
        """`{"bids": [[price, qty], ...], "asks": [...], "timestamp", "last_update_id", "source"}`.
        Example: `reader.order_book("BTCUSDT", 5)["asks"][0]`."""
        return self._read(self.keys.orderbook(symbol, depth), max_age,
                          lambda: self._rest_book(symbol, depth))

    def last_price(self, symbol: str, max_age: float = 5.0) -> dict[str, Any] | None:
        """`{"price", "qty", "timestamp", "source", ...}` of the last aggregated trade.
        Example: `reader.last_price("SOLUSDT")["price"]`."""
        return self._read(self.keys.last_price(symbol), max_age,
                          lambda: self._rest_last_price(symbol))

    def book_ticker(self, symbol: str, max_age: float = 5.0) -> dict[str, Any] | None:
        """`{"bid", "bid_qty", "ask", "ask_qty", "update_id", "timestamp", "source"}`, or None;
        REST fallback `GET /fapi/v1/ticker/bookTicker`. Example:
        `t = reader.book_ticker("BTCUSDT"); spread = Decimal(t["ask"]) - Decimal(t["bid"])`."""
        return self._read(self.keys.book_ticker(symbol), max_age,
                          lambda: self._rest_book_ticker(symbol))

    def klines(self, symbol: str, interval: str, n: int = 500,
               max_age: float | None = None) -> list[dict[str, Any]]:
        """The last `n` closed candles, oldest first, each `{"open_time", "close_time", "open",
        "high", "low", "close", "volume", "quote_volume", "trades", "closed", "event_time",
        "timestamp", "source"}` (`source` "websocket", or "rest" for a candle from the
        history the ingestor fetched). Fresh when the newest closed within one interval plus
        `max_age` s (default 60); else, or when there is none, REST `GET /fapi/v1/klines`
        (weight 1 to 10 by `n`), and the view's candles when that fails. Example::

            closes = [Decimal(k["close"]) for k in reader.klines("BTCUSDT", "1m", 200)]
        """
        n = max(1, min(n, KLINES_MAX))
        rows = [v for raw in self.r.lrange(self.keys.klines(symbol, interval), 0, n - 1)
                if (v := parse_view(raw)) is not None]
        rows.reverse()
        slack = 60.0 if max_age is None else max_age
        limit_s = interval_seconds(interval) + slack
        if rows and self.clock() - rows[-1].get("close_time", 0) / 1000 <= limit_s:
            return rows
        if not self.fallback:
            return rows
        fresh = self._rest_klines(symbol, interval, n)
        return fresh if fresh else rows

    def position(self, symbol: str, side: str | None = None) -> dict[str, Any] | None:
        """The position view (`side` "long"/"short" in hedge mode); no REST fallback because it
        would need the account's keys. Example: `reader.position("BTCUSDT")["pa"]`.
        `projections.client.AccountReader.position` adds a freshness limit."""
        return parse_view(self.r.get(self.keys.position(symbol, side)))

    # --- machinery ------------------------------------------------------------------------

    def _read(self, key: str, max_age: float, rest: Callable[[], dict[str, Any] | None]
              ) -> dict[str, Any] | None:
        view = parse_view(self.r.get(key))
        if view is not None and self.clock() - float(view.get("timestamp", 0)) < max_age:
            return view
        if not self.fallback:
            return None
        fresh = rest()
        return fresh if fresh is not None else view

    def _get(self, path: str, params: dict[str, Any], weight: int) -> Any:
        if self.budget.take(weight, self.clock()) > 0:
            log.warning("rest fallback skipped: weight budget spent", extra={"path": path})
            return None
        try:
            resp = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            log.warning("rest fallback failed", extra={"path": path, "error": type(exc).__name__})
            return None
        self.budget.observe_response(resp.headers, resp.status_code, self.clock())
        if resp.status_code != 200:
            log.warning("rest fallback refused", extra={"path": path, "status": resp.status_code})
            return None
        return orjson.loads(resp.content)

    def _rest_mark_price(self, symbol: str) -> dict[str, Any] | None:
        body = self._get("/fapi/v1/premiumIndex", {"symbol": symbol.upper()}, 1)
        if not isinstance(body, dict):
            return None
        return {"mark_price": body["markPrice"], "index_price": body["indexPrice"],
                "funding_rate": body["lastFundingRate"],
                "next_funding_time": body["nextFundingTime"],
                "timestamp": body["time"] / 1000, "source": "rest"}

    def _rest_book(self, symbol: str, depth: int) -> dict[str, Any] | None:
        limit = next((n for n in _DEPTH_LIMITS if n >= depth), 1000)
        body = self._get("/fapi/v1/depth", {"symbol": symbol.upper(), "limit": limit},
                         depth_weight(limit))
        if not isinstance(body, dict):
            return None
        return {"bids": body["bids"][:depth], "asks": body["asks"][:depth],
                "timestamp": body.get("E", self.clock() * 1000) / 1000,
                "last_update_id": body["lastUpdateId"], "source": "rest"}

    def _rest_book_ticker(self, symbol: str) -> dict[str, Any] | None:
        body = self._get("/fapi/v1/ticker/bookTicker", {"symbol": symbol.upper()}, 2)
        if not isinstance(body, dict):
            return None
        return {"bid": body["bidPrice"], "bid_qty": body["bidQty"], "ask": body["askPrice"],
                "ask_qty": body["askQty"], "update_id": body.get("lastUpdateId"),
                "timestamp": body.get("time", 0) / 1000, "source": "rest"}

    def _rest_klines(self, symbol: str, interval: str, n: int) -> list[dict[str, Any]]:
        body = self._get("/fapi/v1/klines", {"symbol": symbol.upper(), "interval": interval,
                                             "limit": n + 1}, klines_weight(n + 1))
        if not isinstance(body, list):
            return []
        return [{"open_time": r[0], "close_time": r[6], "open": r[1], "high": r[2],
                 "low": r[3], "close": r[4], "volume": r[5], "quote_volume": r[7],
                 "trades": r[8], "closed": True, "event_time": r[6], "timestamp": r[6] / 1000,
                 "source": "rest"} for r in body[:-1]]  # the last row: the candle still open

    def _rest_last_price(self, symbol: str) -> dict[str, Any] | None:
        body = self._get("/fapi/v1/ticker/price", {"symbol": symbol.upper()}, 1)
        if not isinstance(body, dict):
            return None
        return {"price": body["price"], "timestamp": body.get("time", 0) / 1000,
                "source": "rest"}


# --- open orders, from the views ------------------------------------------------------------

def _hash_values(r: redis.Redis, pattern: str, key: str | None) -> list[dict[str, Any]]:
    keys = [key] if key else sorted(r.scan_iter(match=pattern, count=500))
    out: list[dict[str, Any]] = []
    for k in keys:
        for raw in r.hvals(k):
            doc = parse_view(raw)
            if doc is not None:
                out.append(doc)
    return out


def open_orders(r: redis.Redis, symbol: str | None = None, *,
                prefix: str = DEFAULT_PREFIX, account: str | None = None
                ) -> list[dict[str, Any]]:
    """The open orders, shaped as `GET /fapi/v1/openOrders` (and `futures_get_open_orders()`)
    returns them, read from `P:open_orders:{symbol}` with no REST call. Sorted by orderId.
    `account="a1"`: that account's (`P:acct:a1:open_orders:{symbol}`), none of another's.

    Example::

        for o in open_orders(r, "BTCUSDT"):
            print(o["orderId"], o["status"], o["executedQty"])
        strategy_b = open_orders(r, account="b")
    """
    keys = Keys(prefix, account=account, cluster=is_cluster(r))
    key = keys.open_orders(symbol) if symbol else None
    orders = _hash_values(r, keys.pattern("open_orders"), key)
    return sorted(orders, key=lambda o: int(o.get("orderId", 0)))


def open_algo_orders(r: redis.Redis, symbol: str | None = None, *,
                     prefix: str = DEFAULT_PREFIX, account: str | None = None
                     ) -> list[dict[str, Any]]:
    """The open conditional orders (STOP_MARKET, TAKE_PROFIT_MARKET, ...), shaped as
    `GET /fapi/v1/openAlgoOrders` returns them, from `P:open_algo_orders:{symbol}`
    (`account="a1"`: `P:acct:a1:open_algo_orders:{symbol}`).

    Example: `stops = [o for o in open_algo_orders(r) if o["orderType"] == "STOP_MARKET"]`;
    `open_algo_orders(r, "ETHUSDT", account="a1")`
    """
    keys = Keys(prefix, account=account, cluster=is_cluster(r))
    key = keys.open_orders(symbol, "algo") if symbol else None
    orders = _hash_values(r, keys.pattern("open_algo_orders"), key)
    return sorted(orders, key=lambda o: int(o.get("algoId", 0)))
