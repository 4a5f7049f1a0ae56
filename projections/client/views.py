"""The consumer library: what the analyzer and the order listener call. Plain redis-py, no Trio.

Three things, all reading the views that `pipeline project` keeps (see docs/architecture.md):

- `MarketReader`: mark price, order book and last price with a freshness limit, falling back to
  REST (httpx) when the view is stale or missing, within the exchange's request weight.
- `open_orders()` / `open_algo_orders()`: what `futures_get_open_orders()` and the algo
  equivalent return, from the views, with no REST call.
- `OrdersConsumer`: the order listener's loop over `P:orders` with `XREADGROUP`, acknowledging
  after the handler returns and taking over what a dead consumer left pending.

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
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import orjson
import redis

from pipeline.redisconn import error_code
from pipeline.weight import WeightBudget, depth_weight
from projections.core.keys import DEFAULT_PREFIX, Keys

log = logging.getLogger("projections.client")

_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)


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
        self.keys = Keys(prefix, account=account)
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

    def position(self, symbol: str, side: str | None = None) -> dict[str, Any] | None:
        """The position view (`side` "long"/"short" in hedge mode); no REST fallback because it
        would need the account's keys. Example: `reader.position("BTCUSDT")["pa"]`."""
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
    keys = Keys(prefix, account=account)
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
    keys = Keys(prefix, account=account)
    key = keys.open_orders(symbol, "algo") if symbol else None
    orders = _hash_values(r, keys.pattern("open_algo_orders"), key)
    return sorted(orders, key=lambda o: int(o.get("algoId", 0)))


# --- the order listener's consumer ------------------------------------------------------------

@attrs.frozen
class OrderEvent:
    """One entry of `P:orders`: an order or algo order changed state.

    `data` is the order's whole state after the change, as the projector stores it (JSON):
    `status`, `symbol`, `source`, `update_time` and `created_time` (ms), `version`, and `o`, the
    order's fields under Binance's ORDER_TRADE_UPDATE / ALGO_UPDATE names (`o["q"]` quantity,
    `o["p"]` price, `o["l"]`/`o["L"]` last fill, ...; after a reconciliation, the REST row's
    fields under those names). An order's state adds `cum_filled`, `avg_price`, `cum_quote`
    and `realized_profit`; an algo order's adds `actual_order_id` (the matching-engine order it
    placed when triggered, "" before). The properties below read these. Quantities and prices
    are the strings Binance sent (`Decimal(ev.filled_qty)` for arithmetic).

    Example::

        def on_order(ev: OrderEvent) -> None:
            if ev.kind == "order" and ev.status in ("PARTIALLY_FILLED", "FILLED"):
                print(ev.order_id, ev.filled_qty, "filled at", ev.avg_price,
                      "last", ev.last_filled_qty, "@", ev.last_filled_price)
            elif ev.kind == "algo" and ev.status == "TRIGGERED":
                print("stop", ev.order_id, "placed order", ev.actual_order_id)
    """

    entry_id: str
    order_id: str
    status: str
    symbol: str
    kind: str  # "order" or "algo"
    source: str  # "stream" or "reconciliation"
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> OrderEvent:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode()

        return cls(entry_id.decode(), text("order_id"), text("status"), text("symbol"),
                   text("kind") or "order", text("source") or "stream",
                   parse_view(fields.get(b"data")) or {})

    @property
    def fields(self) -> dict[str, Any]:
        """The order's fields under Binance's event names (`data["o"]`). Example:
        `ev.fields.get("S")` is the side, "BUY" or "SELL"."""
        o = self.data.get("o")
        return o if isinstance(o, dict) else {}

    @property
    def filled_qty(self) -> str | None:
        """An order's cumulative filled quantity ("0" before any fill); None for an algo
        order. Example: `Decimal(ev.filled_qty) == Decimal(ev.fields["q"])` once FILLED."""
        return self._text(self.data.get("cum_filled"))

    @property
    def avg_price(self) -> str | None:
        """An order's average fill price ("0" before any fill); None for an algo order.
        Example: `print(f"{ev.filled_qty} @ {ev.avg_price}")`."""
        return self._text(self.data.get("avg_price"))

    @property
    def last_filled_qty(self) -> str | None:
        """The quantity of the fill this event reports (`o["l"]`); None when the event came
        from a REST reconciliation, which reports totals only. Example: `ev.last_filled_qty`."""
        return self._text(self.fields.get("l")) if self.source == "stream" else None

    @property
    def last_filled_price(self) -> str | None:
        """The price of the fill this event reports (`o["L"]`); None as `last_filled_qty`.
        Example: `ev.last_filled_price`."""
        return self._text(self.fields.get("L")) if self.source == "stream" else None

    @property
    def actual_order_id(self) -> str | None:
        """For a triggered algo order, the id of the order it placed (follow that order's own
        events); None before the trigger and for plain orders. Example:
        `if ev.kind == "algo" and ev.actual_order_id: watch(ev.actual_order_id)`."""
        return self._text(self.data.get("actual_order_id")) or None

    @staticmethod
    def _text(value: object) -> str | None:
        return None if value is None else str(value)


class OrdersConsumer:
    """Consume `P:orders` in a consumer group: the order listener's replacement for polling.

    Each entry is handed to `handler(event)`; it is acknowledged only after the handler
    returns. A handler that raises leaves the entry pending: this consumer retries it on its
    next poll, and if this process dies, another consumer of the group takes it over once it
    has been idle `claim_idle_ms`. Delivery is therefore at-least-once: handlers should be
    idempotent (key on `event.entry_id` or on order id + status).

    The client is used as redis-py makes it by default (RESP2 replies). `account="a1"`
    consumes that account's stream, `P:acct:a1:orders` (a group there is that account's own:
    the ACL user `listener-a1` may run groups on it and read nothing of another account).

    Example (see examples/order_listener.py)::

        def on_order(ev: OrderEvent) -> None:
            if ev.status == "FILLED":
                print("filled", ev.symbol, ev.order_id, ev.filled_qty, "at", ev.avg_price)

        OrdersConsumer(r, group="listener", handler=on_order).run()
        OrdersConsumer(r, group="listener", handler=on_order, account="a1").run()
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        group: str,
        handler: Callable[[OrderEvent], object],
        consumer: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        claim_idle_ms: int = 30_000,
        block_ms: int = 1_000,
        count: int = 100,
        start_id: str = "$",
        account: str | None = None,
    ) -> None:
        self.r = r
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.handler = handler
        self.stream = Keys(prefix, account=account).orders_stream()
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.count = count
        self._stopped = False
        self._ensure_group(start_id)

    def _ensure_group(self, start_id: str) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                raise

    def stop(self) -> None:
        """Ask `run()` to return after the current poll (callable from a signal handler)."""
        self._stopped = True

    def run(self) -> None:
        while not self._stopped:
            self.poll_once()

    def poll_once(self) -> int:
        """Handle what is due now: taken-over entries, our own pending ones, then new ones
        (waiting up to `block_ms`). Returns how many entries were acknowledged."""
        done = self._handle(self._claim_abandoned())
        done += self._handle(self._read("0"))
        done += self._handle(self._read(">", block=self.block_ms))
        return done

    def _claim_abandoned(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self.r.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                  "0-0", count=self.count)
        return [(eid, fields) for eid, fields in reply[1] if fields]

    def _read(
        self, start: str, block: int | None = None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = self.r.xreadgroup(self.group, self.consumer, {self.stream: start},
                                  count=self.count, block=block)
        if not reply:
            return []
        return [(eid, fields) for eid, fields in reply[0][1] if fields]

    def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        done = 0
        for entry_id, fields in entries:
            event = OrderEvent.from_entry(entry_id, fields)
            try:
                self.handler(event)
            except Exception:
                # Not acknowledged: stays pending and is delivered again (here or elsewhere).
                log.exception("order handler failed; entry stays pending",
                              extra={"entry": event.entry_id, "order_id": event.order_id})
                continue
            self.r.xack(self.stream, self.group, entry_id)
            done += 1
        return done
