"""After an outage of the user stream, the listener learns what happened: orders Binance no
longer knows end NO_LONGER_KNOWN (and are not looked up again), and orders opened and closed
entirely while the stream was down reach `P:orders` with their fills. The simulator over real
sockets (its exchange clock moved forward for the long outage), a real Redis, the real
ingestor and orders projector, the listener's own consumer."""

from __future__ import annotations

from decimal import Decimal

import redis

from pipeline.localredis import LocalRedis
from projections.client import OrderEvent, OrdersConsumer
from tests.test_ingest_user import (
    SLOW_RECONNECT,
    Running,
    controls,
    events,
    place,
    running,
    snapshots_after,
    until,
    xrange,
)
from tests.test_shared_listen_key import with_orders_projector

DAY_S = 86_400


def orders_entries(r: redis.Redis, prefix: str, order_id: object) -> list[dict[bytes, bytes]]:
    return [f for _, f in xrange(r, f"{prefix}:orders") if f[b"order_id"] == str(order_id).encode()]


async def outage(run: Running) -> None:
    assert run.sim.drop("private") == 1
    await until(lambda: run.sim.account.connection_count() == 0)


async def test_an_order_binance_forgot_during_a_long_outage_ends_no_longer_known(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, timing=SLOW_RECONNECT) as run, with_orders_projector(run):
        prefix, rest = run.settings.view_prefix, run.ingest.reconciler.api.rest
        await snapshots_after(run, 1)
        order = place(run.sim, type="LIMIT", price="45000")
        open_key = f"{prefix}:open_orders:btcusdt"
        await until(lambda: run.r.hexists(open_key, str(order["orderId"])))

        await outage(run)
        run.sim.account.control("cancel", {"orderId": order["orderId"]})  # no fill
        run.sim.accounts.control("advance_clock", {"seconds": 4 * DAY_S})  # past the 3 days

        ended = await until(lambda: [f for f in orders_entries(run.r, prefix, order["orderId"])
                                     if f[b"status"] == b"NO_LONGER_KNOWN"], within=20)
        assert ended[0][b"source"] == b"reconciliation"
        assert not run.r.hexists(open_key, str(order["orderId"]))
        (told,) = [c.body for c in controls(run.r, "final_state")
                   if c.body["kind"] == "notFound"]
        assert (told["of"], told["id"], told["symbol"]) == ("order", str(order["orderId"]),
                                                            "BTCUSDT")
        assert told["trades"] == []
        # allOrders and userTrades were asked before giving up on it
        assert rest.calls["/fapi/v1/allOrders"] and rest.calls["/fapi/v1/userTrades"]

        lookups = rest.calls["/fapi/v1/order"]
        await run.ingest.reconciler.run_once("again")
        await run.ingest.reconciler.run_once("and again")
        assert rest.calls["/fapi/v1/order"] == lookups  # no longer looked up


async def test_an_order_opened_and_filled_during_the_outage_reaches_p_orders_with_its_fills(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, timing=SLOW_RECONNECT) as run, with_orders_projector(run):
        prefix, rest = run.settings.view_prefix, run.ingest.reconciler.api.rest
        seen: list[OrderEvent] = []
        listener = OrdersConsumer(run.r, group="listener", consumer="l1", handler=seen.append,
                                  block_ms=50, start_id="$", prefix=prefix)
        listener.poll_once()
        await snapshots_after(run, 1)
        spent = dict(rest.weight_spent)

        await outage(run)
        order = place(run.sim, type="LIMIT", price="50000", quantity="0.020")
        run.sim.account.control("fill", {"orderId": order["orderId"], "quantity": "0.005"})
        run.sim.account.control("fill", {"orderId": order["orderId"], "price": "49990"})

        def told() -> list[OrderEvent]:
            listener.poll_once()
            return [e for e in seen if e.order_id == str(order["orderId"])]

        (event,) = await until(told, within=20)
        assert (event.status, event.source) == ("FILLED", "reconciliation")
        assert Decimal(event.filled_qty or "") == Decimal("0.020")
        assert Decimal(event.avg_price or "") == Decimal("49992.5")
        # the stream never carried it: the search of the outage did
        assert not [e for e in events(run.r, "ORDER_TRADE_UPDATE")
                    if e["o"]["i"] == order["orderId"]]
        (logged,) = [c.body for c in controls(run.r, "final_state")
                     if c.body["kind"] == "order"
                     and c.body["response"]["orderId"] == order["orderId"]]
        assert logged["via"] == "allOrders"
        assert sorted(Decimal(t["qty"]) for t in logged["trades"]) == [Decimal("0.005"),
                                                                       Decimal("0.015")]
        # the search's weight is counted like any call's
        outage_weight = {p: w - spent.get(p, 0) for p, w in rest.weight_spent.items()}
        assert outage_weight["/fapi/v1/allOrders"] >= 5
        assert outage_weight["/fapi/v1/userTrades"] >= 5
