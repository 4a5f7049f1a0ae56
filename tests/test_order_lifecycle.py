"""The order listener's whole path, as it runs in production: the simulator's account ->
`pipeline ingest user` -> raw:user -> the orders projector -> `P:orders` consumed with
XREADGROUP, and `open_orders()` answering what `GET /fapi/v1/openOrders` answers."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from typing import Any

import redis
import trio

from pipeline.config import Secret
from pipeline.localredis import LocalRedis
from pipeline.rest import RestClient
from pipeline.signing import SignedRest, make_signer
from projections.client import OrderEvent, OrdersConsumer, open_algo_orders, open_orders
from projections.core.keys import Keys
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.conftest import ROOT
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


# --- the example listener, as a user runs it ------------------------------------------------

FILL_LINE = re.compile(r"^fill BTCUSDT (?P<id>\d+) (?P<status>\w+) filled=(?P<filled>\S+) "
                       r"avg=(?P<avg>\S+) last=(?P<last_qty>\S+)@(?P<last_price>\S+) \(stream\)$")


def has_group(r: redis.Redis, key: str, group: str) -> bool:
    try:
        return any(g["name"] == group.encode() for g in r.xinfo_groups(key))
    except redis.ResponseError:  # the stream does not exist yet
        return False


async def test_example_listener_prints_real_fill_quantities_and_prices(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        prefix = run.settings.view_prefix
        output = bytearray()

        async def collect(stream: trio.abc.ReceiveStream) -> None:
            async for chunk in stream:
                output.extend(chunk)

        def lines() -> list[str]:
            return output.decode().splitlines()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "REDIS_"))}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                run_projector, run.settings, choose(run.settings, "orders"),
                RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
            await snapshots_after(run, 1)
            listener = await trio.lowlevel.open_process(
                [sys.executable, str(ROOT / "examples" / "order_listener.py"), "--redis-url",
                 redis_server.url, "--group", "example", "--prefix", prefix],
                stdout=subprocess.PIPE, env=env, cwd=ROOT)
            assert listener.stdout is not None
            nursery.start_soon(collect, listener.stdout)
            await until(lambda: has_group(run.r, Keys(prefix).orders_stream(), "example"))

            order = place(run.sim, type="LIMIT", price="50000", quantity="0.020")
            run.sim.account.control("fill", {"orderId": order["orderId"],
                                             "quantity": "0.005"})
            run.sim.account.control("fill", {"orderId": order["orderId"], "price": "49990"})
            try:
                await until(lambda: any(" FILLED " in line for line in lines()))
                listener.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await listener.wait() == 0
            finally:
                if listener.returncode is None:
                    listener.kill()
            nursery.cancel_scope.cancel()

    assert "None" not in output.decode(), output.decode()
    fills = [m.groupdict() for line in lines() if (m := FILL_LINE.match(line))]
    assert [f["status"] for f in fills] == ["PARTIALLY_FILLED", "FILLED"], lines()
    assert {f["id"] for f in fills} == {str(order["orderId"])}
    partial, full = ({k: v if k in ("id", "status") else Decimal(v) for k, v in f.items()}
                     for f in fills)
    assert (partial["filled"], partial["avg"]) == (Decimal("0.005"), Decimal("50000"))
    assert (partial["last_qty"], partial["last_price"]) == (Decimal("0.005"), Decimal("50000"))
    # 0.005 at 50000 and 0.015 at 49990: the average of the two fills
    assert (full["filled"], full["avg"]) == (Decimal("0.020"), Decimal("49992.5"))
    assert (full["last_qty"], full["last_price"]) == (Decimal("0.015"), Decimal("49990"))
    assert f"order BTCUSDT {order['orderId']} NEW (stream)" in lines()
