"""Performs the order writes (`projections.core.orderwrites`) in Redis, atomically.

`perform_order_write(pipe, write)` queues ONE call of `lua/orders.lua` on a redis-py pipeline;
the script, atomically:
1. reads the stored state (`P:order_state:{symbol}` / `P:algo_order_state:{symbol}` field id);
2. refuses the write unless the stored status is one the transition table allows and the new
   version is newer (so redelivery and replay are no-ops that emit nothing);
3. merges the new fields over the stored ones, adds this fill's quote and realized profit to the
   stored sums (exact decimal strings), keeps the creation time;
4. writes the state, sets or deletes the `P:open_orders:{symbol}` / `P:open_algo_orders:{symbol}`
   row, and XADDs the change to `P:orders:{symbol}` (MAXLEN ~) and `P:orders` (MINID ~ by age).

`projections.shell.viewstore.PERFORMERS` maps the write types to `perform_order_write`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import orjson
from redis.client import Pipeline
from redis.commands.core import Script

from projections.core.keys import Keys
from projections.core.orderwrites import AlgoOrderWrite, OrderWrite, script_payload

LUA_PATH = Path(__file__).with_name("lua") / "orders.lua"


@functools.cache
def orders_script() -> Script:
    # bytes, so that Script needs no client to compute its SHA
    return Script(None, LUA_PATH.read_bytes())  # type: ignore[arg-type]


def perform_order_write(pipe: Pipeline, write: object) -> None:
    """Queue the atomic write of one OrderWrite/AlgoOrderWrite on `pipe`. The script returns 1
    when the transition applied and 0 when it was refused (duplicate, older, not allowed)."""
    if not isinstance(write, OrderWrite | AlgoOrderWrite):
        raise TypeError(f"not an order write: {type(write).__name__}")
    kind = "order" if isinstance(write, OrderWrite) else "algo"
    orders_script()(
        keys=Keys(write.prefix).order_keys(write.symbol, kind),
        args=[orjson.dumps(script_payload(write)), write.symbol_maxlen,
              int(write.orders_max_age_s * 1000)],
        client=pipe)
