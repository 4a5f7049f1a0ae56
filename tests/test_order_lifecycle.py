"""The order listener's whole path, as it runs in production: the simulator's account ->
`pipeline ingest user` -> raw:user -> the orders projector -> `P:orders` consumed with
XREADGROUP, and `open_orders()` answering what `GET /fapi/v1/openOrders` answers."""

from __future__ import annotations

import functools
from typing import Any

import trio

from pipeline.config import Secret
from pipeline.localredis import LocalRedis
from pipeline.rest import RestClient
from pipeline.signing import SignedRest, make_signer
from projections.client import OrderEvent, OrdersConsumer, open_algo_orders, open_orders
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.test_ingest_user import (
    API_KEY,
    API_SECRET,
    place,
    running,
    snapshots_after,
    until,
)


def _by_id(rows: list[dict[str, Any]], id_field: str) -> dict[str, dict[str, Any]]:
    return {str(row[id_field]): row for row in rows}


async def test_listener_sees_every_lifecycle_step_and_open_orders_match_rest(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        prefix = run.settings.view_prefix
        api = SignedRest(RestClient(run.rest_url), Secret(API_KEY),
                         make_signer(Secret(API_SECRET)))
        seen: list[OrderEvent] = []
        listener = OrdersConsumer(run.r, group="listener", consumer="l1", handler=seen.append,
                                  block_ms=50, start_id="0", prefix=prefix)

        def statuses(order_id: object) -> list[str]:
            listener.poll_once()
            return [e.status for e in seen if e.order_id == str(order_id)]

        async with trio.open_nursery() as projector:
            projector.start_soon(functools.partial(
                run_projector, run.settings, choose(run.settings, "orders,account"),
                RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
            # the stream is up and the first reconciliation is done: what follows is live
            await snapshots_after(run, 1)

            filled = place(run.sim, type="LIMIT", price="50000", quantity="0.020")
            canceled = place(run.sim, type="LIMIT", price="49000")
            expired = place(run.sim, type="LIMIT", price="48000")
            resting = place(run.sim, type="LIMIT", price="47000", side="SELL")
            stop = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
            run.sim.account.control("fill", {"orderId": filled["orderId"],
                                             "quantity": "0.005"})
            await until(lambda: statuses(filled["orderId"]) == ["NEW", "PARTIALLY_FILLED"])

            # the same moment, two ways: the views and the exchange's signed REST
            await until(lambda: len(open_orders(run.r, prefix=prefix)) == 4
                        and len(open_algo_orders(run.r, prefix=prefix)) == 1)
            rest_open = await api.signed("GET", "/fapi/v1/openOrders", weight=40)
            rest_algo = await api.signed("GET", "/fapi/v1/openAlgoOrders", weight=40)
            assert _by_id(open_orders(run.r, prefix=prefix), "orderId") == \
                _by_id(rest_open, "orderId")
            assert _by_id(open_algo_orders(run.r, prefix=prefix), "algoId") == \
                _by_id(rest_algo, "algoId")

            run.sim.account.control("fill", {"orderId": filled["orderId"]})
            run.sim.account.control("cancel", {"orderId": canceled["orderId"]})
            run.sim.account.control("expire", {"orderId": expired["orderId"]})
            triggered = run.sim.account.control("trigger", {"algoId": stop["algoId"]})
            assert isinstance(triggered, dict)
            market_id = triggered["actualOrderId"]

            await until(lambda: statuses(filled["orderId"])[-1:] == ["FILLED"])
            await until(lambda: statuses(canceled["orderId"])[-1:] == ["CANCELED"])
            await until(lambda: statuses(expired["orderId"])[-1:] == ["EXPIRED"])
            await until(lambda: statuses(market_id)[-1:] == ["FILLED"])
            await until(lambda: "FINISHED" in statuses(stop["algoId"]))
            assert statuses(filled["orderId"]) == ["NEW", "PARTIALLY_FILLED", "FILLED"]
            assert statuses(market_id) == ["NEW", "FILLED"]
            algo_events = [e for e in seen if e.order_id == str(stop["algoId"])]
            assert all(e.kind == "algo" for e in algo_events)
            assert any(str(e.data.get("o", {}).get("ai")) == str(market_id) for e in algo_events)

            # only the resting order is left open, in the views as at the exchange
            rest_open = await api.signed("GET", "/fapi/v1/openOrders", weight=40)
            assert [o["orderId"] for o in open_orders(run.r, prefix=prefix)] == \
                [o["orderId"] for o in rest_open] == [resting["orderId"]]
            assert open_algo_orders(run.r, prefix=prefix) == []
            assert all(e.source == "stream" for e in seen)
            projector.cancel_scope.cancel()
        await api.rest.aclose()
