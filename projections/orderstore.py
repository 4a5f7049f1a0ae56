"""The atomic order writes: what `projections.orders` asks for, and how Redis performs it.

An `OrderWrite` / `AlgoOrderWrite` is one order transition. `perform_order_write(pipe, write)`
queues ONE call of `lua/orders.lua` on a redis-py pipeline; the script, atomically:
1. reads the stored state (`P:order_state:{symbol}` / `P:algo_order_state:{symbol}` field id);
2. refuses the write unless the stored status is one the transition table allows and the new
   version is newer (so redelivery and replay are no-ops that emit nothing);
3. merges the new fields over the stored ones, adds this fill's quote and realized profit to the
   stored sums (exact decimal strings), keeps the creation time;
4. writes the state, sets or deletes the `P:open_orders:{symbol}` / `P:open_algo_orders:{symbol}`
   row, and XADDs the change to `P:orders:{symbol}` (MAXLEN ~) and `P:orders` (MINID ~ by age).

`projections.viewstore.PERFORMERS` maps the write types to `perform_order_write`. The write
types are pure values; redis is imported only to build the Script, so the pure order fold
(projections.orders) can import them without Redis.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import orjson

if TYPE_CHECKING:
    from redis.client import Pipeline
    from redis.commands.core import Script


LUA_PATH = Path(__file__).with_name("lua") / "orders.lua"
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


def order_keys(prefix: str, symbol: str, kind: str) -> list[str]:
    """KEYS of orders.lua: state hash, open hash, per-symbol stream, all-orders stream."""
    sym = symbol.lower()
    state, open_ = (("order_state", "open_orders") if kind == "order"
                    else ("algo_order_state", "open_algo_orders"))
    return [f"{prefix}:{state}:{sym}", f"{prefix}:{open_}:{sym}", f"{prefix}:orders:{sym}",
            f"{prefix}:orders"]


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


@functools.cache
def orders_script() -> Script:
    from redis.commands.core import Script

    # bytes, so that Script needs no client to compute its SHA
    return Script(None, LUA_PATH.read_bytes())  # type: ignore[arg-type]


def perform_order_write(pipe: Pipeline, write: object) -> None:
    """Queue the atomic write of one OrderWrite/AlgoOrderWrite on `pipe`. The script returns 1
    when the transition applied and 0 when it was refused (duplicate, older, not allowed)."""
    if not isinstance(write, OrderWrite | AlgoOrderWrite):
        raise TypeError(f"not an order write: {type(write).__name__}")
    kind = "order" if isinstance(write, OrderWrite) else "algo"
    orders_script()(
        keys=order_keys(write.prefix, write.symbol, kind),
        args=[orjson.dumps(script_payload(write)), write.symbol_maxlen,
              int(write.orders_max_age_s * 1000)],
        client=pipe)
