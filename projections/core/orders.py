"""The order and algo-order lifecycle: a pure state machine. Imports neither trio nor redis.

Theory of operation
-------------------
Every order the account has is in one status. A matching-engine order (ORDER_TRADE_UPDATE,
`GET /fapi/v1/openOrders`, `GET /fapi/v1/order`) starts NEW, may be amended (AMENDMENT keeps
it NEW) and partially filled any number of times, and ends FILLED, CANCELED, EXPIRED or
EXPIRED_IN_MATCH. An algo order of the Algo service (ALGO_UPDATE, `GET /fapi/v1/openAlgoOrders`,
`GET /fapi/v1/algoOrder`) starts NEW, goes TRIGGERING then TRIGGERED when its condition is met
(`ai` then names the matching-engine order it placed, which has its own lifecycle above), and
ends FINISHED, CANCELED, EXPIRED or REJECTED. `ORDER_TRANSITIONS` and `ALGO_TRANSITIONS` are the
whole machine: from a status, which statuses may follow. Terminal statuses have no way out.

Each transition carries a version (update time T ms, status rank, cumulative filled qty). A
transition applies only when the table allows it from the stored status AND its version is
newer than the stored one. Binance orders one order's events by T, so this refuses exactly the
duplicates (redelivery, a replay over live views, the frames both connections log during a
24-hour rotation) and anything older (a REST snapshot taken before the last event).

This module decides; it stores nothing. `OrdersProjection.apply(entry)` turns a raw:user entry
into `OrderWrite`/`AlgoOrderWrite` values (projections.core.orderwrites), each with the statuses it
may leave; the store's Lua script performs the check and the write atomically against what
Redis holds, so a projector restarted from any point, or two of them, end with the same views.
`apply_write(stored, write)` is the same rule in Python: the reference the Lua script is tested
against, and what the pure tests run.

Reconciliation: a `snapshot` entry (openOrders/openAlgoOrders) applies each listed order whose
REST updateTime is newer than the stored one (source "reconciliation"). An order the views hold
open that a full snapshot no longer lists is NOT closed here: the ingestor fetches its final
state and logs a `final_state` entry, which applies like any transition (an order the fold
never saw, found by the ingestor's search of an outage, starts from "" like any other). The
fold never guesses a final status: when the exchange itself no longer knows an order (GET
order -2013 and nothing in allOrders, see pipeline.reconcile), the ingestor logs a
`final_state` of kind `notFound`, and the order ends in the terminal status NO_LONGER_KNOWN,
versioned by the time of that lookup, with the fills userTrades still had (`z`, `ap`, `l`,
`L`) when it had any.

No single event may hold an order for ever (`projections.core.plausible`): an event or REST row
whose times (E, T, the order's T, updateTime) are later than its entry's receipt time plus
PIPELINE_MAX_CLOCK_AHEAD_S, whose ids are not integers in [0, 2^53), whose symbol is not
well-formed or whose prices and quantities are not decimal strings is poison (dead-lettered).
A stored state whose update time is ahead of the server's clock by more than the same bound
(written before these checks) is repaired: neither its version nor its status binds the next
transition (`apply_write(..., now_ms=...)`, orders.lua).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.keys import projection_name, user_key
from projections.core.orderwrites import (
    DEFAULT_ORDERS_MAX_AGE_S,
    DEFAULT_SYMBOL_MAXLEN,
    AlgoOrderWrite,
    OrderWrite,
    Version,
    script_payload,
)
from projections.core.outputs import Entry, Output, PoisonEntry, Unrecognized
from projections.core.plausible import Bounds, check_fields, present
from projections.core.userevents import (
    KNOWN_TYPES,
    AlgoFields,
    AlgoUpdate,
    BadEvent,
    OrderFields,
    OrderTradeUpdate,
    UnknownEvent,
    decode_frame,
    parse_user_event,
)

# NO_LONGER_KNOWN is ours, not Binance's: the exchange has forgotten the order (module doc)
NO_LONGER_KNOWN = "NO_LONGER_KNOWN"
_ORDER_TERMINAL = ("FILLED", "CANCELED", "EXPIRED", "EXPIRED_IN_MATCH", NO_LONGER_KNOWN)
_ALGO_TERMINAL = ("FINISHED", "CANCELED", "EXPIRED", "REJECTED", NO_LONGER_KNOWN)

# from status ("" = not seen yet) -> statuses that may follow
ORDER_TRANSITIONS: dict[str, frozenset[str]] = {
    "": frozenset({"NEW", "PARTIALLY_FILLED", *_ORDER_TERMINAL}),
    "NEW": frozenset({"NEW", "PARTIALLY_FILLED", *_ORDER_TERMINAL}),  # NEW->NEW: AMENDMENT
    "PARTIALLY_FILLED": frozenset({"PARTIALLY_FILLED", *_ORDER_TERMINAL}),
    **{s: frozenset() for s in _ORDER_TERMINAL},
}
ALGO_TRANSITIONS: dict[str, frozenset[str]] = {
    "": frozenset({"NEW", "TRIGGERING", "TRIGGERED", *_ALGO_TERMINAL}),
    "NEW": frozenset({"NEW", "TRIGGERING", "TRIGGERED", *_ALGO_TERMINAL}),
    "TRIGGERING": frozenset({"TRIGGERED", *_ALGO_TERMINAL}),
    "TRIGGERED": frozenset(_ALGO_TERMINAL),
    **{s: frozenset() for s in _ALGO_TERMINAL},
}
ORDER_RANK = {"NEW": 0, "PARTIALLY_FILLED": 1, **{s: 2 for s in _ORDER_TERMINAL}}
ALGO_RANK = {"NEW": 0, "TRIGGERING": 1, "TRIGGERED": 2, **{s: 3 for s in _ALGO_TERMINAL}}
# Listed by GET /fapi/v1/openOrders resp. openAlgoOrders. An algo order stays listed while
# TRIGGERED (its matching-engine order `ai` is working) and leaves when FINISHED: triggered and
# done.
OPEN_ORDER_STATUSES = frozenset({"NEW", "PARTIALLY_FILLED"})
OPEN_ALGO_STATUSES = frozenset({"NEW", "TRIGGERING", "TRIGGERED"})


def allowed_from(table: Mapping[str, frozenset[str]], status: str) -> tuple[str, ...]:
    """The stored statuses from which `status` may follow, per the transition table."""
    return tuple(sorted(src for src, nexts in table.items() if status in nexts))


# --- wire mappings: event `o` <-> REST rows ----------------------------------------------------

# openOrders / GET order row field <- ORDER_TRADE_UPDATE `o` field. cumQuote and time are
# filled by the store (sum of fills, creation time); activatePrice/priceRate only for trailing.
ORDER_REST_FROM_EVENT: dict[str, str] = {
    "avgPrice": "ap", "clientOrderId": "c", "executedQty": "z", "orderId": "i",
    "origQty": "q", "origType": "ot", "price": "p", "reduceOnly": "R", "side": "S",
    "positionSide": "ps", "status": "X", "stopPrice": "sp", "closePosition": "cp",
    "symbol": "s", "timeInForce": "f", "type": "o", "updateTime": "T", "workingType": "wt",
    "priceProtect": "pP", "priceMatch": "pm", "selfTradePreventionMode": "V",
    "goodTillDate": "gtd",
}
_TRAILING_REST = {"activatePrice": "AP", "priceRate": "cr"}

# openAlgoOrders / GET algoOrder row field <- ALGO_UPDATE `o` field; createTime by the store.
ALGO_REST_FROM_EVENT: dict[str, str] = {
    "algoId": "aid", "clientAlgoId": "caid", "algoType": "at", "orderType": "o",
    "symbol": "s", "side": "S", "positionSide": "ps", "timeInForce": "f", "quantity": "q",
    "algoStatus": "X", "actualOrderId": "ai", "actualPrice": "ap", "triggerPrice": "tp",
    "price": "p", "selfTradePreventionMode": "V", "workingType": "wt", "priceMatch": "pm",
    "closePosition": "cp", "priceProtect": "pP", "reduceOnly": "R", "triggerTime": "tt",
    "goodTillDate": "gtd", "actualQty": "aq",
}


def order_rest_row(o: Mapping[str, Any]) -> dict[str, Any]:
    """The openOrders row for event fields `o` (without cumQuote and time)."""
    row = {rest: o[ev] for rest, ev in ORDER_REST_FROM_EVENT.items() if ev in o}
    if o.get("o") == "TRAILING_STOP_MARKET" or o.get("ot") == "TRAILING_STOP_MARKET":
        row.update({rest: o[ev] for rest, ev in _TRAILING_REST.items() if ev in o})
    return row


# In every openAlgoOrders row but not in ALGO_UPDATE: what a CONDITIONAL order has there (a
# value a snapshot gave for the same order is kept over these: the store merges rows).
# Binance's 2026-06-09 shape: `actualType` and `actualQty` (the triggered order's type and
# executed quantity), no tp/sl trigger and price fields.
ALGO_REST_DEFAULTS: dict[str, Any] = {"icebergQuantity": None, "actualType": "", "actualQty": "0"}


def algo_rest_row(o: Mapping[str, Any], update_time: int) -> dict[str, Any]:
    """The openAlgoOrders row for event fields `o` (without createTime). ALGO_UPDATE's `act`
    is "0" before the trigger, where REST's `actualType` is ""."""
    row = {**ALGO_REST_DEFAULTS,
           **{rest: o[ev] for rest, ev in ALGO_REST_FROM_EVENT.items() if ev in o},
           "updateTime": update_time}
    act = o.get("act")
    if act not in (None, "0", 0):
        row["actualType"] = act
    return row


def order_fields_from_rest(row: Mapping[str, Any]) -> dict[str, Any]:
    """A REST order row in `o` names (the state keeps Binance's event names)."""
    return {ev: row[rest] for rest, ev in {**ORDER_REST_FROM_EVENT, **_TRAILING_REST}.items()
            if rest in row}


def algo_fields_from_rest(row: Mapping[str, Any]) -> dict[str, Any]:
    return {ev: row[rest] for rest, ev in ALGO_REST_FROM_EVENT.items() if rest in row}


def dec_str(d: Decimal) -> str:
    """Binance's REST number format, which the Lua script's dec_add produces too: plain
    notation, no trailing zeros, "0" for zero."""
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def _dec(s: Any) -> Decimal:
    try:
        return Decimal(str(s))
    except InvalidOperation:
        raise PoisonEntry(f"not a decimal: {s!r}") from None


# --- transitions ------------------------------------------------------------------------------

@attrs.frozen
class OrderSettings:
    """Where and how the writes go; the same for every write of one projection."""

    prefix: str = "websocket"
    symbol_maxlen: int = DEFAULT_SYMBOL_MAXLEN
    orders_max_age_s: float = DEFAULT_ORDERS_MAX_AGE_S
    account: str | None = None  # the account label whose keys the writes go to


def order_write_from_event(ev: OrderTradeUpdate, cfg: OrderSettings) -> OrderWrite | None:
    """The transition an ORDER_TRADE_UPDATE asks for; None for a status this version does not
    know (logged and counted by the caller)."""
    o, raw = ev.order, ev.order.raw
    if o.status not in ORDER_RANK:
        return None
    filled = _dec(o.last_filled_qty)
    quote = filled * _dec(o.last_filled_price) if filled else Decimal(0)
    return OrderWrite(
        prefix=cfg.prefix, symbol=o.symbol, order_id=o.order_id, status=o.status,
        version=(o.update_time, ORDER_RANK[o.status], o.filled_qty),
        allowed_from=allowed_from(ORDER_TRANSITIONS, o.status), fields=dict(raw),
        rest=order_rest_row(raw) if o.status in OPEN_ORDER_STATUSES else None,
        quote_add=dec_str(quote), profit_add=dec_str(_dec(o.realized_profit)),
        created_ms=o.update_time if o.execution_type == "NEW" else 0,
        symbol_maxlen=cfg.symbol_maxlen, orders_max_age_s=cfg.orders_max_age_s, account=cfg.account)


def algo_write_from_event(ev: AlgoUpdate, cfg: OrderSettings) -> AlgoOrderWrite | None:
    o, raw = ev.order, ev.order.raw
    if o.status not in ALGO_RANK:
        return None
    return AlgoOrderWrite(
        prefix=cfg.prefix, symbol=o.symbol, algo_id=o.algo_id, status=o.status,
        version=(ev.transaction_time, ALGO_RANK[o.status], "0"),
        allowed_from=allowed_from(ALGO_TRANSITIONS, o.status),
        fields=dict(raw),
        rest=algo_rest_row(raw, ev.transaction_time) if o.status in OPEN_ALGO_STATUSES else None,
        created_ms=ev.transaction_time if o.status == "NEW" else 0,
        symbol_maxlen=cfg.symbol_maxlen, orders_max_age_s=cfg.orders_max_age_s, account=cfg.account)


def order_write_from_rest(row: Mapping[str, Any], cfg: OrderSettings) -> OrderWrite | None:
    """A reconciliation transition from an openOrders row or a GET order answer."""
    try:
        status, symbol, order_id = row["status"], row["symbol"], int(row["orderId"])
        update_time = int(row["updateTime"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEntry(f"REST order row without {exc}") from None
    if status not in ORDER_RANK:
        return None
    rest = {k: v for k, v in row.items() if k not in ("cumQuote", "time")}
    return OrderWrite(
        prefix=cfg.prefix, symbol=symbol, order_id=order_id, status=status,
        version=(update_time, ORDER_RANK[status], str(row.get("executedQty", "0"))),
        allowed_from=allowed_from(ORDER_TRANSITIONS, status),
        fields=order_fields_from_rest(row),
        rest=rest if status in OPEN_ORDER_STATUSES else None, source="reconciliation",
        quote_set=str(row["cumQuote"]) if "cumQuote" in row else None,
        created_ms=int(row.get("time") or 0),
        symbol_maxlen=cfg.symbol_maxlen, orders_max_age_s=cfg.orders_max_age_s, account=cfg.account)


def algo_write_from_rest(row: Mapping[str, Any], cfg: OrderSettings) -> AlgoOrderWrite | None:
    try:
        status, symbol, algo_id = row["algoStatus"], row["symbol"], int(row["algoId"])
        update_time = int(row["updateTime"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEntry(f"REST algo order row without {exc}") from None
    if status not in ALGO_RANK:
        return None
    rest = {k: v for k, v in row.items() if k != "createTime"}
    return AlgoOrderWrite(
        prefix=cfg.prefix, symbol=symbol, algo_id=algo_id, status=status,
        version=(update_time, ALGO_RANK[status], "0"),
        allowed_from=allowed_from(ALGO_TRANSITIONS, status),
        fields=algo_fields_from_rest(row),
        rest=rest if status in OPEN_ALGO_STATUSES else None, source="reconciliation",
        created_ms=int(row.get("createTime") or 0),
        symbol_maxlen=cfg.symbol_maxlen, orders_max_age_s=cfg.orders_max_age_s, account=cfg.account)


def not_found_write(body: Mapping[str, Any], cfg: OrderSettings
                    ) -> OrderWrite | AlgoOrderWrite:
    """The terminal NO_LONGER_KNOWN transition of a `final_state` entry of kind `notFound`."""
    try:
        of, symbol, ident = body["of"], str(body["symbol"]), int(body["id"])
        at = int(body["fetched_at_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEntry(f"notFound entry without {exc}") from None
    if of == "algoOrder":
        return AlgoOrderWrite(
            prefix=cfg.prefix, symbol=symbol, algo_id=ident, status=NO_LONGER_KNOWN,
            version=(at, ALGO_RANK[NO_LONGER_KNOWN], "0"),
            allowed_from=allowed_from(ALGO_TRANSITIONS, NO_LONGER_KNOWN),
            fields={"X": NO_LONGER_KNOWN}, rest=None, source="reconciliation",
            symbol_maxlen=cfg.symbol_maxlen, orders_max_age_s=cfg.orders_max_age_s,
            account=cfg.account)
    fields = {"X": NO_LONGER_KNOWN, **fills_of(body.get("trades"))}
    return OrderWrite(
        prefix=cfg.prefix, symbol=symbol, order_id=ident, status=NO_LONGER_KNOWN,
        version=(at, ORDER_RANK[NO_LONGER_KNOWN], str(fields.get("z", "0"))),
        allowed_from=allowed_from(ORDER_TRANSITIONS, NO_LONGER_KNOWN), fields=fields,
        rest=None, source="reconciliation", symbol_maxlen=cfg.symbol_maxlen,
        orders_max_age_s=cfg.orders_max_age_s, account=cfg.account)


def fills_of(trades: Any) -> dict[str, str]:
    """`z`, `ap`, `l`, `L` from userTrades rows (in trade id order); {} without any."""
    rows = sorted((t for t in trades if isinstance(t, dict)) if isinstance(trades, list) else (),
                  key=lambda t: int(t.get("id", 0)))
    if not rows:
        return {}
    qty = sum((_dec(t.get("qty")) for t in rows), Decimal(0))
    quote = sum((_dec(t.get("qty")) * _dec(t.get("price")) for t in rows), Decimal(0))
    return {"z": dec_str(qty), "ap": dec_str(quote / qty) if qty else "0",
            "l": str(rows[-1].get("qty")), "L": str(rows[-1].get("price"))}


# --- plausibility: what an event or a REST row must be to be applied -------------------------

# fields the state or the open-orders row keeps, when the event has them
_ORDER_DECIMALS = ("q", "p", "ap", "sp", "l", "z", "L", "rp")
_ALGO_DECIMALS = ("q", "p", "tp", "ap")
_ORDER_ROW_DECIMALS = ("origQty", "price", "avgPrice", "stopPrice", "executedQty", "cumQuote")
_ALGO_ROW_DECIMALS = ("quantity", "price", "triggerPrice", "actualPrice")


def implausible_event(ev: OrderTradeUpdate | AlgoUpdate, limit_ms: int) -> str | None:
    """Why an ORDER_TRADE_UPDATE or ALGO_UPDATE must not be applied, or None;
    `limit_ms` is its entry's receipt time + PIPELINE_MAX_CLOCK_AHEAD_S."""
    times = [("E", ev.event_time), ("T", ev.transaction_time)]
    o, raw = ev.order, ev.order.raw
    if isinstance(ev, OrderTradeUpdate):
        assert isinstance(o, OrderFields)
        return check_fields("ORDER_TRADE_UPDATE", limit_ms, symbols=[("o.s", o.symbol)],
                            ids=[("o.i", o.order_id)], times=[*times, ("o.T", o.update_time)],
                            decimals=present(raw, _ORDER_DECIMALS))
    assert isinstance(o, AlgoFields)
    return check_fields("ALGO_UPDATE", limit_ms, symbols=[("o.s", o.symbol)],
                        ids=[("o.aid", o.algo_id)], times=times,
                        counts=present(raw, ("tt",)), decimals=present(raw, _ALGO_DECIMALS))


def implausible_row(row: Mapping[str, Any], orders: bool, limit_ms: int) -> str | None:
    """Why a REST order (`orders`) or algo-order row must not be applied, or None."""
    if orders:
        return check_fields("REST order", limit_ms, symbols=[("symbol", row.get("symbol"))],
                            ids=[("orderId", row.get("orderId"))],
                            times=[("updateTime", row.get("updateTime"))],
                            counts=present(row, ("time",)),
                            decimals=present(row, _ORDER_ROW_DECIMALS))
    return check_fields("REST algo order", limit_ms, symbols=[("symbol", row.get("symbol"))],
                        ids=[("algoId", row.get("algoId"))],
                        times=[("updateTime", row.get("updateTime"))],
                        counts=present(row, ("createTime", "triggerTime")),
                        decimals=present(row, _ALGO_ROW_DECIMALS))


# --- the reference of orders.lua --------------------------------------------------------------

def _newer(v: Version | list[Any], old: Version | list[Any]) -> bool:
    if v[0] != old[0]:
        return bool(v[0] > old[0])
    if v[1] != old[1]:
        return bool(v[1] > old[1])
    return Decimal(str(v[2])) > Decimal(str(old[2]))


def apply_write(stored: Mapping[str, Any] | None, write: OrderWrite | AlgoOrderWrite,
                stored_row: Mapping[str, Any] | None = None, *, now_ms: int | None = None,
                max_ahead_ms: int = Bounds().max_ahead_ms,
                ) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """What orders.lua does, in Python: (new state, open-orders row or None for closed), or
    None when the transition is refused. States are the JSON objects the store keeps;
    `stored_row` is the open-orders row held for the order (its fields outlive a write that
    does not name them). `now_ms` (the server's clock; None: never) with `max_ahead_ms`: a
    stored state whose update time is further ahead is repaired, not obeyed."""
    w = script_payload(write)
    if stored is not None and now_ms is not None and \
            stored["version"][0] > now_ms + max_ahead_ms:
        stored = {**stored, "status": ""}  # its status and version bind nothing
    if (stored["status"] if stored else "") not in w["allowed_from"]:
        return None
    if stored is not None and stored["status"] and not _newer(w["version"], stored["version"]):
        return None
    fields = {**(stored["o"] if stored else {}), **w["fields"]}
    created = w["created_ms"] or (stored or {}).get("created_time") or w["version"][0]
    state: dict[str, Any] = {
        "symbol": w["symbol"], "status": w["status"], "o": fields,
        "update_time": w["version"][0], "created_time": created, "version": w["version"],
        "source": w["source"]}
    row = {**(stored_row or {}), **w["rest"]} if w["rest"] is not None else None
    if w["kind"] == "order":
        held = stored or {}
        quote = (w["quote_set"] if w["quote_set"] is not None
                 else dec_str(Decimal(held.get("cum_quote", "0")) + Decimal(w["quote_add"])))
        state.update(order_id=w["id"], cum_quote=quote,
                     realized_profit=dec_str(Decimal(held.get("realized_profit", "0"))
                                             + Decimal(w["profit_add"])),
                     cum_filled=fields.get("z", "0"), avg_price=fields.get("ap", "0"))
        if row is not None:
            row.update(cumQuote=state["cum_quote"], time=created)
    else:
        state.update(algo_id=w["id"], actual_order_id=fields.get("ai", ""))
        if row is not None:
            row["createTime"] = created
    return state, row


# --- the projection ---------------------------------------------------------------------------

def _rows(response: Any) -> list[Mapping[str, Any]]:
    if isinstance(response, dict) and isinstance(response.get("orders"), list):
        response = response["orders"]
    if not isinstance(response, list) or not all(isinstance(r, dict) for r in response):
        raise PoisonEntry("snapshot response is not a list of orders")
    return response


_FOLDED = ("ORDER_TRADE_UPDATE", "ALGO_UPDATE")


class OrdersProjection:
    """Folds raw:user into order and algo-order writes (see the theory of operation above).

    Exclusive: two consumers sharing raw:user would each get some entries, and one could apply
    a later transition of an order before the other applies the earlier one, which the store
    then refuses as older: the listener would miss that step. One consumer applies the log in
    order. The fold itself keeps no state: the store holds it.

    `account`: the account label whose log (`raw:user:{label}`) it folds into that account's
    keys, as `orders@{label}` (`projections.core.keys`); None: `raw:user`, `orders`.
    """

    exclusive = True

    def __init__(self, prefix: str = "websocket", *,
                 symbol_maxlen: int = DEFAULT_SYMBOL_MAXLEN,
                 orders_max_age_s: float = DEFAULT_ORDERS_MAX_AGE_S,
                 bounds: Bounds | None = None, account: str | None = None,
                 **_unused: object) -> None:
        self.name = projection_name("orders", account)
        self.sources = (user_key(account),)
        self.cfg = OrderSettings(prefix, symbol_maxlen, orders_max_age_s, account)
        self.bounds = bounds or Bounds()

    def apply(self, entry: Entry) -> Iterable[Output]:
        if isinstance(entry, FrameEntry):
            return self._frame(entry)
        if isinstance(entry, ControlEntry):
            return self._control(entry)
        return []

    def _frame(self, entry: FrameEntry) -> list[Output]:
        try:
            payload = decode_frame(entry.frame)
            etype = payload.get("e")
            if etype in KNOWN_TYPES and etype not in _FOLDED:
                return []  # the account projection's, or nothing to fold
            event = parse_user_event(payload)
        except BadEvent as exc:
            raise PoisonEntry(str(exc)) from None
        if isinstance(event, OrderTradeUpdate | AlgoUpdate):
            why = implausible_event(event, self.bounds.time_limit_ms(entry.recv_ts))
            if why is not None:
                raise PoisonEntry(why)
        write: OrderWrite | AlgoOrderWrite | None
        if isinstance(event, OrderTradeUpdate):
            write = order_write_from_event(event, self.cfg)
            label = f"ORDER_TRADE_UPDATE:{event.order.status}"
        elif isinstance(event, AlgoUpdate):
            write = algo_write_from_event(event, self.cfg)
            label = f"ALGO_UPDATE:{event.order.status}"
        else:
            if isinstance(event, UnknownEvent):
                return [Unrecognized(event.event_type or "(no e field)")]
            return []
        if write is None:  # a status this version does not know
            return [Unrecognized(label)]
        return [write]

    def _control(self, entry: ControlEntry) -> list[Output]:
        body = entry.body
        if entry.ctl not in ("snapshot", "final_state"):
            return []
        if not isinstance(body, dict):
            raise PoisonEntry(f"{entry.ctl} entry without a JSON object body")
        kind, response = body.get("kind"), body.get("response")
        if entry.ctl == "snapshot" and kind in ("openOrders", "openAlgoOrders"):
            rows = _rows(response)
        elif entry.ctl == "final_state" and kind in ("order", "algoOrder"):
            if not isinstance(response, dict):
                raise PoisonEntry("final_state entry without an order object")
            rows = [response]
        elif entry.ctl == "final_state" and kind == "notFound":
            return [not_found_write(body, self.cfg)]
        else:
            return []
        orders = kind in ("openOrders", "order")
        limit_ms = self.bounds.time_limit_ms(entry.recv_ts)
        for row in rows:
            why = implausible_row(row, orders, limit_ms)
            if why is not None:
                raise PoisonEntry(why)
        make = order_write_from_rest if orders else algo_write_from_rest
        writes = [make(row, self.cfg) for row in rows]
        return [w for w in writes if w is not None]


class InMemoryOrders:
    """The store's views held in dicts, performing writes with `apply_write`: what the pure
    tests fold into, and the reference the Redis store is compared with."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str, int], dict[str, Any]] = {}  # (kind, SYMBOL, id)
        self.open_rows: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.emitted: list[dict[str, Any]] = []  # what P:orders would carry, in order

    def perform(self, write: object) -> bool:
        if not isinstance(write, OrderWrite | AlgoOrderWrite):
            return False
        kind = "order" if isinstance(write, OrderWrite) else "algo"
        ident = write.order_id if isinstance(write, OrderWrite) else write.algo_id
        key = (kind, write.symbol, ident)
        result = apply_write(self.states.get(key), write, self.open_rows.get(key))
        if result is None:
            return False
        state, row = result
        self.states[key] = state
        if row is None:
            self.open_rows.pop(key, None)
        else:
            self.open_rows[key] = row
        self.emitted.append({"order_id": str(ident), "status": state["status"], "kind": kind,
                             "source": state["source"], "symbol": write.symbol, "data": state})
        return True

    def open_orders(self, kind: str = "order") -> list[dict[str, Any]]:
        return [row for (k, _, _), row in sorted(self.open_rows.items()) if k == kind]
