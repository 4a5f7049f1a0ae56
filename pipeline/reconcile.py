"""REST reconciliation of the user-data stream: what the exchange says now, into the log.

Why: the user stream does not replay what happened while it was down (a fill, a triggered
stop). So on every connect and reconnect, and every few minutes, the ingestor asks REST for the
account's current state and appends each answer to `raw:user` as a control entry, so that the
projectors (and any later replay) see exactly the same answer:

    ctl=snapshot     {"kind": "openOrders"|"openAlgoOrders"|"positionRisk"|"balance",
                      "symbol": null, "fetched_at_ms": ..., "weight_used_1m": ...,
                      "response": <parsed JSON>}
    ctl=final_state  {"kind": "order"|"algoOrder", "symbol": S, "fetched_at_ms": ...,
                      "weight_used_1m": ..., "response": <GET /fapi/v1/order or algoOrder>}

A snapshot lists only what is open, so an order that closed during the outage would simply
vanish. Therefore, for every order the views hold open (`P:open_orders:*`,
`P:open_algo_orders:*`) that the snapshot no longer lists, the final state is fetched one by
one and logged as `final_state`; the orders projection emits it on `P:orders`, and the
listener learns of the fill. The views are read BEFORE the snapshot is taken, so an order
placed during reconciliation is never mistaken for a vanished one. A triggered algo order
names the matching-engine order it created (`actualOrderId`, the stream's `ai`); that order was
never in the views, so its final state is fetched too.

Weight: every call goes through `pipeline.rest.RestClient`, whose `WeightBudget` waits before a
call that would pass 80 % of the minute's limit. Without a symbol, openOrders and
openAlgoOrders cost 40 each; positionRisk and balance 5; each final-state lookup 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import redis
import trio

from pipeline import metrics
from pipeline.errors import ExchangeError, RedisUnavailable
from pipeline.redisconn import redis_errors
from pipeline.signing import SignedRest
from pipeline.weight import open_orders_weight
from projections.core.keys import Keys

log = logging.getLogger("pipeline.reconcile")

# kind -> (path, weight); order matters: open orders first, they decide the final-state lookups
SNAPSHOTS: tuple[tuple[str, str, int], ...] = (
    ("openOrders", "/fapi/v1/openOrders", open_orders_weight(None)),
    ("openAlgoOrders", "/fapi/v1/openAlgoOrders", open_orders_weight(None)),
    ("positionRisk", "/fapi/v3/positionRisk", 5),
    ("balance", "/fapi/v2/balance", 5),
)

# view hash (after the prefix) -> (final_state kind, id field in the REST shape)
HELD_VIEWS: dict[str, tuple[str, str]] = {
    "open_orders": ("order", "orderId"),
    "open_algo_orders": ("algoOrder", "algoId"),
}
# snapshot kind -> the final_state kind whose open orders it lists, and their id field
LISTS: dict[str, tuple[str, str]] = {
    "openOrders": ("order", "orderId"),
    "openAlgoOrders": ("algoOrder", "algoId"),
}

Append = Callable[[str, Mapping[str, Any]], None]  # (ctl, body) -> appended to raw:user


@attrs.frozen(order=True)
class HeldOrder:
    kind: str  # "order" | "algoOrder"
    symbol: str  # upper case, as REST wants it
    id: str


@attrs.frozen
class ReconcileResult:
    snapshots: int
    final_states: int
    weight_used_1m: int
    failed: tuple[str, ...] = ()


# --- pure ---------------------------------------------------------------------------------

def listed_ids(response: Any, id_field: str) -> set[str]:
    """Ids in a REST list answer (as text: views store hash fields as text)."""
    if not isinstance(response, list):
        return set()
    return {str(o[id_field]) for o in response if isinstance(o, dict) and id_field in o}


def vanished(held: Iterable[HeldOrder], listed: Mapping[str, set[str]]) -> list[HeldOrder]:
    """Held-open orders of a kind whose snapshot was taken and does not list them."""
    return sorted(h for h in held if h.kind in listed and h.id not in listed[h.kind])


def triggered_order_id(algo: Any) -> str | None:
    """The matching-engine order an algo order created when it triggered, if any."""
    if not isinstance(algo, dict):
        return None
    value = algo.get("actualOrderId", algo.get("ai"))
    if value in (None, "", 0, "0"):
        return None
    return str(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_held(keys: Keys, key: bytes | str, fields: Iterable[bytes | str]) -> list[HeldOrder]:
    """`P:open_orders:btcusdt` + its hash fields -> HeldOrder per field."""
    held = keys.held_orders(_text(key))
    if held is None:
        return []
    family, symbol = held
    return [HeldOrder(HELD_VIEWS[family][0], symbol, _text(f)) for f in fields]


# --- shell --------------------------------------------------------------------------------

class Reconciler:
    """Runs one reconciliation at a time (connect, periodic and expiry may ask together)."""

    def __init__(self, api: SignedRest, views: redis.Redis, view_prefix: str,
                 append: Append) -> None:
        self.api = api
        self.views = views
        self.keys = Keys(view_prefix)
        self.append = append
        self.runs = 0
        self._lock = trio.Lock()

    async def run_once(self, reason: str) -> ReconcileResult:
        async with self._lock:
            held = await self._held_open()
            listed: dict[str, set[str]] = {}
            failed: list[str] = []
            snapshots = 0
            for kind, path, weight in SNAPSHOTS:
                response = await self._fetch(path, {}, weight)
                if response is _FAILED:
                    failed.append(kind)
                    continue
                self._log("snapshot", kind, None, response)
                snapshots += 1
                if kind in LISTS:
                    held_kind, id_field = LISTS[kind]
                    listed[held_kind] = listed_ids(response, id_field)
            finals = await self._final_states(vanished(held or (), listed), listed)
            self.runs += 1
            result = ReconcileResult(snapshots, finals, self.api.rest.budget.used, tuple(failed))
            log.info("reconciled", extra={"reason": reason, "snapshots": snapshots,
                                          "final_states": finals, "failed": ",".join(failed),
                                          "weight_used_1m": result.weight_used_1m})
            return result

    async def every(self, period: float) -> None:
        while True:
            await trio.sleep(period)
            await self.run_once("periodic")

    async def _final_states(self, gone: list[HeldOrder], listed: Mapping[str, set[str]]) -> int:
        count = 0
        for order in gone:
            if order.kind == "order":
                params = {"symbol": order.symbol, "orderId": order.id}
                path = "/fapi/v1/order"
            else:
                params = {"algoId": order.id}
                path = "/fapi/v1/algoOrder"
            response = await self._fetch(path, params, 1)
            if response is _FAILED:
                continue
            self._log("final_state", order.kind, order.symbol, response)
            count += 1
            actual = triggered_order_id(response) if order.kind == "algoOrder" else None
            if actual is not None and actual not in listed.get("order", set()):
                count += await self._final_states([HeldOrder("order", order.symbol, actual)],
                                                  listed)
        return count

    async def _fetch(self, path: str, params: Mapping[str, Any], weight: int) -> Any:
        try:
            return await self.api.signed("GET", path, params, weight=weight)
        except ExchangeError as exc:
            # the message names method, path, status and Binance's code: never the query
            log.warning("reconciliation call failed", extra={"error": str(exc)})
            return _FAILED
        finally:
            metrics.REST_WEIGHT.set(self.api.rest.budget.used)

    def _log(self, ctl: str, kind: str, symbol: str | None, response: Any) -> None:
        self.append(ctl, {"kind": kind, "symbol": symbol,
                          "fetched_at_ms": self.api.server_clock.now_ms(),
                          "weight_used_1m": self.api.rest.budget.used, "response": response})

    async def _held_open(self) -> list[HeldOrder] | None:
        """Orders the views list open; None when Redis cannot tell (no final-state lookups)."""
        try:
            return await trio.to_thread.run_sync(self._read_held)
        except RedisUnavailable as exc:
            log.warning("cannot read the open-order views; final states skipped this round",
                        extra={"error": str(exc)})
            return None

    def _read_held(self) -> list[HeldOrder]:
        out: list[HeldOrder] = []
        with redis_errors():
            for family in HELD_VIEWS:
                for key in self.views.scan_iter(match=self.keys.pattern(family), count=500):
                    out += parse_held(self.keys, key, self.views.hkeys(key))
        return out


_FAILED = object()
