"""Realistic user-data frames and REST rows for the user-fold tests (shapes of Binance's docs).

Shared by tests/test_orders_fold.py, test_account_fold.py and test_orderstore.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from pipeline.eventlog import ControlEntry, FrameEntry

T0 = 1_795_000_000_000  # ms
RECV = T0 / 1000  # receipt times are RECV + a few seconds: the events' times are plausible
_seq = itertools.count(1)


def order_o(order_id: int, status: str, exec_type: str, *, t: int, z: str = "0",
            last_qty: str = "0", last_price: str = "0", rp: str = "0", ap: str = "0",
            symbol: str = "BTCUSDT",
            otype: str = "LIMIT", side: str = "BUY", q: str = "0.003", p: str = "50000.10",
            ps: str = "BOTH", trade_id: int = 0, **extra: Any) -> dict[str, Any]:
    o = {"s": symbol, "c": f"client-{order_id}", "S": side, "o": otype, "f": "GTC", "q": q,
         "p": p, "ap": ap, "sp": "0", "x": exec_type, "X": status, "i": order_id, "l": last_qty,
         "z": z, "L": last_price, "N": "USDT", "n": "0", "T": t, "t": trade_id, "b": "0",
         "a": "0", "m": False, "R": False, "wt": "CONTRACT_PRICE", "ot": otype, "ps": ps,
         "cp": False, "rp": rp, "pP": False, "si": 0, "ss": 0, "V": "EXPIRE_MAKER",
         "pm": "NONE", "gtd": 0, "er": "0"}
    o.update(extra)
    return o


def order_frame(*args: Any, **kw: Any) -> bytes:
    o = order_o(*args, **kw)
    return orjson.dumps({"e": "ORDER_TRADE_UPDATE", "E": o["T"] + 3, "T": o["T"], "o": o})


def algo_o(algo_id: int, status: str, *, ai: str = "", symbol: str = "BTCUSDT",
           otype: str = "STOP_MARKET", side: str = "SELL", q: str = "0.003",
           tp: str = "48000.00", tt: int = 0) -> dict[str, Any]:
    return {"caid": f"algo-client-{algo_id}", "aid": algo_id, "at": "CONDITIONAL", "o": otype,
            "s": symbol, "S": side, "ps": "BOTH", "f": "GTC", "q": q, "X": status, "ai": ai,
            "ap": "0.00000", "aq": "0.000", "act": "0", "tp": tp, "p": "0", "V": "EXPIRE_MAKER",
            "wt": "CONTRACT_PRICE", "pm": "NONE", "cp": False, "pP": False, "R": True,
            "tt": tt, "gtd": 0, "rm": ""}


def algo_frame(algo_id: int, status: str, *, t: int, **kw: Any) -> bytes:
    return orjson.dumps({"e": "ALGO_UPDATE", "T": t, "E": t + 6, "o": algo_o(algo_id, status,
                                                                              **kw)})


def account_frame(*, t: int, positions: list[dict[str, Any]] = (),  # type: ignore[assignment]
                  balances: list[dict[str, Any]] = (),  # type: ignore[assignment]
                  reason: str = "ORDER") -> bytes:
    return orjson.dumps({"e": "ACCOUNT_UPDATE", "E": t + 2, "T": t,
                         "a": {"m": reason, "B": list(balances), "P": list(positions)}})


def position(symbol: str = "BTCUSDT", pa: str = "0.003", *, ps: str = "BOTH", ep: str = "50000.1",
             cr: str = "0", up: str = "0.1") -> dict[str, Any]:
    return {"s": symbol, "pa": pa, "ep": ep, "bep": ep, "cr": cr, "up": up, "mt": "cross",
            "iw": "0", "ps": ps, "ma": "USDT"}


def frame_entry(frame: bytes, recv_ts: float) -> FrameEntry:
    n = next(_seq)
    return FrameEntry(id=f"{n}-0".encode(), frame=frame, recv_ts=recv_ts, conn="u1", seq=n)


def control(ctl: str, body: dict[str, Any], recv_ts: float) -> ControlEntry:
    n = next(_seq)
    return ControlEntry(id=f"{n}-0".encode(), ctl=ctl, body=body, recv_ts=recv_ts, conn="u1")


def rest_order(order_id: int, status: str, *, update_time: int, time: int,
               executed: str = "0", cum_quote: str = "0", avg: str = "0",
               symbol: str = "BTCUSDT", otype: str = "LIMIT", side: str = "BUY",
               q: str = "0.003", p: str = "50000.10") -> dict[str, Any]:
    """A row of GET /fapi/v1/openOrders (and the answer of GET /fapi/v1/order)."""
    return {"avgPrice": avg, "clientOrderId": f"client-{order_id}", "cumQuote": cum_quote,
            "executedQty": executed, "orderId": order_id, "origQty": q, "origType": otype,
            "price": p, "reduceOnly": False, "side": side, "positionSide": "BOTH",
            "status": status, "stopPrice": "0", "closePosition": False, "symbol": symbol,
            "time": time, "timeInForce": "GTC", "type": otype, "updateTime": update_time,
            "workingType": "CONTRACT_PRICE", "priceProtect": False, "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0}


def rest_algo(algo_id: int, status: str, *, update_time: int, create_time: int,
              ai: str = "", symbol: str = "BTCUSDT", tp: str = "48000.00") -> dict[str, Any]:
    """A row of GET /fapi/v1/openAlgoOrders (and the answer of GET /fapi/v1/algoOrder)."""
    return {"algoId": algo_id, "clientAlgoId": f"algo-client-{algo_id}",
            "algoType": "CONDITIONAL", "orderType": "STOP_MARKET", "symbol": symbol,
            "side": "SELL", "positionSide": "BOTH", "timeInForce": "GTC", "quantity": "0.003",
            "algoStatus": status, "actualOrderId": ai, "actualPrice": "0.00000",
            "triggerPrice": tp, "price": "0", "icebergQuantity": None,
            "actualType": "", "actualQty": "0.000",  # Binance's shape since 2026-06-09
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "workingType": "CONTRACT_PRICE", "priceMatch": "NONE", "closePosition": False,
            "priceProtect": False, "reduceOnly": True, "createTime": create_time,
            "updateTime": update_time, "triggerTime": 0, "goodTillDate": 0}
