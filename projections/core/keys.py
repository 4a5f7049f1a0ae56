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

Several accounts (`PIPELINE_ACCOUNT`, a label such as `a1`): the account scope is a property of
a view family. The families in `ACCOUNT_FAMILIES` hold one account's user data (positions,
balances, order state, open orders, the orders streams, and every user-data family added
later: it joins the set and is scoped with no other change); with a label they live under
`P:acct:{label}:` (`websocket:acct:a1:open_orders:btcusdt`, `websocket:acct:a1:orders`), while
every other family (the market's) stays shared (`websocket:mark_price:btcusdt`). The raw keys of
an account are `raw:user:{label}` and `raw:conn:user:{label}`; the projections folding them are
named `{name}@{label}` (`orders@a1`: its consumer group, `dlq:orders@a1`, `lease:orders@a1`).
`Keys(prefix, account=label)` builds all of them; without a label (None) every name is today's,
byte for byte. `family_of`, `account_of` and `parts_of` read the `acct:{label}` segment back.

Redis Cluster (`PIPELINE_REDIS_CLUSTER`, docs/contract.md "Cluster mode"): the layout is a
property of the process, chosen once at start (`set_cluster_layout(True)`, by
`pipeline.redisconn.connect_checked`) before any fold or store is built. Off (the default),
every name is the single-node one, byte for byte. On, only the keys that a multi-key
command or function call writes or reads together carry a hash tag (`{...}`, Redis hashes
only that part), so that they share one slot:
- the market log, one tag per projection's sources (`XREADGROUP` reads them in one call):
  `raw:market:{partial}:depth20` (depth5/10/20), `raw:market:{candles}:kline_1m` (every
  kline interval), `raw:market:{diff}:depth` with the depth book's own
  `raw:depth_snapshots:{diff}`, `raw:market:{mark}:markPrice`, and the family's own name for
  the others (`raw:market:{aggTrade}:aggTrade`); the tags are chosen so that the heavy
  streams fall on different masters of an evenly split cluster (`_SOURCE_TAGS`);
- one account's orders: a symbol belongs to one of `ORDER_PARTITIONS` partitions
  (`order_partition`, CRC-32 of the symbol), and orders.lua writes its state hash, open-orders
  hash, per-symbol stream and the partition's stream in one call, so all four carry the
  partition's tag: `P:order_state:{o2}:btcusdt`, `P:open_orders:{o2}:btcusdt`,
  `P:orders:{o2}:btcusdt`, `P:orders:{o2}` (with an account label `{a1.o2}`). `P:orders`
  itself is not written: a listener reads the partitions (`orders_partitions`), each in order,
  and a symbol's events are all in one partition.
Every other key (the market views the analyzer reads with one GET, `raw:user`, the dead letters,
the leases) keeps its single-node name: the projector splits a batch's views call per slot.
"""

from __future__ import annotations

import re
import zlib

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

# --- accounts -----------------------------------------------------------------------------------
# The view families of one account's user data: with an account label, under `P:acct:{label}:`.
# The last three are issue #13's user-data views, scoped here so that their builders need no
# account logic of their own. No family may be named `acct` (the segment that opens a scope).
ACCOUNT_FAMILIES = frozenset({
    "position", "balance", "order_state", "algo_order_state", "open_orders",
    "open_algo_orders", "orders", "account_events", "leverage", "position_events",
    "multi_assets_margin",
})
ACCOUNT_SEGMENT = "acct"
# lower case, digits, `_` and `-`, at most 32: safe in key names, SCAN and ACL patterns, ACL
# user names and secret file names
ACCOUNT_LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
PROJECTION_ACCOUNT_SEP = "@"  # `orders@a1`


def check_account(label: str) -> str:
    """`label` when it is a valid account label, else ValueError saying what is allowed."""
    if not ACCOUNT_LABEL.fullmatch(label):
        raise ValueError(f"{label[:40]!r} is not an account label: 1 to 32 of a-z 0-9 _ -, "
                         "starting with a letter or digit")
    return label


def user_key(account: str | None = None) -> str:
    """`raw:user`, or `raw:user:{account}`: the account's user frames and REST snapshots."""
    return f"{KEY_USER}:{account}" if account else KEY_USER


def conn_user_key(account: str | None = None) -> str:
    """`raw:conn:user`, or `raw:conn:user:{account}`: its user ingestor's lifecycle."""
    return f"{KEY_CONN_USER}:{account}" if account else KEY_CONN_USER


def raw_account(raw_key: str) -> tuple[str, str | None]:
    """`raw:user:a1` -> ("raw:user", "a1"); `raw:conn:user:a1` -> ("raw:conn:user", "a1");
    any other key -> (the key, None)."""
    for base in (KEY_USER, KEY_CONN_USER):
        if raw_key.startswith(base + ":"):
            return base, raw_key[len(base) + 1:]
    return raw_key, None


def projection_name(base: str, account: str | None = None) -> str:
    """`orders` for the unlabelled account, `orders@a1` for account `a1`."""
    return f"{base}{PROJECTION_ACCOUNT_SEP}{account}" if account else base


def projection_base(name: str) -> tuple[str, str | None]:
    """`orders@a1` -> ("orders", "a1"); `orders` -> ("orders", None)."""
    base, sep, account = name.partition(PROJECTION_ACCOUNT_SEP)
    return (base, account) if sep and account else (name, None)


def market_key(family: str) -> str:
    """`depth20` -> `raw:market:depth20` (cluster mode: `raw:market:{partial}:depth20`)."""
    if _layout["cluster"]:
        return f"{MARKET_PREFIX}{{{source_tag(family)}}}:{family}"
    return MARKET_PREFIX + family


def family_of_key(raw_key: str) -> str | None:
    """`raw:market:depth20` (or `raw:market:{partial}:depth20`) -> `depth20`; None for a key
    outside `raw:market:`."""
    if not raw_key.startswith(MARKET_PREFIX):
        return None
    return strip_tag(raw_key[len(MARKET_PREFIX):])


def is_raw(key: str) -> bool:
    return key.startswith(RAW_PREFIX)


def dlq_key(projection: str) -> str:
    return DLQ_PREFIX + projection


def lease_key(projection: str) -> str:
    return LEASE_PREFIX + projection


RAW_PATTERN = RAW_PREFIX + "*"

# --- Redis Cluster layout ------------------------------------------------------------------------
ORDER_PARTITIONS = 4  # fixed: a symbol's partition must not move while its stream is read
_layout = {"cluster": False}


def set_cluster_layout(on: bool) -> None:
    """Choose the process's key layout: the Redis Cluster names (on) or the single-node ones."""
    _layout["cluster"] = bool(on)


def cluster_layout() -> bool:
    return _layout["cluster"]


# Tags whose slots (CRC16 % 16384) fall in different thirds of the slot space, so that on the
# default even split over three (or six) masters the heavy streams (diff depth, partial books,
# trades) land on different masters: diff 15157, mark 16377, partial 8083, candles 8278,
# aggTrade 5107. Other families keep their own name as tag.
_SOURCE_TAGS = {"markPrice": "mark", "depth": "diff", "depth5": "partial",
                "depth10": "partial", "depth20": "partial"}


def source_tag(family: str) -> str:
    """The hash tag of a market family's raw key in cluster mode: the families one projection
    reads together share one (`depth20` -> `partial`, `kline_1m` -> `candles`)."""
    if family.startswith("kline_"):
        return "candles"
    return _SOURCE_TAGS.get(family, family)


def order_partition(symbol: str) -> int:
    """The orders partition of `symbol` (cluster mode): CRC-32 of its upper-case name."""
    return zlib.crc32(symbol.upper().encode()) % ORDER_PARTITIONS


def strip_tag(rest: str) -> str:
    """`{partial}:depth20` -> `depth20`: a key's remainder without a leading hash tag
    segment."""
    if rest.startswith("{"):
        end = rest.find("}:")
        if end > 0:
            return rest[end + 2:]
    return rest


def depth_snapshots_key() -> str:
    """`raw:depth_snapshots`; cluster mode: `raw:depth_snapshots:{diff}`, in the slot of
    `raw:market:{diff}:depth` (the depth book reads both in one XREADGROUP)."""
    return KEY_DEPTH_SNAPSHOTS + ":{diff}" if _layout["cluster"] else KEY_DEPTH_SNAPSHOTS
DLQ_PATTERN = DLQ_PREFIX + "*"


@attrs.frozen
class Keys:
    """The keys of one deployment (one view prefix) as one account sees them: its own user data
    (`account`: a label, or None for the unlabelled account) and the shared market views."""

    prefix: str = DEFAULT_PREFIX
    account: str | None = None
    # the cluster layout (tagged order keys) or not; None: the process's (`cluster_layout`).
    # The consumer library passes what its client is, so a reader needs no setting.
    cluster: bool | None = None

    def _in_cluster(self) -> bool:
        return _layout["cluster"] if self.cluster is None else self.cluster

    def _family_head(self, family: str) -> str:
        if self.account and family in ACCOUNT_FAMILIES:
            return f"{self.prefix}:{ACCOUNT_SEGMENT}:{self.account}:{family}"
        return f"{self.prefix}:{family}"

    def view(self, family: str, *parts: str) -> str:
        """`view("orderbook", "BTCUSDT", "20")` -> `websocket:orderbook:btcusdt:20`; with
        account `a1`, `view("open_orders", "BTCUSDT")` ->
        `websocket:acct:a1:open_orders:btcusdt`."""
        return ":".join((self._family_head(family), *(p.lower() for p in parts)))

    def view_head(self, family: str) -> str:
        """`websocket:mark_price:`: what a hot-path fold appends the lower-cased symbol to."""
        return self._family_head(family) + ":"

    def pattern(self, family: str = "*", *parts: str) -> str:
        """A SCAN pattern: `pattern("open_orders")` -> `websocket:open_orders:*` (with account
        `a1`: `websocket:acct:a1:open_orders:*`); `pattern("orderbook", "*", "20")` ->
        `websocket:orderbook:*:20`; `pattern()` every view key under the prefix, every
        account's included. The prefix and the label hold no glob character (settings refuse
        one)."""
        return ":".join((self._family_head(family), *(parts or ("*",)))) if family != "*" \
            else f"{self.prefix}:*"

    def _scoped(self, key: str) -> tuple[str | None, str] | None:
        """(account label or None, the key after it and the prefix), None for another prefix."""
        head = self.prefix + ":"
        if not key.startswith(head):
            return None
        rest = key[len(head):]
        if rest.startswith(ACCOUNT_SEGMENT + ":"):
            parts = rest.split(":", 2)
            if len(parts) == 3 and parts[1]:
                return parts[1], parts[2]
        return None, rest

    def family_of(self, key: str) -> str | None:
        """`websocket:orderbook:btcusdt:20` -> `orderbook`, and
        `websocket:acct:a1:open_orders:btcusdt` -> `open_orders` (whichever account, see
        `account_of`); None for a key of another prefix."""
        scoped = self._scoped(key)
        return None if scoped is None else scoped[1].split(":", 1)[0]

    def account_of(self, key: str) -> str | None:
        """`websocket:acct:a1:open_orders:btcusdt` -> `a1`; None for a key of no account."""
        scoped = self._scoped(key)
        return None if scoped is None else scoped[0]

    def parts_of(self, key: str, family: str) -> list[str] | None:
        """The parts after `P:{family}:` (`["btcusdt", "20"]`) of this account's (or a shared)
        family, None for another family or another account's key."""
        head = self.view_head(family)
        return key[len(head):].split(":") if key.startswith(head) else None

    # --- the raw keys and projection names of this account -----------------------------------

    def raw_user(self) -> str:
        """`raw:user` or `raw:user:{account}`."""
        return user_key(self.account)

    def raw_conn_user(self) -> str:
        """`raw:conn:user` or `raw:conn:user:{account}`."""
        return conn_user_key(self.account)

    def projection(self, base: str) -> str:
        """The name of a user-data projection for this account: `orders`, `orders@a1`."""
        return projection_name(base, self.account)

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

    def _order_tag(self, partition: int) -> str:
        """Cluster mode: the hash tag of one orders partition, `{o2}` (`{a1.o2}` for a1)."""
        return f"{{{self.account}.o{partition}}}" if self.account else f"{{o{partition}}}"

    def _order_view(self, family: str, symbol: str) -> str:
        if self._in_cluster():
            return self.view(family, self._order_tag(order_partition(symbol)), symbol)
        return self.view(family, symbol)

    def order_state(self, symbol: str, kind: str = "order") -> str:
        return self._order_view("order_state" if kind == "order" else "algo_order_state",
                                symbol)

    def open_orders(self, symbol: str, kind: str = "order") -> str:
        return self._order_view("open_orders" if kind == "order" else "open_algo_orders",
                                symbol)

    def orders_stream(self, symbol: str | None = None) -> str:
        """`P:orders` (every order event) or `P:orders:{symbol}`; cluster mode: the symbol's
        partition's `P:orders:{o2}` (no symbol: partition 0's, see `orders_partitions`) or
        `P:orders:{o2}:{symbol}`."""
        if symbol:
            return self._order_view("orders", symbol)
        return self.orders_partitions()[0]

    def orders_partitions(self) -> list[str]:
        """The streams that together hold every order event: `[P:orders]`; cluster mode one
        per partition, `P:orders:{o0}` ... `P:orders:{o3}`."""
        if self._in_cluster():
            return [self.view("orders", self._order_tag(i)) for i in range(ORDER_PARTITIONS)]
        return [self.view("orders")]

    def order_keys(self, symbol: str, kind: str) -> list[str]:
        """KEYS of orders.lua: state hash, open hash, per-symbol stream, all-orders stream
        (cluster mode: the symbol's partition's stream)."""
        stream = (self.view("orders", self._order_tag(order_partition(symbol)))
                  if self._in_cluster() else self.orders_stream())
        return [self.order_state(symbol, kind), self.open_orders(symbol, kind),
                self.orders_stream(symbol), stream]

    # --- the account's events and settings (issue #13) -----------------------------------

    def account_events(self) -> str:
        """`P:account_events`: MARGIN_CALL, ACCOUNT_CONFIG_UPDATE, STRATEGY_UPDATE, ... ."""
        return self.view("account_events")

    def position_events(self) -> str:
        """`P:position_events`: a position opened, grown, reduced, flipped or closed."""
        return self.view("position_events")

    def leverage(self, symbol: str) -> str:
        return self.view("leverage", symbol)

    def multi_assets_margin(self) -> str:
        """`P:multi_assets_margin`: the account's Multi-Assets mode."""
        return self.view("multi_assets_margin")

    def held_orders(self, key: str) -> tuple[str, str] | None:
        """`P:open_orders:btcusdt` -> ("open_orders", "BTCUSDT"); None for any other key."""
        family = self.family_of(key)
        if family not in OPEN_ORDER_VIEWS:
            return None
        parts = self.parts_of(key, family)
        if parts and len(parts) == 2 and parts[0].startswith("{") and parts[0].endswith("}"):
            parts = parts[1:]  # cluster mode: `P:open_orders:{o2}:btcusdt`
        if not parts or len(parts) != 1 or not parts[0]:
            return None
        return family, parts[0].upper()
