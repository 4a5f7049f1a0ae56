"""The projector's /healthz across a real Redis outage longer than the lease.

What an orchestrator acting on /healthz needs: unhealthy while the projector cannot work
(Redis away: its loops fail, and an exclusive projection that lost its lease cannot win it
back), healthy again once it works, so that a projector that recovered by itself is not
restarted in a loop. Real redis-server, killed and started again on its port; the projector
runs in this process on the real clock (its Redis calls run in worker threads).
"""

from __future__ import annotations

import time

import redis
import trio

from pipeline.localredis import LocalRedis
from projections.core.keys import lease_key
from projections.shell import project as runner
from projections.shell.health import ProjectorHealth
from projections.shell.registry import choose
from tests.projector_support import mark_frame, seed, settings_for, wait_for

LEASE_TTL_MS = 1000  # renewals every 0.33 s, given up at 0.8 s without one
UNHEALTHY_AFTER_S = 1.0


async def healthy_for(health: ProjectorHealth, seconds: float) -> None:
    """Fails the test unless `health` stays healthy for `seconds`."""
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        assert health.healthy(), health.failing()
        await trio.sleep(0.05)


async def test_a_projector_is_unhealthy_during_an_outage_longer_than_the_lease_and_then_healthy(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    health = ProjectorHealth(unhealthy_after_s=UNHEALTHY_AFTER_S)
    opts = runner.RunOptions(consumer="p1", lease_ttl_ms=LEASE_TTL_MS, block_ms=100)
    key = "websocket:mark_price:btcusdt"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price,orders"), opts,
                           None, None, health)
        await wait_for(lambda: r.get(lease_key("orders")) == b"p1")
        await healthy_for(health, 0.5)

        redis_server.kill()
        await trio.sleep(3 * LEASE_TTL_MS / 1000)  # the lease is lost, and so is Redis
        assert not health.healthy()
        assert any("orders" in task for task in health.failing())  # waiting for its lease

        redis_server.start()  # empty: no lease, no groups
        seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "1.00"))])
        await wait_for(lambda: r.exists(key) and r.get(lease_key("orders")) == b"p1")
        with trio.fail_after(5):
            while not health.healthy():  # noqa: ASYNC110 - the loops report from threads
                await trio.sleep(0.05)
        await healthy_for(health, 2.0)  # and stays so: nothing left marked by the outage
        nursery.cancel_scope.cancel()


async def test_an_exclusive_projection_alone_counts_as_failing_while_redis_keeps_its_lease_away(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    holder = ProjectorHealth(unhealthy_after_s=UNHEALTHY_AFTER_S)
    standby = ProjectorHealth(unhealthy_after_s=UNHEALTHY_AFTER_S)
    only_orders = choose(settings, "orders")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, only_orders,
                           runner.RunOptions(consumer="a", lease_ttl_ms=LEASE_TTL_MS), None,
                           None, holder)
        await wait_for(lambda: r.get(lease_key("orders")) == b"a")
        nursery.start_soon(runner.run, settings, only_orders,
                           runner.RunOptions(consumer="b", lease_ttl_ms=LEASE_TTL_MS), None,
                           None, standby)
        await healthy_for(standby, 0.5)  # a standby waiting on a held lease is healthy

        redis_server.kill()
        await trio.sleep(3 * LEASE_TTL_MS / 1000)
        assert not holder.healthy() and not standby.healthy()

        redis_server.start()
        await wait_for(lambda: r.get(lease_key("orders")) in (b"a", b"b"))
        with trio.fail_after(5):
            while not (holder.healthy() and standby.healthy()):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await healthy_for(holder, 1.0)
        await healthy_for(standby, 1.0)
        nursery.cancel_scope.cancel()

