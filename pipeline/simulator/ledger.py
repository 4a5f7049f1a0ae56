"""The simulated account's books: orders, algo orders, positions, balances. Pure: no trio, no I/O.

Theory of operation
-------------------
A `Ledger` is the exchange's side of one USDⓈ-M futures account. Every operation (`place`,
`fill`, `cancel`, `expire`, `amend`, `trigger`, `funding`) takes the time it happens at (`now_ms`),
changes the books, and returns the user-data events Binance would push for it, in push order, as
plain dicts with Binance's field names. The shell (`account.py`) fans them out to the open
private-stream connections; the REST views (`rest_order`, `rest_algo_order`, `position_risk`,
`balances`) read the same books, so the stream and REST can never disagree.

Order kinds follow Binance since 2025-12: LIMIT and MARKET live in the matching engine and have an
`orderId`; the conditional kinds (STOP_MARKET, TAKE_PROFIT_MARKET, STOP, TAKE_PROFIT,
TRAILING_STOP_MARKET) live in the Algo service with an `algoId` and emit ALGO_UPDATE. Triggering
an algo order places a new matching-engine order whose id the algo order reports as `ai`
(`actualOrderId` over REST). The *_MARKET kinds fill at once; STOP and TAKE_PROFIT leave a LIMIT
order that fills through `fill`. When that order ends, the algo order becomes FINISHED.

Order state transitions (anything else is refused with a `LedgerError`):

    status            fill (part)        fill (rest)   cancel     expire     amend
    NEW               PARTIALLY_FILLED   FILLED        CANCELED   EXPIRED    NEW
    PARTIALLY_FILLED  PARTIALLY_FILLED   FILLED        CANCELED   EXPIRED    PARTIALLY_FILLED

Algo order transitions: NEW -> CANCELED | EXPIRED | TRIGGERING -> TRIGGERED -> FINISHED, and
TRIGGERING -> REJECTED; a trailing stop may go NEW -> NEW (activated) first.

A rejected trigger (`reject_trigger`) goes NEW -> TRIGGERING -> REJECTED, with the matching
engine's reason in `rm`; a TRAILING_STOP_MARKET order is first NEW with `ia` false, and `activate`
pushes it NEW again with `ia` true (Binance, 2026-08-21), before its trigger.

Besides the orders the books keep every trade (`trades`, for GET /fapi/v1/userTrades), the
leverage per symbol (`set_leverage`: ACCOUNT_CONFIG_UPDATE `ac`) and the Multi-Assets mode
(`set_multi_assets`: `ai`). `margin_call` reports the open positions as MARGIN_CALL does.
Which orders and trades REST still finds after days is `history.py`'s.

Numbers are Decimals inside and strings on the wire (normalised, no exponent), one formatter for
both the stream and REST. Fees: maker 0.02 %, taker 0.05 %, charged in USDT. Margin is cross at
20x unless `set_leverage` changed a symbol's; liquidation price and margins are simple
estimates, good enough to be plausible.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs

from pipeline.simulator import wire

Event = dict[str, Any]

MARKET_KINDS = frozenset({"LIMIT", "MARKET"})
ALGO_KINDS = frozenset({"STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT",
                        "TRAILING_STOP_MARKET"})
OPEN = frozenset({"NEW", "PARTIALLY_FILLED"})
TRAILING = "TRAILING_STOP_MARKET"
DEFAULT_LEVERAGE = 20
MAX_LEVERAGE = 125
ALGO_OPEN = frozenset({"NEW", "TRIGGERING", "TRIGGERED"})
MAKER_FEE = Decimal("0.0002")
TAKER_FEE = Decimal("0.0005")
ZERO = Decimal(0)
START_BALANCES = {"USDT": Decimal("10000"), "USDC": ZERO, "BNB": ZERO}
# Plausible starting marks; a symbol not listed starts at 100.
BASE_PRICES = {"BTCUSDT": Decimal("60000"), "ETHUSDT": Decimal("3000"),
               "SOLUSDT": Decimal("150"), "BNBUSDT": Decimal("600")}


class LedgerError(Exception):
    """A refused operation, with Binance's error code and message (answered as HTTP 400)."""

    def __init__(self, code: int, msg: str) -> None:
        self.code = code
        self.msg = msg
        super().__init__(f"{code}: {msg}")


def dec(value: object, name: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise LedgerError(-1102, f"Parameter '{name}' was malformed.") from None
    if not result.is_finite() or result < 0:
        raise LedgerError(-1102, f"Parameter '{name}' was malformed.")
    return result


@attrs.frozen
class Order:
    """A matching-engine order, as the books hold it."""

    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    orig_type: str
    quantity: Decimal
    price: Decimal
    stop_price: Decimal
    position_side: str
    reduce_only: bool
    time: int
    update_time: int
    time_in_force: str = "GTC"
    status: str = "NEW"
    executed: Decimal = ZERO
    cum_quote: Decimal = ZERO
    realized: Decimal = ZERO
    algo_id: int | None = None
    amendment_id: int = 0  # of the last AMENDMENT (`M`); 0 while never amended
    callback_rate: Decimal = ZERO  # trailing stops only (`cr`), copied from the algo order
    activate_price: Decimal = ZERO  # trailing stops only (`AP`)

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.executed if self.executed else ZERO

    @property
    def remaining(self) -> Decimal:
        return self.quantity - self.executed


@attrs.frozen
class AlgoOrder:
    """A conditional order in the Algo service."""

    algo_id: int
    client_algo_id: str
    symbol: str
    side: str
    order_type: str
    quantity: Decimal
    trigger_price: Decimal
    price: Decimal
    position_side: str
    reduce_only: bool
    close_position: bool
    create_time: int
    update_time: int
    time_in_force: str = "GTC"
    status: str = "NEW"
    actual_order_id: int | None = None
    trigger_time: int = 0
    callback_rate: Decimal = ZERO
    activate_price: Decimal = ZERO
    activated: bool = False  # `ia`: a trailing stop whose activation price was reached
    reject_reason: str = ""  # `rm`


@attrs.frozen
class Position:
    symbol: str
    position_side: str
    amount: Decimal = ZERO  # signed: negative is short
    entry_price: Decimal = ZERO
    realized: Decimal = ZERO  # accumulated, before fees
    update_time: int = 0


@attrs.frozen
class Fill:
    """One trade against an order: what the events of a fill carry."""

    trade_id: int
    quantity: Decimal
    price: Decimal
    commission: Decimal
    realized: Decimal
    maker: bool


@attrs.frozen
class Trade:
    """One fill as GET /fapi/v1/userTrades reports it."""

    trade_id: int
    order_id: int
    symbol: str
    side: str
    position_side: str
    price: Decimal
    quantity: Decimal
    commission: Decimal
    realized: Decimal
    maker: bool
    time: int


def apply_trade(pos: Position, signed_qty: Decimal, price: Decimal,
                now_ms: int) -> tuple[Position, Decimal]:
    """The position after a trade of `signed_qty` (BUY > 0) at `price`, and the realised PnL."""
    amt = pos.amount
    if amt == 0 or (amt > 0) == (signed_qty > 0):
        new_amt = amt + signed_qty
        entry = (abs(amt) * pos.entry_price + abs(signed_qty) * price) / abs(new_amt)
        return attrs.evolve(pos, amount=new_amt, entry_price=entry, update_time=now_ms), ZERO
    closing = min(abs(amt), abs(signed_qty))
    direction = 1 if amt > 0 else -1
    pnl = closing * (price - pos.entry_price) * direction
    new_amt = amt + signed_qty
    if new_amt == 0:
        entry = ZERO
    elif (new_amt > 0) == (amt > 0):
        entry = pos.entry_price
    else:  # flipped: the rest opens a new position at the trade price
        entry = price
    return attrs.evolve(pos, amount=new_amt, entry_price=entry, realized=pos.realized + pnl,
                        update_time=now_ms), pnl


@attrs.define
class Ledger:
    """The books of one account; every operation returns the events it pushes (see module doc)."""

    symbols: tuple[str, ...]
    hedge_mode: bool = False
    orders: dict[int, Order] = attrs.Factory(dict)
    algos: dict[int, AlgoOrder] = attrs.Factory(dict)
    positions: dict[tuple[str, str], Position] = attrs.Factory(dict)
    balances: dict[str, Decimal] = attrs.Factory(lambda: dict(START_BALANCES))
    marks: dict[str, Decimal] = attrs.Factory(dict)  # last trade price per symbol
    pinned: dict[str, Decimal] = attrs.Factory(dict)  # set by the `mark` control: wins
    # The market side's price (e.g. the simulated book's mid), when the server wires it in.
    mark_source: Callable[[str], Decimal | None] | None = None
    trades: list[Trade] = attrs.Factory(list)
    leverage: dict[str, int] = attrs.Factory(dict)  # symbols not in it are at DEFAULT_LEVERAGE
    multi_assets: bool = False
    next_order_id: int = 8_389_765_001
    next_algo_id: int = 4_000_000_001
    next_trade_id: int = 1_000_001
    next_amendment_id: int = 5_363_001

    # ---- reading -------------------------------------------------------------------------
    def mark(self, symbol: str) -> Decimal:
        """Pinned by a test, else the market's price, else the last trade, else a base price."""
        if symbol in self.pinned:
            return self.pinned[symbol]
        market = self.mark_source(symbol) if self.mark_source else None
        return market or self.marks.get(symbol) or BASE_PRICES.get(symbol, Decimal(100))

    def leverage_of(self, symbol: str) -> int:
        return self.leverage.get(symbol, DEFAULT_LEVERAGE)

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        return [o for o in self.orders.values()
                if o.status in OPEN and symbol in (None, o.symbol)]

    def open_algos(self, symbol: str | None = None) -> list[AlgoOrder]:
        return [a for a in self.algos.values()
                if a.status in ALGO_OPEN and symbol in (None, a.symbol)]

    def find_order(self, order_id: str | None, client_id: str | None) -> Order:
        for order in self.orders.values():
            if (order_id and str(order.order_id) == order_id) or (
                    client_id and order.client_order_id == client_id):
                return order
        raise LedgerError(-2013, "Order does not exist.")

    def find_algo(self, algo_id: str | None, client_id: str | None) -> AlgoOrder:
        for algo in self.algos.values():
            if (algo_id and str(algo.algo_id) == algo_id) or (
                    client_id and algo.client_algo_id == client_id):
                return algo
        raise LedgerError(-2013, "Order does not exist.")

    def linked_order(self, algo: AlgoOrder) -> Order | None:
        return self.orders.get(algo.actual_order_id) if algo.actual_order_id else None

    def open_notional(self, symbol: str) -> tuple[Decimal, Decimal]:
        """(bid, ask) notional of the symbol's open orders: `b`/`a` of ORDER_TRADE_UPDATE."""
        bid = sum((o.price * o.remaining for o in self.open_orders(symbol) if o.side == "BUY"),
                  ZERO)
        ask = sum((o.price * o.remaining for o in self.open_orders(symbol) if o.side == "SELL"),
                  ZERO)
        return bid, ask

    def position(self, symbol: str, side: str) -> Position:
        return self.positions.get((symbol, side)) or Position(symbol, side)

    def position_sides(self) -> tuple[str, ...]:
        return ("LONG", "SHORT") if self.hedge_mode else ("BOTH",)

    def risk_symbols(self) -> list[str]:
        """Symbols positionRisk v3 reports: a position, or an open (algo) order, on them."""
        active = {s for (s, _), p in self.positions.items() if p.amount}
        active |= {o.symbol for o in self.open_orders()} | {a.symbol for a in self.open_algos()}
        return [s for s in self.symbols if s in active] + sorted(active - set(self.symbols))

    def unrealized_total(self) -> Decimal:
        return sum((wire.unrealized(p, self.mark(p.symbol)) for p in self.positions.values()),
                   ZERO)

    # ---- placing ---------------------------------------------------------------------------
    def place(self, req: PlaceRequest, now_ms: int) -> tuple[list[Event], Order | AlgoOrder]:
        self._check_place(req)
        side = req.position_side or "BOTH"
        if req.type in ALGO_KINDS:
            algo = AlgoOrder(
                algo_id=self._algo_id(), client_algo_id=req.client_id or "",
                symbol=req.symbol, side=req.side, order_type=req.type,
                quantity=req.quantity, trigger_price=req.trigger_price, price=req.price,
                position_side=side, reduce_only=req.reduce_only,
                close_position=req.close_position, create_time=now_ms, update_time=now_ms,
                time_in_force=req.time_in_force, callback_rate=req.callback_rate,
                activate_price=req.activate_price)
            if not algo.client_algo_id:
                algo = attrs.evolve(algo, client_algo_id=f"simalgo{algo.algo_id}")
            self.algos[algo.algo_id] = algo
            return [wire.algo_update(algo, now_ms)], algo
        order = Order(
            order_id=self._order_id(), client_order_id=req.client_id or "", symbol=req.symbol,
            side=req.side, type=req.type, orig_type=req.type, quantity=req.quantity,
            price=req.price if req.type == "LIMIT" else ZERO, stop_price=ZERO,
            position_side=side, reduce_only=req.reduce_only, time=now_ms, update_time=now_ms,
            time_in_force=req.time_in_force if req.type == "LIMIT" else "GTC")
        if not order.client_order_id:
            order = attrs.evolve(order, client_order_id=f"simorder{order.order_id}")
        return self._enter(order, now_ms)

    def _enter(self, order: Order, now_ms: int) -> tuple[list[Event], Order]:
        """Put `order` in the matching engine; a MARKET order fills at once at the mark."""
        self.orders[order.order_id] = order
        events = [self._otu(order, "NEW", None, now_ms)]
        if order.type == "MARKET":
            events += self.fill(order.order_id, None, None, now_ms)[0]
        return events, self.orders[order.order_id]

    def _check_place(self, req: PlaceRequest) -> None:
        if req.symbol not in self.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        if req.side not in ("BUY", "SELL"):
            raise LedgerError(-1117, "Invalid side.")
        if req.type not in MARKET_KINDS | ALGO_KINDS:
            raise LedgerError(-1116, "Invalid orderType.")
        if req.quantity <= 0:
            raise LedgerError(-4003, "Quantity less than or equal to zero.")
        if req.type in ("LIMIT", "STOP", "TAKE_PROFIT") and req.price <= 0:
            raise LedgerError(-1102, "Mandatory parameter 'price' was not sent, was empty/null,"
                                     " or malformed.")
        if req.type in ALGO_KINDS - {"TRAILING_STOP_MARKET"} and req.trigger_price <= 0:
            raise LedgerError(-1102, "Mandatory parameter 'triggerPrice' was not sent, was "
                                     "empty/null, or malformed.")
        if (req.position_side or "BOTH") not in self.position_sides():
            raise LedgerError(-4061, "Order's position side does not match user's setting.")

    # ---- filling ---------------------------------------------------------------------------
    def fill(self, order_id: int, quantity: Decimal | None, price: Decimal | None,
             now_ms: int) -> tuple[list[Event], Order]:
        """A trade of `quantity` (default: all that remains) at `price` (default: order's/mark)."""
        order = self._open_order(order_id)
        qty = order.remaining if quantity is None else quantity
        if qty <= 0 or qty > order.remaining:
            raise LedgerError(-4003, "Fill quantity must be > 0 and <= "
                                     f"{wire.fmt(order.remaining)}.")
        px = price or (order.price if order.type == "LIMIT" else self.mark(order.symbol))
        maker = order.type == "LIMIT"
        signed = qty if order.side == "BUY" else -qty
        pos, pnl = apply_trade(self.position(order.symbol, order.position_side), signed, px,
                               now_ms)
        self.positions[(order.symbol, order.position_side)] = pos
        self.marks[order.symbol] = px
        commission = qty * px * (MAKER_FEE if maker else TAKER_FEE)
        self.balances["USDT"] += pnl - commission
        fill = Fill(self._trade_id(), qty, px, commission, pnl, maker)
        self.trades.append(Trade(fill.trade_id, order.order_id, order.symbol, order.side,
                                 order.position_side, px, qty, commission, pnl, maker, now_ms))
        executed = order.executed + qty
        order = attrs.evolve(
            order, executed=executed, cum_quote=order.cum_quote + qty * px,
            realized=order.realized + pnl, update_time=now_ms,
            status="FILLED" if executed == order.quantity else "PARTIALLY_FILLED")
        self.orders[order.order_id] = order
        events = [
            self._otu(order, "TRADE", fill, now_ms),
            wire.account_update("ORDER", [("USDT", self.balances["USDT"], ZERO)],
                                [wire.position_entry(pos, px)], now_ms),
            wire.trade_lite(order, fill, now_ms),
        ]
        return events + self._finish_algo(order, now_ms), order

    def _open_order(self, order_id: int) -> Order:
        order = self.orders.get(order_id)
        if order is None:
            raise LedgerError(-2013, "Order does not exist.")
        if order.status not in OPEN:
            raise LedgerError(-2011, f"Order is {order.status}, not open.")
        return order

    def _finish_algo(self, order: Order, now_ms: int) -> list[Event]:
        """The algo order that placed `order` is FINISHED once `order` is no longer open."""
        if order.algo_id is None or order.status in OPEN:
            return []
        algo = attrs.evolve(self.algos[order.algo_id], status="FINISHED", update_time=now_ms)
        self.algos[algo.algo_id] = algo
        return [wire.algo_update(algo, now_ms, order)]

    # ---- ending and changing -----------------------------------------------------------------
    def end_order(self, order_id: int, status: str, now_ms: int) -> tuple[list[Event], Order]:
        """Cancel (status CANCELED) or expire (EXPIRED) an open order."""
        order = attrs.evolve(self._open_order(order_id), status=status, update_time=now_ms)
        self.orders[order_id] = order
        return [self._otu(order, status, None, now_ms), *self._finish_algo(order, now_ms)], order

    def end_algo(self, algo_id: int, status: str, now_ms: int) -> tuple[list[Event], AlgoOrder]:
        algo = attrs.evolve(self._new_algo(algo_id), status=status, update_time=now_ms)
        self.algos[algo_id] = algo
        return [wire.algo_update(algo, now_ms)], algo

    def amend(self, order_id: int, price: Decimal | None, quantity: Decimal | None,
              now_ms: int) -> tuple[list[Event], Order]:
        order = self._open_order(order_id)
        if order.type != "LIMIT":
            raise LedgerError(-2027, "Only LIMIT orders can be modified.")
        new_qty = order.quantity if quantity is None else quantity
        if new_qty <= order.executed:
            raise LedgerError(-4003, "Quantity must exceed the executed quantity.")
        self.next_amendment_id += 1
        order = attrs.evolve(order, price=price or order.price, quantity=new_qty,
                             update_time=now_ms, amendment_id=self.next_amendment_id - 1)
        self.orders[order_id] = order
        return [self._otu(order, "AMENDMENT", None, now_ms)], order

    def trigger(self, algo_id: int, price: Decimal | None,
                now_ms: int) -> tuple[list[Event], AlgoOrder]:
        """The trigger condition is met: TRIGGERING, TRIGGERED (with `ai`), the new order's
        events, and for the *_MARKET kinds its fill and FINISHED."""
        algo = self._new_algo(algo_id)
        px = price or algo.trigger_price or self.mark(algo.symbol)
        self.marks[algo.symbol] = px
        order_id = self._order_id()
        algo = attrs.evolve(algo, status="TRIGGERING", actual_order_id=order_id,
                            trigger_time=now_ms, update_time=now_ms)
        events = [wire.algo_update(algo, now_ms)]
        algo = attrs.evolve(algo, status="TRIGGERED")
        self.algos[algo_id] = algo
        events.append(wire.algo_update(algo, now_ms))
        limit = algo.order_type in ("STOP", "TAKE_PROFIT")
        order = Order(
            order_id=order_id, client_order_id=algo.client_algo_id, symbol=algo.symbol,
            side=algo.side, type="LIMIT" if limit else "MARKET", orig_type=algo.order_type,
            quantity=algo.quantity, price=algo.price if limit else ZERO,
            stop_price=algo.trigger_price, position_side=algo.position_side,
            reduce_only=algo.reduce_only, time=now_ms, update_time=now_ms, algo_id=algo_id,
            callback_rate=algo.callback_rate, activate_price=algo.activate_price)
        more, _ = self._enter(order, now_ms)
        return events + more, self.algos[algo_id]

    def reject_trigger(self, algo_id: int, reason: str, now_ms: int,
                       legacy_event: bool = False) -> tuple[list[Event], AlgoOrder]:
        """The trigger fires but the matching engine refuses the order: TRIGGERING, then
        REJECTED with the reason in `rm` (Binance since 2025-12-15). `legacy_event` also pushes
        the CONDITIONAL_ORDER_TRIGGER_REJECT that Binance deprecated then, between the two."""
        algo = self._new_algo(algo_id)
        order_id = self._order_id()
        algo = attrs.evolve(algo, status="TRIGGERING", actual_order_id=order_id,
                            trigger_time=now_ms, update_time=now_ms)
        events = [wire.algo_update(algo, now_ms)]
        if legacy_event:
            events.append(wire.conditional_order_trigger_reject(algo.symbol, order_id, reason,
                                                                now_ms))
        algo = attrs.evolve(algo, status="REJECTED", reject_reason=reason)
        self.algos[algo_id] = algo
        events.append(wire.algo_update(algo, now_ms))
        return events, algo

    def activate(self, algo_id: int, now_ms: int) -> tuple[list[Event], AlgoOrder]:
        """A trailing stop's activation price is reached: ALGO_UPDATE NEW again, `ia` true."""
        algo = self._new_algo(algo_id)
        if algo.order_type != TRAILING or algo.activated:
            raise LedgerError(-2011, "Only a TRAILING_STOP_MARKET order not yet activated can "
                                     "be activated.")
        algo = attrs.evolve(algo, activated=True, update_time=now_ms)
        self.algos[algo_id] = algo
        return [wire.algo_update(algo, now_ms)], algo

    def set_leverage(self, symbol: str, leverage: int, now_ms: int) -> list[Event]:
        """ACCOUNT_CONFIG_UPDATE with `ac`: the symbol's new initial leverage."""
        if symbol not in self.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        if not 1 <= leverage <= MAX_LEVERAGE:
            raise LedgerError(-4028, f"Leverage {leverage} is not valid")
        self.leverage[symbol] = leverage
        return [wire.account_config_leverage(symbol, leverage, now_ms)]

    def set_multi_assets(self, on: bool, now_ms: int) -> list[Event]:
        """ACCOUNT_CONFIG_UPDATE with `ai`: the Multi-Assets margin mode."""
        if on == self.multi_assets:
            raise LedgerError(-4171, "Adjusted asset mode is currently set and does not need "
                                     "to be adjusted repeatedly.")
        self.multi_assets = on
        return [wire.account_config_multi_assets(on, now_ms)]

    def margin_call(self, symbol: str | None, now_ms: int) -> list[Event]:
        """MARGIN_CALL listing the open positions (of `symbol`, or all)."""
        rows = [wire.margin_call_position(p, self.mark(p.symbol))
                for (s, _), p in sorted(self.positions.items())
                if p.amount and symbol in (None, s)]
        if not rows:
            raise LedgerError(-2013, "No open position to call margin on.")
        return [wire.margin_call(self.balances["USDT"], rows, now_ms)]

    def funding(self, symbol: str, amount: Decimal, now_ms: int) -> list[Event]:
        """A funding fee (negative: paid) booked to USDT: ACCOUNT_UPDATE reason FUNDING_FEE."""
        self.balances["USDT"] += amount
        return [wire.account_update("FUNDING_FEE", [("USDT", self.balances["USDT"], amount)],
                                    [], now_ms)]

    def set_hedge_mode(self, on: bool) -> None:
        if on == self.hedge_mode:
            return
        if any(p.amount for p in self.positions.values()):
            raise LedgerError(-4068, "Position side cannot be changed if there exists position.")
        if self.open_orders() or self.open_algos():
            raise LedgerError(-4067, "Position side cannot be changed if there exists open "
                                     "orders.")
        self.hedge_mode = on
        self.positions = {k: p for k, p in self.positions.items() if p.amount}

    # ---- helpers -------------------------------------------------------------------------------
    def _new_algo(self, algo_id: int) -> AlgoOrder:
        algo = self.algos.get(algo_id)
        if algo is None:
            raise LedgerError(-2013, "Order does not exist.")
        if algo.status != "NEW":
            raise LedgerError(-2011, f"Algo order is {algo.status}, not NEW.")
        return algo

    def _otu(self, order: Order, execution: str, fill: Fill | None, now_ms: int) -> Event:
        return wire.order_trade_update(order, execution, fill, now_ms,
                                       self.open_notional(order.symbol))

    def _order_id(self) -> int:
        self.next_order_id += 1
        return self.next_order_id - 1

    def _algo_id(self) -> int:
        self.next_algo_id += 1
        return self.next_algo_id - 1

    def _trade_id(self) -> int:
        self.next_trade_id += 1
        return self.next_trade_id - 1


@attrs.frozen
class PlaceRequest:
    """What `place` needs, parsed from the control API's JSON by `from_json`."""

    symbol: str
    side: str
    type: str
    quantity: Decimal
    price: Decimal = ZERO
    trigger_price: Decimal = ZERO
    position_side: str | None = None
    reduce_only: bool = False
    close_position: bool = False
    time_in_force: str = "GTC"
    client_id: str | None = None
    callback_rate: Decimal = ZERO
    activate_price: Decimal = ZERO

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PlaceRequest:
        def num(name: str, *aliases: str) -> Decimal:
            for key in (name, *aliases):
                if body.get(key) not in (None, ""):
                    return dec(body[key], key)
            return ZERO

        return cls(
            symbol=str(body.get("symbol", "")).upper(), side=str(body.get("side", "")).upper(),
            type=str(body.get("type", "")).upper(), quantity=num("quantity"),
            price=num("price"), trigger_price=num("triggerPrice", "stopPrice"),
            position_side=str(body["positionSide"]).upper() if body.get("positionSide")
            else None,
            reduce_only=_flag(body.get("reduceOnly")),
            close_position=_flag(body.get("closePosition")),
            time_in_force=str(body.get("timeInForce") or "GTC"),
            client_id=body.get("newClientOrderId") or body.get("clientOrderId")
            or body.get("clientAlgoId"),
            callback_rate=num("callbackRate"),
            activate_price=num("activatePrice", "activationPrice"))


def _flag(value: object) -> bool:
    return value is True or str(value).lower() == "true"
