"""The account's books in Binance's wire shapes: user-data events and REST answers. Pure.

One function per shape, named for it, so a reader can hold each next to Binance's documentation:
the ten user-data event types of 2026 (ORDER_TRADE_UPDATE, ALGO_UPDATE, ACCOUNT_UPDATE,
TRADE_LITE, MARGIN_CALL, ACCOUNT_CONFIG_UPDATE, STRATEGY_UPDATE, GRID_UPDATE,
CONDITIONAL_ORDER_TRIGGER_REJECT, listenKeyExpired); and the REST bodies of GET /fapi/v1/order
(also each item of openOrders and allOrders), /fapi/v1/algoOrder (also each item of
openAlgoOrders), /fapi/v1/userTrades, /fapi/v3/positionRisk, /fapi/v2/balance and
/fapi/v1/symbolConfig. Every number goes through `fmt`, the same on the stream and over REST.

2026 details: `AP` and `cr` are in ORDER_TRADE_UPDATE only for TRAILING_STOP_MARKET orders
(`o` or `ot`); an AMENDMENT carries the modification's id in `M`; ALGO_UPDATE carries `ia`
(a trailing stop's activation reached; false for the other kinds) and, for trailing stops, `cr`.
ACCOUNT_UPDATE balance rows are `a`, `wb`, `cw`, `bc` and nothing else, FUNDING_FEE included
(Binance's Event: Balance and Position Update); a funding fee on a cross position names no
position. GRID_UPDATE and CONDITIONAL_ORDER_TRIGGER_REJECT are marked deprecated by Binance and
are only sent when a control asks for them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.simulator.ledger import AlgoOrder, Fill, Order, Position, Trade

Event = dict[str, Any]
ZERO = Decimal(0)
TRAILING = "TRAILING_STOP_MARKET"
MAINT_RATE = Decimal("0.004")
TAKER_FEE = Decimal("0.0005")


def fmt(value: Decimal) -> str:
    """Decimal -> Binance-style string: no exponent, no trailing zeros, "0" for zero."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def order_trade_update(order: Order, execution: str, fill: Fill | None, event_ms: int,
                       notional: tuple[Decimal, Decimal]) -> Event:
    """ORDER_TRADE_UPDATE for `order` (its state after the change) with execution type `x`."""
    o = {
        "s": order.symbol, "c": order.client_order_id, "S": order.side, "o": order.type,
        "f": order.time_in_force, "q": fmt(order.quantity), "p": fmt(order.price),
        "ap": fmt(order.avg_price), "sp": fmt(order.stop_price), "x": execution,
        "X": order.status, "i": order.order_id,
        "l": fmt(fill.quantity) if fill else "0", "z": fmt(order.executed),
        "L": fmt(fill.price) if fill else "0", "n": fmt(fill.commission) if fill else "0",
        "N": "USDT", "T": event_ms, "t": fill.trade_id if fill else 0,
        "b": fmt(notional[0]), "a": fmt(notional[1]), "m": fill.maker if fill else False,
        "R": order.reduce_only, "wt": "CONTRACT_PRICE", "ot": order.orig_type,
        "ps": order.position_side, "cp": False,
        "pP": False, "si": 0, "ss": 0, "rp": fmt(fill.realized) if fill else "0",
        "V": "EXPIRE_MAKER", "pm": "NONE", "gtd": 0, "er": "0",
    }
    if TRAILING in (order.type, order.orig_type):
        o["AP"], o["cr"] = fmt(order.activate_price), fmt(order.callback_rate)
    if execution == "AMENDMENT":
        o["M"] = order.amendment_id
    return {"e": "ORDER_TRADE_UPDATE", "E": event_ms, "T": event_ms, "o": o}


def algo_update(algo: AlgoOrder, event_ms: int, filled: Order | None = None) -> Event:
    """ALGO_UPDATE for `algo`; `filled` is the order it triggered, for `ap`/`aq`."""
    o = {
        "caid": algo.client_algo_id, "aid": algo.algo_id, "at": "CONDITIONAL",
        "o": algo.order_type, "s": algo.symbol, "S": algo.side, "ps": algo.position_side,
        "f": algo.time_in_force, "q": fmt(algo.quantity), "X": algo.status,
        "ai": str(algo.actual_order_id) if algo.actual_order_id else "",
        "ap": fmt(filled.avg_price) if filled else "0",
        "aq": fmt(filled.executed) if filled else "0",
        "act": filled.type if filled else "0",
        "tp": fmt(algo.trigger_price), "p": fmt(algo.price), "V": "EXPIRE_MAKER",
        "wt": "CONTRACT_PRICE", "pm": "NONE", "cp": algo.close_position, "pP": False,
        "R": algo.reduce_only, "tt": algo.trigger_time, "gtd": 0, "rm": algo.reject_reason,
        "ia": algo.activated,
    }
    if algo.order_type == TRAILING:
        o["cr"] = fmt(algo.callback_rate)
    return {"e": "ALGO_UPDATE", "T": event_ms, "E": event_ms, "o": o}


def position_entry(pos: Position, mark: Decimal) -> Event:
    """One element of ACCOUNT_UPDATE `a.P`."""
    return {
        "s": pos.symbol, "pa": fmt(pos.amount), "ep": fmt(pos.entry_price),
        "bep": fmt(break_even(pos)), "cr": fmt(pos.realized),
        "up": fmt(unrealized(pos, mark)), "mt": "cross", "iw": "0", "ps": pos.position_side,
    }


def account_update(reason: str, balances: list[tuple[str, Decimal, Decimal]],
                   positions: list[Event], event_ms: int) -> Event:
    """ACCOUNT_UPDATE naming only what changed; balances are (asset, wallet, change)."""
    b = [{"a": asset, "wb": fmt(wallet), "cw": fmt(wallet), "bc": fmt(change)}
         for asset, wallet, change in balances]
    return {"e": "ACCOUNT_UPDATE", "E": event_ms, "T": event_ms,
            "a": {"m": reason, "B": b, "P": positions}}


def trade_lite(order: Order, fill: Fill, event_ms: int) -> Event:
    return {"e": "TRADE_LITE", "E": event_ms, "T": event_ms, "s": order.symbol,
            "q": fmt(order.quantity), "p": fmt(order.price), "m": fill.maker,
            "c": order.client_order_id, "S": order.side, "L": fmt(fill.price),
            "l": fmt(fill.quantity), "t": fill.trade_id, "i": order.order_id}


def listen_key_expired(listen_key: str, event_ms: int) -> Event:
    # Binance sends E as a string in this one event, and names the (now dead) key.
    return {"e": "listenKeyExpired", "E": str(event_ms), "listenKey": listen_key}


def account_config_leverage(symbol: str, leverage: int, event_ms: int) -> Event:
    return {"e": "ACCOUNT_CONFIG_UPDATE", "E": event_ms, "T": event_ms,
            "ac": {"s": symbol, "l": leverage}}


def account_config_multi_assets(on: bool, event_ms: int) -> Event:
    return {"e": "ACCOUNT_CONFIG_UPDATE", "E": event_ms, "T": event_ms, "ai": {"j": on}}


def margin_call_position(pos: Position, mark: Decimal) -> Event:
    """One element of MARGIN_CALL `p`."""
    return {"s": pos.symbol, "ps": pos.position_side, "pa": fmt(pos.amount), "mt": "CROSSED",
            "iw": "0", "mp": fmt(mark), "up": fmt(unrealized(pos, mark)),
            "mm": fmt(abs(pos.amount * mark) * MAINT_RATE)}


def margin_call(cross_wallet: Decimal, positions: list[Event], event_ms: int) -> Event:
    # Binance's MARGIN_CALL has an event time and no transaction time.
    return {"e": "MARGIN_CALL", "E": event_ms, "cw": fmt(cross_wallet), "p": positions}


def strategy_update(strategy_id: int, symbol: str, status: str, op_code: int,
                    event_ms: int, strategy_type: str = "GRID") -> Event:
    return {"e": "STRATEGY_UPDATE", "T": event_ms, "E": event_ms,
            "su": {"si": strategy_id, "st": strategy_type, "ss": status, "s": symbol,
                   "ut": event_ms, "c": op_code}}


def grid_update(strategy_id: int, symbol: str, status: str, realized: Decimal,
                unmatched_avg: Decimal, unmatched_qty: Decimal, unmatched_fee: Decimal,
                matched_profit: Decimal, event_ms: int) -> Event:
    return {"e": "GRID_UPDATE", "T": event_ms, "E": event_ms,
            "gu": {"si": strategy_id, "st": "GRID", "ss": status, "s": symbol,
                   "r": fmt(realized), "up": fmt(unmatched_avg), "uq": fmt(unmatched_qty),
                   "uf": fmt(unmatched_fee), "mp": fmt(matched_profit), "ut": event_ms}}


def conditional_order_trigger_reject(symbol: str, order_id: int, reason: str,
                                     event_ms: int) -> Event:
    return {"e": "CONDITIONAL_ORDER_TRIGGER_REJECT", "E": event_ms, "T": event_ms,
            "or": {"s": symbol, "i": order_id, "r": reason}}


def rest_order(order: Order) -> Event:
    """GET /fapi/v1/order, and each item of GET /fapi/v1/openOrders."""
    body: Event = {
        "avgPrice": fmt(order.avg_price), "clientOrderId": order.client_order_id,
        "cumQuote": fmt(order.cum_quote), "executedQty": fmt(order.executed),
        "orderId": order.order_id, "origQty": fmt(order.quantity), "origType": order.orig_type,
        "price": fmt(order.price), "reduceOnly": order.reduce_only, "side": order.side,
        "positionSide": order.position_side, "status": order.status,
        "stopPrice": fmt(order.stop_price), "closePosition": False, "symbol": order.symbol,
        "time": order.time, "timeInForce": order.time_in_force, "type": order.type,
        "updateTime": order.update_time, "workingType": "CONTRACT_PRICE",
        "priceProtect": False, "priceMatch": "NONE",
        "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0,
    }
    return body


def rest_algo_order(algo: AlgoOrder, filled: Order | None = None, *,
                    legacy: bool = False) -> Event:
    """GET /fapi/v1/algoOrder, and each item of GET /fapi/v1/openAlgoOrders, in the shape of
    Binance's 2026-06-09 change: `actualType` and `actualQty` (the triggered order's type and
    executed quantity; "" and "0" before the trigger), no tp/sl trigger and price fields.
    `legacy`: the shape before it (the tp/sl fields, no actualType/actualQty)."""
    row = {
        "algoId": algo.algo_id, "clientAlgoId": algo.client_algo_id, "algoType": "CONDITIONAL",
        "orderType": algo.order_type, "symbol": algo.symbol, "side": algo.side,
        "positionSide": algo.position_side, "timeInForce": algo.time_in_force,
        "quantity": fmt(algo.quantity), "algoStatus": algo.status,
        "actualOrderId": str(algo.actual_order_id) if algo.actual_order_id else "",
        "actualPrice": fmt(filled.avg_price) if filled else "0",
        "triggerPrice": fmt(algo.trigger_price), "price": fmt(algo.price),
        "icebergQuantity": None, "tpTriggerPrice": "0", "tpPrice": "0",
        "slTriggerPrice": "0", "slPrice": "0", "tpOrderType": "",
        "selfTradePreventionMode": "EXPIRE_MAKER", "workingType": "CONTRACT_PRICE",
        "priceMatch": "NONE", "closePosition": algo.close_position, "priceProtect": False,
        "reduceOnly": algo.reduce_only, "createTime": algo.create_time,
        "updateTime": algo.update_time, "triggerTime": algo.trigger_time, "goodTillDate": 0,
    }
    if legacy:
        return row
    for name in TPSL_FIELDS:
        del row[name]
    row["actualType"] = filled.type if filled else ""
    row["actualQty"] = fmt(filled.executed) if filled else "0"
    return row


TPSL_FIELDS = ("tpTriggerPrice", "tpPrice", "slTriggerPrice", "slPrice", "tpOrderType")


def position_risk(pos: Position, mark: Decimal, wallet: Decimal,
                  open_notional: tuple[Decimal, Decimal], leverage: int = 20) -> Event:
    """One item of GET /fapi/v3/positionRisk (v3 names no leverage; margins use it)."""
    notional = pos.amount * mark
    initial = abs(notional) / leverage
    order_initial = (open_notional[0] + open_notional[1]) / leverage
    return {
        "symbol": pos.symbol, "positionSide": pos.position_side,
        "positionAmt": fmt(pos.amount), "entryPrice": fmt(pos.entry_price),
        "breakEvenPrice": fmt(break_even(pos)), "markPrice": fmt(mark),
        "unRealizedProfit": fmt(unrealized(pos, mark)),
        "liquidationPrice": fmt(liquidation_price(pos, wallet)), "isolatedMargin": "0",
        "notional": fmt(notional), "marginAsset": "USDT", "isolatedWallet": "0",
        "initialMargin": fmt(initial + order_initial),
        "maintMargin": fmt(abs(notional) * MAINT_RATE),
        "positionInitialMargin": fmt(initial), "openOrderInitialMargin": fmt(order_initial),
        "adl": 0, "bidNotional": fmt(open_notional[0]), "askNotional": fmt(open_notional[1]),
        "updateTime": pos.update_time,
    }


def balance_row(asset: str, wallet: Decimal, unrealized_total: Decimal, now_ms: int) -> Event:
    """One item of GET /fapi/v2/balance."""
    available = wallet + unrealized_total if asset == "USDT" else wallet
    return {
        "accountAlias": "SgsR", "asset": asset, "balance": fmt(wallet),
        "crossWalletBalance": fmt(wallet),
        "crossUnPnl": fmt(unrealized_total) if asset == "USDT" else "0",
        "availableBalance": fmt(max(available, ZERO)),
        "maxWithdrawAmount": fmt(max(min(wallet, available), ZERO)),
        "marginAvailable": True, "updateTime": now_ms,
    }


def user_trade(trade: Trade) -> Event:
    """One item of GET /fapi/v1/userTrades."""
    return {
        "buyer": trade.side == "BUY", "commission": fmt(trade.commission),
        "commissionAsset": "USDT", "id": trade.trade_id, "maker": trade.maker,
        "orderId": trade.order_id, "price": fmt(trade.price), "qty": fmt(trade.quantity),
        "quoteQty": fmt(trade.price * trade.quantity), "realizedPnl": fmt(trade.realized),
        "side": trade.side, "positionSide": trade.position_side, "symbol": trade.symbol,
        "time": trade.time,
    }


# The notional cap of the first bracket a leverage allows (BTCUSDT-like brackets).
_BRACKETS = ((125, "50000"), (100, "600000"), (50, "3000000"), (20, "12000000"),
             (10, "70000000"), (5, "100000000"), (4, "230000000"), (3, "480000000"),
             (2, "600000000"), (1, "800000000"))


def symbol_config(symbol: str, leverage: int) -> Event:
    """One item of GET /fapi/v1/symbolConfig."""
    cap = next(cap for most, cap in reversed(_BRACKETS) if leverage <= most)
    return {"symbol": symbol, "marginType": "CROSSED", "isAutoAddMargin": False,
            "leverage": leverage, "maxNotionalValue": cap}


def unrealized(pos: Position, mark: Decimal) -> Decimal:
    return pos.amount * (mark - pos.entry_price) if pos.amount else ZERO


def break_even(pos: Position) -> Decimal:
    # Entry moved by the taker fee paid to open and to close: an estimate, as the UI shows it.
    if pos.amount == 0:
        return ZERO
    sign = 1 if pos.amount > 0 else -1
    return pos.entry_price * (1 + sign * 2 * TAKER_FEE)


def liquidation_price(pos: Position, wallet: Decimal) -> Decimal:
    """Cross margin, one position: the mark at which wallet + PnL falls to maintenance margin."""
    amt = pos.amount
    if amt == 0:
        return ZERO
    if amt > 0:
        price = (amt * pos.entry_price - wallet) / (amt * (1 - MAINT_RATE))
    else:
        price = (wallet + abs(amt) * pos.entry_price) / (abs(amt) * (1 + MAINT_RATE))
    return max(price, ZERO).quantize(Decimal("0.01"))
