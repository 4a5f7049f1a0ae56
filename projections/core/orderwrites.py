"""The order writes as plain data: one order or algo-order transition each.

Pure. The order fold (`projections.core.orders`) produces them; the shell
(`projections.shell.orderstore`) performs each as one call of `lua/orders.lua`, which reads
the stored state, refuses a transition that is older or not allowed, merges, and writes the
state, the open-orders row and the orders streams atomically. `script_payload` is the script's
JSON argument, also what the pure reference model in the tests reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

DEFAULT_SYMBOL_MAXLEN = 1000
DEFAULT_ORDERS_MAX_AGE_S = 7 * 86400.0

Version = tuple[int, int, str]


@attrs.frozen
class OrderWrite:
    """One transition of a matching-engine order (from ORDER_TRADE_UPDATE or REST)."""

    prefix: str
    symbol: str  # as Binance sends it; keys use it lower-cased
    order_id: int
    status: str
    version: Version  # (update time ms, status rank, cumulative filled qty)
    allowed_from: tuple[str, ...]  # stored statuses this transition may leave ("" = none)
    fields: Mapping[str, Any]  # `o` fields, names as Binance sends them
    rest: Mapping[str, Any] | None  # openOrders row without cumQuote/time; None: closed
    source: str = "stream"  # stream | reconciliation
    quote_add: str = "0"  # this fill's qty x price
    quote_set: str | None = None  # REST cumQuote (reconciliation replaces the sum)
    profit_add: str = "0"  # this fill's realized profit
    created_ms: int = 0  # creation time when this transition knows it (NEW, REST `time`)
    symbol_maxlen: int = DEFAULT_SYMBOL_MAXLEN
    orders_max_age_s: float = DEFAULT_ORDERS_MAX_AGE_S
    account: str | None = None  # whose keys it writes (`projections.core.keys`); None: unlabelled


@attrs.frozen
class AlgoOrderWrite:
    """One transition of an algo (conditional) order (from ALGO_UPDATE or REST)."""

    prefix: str
    symbol: str
    algo_id: int
    status: str
    version: Version  # (update time ms, status rank, "0")
    allowed_from: tuple[str, ...]
    fields: Mapping[str, Any]  # ALGO_UPDATE `o` fields, incl. `ai`
    rest: Mapping[str, Any] | None  # openAlgoOrders row without createTime; None: closed
    source: str = "stream"
    created_ms: int = 0
    symbol_maxlen: int = DEFAULT_SYMBOL_MAXLEN
    orders_max_age_s: float = DEFAULT_ORDERS_MAX_AGE_S
    account: str | None = None


def script_payload(write: OrderWrite | AlgoOrderWrite) -> dict[str, Any]:
    """The JSON argument of orders.lua (also what the pure reference model reads)."""
    common = {"status": write.status, "version": list(write.version),
              "allowed_from": list(write.allowed_from), "fields": dict(write.fields),
              "rest": dict(write.rest) if write.rest is not None else None,
              "source": write.source, "symbol": write.symbol, "created_ms": write.created_ms}
    if isinstance(write, OrderWrite):
        return {"kind": "order", "id": write.order_id, "quote_add": write.quote_add,
                "quote_set": write.quote_set, "profit_add": write.profit_add, **common}
    return {"kind": "algo", "id": write.algo_id, **common}
