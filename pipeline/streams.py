"""Binance market stream kinds: parsing the settings, naming streams, routing them to a path.

Pure: no I/O. Also which connection carries which streams (`MarketPlan`, which listings change
while the ingestor runs) and which symbols a market shard takes (`Shard`).

Since 2026 Binance routes USD-M market streams by path:
`/public` carries the order book streams (depth, bookTicker), `/market` everything else.
A stream on the wrong path is accepted and then stays silent, which is why routing lives in one
table here and the connection watches for silence (`pipeline.wsconn`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from enum import StrEnum

import attrs

from pipeline.errors import SettingsError


class Path(StrEnum):
    PUBLIC = "public"
    MARKET = "market"
    PRIVATE = "private"


KLINE_INTERVALS = (
    "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M",
)
PARTIAL_DEPTHS = (5, 10, 20)
# Binance's depth speeds: `@100ms`, `@500ms`, or no suffix for its 250 ms default.
DEPTH_SPEEDS = ("100ms", "500ms")
_DEPTH_RE = re.compile(f"depth({'|'.join(map(str, PARTIAL_DEPTHS))})?(?:@(.+))?")

_SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,24}(_[0-9]{6})?$")


@attrs.frozen
class StreamKind:
    """One entry of PIPELINE_MARKET_STREAMS, e.g. `depth20@100ms`.

    `family` names the raw log key (`raw:market:{family}`) and the projection that reads it.
    `per_symbol` is False only for the all-market `!markPrice@arr` stream.
    """

    spec: str  # as written in the setting, e.g. "markPrice@1s"
    # markPrice, markPrice_arr, depth5, depth10, depth20, depth, aggTrade, kline_1m, ...
    family: str
    path: Path
    per_symbol: bool = True
    # Streams that tick at least once a second; the silence timeout only applies to those.
    ticks_every_second: bool = True

    def stream_name(self, symbol: str | None) -> str:
        """The name Binance uses in URLs and in the combined wrapper's "stream" field."""
        if not self.per_symbol:
            return self.spec
        assert symbol is not None
        return f"{symbol.lower()}@{self.spec}"


def parse_stream_kind(spec: str) -> StreamKind:
    """Parse one stream kind; raises SettingsError naming PIPELINE_MARKET_STREAMS."""
    s = spec.strip()
    bad = SettingsError("PIPELINE_MARKET_STREAMS", f"unknown stream kind {s!r}")
    if s in ("markPrice", "markPrice@1s"):
        return StreamKind(s, "markPrice", Path.MARKET)
    if s in ("!markPrice@arr", "!markPrice@arr@1s"):
        return StreamKind(s, "markPrice_arr", Path.MARKET, per_symbol=False)
    if s in ("aggTrade",):
        # a quiet symbol may trade less than once a second: no silence rule of its own
        return StreamKind(s, "aggTrade", Path.MARKET, ticks_every_second=False)
    if s == "forceOrder":
        return StreamKind(s, "forceOrder", Path.MARKET, ticks_every_second=False)
    if s == "bookTicker":
        return StreamKind(s, "bookTicker", Path.PUBLIC)
    if s.startswith("kline_"):
        if s[len("kline_"):] not in KLINE_INTERVALS:
            raise bad
        return StreamKind(s, s, Path.MARKET)
    m = _DEPTH_RE.fullmatch(s)
    if m:
        levels, speed = m.groups()
        if speed is not None and speed not in DEPTH_SPEEDS:
            speeds = ", ".join(f"@{v}" for v in DEPTH_SPEEDS)
            raise SettingsError("PIPELINE_MARKET_STREAMS", f"unknown stream kind {s!r}: depth "
                                f"speeds are {speeds} or none (250 ms)")
        return StreamKind(s, f"depth{levels}" if levels else "depth", Path.PUBLIC)
    raise bad


def parse_stream_kinds(value: str) -> tuple[StreamKind, ...]:
    items = [v for v in (p.strip() for p in value.split(",")) if v]
    if not items:
        raise SettingsError("PIPELINE_MARKET_STREAMS", "is empty")
    kinds = tuple(parse_stream_kind(v) for v in items)
    families = [k.family for k in kinds]
    dup = {f for f in families if families.count(f) > 1}
    if dup:
        raise SettingsError("PIPELINE_MARKET_STREAMS", f"more than one speed for {sorted(dup)}")
    return kinds


def parse_symbols(value: str) -> tuple[str, ...] | None:
    """Upper-case symbols, or None for `ALL` (resolved later from exchangeInfo)."""
    items = [v.strip().upper() for v in value.split(",") if v.strip()]
    if not items:
        raise SettingsError("PIPELINE_SYMBOLS", "is empty")
    if items == ["ALL"]:
        return None
    for sym in items:
        if not _SYMBOL_RE.match(sym):
            raise SettingsError("PIPELINE_SYMBOLS", f"malformed symbol {sym!r}")
    return tuple(dict.fromkeys(items))


@attrs.frozen
class Subscription:
    """One stream on one path: what a connection subscribes to."""

    name: str  # e.g. "btcusdt@depth20@100ms"
    kind: StreamKind


MAX_STREAMS_PER_CONNECTION = 1024


def plan_subscriptions(
    symbols: Sequence[str], kinds: Iterable[StreamKind]
) -> dict[Path, list[Subscription]]:
    """Every stream to subscribe, grouped by the path it must be served on."""
    plan: dict[Path, list[Subscription]] = {}
    for kind in kinds:
        names = [kind.stream_name(None)] if not kind.per_symbol else [
            kind.stream_name(sym) for sym in symbols
        ]
        plan.setdefault(kind.path, []).extend(Subscription(n, kind) for n in names)
    return plan


def plan_connections(
    symbols: Sequence[str],
    kinds: Iterable[StreamKind],
    max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
) -> list[tuple[Path, list[Subscription]]]:
    """Split the subscriptions into connections of at most `max_per_connection` streams.

    All stream kinds of one symbol that share a path stay on one connection, so the frames of a
    symbol reach the log in the order the exchange sent them.
    """
    out: list[tuple[Path, list[Subscription]]] = []
    for path, subs in plan_subscriptions(symbols, kinds).items():
        by_symbol: dict[str, list[Subscription]] = {}
        for sub in subs:
            by_symbol.setdefault(sub.name.split("@", 1)[0], []).append(sub)
        current: list[Subscription] = []
        for group in by_symbol.values():
            if current and len(current) + len(group) > max_per_connection:
                out.append((path, current))
                current = []
            current.extend(group)
        if current:
            out.append((path, current))
    return out


# --- shards -------------------------------------------------------------------------------------
# PIPELINE_SHARD=i/n: n market ingestors, on one host or many, each take the symbols of their
# shard, so together they cover the symbol list once, with no overlap and no hole. A symbol's
# shard is a hash of its name, not its place in the list, so a listing or a delisting never
# moves another symbol to another shard (which would split its frames over two processes).
MAX_SHARDS = 256
_SHARD_RE = re.compile(r"^\s*(\d{1,3})\s*/\s*(\d{1,3})\s*$")


def shard_of(symbol: str, count: int) -> int:
    """The shard (1-based) of `symbol` among `count`: CRC-32 of the upper-case name, which is
    the same in every process and on every host (Python's own `hash` of a str is not)."""
    return 1 + zlib.crc32(symbol.upper().encode()) % count


@attrs.frozen
class Shard:
    """Shard `index` of `count` (1-based)."""

    index: int
    count: int

    def owns(self, symbol: str) -> bool:
        return shard_of(symbol, self.count) == self.index

    def take(self, symbols: Iterable[str]) -> tuple[str, ...]:
        """The symbols of this shard, in the order given."""
        return tuple(s for s in symbols if self.owns(s))

    @property
    def label(self) -> str:
        """`2/3`, as the setting writes it."""
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """`s2of3`: the part of a connection name that names the shard."""
        return f"s{self.index}of{self.count}"


def parse_shard(value: str) -> Shard | None:
    """PIPELINE_SHARD: `i/n` with 1 <= i <= n <= 256; empty: no sharding (None)."""
    if not value.strip():
        return None
    m = _SHARD_RE.match(value)
    if not m:
        raise SettingsError("PIPELINE_SHARD", f"{value[:40]!r} is not i/n (e.g. 2/3)")
    index, count = int(m.group(1)), int(m.group(2))
    if not 1 <= index <= count <= MAX_SHARDS:
        raise SettingsError("PIPELINE_SHARD", f"{value.strip()!r}: need 1 <= i <= n <= "
                                              f"{MAX_SHARDS}")
    return Shard(index, count)


# --- the connections of one ingestor, changing with listings --------------------------------------

MARKET_CONN_NAME = "mkt"
SESSION_CONN_NAME = "mkt-sessions"  # `pipeline.health` does not judge these by silence


@attrs.define(eq=False)
class PlannedConnection:
    """One market connection of a `MarketPlan`: the streams it carries now, in order (its URL
    names the first ones)."""

    name: str  # `mkt-3`, `mkt-s2of3-3`, `mkt-sessions-1`, `mkt-sessions-s2of3-1`
    path: Path
    names: list[str]
    sessions: bool = False  # symbols that trade in sessions: no silence rule
    ticks: bool = True  # carries a stream that ticks every second

    def carried(self) -> tuple[str, ...]:
        return tuple(self.names)


class MarketPlan:
    """The market connections of one ingestor and the streams each carries.

    `MarketPlan.of` plans the symbols of the ingestor's shard as `plan_connections` does: the
    symbols that trade in sessions on connections of their own; all-market streams
    (`!markPrice@arr`) once, by shard 1 (or the only ingestor). A symbol listed later goes to a
    connection of each of its paths with room, or a new one (`add`); a delisted one leaves
    every connection it was on (`remove`: a connection left empty leaves the plan, to be
    stopped). Connection names are numbered in the order made and never reused.
    """

    def __init__(self, kinds: Iterable[StreamKind], *, shard: Shard | None = None,
                 max_per_connection: int = MAX_STREAMS_PER_CONNECTION) -> None:
        self.kinds = tuple(kinds)
        self.symbol_kinds = tuple(k for k in self.kinds if k.per_symbol)
        self.shard = shard
        self.max_per = max_per_connection
        self.connections: list[PlannedConnection] = []
        self.symbols: dict[str, bool] = {}  # symbol -> trades in sessions
        self._made = {False: 0, True: 0}

    @classmethod
    def of(cls, symbols: Sequence[str], kinds: Iterable[StreamKind], *,
           sessions: Iterable[str] = (), shard: Shard | None = None,
           max_per_connection: int = MAX_STREAMS_PER_CONNECTION) -> MarketPlan:
        plan = cls(kinds, shard=shard, max_per_connection=max_per_connection)
        mine = shard.take(symbols) if shard else tuple(symbols)
        in_sessions = set(sessions)
        first = shard is None or shard.index == 1
        plan._extend([s for s in mine if s not in in_sessions],
                     plan.kinds if first else plan.symbol_kinds, False)
        plan._extend([s for s in mine if s in in_sessions], plan.symbol_kinds, True)
        return plan

    def _extend(self, symbols: Sequence[str], kinds: Sequence[StreamKind],
                sessions: bool) -> None:
        for path, subs in plan_connections(symbols, kinds, self.max_per):
            self._new(path, [s.name for s in subs], sessions,
                      any(s.kind.ticks_every_second for s in subs))
        self.symbols.update(dict.fromkeys(symbols, sessions))

    def _new(self, path: Path, names: list[str], sessions: bool,
             ticks: bool) -> PlannedConnection:
        self._made[sessions] += 1
        tag = f"{self.shard.tag}-" if self.shard else ""
        head = SESSION_CONN_NAME if sessions else MARKET_CONN_NAME
        conn = PlannedConnection(f"{head}-{tag}{self._made[sessions]}", path, names, sessions,
                                 ticks)
        self.connections.append(conn)
        return conn

    def add(self, symbol: str, sessions: bool = False
            ) -> list[tuple[PlannedConnection, list[str], bool]]:
        """Plan the streams of a new symbol: (connection, the streams added to it, whether
        the connection is new) per path; nothing for a symbol already planned."""
        if symbol in self.symbols:
            return []
        self.symbols[symbol] = sessions
        out = []
        for path, subs in plan_subscriptions([symbol], self.symbol_kinds).items():
            names = [s.name for s in subs]
            conn = next((c for c in self.connections if c.path == path
                         and c.sessions == sessions
                         and len(c.names) + len(names) <= self.max_per), None)
            if conn is None:
                ticks = any(s.kind.ticks_every_second for s in subs)
                out.append((self._new(path, names, sessions, ticks), names, True))
            else:
                conn.names.extend(names)
                out.append((conn, names, False))
        return out

    def remove(self, symbol: str) -> list[tuple[PlannedConnection, list[str]]]:
        """Take a symbol's streams off its connections: (connection, the streams removed);
        a connection left with none is dropped from the plan."""
        if self.symbols.pop(symbol, None) is None:
            return []
        head = symbol.lower() + "@"
        out = []
        for conn in list(self.connections):
            gone = [n for n in conn.names if n.startswith(head)]
            if gone:
                conn.names[:] = [n for n in conn.names if not n.startswith(head)]
                out.append((conn, gone))
                if not conn.names:
                    self.connections.remove(conn)
        return out


def well_formed_symbol(symbol: object) -> bool:
    """A symbol this project puts into stream names and keys (as PIPELINE_SYMBOLS allows)."""
    return isinstance(symbol, str) and _SYMBOL_RE.match(symbol) is not None
