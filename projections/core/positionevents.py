"""`P:position_events`: one entry each time a position opens, grows, shrinks, changes side or
closes, with what caused it. Pure: imports neither trio nor redis.

Theory of operation
-------------------
ACCOUNT_UPDATE says what a position is now (`pa`, `ep`), not what it was nor why it changed.
`PositionTracker` remembers, per position (symbol and position side), the amount and entry
price it last learned and when, so each ACCOUNT_UPDATE becomes a change `before -> after`:

    0 -> x          opened        x -> 0          closed
    x -> y, |y|>|x| increased     x -> y, |y|<|x| reduced       (same sign)
    x -> -y         flipped       (the side changed in one step)
    ? -> 0          closed        ? -> y          changed       (before unknown, below)

The cause of a change with reason ORDER is the fill that made it: ORDER_TRADE_UPDATE (execution
type TRADE, or CALCULATED for liquidations and ADL) of the same symbol, position side and
transaction time `T`. The two frames come in either order, so whichever comes second completes
the pair: fills wait in `fills` for their ACCOUNT_UPDATE, a change waits in `pending` for its
fills until an event of a later time (or a control entry) shows none is coming, and is then
written without an order. Several fills of one time add their realized profit (`rp`).
An order that a triggered algo order placed (STOP_MARKET, TAKE_PROFIT_MARKET, STOP,
TAKE_PROFIT, TRAILING_STOP_MARKET) is known from the ALGO_UPDATE that names it in `ai`: the
tracker keeps order id -> (algo id, algo type) for the last 10,000 triggers, so the entry of a
close by a stop-loss carries `algo_id` and `algo_type: "STOP_MARKET"`. Without that ALGO_UPDATE
(a fold started after the trigger) the order's `ot` still names the algo type.

Reconciliation: a full positionRisk snapshot (every 300 s and after every reconnect) that
disagrees with what the tracker knows reports the difference as a change with `source:
"reconciliation"` and no order, e.g. a position a stop closed while the stream was down. A
position the snapshot no longer lists is flat. The snapshot is judged only against knowledge
at least `RECONCILE_SLACK_MS` older than the answer (`fetched_at_ms` is the exchange's clock as
the ingestor estimates it): an event of the same moment may not be in the REST answer yet. An
ACCOUNT_UPDATE older than what a snapshot already showed adds nothing.

Before the tracker has seen a full snapshot (a fold started in the middle of the log: a new
lease holder, a `replay --from`), a position it has not seen has no known `before`: its first
change says `amount_before: null` and kind `changed` (or `closed`). From the first snapshot on,
a position the snapshot does not list is known to be flat.

Everything here depends only on the entries, in log order, so a replay from the log's start
emits the same entries with the same `event_key`s, and the store's append function
(lua/streams.lua) refuses the ones the stream already holds: exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import orjson

from projections.core.outputs import StreamAppend
from projections.core.userevents import AccountUpdate, AlgoUpdate, OrderTradeUpdate

ALGO_TYPES = frozenset({"STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT",
                        "TRAILING_STOP_MARKET"})
FILL_EXECUTIONS = frozenset({"TRADE", "CALCULATED"})
LINKS_KEPT = 10_000
FILLS_KEPT = 1_000
PENDING_KEPT = 1_000
RECONCILE_SLACK_MS = 2_000
ZERO = Decimal(0)


@attrs.frozen
class Held:
    """What the tracker knows of one position, and since when (ms)."""

    symbol: str
    side: str  # BOTH, LONG, SHORT
    amount: str  # signed, as Binance writes it
    entry_price: str
    known_ms: int


@attrs.define
class Fills:
    """The fills of one (symbol, position side, transaction time)."""

    order_id: int
    order_type: str  # `o`
    orig_type: str  # `ot`
    profit: Decimal = ZERO


@attrs.frozen
class Change:
    before: Held | None
    after: Held
    at_ms: int
    reason: str  # ACCOUNT_UPDATE `m`, or "reconciliation"


def _dec(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return ZERO


def _text(d: Decimal) -> str:
    return "0" if d == 0 else format(d.normalize(), "f")


def kind_of(before: str | None, after: str) -> str:
    """The module docstring's table."""
    b, a = (None if before is None else _dec(before)), _dec(after)
    if a == 0:
        return "closed"
    if b is None:
        return "changed"
    if b == 0:
        return "opened"
    if (b > 0) != (a > 0):
        return "flipped"
    return "increased" if abs(a) > abs(b) else "reduced"


class PositionTracker:
    """The memory behind `P:position_events` (module docstring). Its methods take the events
    the account fold has parsed and judged, and return the appends to make."""

    def __init__(self, stream_key: str, max_age_ms: int) -> None:
        self.stream_key = stream_key
        self.max_age_ms = max_age_ms
        self.held: dict[str, Held] = {}  # position view key -> knowledge
        self.complete = False  # a full snapshot was seen: positions not held are flat
        self.links: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self.fills: OrderedDict[tuple[str, str, int], Fills] = OrderedDict()
        self.pending: dict[tuple[str, str, int], list[Change]] = {}

    # --- the events --------------------------------------------------------------------------

    def on_algo(self, event: AlgoUpdate) -> None:
        """A triggered algo order names the order it placed (`ai`)."""
        placed = str(event.order.actual_order_id or "")
        if placed.isdigit():
            self.links[int(placed)] = (event.order.algo_id, str(event.order.raw.get("o", "")))
            self.links.move_to_end(int(placed))
            while len(self.links) > LINKS_KEPT:
                self.links.popitem(last=False)

    def on_order(self, event: OrderTradeUpdate) -> list[StreamAppend]:
        """A fill: the cause of the change of its time, waiting or to come."""
        o = event.order
        if o.execution_type not in FILL_EXECUTIONS:
            return []
        at = (o.symbol, str(o.raw.get("ps", "BOTH")), event.transaction_time)
        fills = self.fills.get(at)
        if fills is None:
            fills = self.fills[at] = Fills(o.order_id, str(o.raw.get("o", "")),
                                           str(o.raw.get("ot", "")))
            while len(self.fills) > FILLS_KEPT:
                self.fills.popitem(last=False)
        fills.profit += _dec(o.realized_profit)
        waiting = self.pending.pop(at, [])
        if waiting:
            del self.fills[at]
        return [self._append(change, fills) for change in waiting]

    def on_account(self, event: AccountUpdate, key_of: Mapping[int, str]
                   ) -> list[StreamAppend]:
        """Each position of an ACCOUNT_UPDATE (`key_of`: index in `a.P` -> its view key)."""
        at_ms = event.transaction_time or event.event_time
        out: list[StreamAppend] = []
        for i, pos in enumerate(event.account.positions):
            after = Held(pos.symbol, pos.position_side, str(pos.raw.get("pa", "0")),
                         str(pos.raw.get("ep", "0")), at_ms)
            change = self._learn(key_of[i], after, event.account.reason)
            if change is None:
                continue
            at = (pos.symbol, pos.position_side, at_ms)
            if change.reason != "ORDER":
                out.append(self._append(change, None))
            elif at in self.fills:
                out.append(self._append(change, self.fills.pop(at)))
            elif sum(len(v) for v in self.pending.values()) < PENDING_KEPT:
                self.pending.setdefault(at, []).append(change)
            else:
                out.append(self._append(change, None))
        return out

    def on_snapshot(self, rows: Iterable[tuple[str, Held]], fetched_ms: int
                    ) -> tuple[list[StreamAppend], list[str]]:
        """A full positionRisk snapshot as (view key, what it says) per row. Returns the
        appends and the view keys of held positions it no longer lists (now flat)."""
        out: list[StreamAppend] = []
        listed: set[str] = set()
        for key, after in rows:
            listed.add(key)
            out += self._reconciled(key, after, fetched_ms)
        gone = [key for key, held in self.held.items()
                if key not in listed and _dec(held.amount) != 0]
        flat: list[str] = []
        for key in gone:
            held = self.held[key]
            appended = self._reconciled(key, attrs.evolve(held, amount="0", entry_price="0",
                                                          known_ms=fetched_ms), fetched_ms)
            if self.held[key].known_ms == fetched_ms:
                flat.append(key)
            out += appended
        self.complete = True
        return out, flat

    def flush(self, before_ms: int | None = None) -> list[StreamAppend]:
        """Changes still waiting for fills of a time before `before_ms` (None: all): none is
        coming, they are written without an order."""
        due = [at for at in self.pending if before_ms is None or at[2] < before_ms]
        return [self._append(change, None) for at in due for change in self.pending.pop(at)]

    # --- machinery -----------------------------------------------------------------------------

    def _learn(self, key: str, after: Held, reason: str) -> Change | None:
        before = self.held.get(key)
        if before is not None and before.known_ms > after.known_ms:
            return None  # older than a snapshot that already showed its effect
        if before is None and self.complete:
            before = Held(after.symbol, after.side, "0", "0", 0)
        self.held[key] = after
        if before is not None and _dec(before.amount) == _dec(after.amount):
            return None
        return Change(before, after, after.known_ms, reason)

    def _reconciled(self, key: str, after: Held, fetched_ms: int) -> list[StreamAppend]:
        before = self.held.get(key)
        if before is not None and before.known_ms > fetched_ms - RECONCILE_SLACK_MS:
            return []  # the stream knows something this recent: the answer may predate it
        change = self._learn(key, after, "reconciliation")
        if change is None or change.before is None:
            return []  # agrees, or the first snapshot: it seeds what the tracker knows
        return [self._append(change, None, source="reconciliation")]

    def _append(self, change: Change, fills: Fills | None, source: str = "websocket"
                ) -> StreamAppend:
        after, before = change.after, change.before
        order_id = fills.order_id if fills is not None else None
        algo_id, algo_type = self.links.get(order_id, (None, None)) if order_id else (None, None)
        if algo_type is None and fills is not None and fills.orig_type in ALGO_TYPES:
            algo_type = fills.orig_type
        kind = kind_of(before.amount if before else None, after.amount)
        event_key = f"{after.symbol}:{after.side}:{change.at_ms}:{after.amount}:{source}"
        value = {
            "timestamp": change.at_ms / 1000, "event_time": change.at_ms, "kind": kind,
            "symbol": after.symbol, "position_side": after.side,
            "amount_before": before.amount if before else None, "amount_after": after.amount,
            "entry_price_before": before.entry_price if before else None,
            "entry_price": after.entry_price,
            "realized_profit": _text(fills.profit) if fills is not None else None,
            "reason": change.reason, "order_id": order_id,
            "order_type": fills.order_type if fills is not None else None,
            "algo_id": algo_id, "algo_type": algo_type, "source": source,
            "event_key": event_key,
        }
        fields = [("kind", kind), ("symbol", after.symbol), ("position_side", after.side),
                  ("source", source)]
        if order_id is not None:
            fields.append(("order_id", str(order_id)))
        if algo_type is not None:
            fields.append(("algo_type", algo_type))
        return StreamAppend(self.stream_key, change.at_ms, event_key,
                            (*((k, v.encode()) for k, v in fields),
                             ("data", orjson.dumps(value))), self.max_age_ms)


def held_from_risk(row: Mapping[str, Any], fetched_ms: int) -> Held:
    """What a positionRisk (v3) row says of its position."""
    return Held(str(row["symbol"]), str(row.get("positionSide", "BOTH")),
                str(row.get("positionAmt", "0")), str(row.get("entryPrice", "0")), fetched_ms)
