"""Every key name this project reads or writes, and every pattern it scans. Pure.

One place builds them so that a change of the key layout (an account label, Redis Cluster hash
tags) is made here and nowhere else; every other module asks this one. Two kinds:

- the event log, `raw:...`: `raw:market:{family}` (one stream per stream family, e.g.
  `raw:market:depth20`), `raw:market:other` (frames naming no known stream), `raw:user` (user
  frames and REST snapshots), `raw:conn:market` and `raw:conn:user` (connection lifecycle,
  one stream per ingestor role), `raw:depth_snapshots` (the projector's depth snapshots and
  sequence gaps). Each raw stream has exactly one writing role, so the ACL can give every
  role write access to its own streams only: a role that trims its streams or appends a
  maximal id harms no other role's appends (`pipeline status` detects both);
- the views, `P:{view}:{symbol}[:...]` with `P` the view prefix (`PIPELINE_VIEW_PREFIX`,
  default `websocket`) and symbols and assets lower case; the projector's own keys
  `dlq:{projection}` and `lease:{projection}`.

`Keys(prefix)` holds the prefix; the raw keys do not depend on it.
"""

from __future__ import annotations

import attrs

RAW_PREFIX = "raw:"
MARKET_PREFIX = "raw:market:"
KEY_OTHER = "raw:market:other"
KEY_USER = "raw:user"
CONN_PREFIX = "raw:conn:"
KEY_CONN_MARKET = "raw:conn:market"  # written by `ingest market` only
KEY_CONN_USER = "raw:conn:user"  # written by `ingest user` only
CONN_KEYS = (KEY_CONN_MARKET, KEY_CONN_USER)
# Written by the projector only (`depth_book`): no ingestor reads or appends to it, so neither
# side can block or trim the other's stream.
KEY_DEPTH_SNAPSHOTS = "raw:depth_snapshots"
DLQ_PREFIX = "dlq:"
LEASE_PREFIX = "lease:"
DEFAULT_PREFIX = "websocket"

# the view families that are hashes of open orders (orderId / algoId -> the REST row)
OPEN_ORDER_VIEWS = ("open_orders", "open_algo_orders")


def market_key(family: str) -> str:
    """`depth20` -> `raw:market:depth20`."""
    return MARKET_PREFIX + family


def family_of_key(raw_key: str) -> str | None:
    """`raw:market:depth20` -> `depth20`; None for a key outside `raw:market:`."""
    return raw_key[len(MARKET_PREFIX):] if raw_key.startswith(MARKET_PREFIX) else None


def is_raw(key: str) -> bool:
    return key.startswith(RAW_PREFIX)


def dlq_key(projection: str) -> str:
    return DLQ_PREFIX + projection


def lease_key(projection: str) -> str:
    return LEASE_PREFIX + projection


RAW_PATTERN = RAW_PREFIX + "*"
DLQ_PATTERN = DLQ_PREFIX + "*"


@attrs.frozen
class Keys:
    """The view keys of one deployment (one view prefix)."""

    prefix: str = DEFAULT_PREFIX

    def view(self, family: str, *parts: str) -> str:
        """`view("orderbook", "BTCUSDT", "20")` -> `websocket:orderbook:btcusdt:20`."""
        return ":".join((self.prefix, family, *(p.lower() for p in parts)))

    def view_head(self, family: str) -> str:
        """`websocket:mark_price:`: what a hot-path fold appends the lower-cased symbol to."""
        return f"{self.prefix}:{family}:"

    def pattern(self, family: str = "*", *parts: str) -> str:
        """A SCAN pattern: `pattern("open_orders")` -> `websocket:open_orders:*`;
        `pattern("orderbook", "*", "20")` -> `websocket:orderbook:*:20`; `pattern()` every
        view. The prefix holds no glob character (settings refuse one)."""
        return ":".join((self.prefix, family, *(parts or ("*",)))) if family != "*" \
            else f"{self.prefix}:*"

    def family_of(self, key: str) -> str | None:
        """`websocket:orderbook:btcusdt:20` -> `orderbook`; None for a key of another prefix."""
        head = self.prefix + ":"
        if not key.startswith(head):
            return None
        return key[len(head):].split(":", 1)[0]

    def parts_of(self, key: str, family: str) -> list[str] | None:
        """The parts after `P:{family}:` (`["btcusdt", "20"]`), None for another family."""
        head = self.view_head(family)
        return key[len(head):].split(":") if key.startswith(head) else None

    # --- the views other services read -----------------------------------------------------

    def mark_price(self, symbol: str) -> str:
        return self.view("mark_price", symbol)

    def orderbook(self, symbol: str, depth: int | str) -> str:
        return self.view("orderbook", symbol, str(depth))

    def last_price(self, symbol: str) -> str:
        return self.view("last_price", symbol)

    def book_ticker(self, symbol: str) -> str:
        return self.view("book_ticker", symbol)

    def kline(self, symbol: str, interval: str) -> str:
        return f"{self.view_head('kline')}{symbol.lower()}:{interval}"

    def klines(self, symbol: str, interval: str) -> str:
        return f"{self.view_head('klines')}{symbol.lower()}:{interval}"

    def position(self, symbol: str, side: str | None = None) -> str:
        """One-way mode: `P:position:{symbol}`; hedge mode: `...:long` / `...:short`."""
        return self.view("position", symbol, *((side,) if side else ()))

    def balance(self, asset: str) -> str:
        return self.view("balance", asset)

    def order_state(self, symbol: str, kind: str = "order") -> str:
        return self.view("order_state" if kind == "order" else "algo_order_state", symbol)

    def open_orders(self, symbol: str, kind: str = "order") -> str:
        return self.view("open_orders" if kind == "order" else "open_algo_orders", symbol)

    def orders_stream(self, symbol: str | None = None) -> str:
        """`P:orders` (every order event) or `P:orders:{symbol}`."""
        return self.view("orders", symbol) if symbol else self.view("orders")

    def order_keys(self, symbol: str, kind: str) -> list[str]:
        """KEYS of orders.lua: state hash, open hash, per-symbol stream, all-orders stream."""
        return [self.order_state(symbol, kind), self.open_orders(symbol, kind),
                self.orders_stream(symbol), self.orders_stream()]

    def held_orders(self, key: str) -> tuple[str, str] | None:
        """`P:open_orders:btcusdt` -> ("open_orders", "BTCUSDT"); None for any other key."""
        family = self.family_of(key)
        if family not in OPEN_ORDER_VIEWS:
            return None
        parts = self.parts_of(key, family)
        if not parts or len(parts) != 1 or not parts[0]:
            return None
        return family, parts[0].upper()
