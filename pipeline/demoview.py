"""What `pipeline demo` shows: one snapshot of the views, read from Redis the way a reader
would (GET, HGETALL, XREVRANGE, LLEN), then drawn as a rich layout or written as a plain
summary: prices and books, open orders and order events, position events, account events,
leverage and the candles held.

`read_snapshot` is the only function here that touches Redis; the rest turns a `Snapshot`
into text.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

import attrs
import redis
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text

from projections.client import parse_view
from projections.core.keys import CONN_KEYS, KEY_DEPTH_SNAPSHOTS, RAW_PATTERN, Keys

EVENTS_SHOWN = 10
# raw streams of control entries only (connection lifecycle of each ingestor, the projector's
# depth snapshots): their groups count in the lag, their entries are not frames
CONTROL_STREAMS = frozenset((*CONN_KEYS, KEY_DEPTH_SNAPSHOTS))


@attrs.frozen
class Mark:
    symbol: str
    price: str
    funding_rate: str
    age_s: float


@attrs.frozen
class Top:
    symbol: str
    bid: str
    bid_qty: str
    ask: str
    ask_qty: str


@attrs.frozen
class OrderEvent:
    entry_id: str
    symbol: str
    order_id: str
    kind: str
    status: str
    source: str


@attrs.frozen
class PositionLine:
    """One entry of P:position_events, as the demo shows it."""

    entry_id: str
    symbol: str
    kind: str
    before: str
    after: str
    cause: str  # the algo type behind the order, else the order id, else the reason
    profit: str
    source: str


@attrs.frozen
class AccountLine:
    """One entry of P:account_events, as the demo shows it."""

    entry_id: str
    type: str
    symbol: str
    detail: str


@attrs.frozen
class Account:
    """The account's events and settings (issue #13), newest first."""

    positions: tuple[PositionLine, ...] = ()
    position_events: int = 0  # entries on P:position_events
    events: tuple[AccountLine, ...] = ()
    account_events: int = 0  # entries on P:account_events
    leverage: Mapping[str, int] = attrs.field(factory=dict)  # symbol -> leverage
    klines: Mapping[str, int] = attrs.field(factory=dict)  # symbol -> closed 1m candles held


@attrs.frozen
class Snapshot:
    marks: tuple[Mark, ...]
    tops: tuple[Top, ...]
    open_orders: tuple[dict[str, Any], ...]
    open_algo_orders: tuple[dict[str, Any], ...]
    events: tuple[OrderEvent, ...]  # newest first
    order_events: int  # entries on P:orders
    frames_logged: Mapping[str, int]  # raw key -> entries ever added (XINFO entries-added)
    lag: Mapping[str, int]  # group -> entries not yet delivered, summed over its raw keys
    views: Mapping[str, int]  # view family -> keys
    account: Account = attrs.field(factory=Account)

    @property
    def frames_total(self) -> int:
        return sum(self.frames_logged.values())


def read_snapshot(client: redis.Redis, prefix: str, symbols: Sequence[str],
                  now: float | None = None) -> Snapshot:
    now = time.time() if now is None else now
    syms = [s.lower() for s in symbols]
    keys = Keys(prefix)
    with client.pipeline(transaction=False) as pipe:
        for s in syms:
            pipe.get(keys.mark_price(s))
            pipe.get(keys.orderbook(s, 20))
            pipe.hgetall(keys.open_orders(s))
            pipe.hgetall(keys.open_orders(s, "algo"))
        pipe.xrevrange(keys.orders_stream(), count=EVENTS_SHOWN)
        pipe.xlen(keys.orders_stream())
        replies = pipe.execute()
    marks: list[Mark] = []
    tops: list[Top] = []
    orders: list[dict[str, Any]] = []
    algos: list[dict[str, Any]] = []
    for i, s in enumerate(syms):
        mark, book, open_o, open_a = replies[4 * i: 4 * i + 4]
        if (m := parse_view(mark)) is not None:
            marks.append(Mark(s.upper(), str(m.get("mark_price")), str(m.get("funding_rate")),
                              max(0.0, now - float(m.get("timestamp", now)))))
        if (b := parse_view(book)) is not None and b.get("bids") and b.get("asks"):
            (bid, bq), (ask, aq) = b["bids"][0][:2], b["asks"][0][:2]
            tops.append(Top(s.upper(), bid, bq, ask, aq))
        orders.extend(d for v in open_o.values() if (d := parse_view(v)) is not None)
        algos.extend(d for v in open_a.values() if (d := parse_view(v)) is not None)
    events = tuple(_event(eid, fields) for eid, fields in replies[-2])
    frames, lag = _log_counts(client)
    return Snapshot(tuple(marks), tuple(tops), tuple(orders), tuple(algos), events,
                    int(replies[-1]), frames, lag, _view_counts(client, prefix),
                    read_account(client, keys, syms))


def read_account(client: redis.Redis, keys: Keys, syms: Sequence[str]) -> Account:
    """The newest position and account events, each symbol's leverage and 1m candles."""
    with client.pipeline(transaction=False) as pipe:
        pipe.xrevrange(keys.position_events(), count=EVENTS_SHOWN)
        pipe.xlen(keys.position_events())
        pipe.xrevrange(keys.account_events(), count=EVENTS_SHOWN)
        pipe.xlen(keys.account_events())
        for s in syms:
            pipe.get(keys.leverage(s))
            pipe.llen(keys.klines(s, "1m"))
        replies = pipe.execute()
    leverage: dict[str, int] = {}
    klines: dict[str, int] = {}
    for i, s in enumerate(syms):
        lev, candles = replies[4 + 2 * i: 6 + 2 * i]
        if (v := parse_view(lev)) is not None and isinstance(v.get("leverage"), int):
            leverage[s.upper()] = v["leverage"]
        klines[s.upper()] = int(candles)
    return Account(tuple(_position(eid, f) for eid, f in replies[0]), int(replies[1]),
                   tuple(_account_event(eid, f) for eid, f in replies[2]), int(replies[3]),
                   leverage, klines)


def _position(entry_id: bytes, fields: Mapping[bytes, bytes]) -> PositionLine:
    d = parse_view(fields.get(b"data")) or {}
    cause = d.get("algo_type") or (f"order {d['order_id']}" if d.get("order_id") else
                                   str(d.get("reason", "")))
    return PositionLine(entry_id.decode(), str(d.get("symbol", "")), str(d.get("kind", "")),
                        str(d.get("amount_before")), str(d.get("amount_after")), cause,
                        str(d.get("realized_profit") or "-"), str(d.get("source", "")))


def _account_event(entry_id: bytes, fields: Mapping[bytes, bytes]) -> AccountLine:
    d = parse_view(fields.get(b"data")) or {}
    ac, ai = d.get("ac"), d.get("ai")
    if isinstance(ac, dict):
        detail = f"leverage {ac.get('l')}"
    elif isinstance(ai, dict):
        detail = f"multi-assets {ai.get('j')}"
    elif isinstance(d.get("p"), list):
        detail = ", ".join(f"{p.get('s')} {p.get('pa')} mm {p.get('mm')}" for p in d["p"]
                           if isinstance(p, dict))
    else:
        detail = ""
    return AccountLine(entry_id.decode(), fields.get(b"type", b"").decode(),
                       fields.get(b"symbol", b"-").decode(), detail)


def _event(entry_id: bytes, fields: Mapping[bytes, bytes]) -> OrderEvent:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    return OrderEvent(entry_id.decode(), get("symbol"), get("order_id"), get("kind") or "order",
                      get("status"), get("source"))


def _log_counts(client: redis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    frames: dict[str, int] = {}
    lag: Counter[str] = Counter()
    for raw_key in client.scan_iter(match=RAW_PATTERN, count=1000, _type="stream"):
        key = raw_key.decode()
        if key not in CONTROL_STREAMS:
            info = cast(dict[str, Any], client.xinfo_stream(key))
            frames[key] = int(info.get("entries-added") or info["length"])
        for g in cast(list[dict[str, Any]], client.xinfo_groups(key)):
            lag[g["name"].decode()] += int(g.get("lag") or 0)
    return frames, dict(lag)


def _view_counts(client: redis.Redis, prefix: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    keys = Keys(prefix)
    for i, key in enumerate(client.scan_iter(match=keys.pattern(), count=1000)):
        if i >= 20_000:
            break
        family = keys.family_of(key.decode())
        if family is not None:
            counts[family] += 1
    return dict(sorted(counts.items()))


# --- the live terminal view ----------------------------------------------------------------

def _market_table(snap: Snapshot) -> Table:
    t = Table(title="market", title_justify="left", expand=False)
    for col in ("symbol", "mark price", "funding", "age", "best bid", "best ask"):
        t.add_column(col, justify="left" if col == "symbol" else "right")
    tops = {tp.symbol: tp for tp in snap.tops}
    for m in snap.marks:
        tp = tops.get(m.symbol)
        t.add_row(m.symbol, m.price, m.funding_rate, f"{m.age_s:.1f} s",
                  f"{tp.bid} x {tp.bid_qty}" if tp else "-",
                  f"{tp.ask} x {tp.ask_qty}" if tp else "-")
    return t


def _orders_table(snap: Snapshot) -> Table:
    t = Table(title="open orders", title_justify="left")
    for col in ("symbol", "id", "side", "type", "price", "qty", "status"):
        t.add_column(col)
    for o in snap.open_orders:
        t.add_row(str(o.get("symbol")), str(o.get("orderId")), str(o.get("side")),
                  str(o.get("type")), str(o.get("price")), str(o.get("origQty")),
                  str(o.get("status")))
    for a in snap.open_algo_orders:
        t.add_row(str(a.get("symbol")), f"algo {a.get('algoId')}", str(a.get("side")),
                  str(a.get("orderType") or a.get("type")), str(a.get("triggerPrice")),
                  str(a.get("quantity")), str(a.get("algoStatus")))
    return t


def _events_table(snap: Snapshot) -> Table:
    t = Table(title=f"order events ({snap.order_events} on the orders stream)",
              title_justify="left")
    for col in ("entry", "symbol", "order", "kind", "status", "from"):
        t.add_column(col)
    for e in snap.events:
        t.add_row(e.entry_id, e.symbol, e.order_id, e.kind, e.status, e.source)
    return t


def _positions_table(snap: Snapshot) -> Table:
    acct = snap.account
    t = Table(title=f"position events ({acct.position_events} on the stream)",
              title_justify="left")
    for col in ("entry", "symbol", "kind", "amount", "cause", "profit", "from"):
        t.add_column(col)
    for p in acct.positions:
        t.add_row(p.entry_id, p.symbol, p.kind, f"{p.before} -> {p.after}", p.cause,
                  p.profit, p.source)
    return t


def _account_table(snap: Snapshot) -> Table:
    acct = snap.account
    lev = ", ".join(f"{s} {n}x" for s, n in acct.leverage.items()) or "-"
    t = Table(title=f"account events ({acct.account_events} on the stream); leverage {lev}",
              title_justify="left")
    for col in ("entry", "type", "symbol", "detail"):
        t.add_column(col)
    for e in acct.events:
        t.add_row(e.entry_id, e.type, e.symbol, e.detail)
    return t


def render_live(snap: Snapshot, fps: float, processes: str) -> RichGroup:
    lag = max(snap.lag.values(), default=0)
    candles = ", ".join(f"{s} {n}" for s, n in snap.account.klines.items())
    footer = Text(f"frames logged {snap.frames_total}   {fps:,.0f} frames/s   "
                  f"max group lag {lag}   1m candles {candles}   Ctrl-C stops everything\n"
                  f"{processes}")
    return RichGroup(_market_table(snap), _orders_table(snap), _events_table(snap),
                     _positions_table(snap), _account_table(snap), footer)


def summary_lines(snap: Snapshot) -> list[str]:
    """The plain-text summary of `pipeline demo --seconds N` (one fact per line)."""
    statuses = Counter(e.status for e in snap.events)
    by_kind = ", ".join(f"{k} {n}" for k, n in snap.frames_logged.items())
    return [
        f"frames logged: {snap.frames_total} ({by_kind})",
        "views found: " + (", ".join(f"{k} {n}" for k, n in snap.views.items()) or "none"),
        "mark prices: " + (", ".join(f"{m.symbol} {m.price}" for m in snap.marks) or "none"),
        "order books: " + (", ".join(f"{t.symbol} bid {t.bid} ask {t.ask}"
                                     for t in snap.tops) or "none"),
        f"order events seen: {snap.order_events} (latest: "
        + (", ".join(f"{s} {n}" for s, n in statuses.items()) or "none") + ")",
        f"open orders: {len(snap.open_orders)}, open algo orders: {len(snap.open_algo_orders)}",
        "group lag: " + (", ".join(f"{g} {n}" for g, n in sorted(snap.lag.items())) or "none"),
        *account_lines(snap.account),
    ]


def account_lines(acct: Account) -> list[str]:
    kinds = Counter(p.kind for p in acct.positions)
    stops = sum(1 for p in acct.positions if p.kind == "closed" and p.cause in (
        "STOP_MARKET", "STOP"))
    types = Counter(e.type for e in acct.events)
    return [
        f"position events seen: {acct.position_events} (latest: "
        + (", ".join(f"{k} {n}" for k, n in kinds.items()) or "none")
        + f"; closed by a stop-loss {stops})",
        f"account events seen: {acct.account_events} (latest: "
        + (", ".join(f"{k} {n}" for k, n in types.items()) or "none") + ")",
        "leverage: " + (", ".join(f"{s} {n}" for s, n in acct.leverage.items()) or "none"),
        "1m candles held: " + (", ".join(f"{s} {n}" for s, n in acct.klines.items()) or "none"),
    ]
