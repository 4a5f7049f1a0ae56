"""Performs the order writes (`projections.core.orderwrites`) in Redis, atomically.

`perform_order_write(pipe, write, bounds)` queues ONE call of the library's order function
(`lua/orders.lua`, a Redis function: `projections.shell.functions`) on a redis-py pipeline;
the function, atomically:
1. reads the stored state (`P:order_state:{symbol}` / `P:algo_order_state:{symbol}` field id);
   a state whose update time is ahead of the server's clock by more than
   `bounds.max_ahead_ms` is not obeyed (repaired);
2. refuses the write unless the stored status is one the transition table allows and the new
   version is newer (so redelivery and replay are no-ops that emit nothing);
3. merges the new fields over the stored ones, adds this fill's quote and realized profit to the
   stored sums (exact decimal strings), keeps the creation time;
4. writes the state, sets or deletes the `P:open_orders:{symbol}` / `P:open_algo_orders:{symbol}`
   row, and XADDs the change to `P:orders:{symbol}` (MAXLEN ~) and `P:orders` (MINID ~ by age).

`projections.shell.viewstore.PERFORMERS` maps the write types to `perform_order_write`; the
view store makes sure the library is loaded before it queues one.
"""

from __future__ import annotations

import orjson
from redis.client import Pipeline

from projections.core.keys import Keys
from projections.core.orderwrites import AlgoOrderWrite, OrderWrite, script_payload
from projections.core.plausible import Bounds
from projections.shell.functions import ORDER_FN

_DEFAULT_BOUNDS = Bounds()


def perform_order_write(pipe: Pipeline, write: object, bounds: Bounds = _DEFAULT_BOUNDS) -> None:
    """Queue the atomic write of one OrderWrite/AlgoOrderWrite on `pipe`. The function returns
    1 when the transition applied and 0 when it was refused (duplicate, older, not allowed)."""
    if not isinstance(write, OrderWrite | AlgoOrderWrite):
        raise TypeError(f"not an order write: {type(write).__name__}")
    kind = "order" if isinstance(write, OrderWrite) else "algo"
    keys = Keys(write.prefix, account=write.account)
    pipe.fcall(ORDER_FN, 4, *keys.order_keys(write.symbol, kind),
               orjson.dumps(script_payload(write)), write.symbol_maxlen,
               int(write.orders_max_age_s * 1000), bounds.max_ahead_ms)
