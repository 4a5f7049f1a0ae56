"""The lease of an exclusive projection, its timing on Trio's MockClock (real redis-server).

Each test takes pytest-trio's `autojump_clock` (`MockClock(autojump_threshold=0)`). Timing
rules under test (projections/shell/lease.py): a holder renews at a third of the TTL;
it stops at the first renewal that finds the lease taken, and at the latest 80 % of the TTL
after its last good renewal was sent, whether Redis refuses connections or hangs; a waiting
process polls at a third of the TTL.

Redis expires keys on its own clock, which MockClock cannot move: these tests never wait for
Redis to expire the lease (tests/test_projector.py does, in real time). The Redis calls run
inline on the event loop (the `run_sync` seam) where Redis answers, because autojump would
jump the clock while a worker thread waits for a reply; the hanging-Redis test keeps the
worker thread, since a call that hangs inline would block the whole loop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis
import trio
import trio.testing

from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from projections.core.keys import lease_key
from projections.shell.lease import Lease

T = TypeVar("T")
TTL_MS = 9_000  # renewals every 3 s, stop at 7.2 s without one


@pytest.fixture
def client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    c = make_client(redis_server.url)  # as the projector makes its clients
    yield c
    c.close()


class Inline:
    """The `run_sync` seam: run each Redis call on the event loop, noting when it was made."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.calls.append(trio.current_time())
        return fn()


def lease(client: redis.Redis, run_sync: Callable[[Callable[[], T]], Awaitable[T]] | None = None
          ) -> Lease:
    extra = {"run_sync": run_sync} if run_sync is not None else {}
    return Lease(client, "counter", "a", ttl_ms=TTL_MS, **extra)  # type: ignore[arg-type]


async def keep_until_lost(held: Lease, within: float = 60.0) -> float:
    """Run `keep` from now; the mock time at which it gave the lease up."""
    lost: list[float] = []
    with trio.fail_after(within):
        await held.keep(lambda: lost.append(trio.current_time()))
    assert len(lost) == 1
    return lost[0]


async def test_holder_renews_at_a_third_of_its_ttl(
        autojump_clock: trio.testing.MockClock, client: redis.Redis, r: redis.Redis) -> None:
    inline = Inline()
    held = lease(client, inline)
    assert held.try_acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held.keep, lambda: pytest.fail("lease given up while Redis renews"))
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert inline.calls == pytest.approx([3.0, 6.0, 9.0, 12.0, 15.0, 18.0])
    assert r.get(lease_key("counter")) == b"a"
    assert 0 < r.pttl(lease_key("counter")) <= TTL_MS


async def test_holder_that_finds_its_lease_taken_stops_at_the_next_renewal(
        autojump_clock: trio.testing.MockClock, client: redis.Redis, r: redis.Redis) -> None:
    held = lease(client, Inline())
    assert held.try_acquire()

    async def intrude() -> None:
        await trio.sleep(4)  # e.g. "a" paused past its TTL and another process took over
        r.set(lease_key("counter"), b"intruder")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(intrude)
        assert await keep_until_lost(held) == pytest.approx(6.0)
    assert r.get(lease_key("counter")) == b"intruder"  # a lost lease is not ours to touch


async def test_holder_stops_before_its_ttl_runs_out_when_redis_is_unreachable(
        autojump_clock: trio.testing.MockClock, redis_server: LocalRedis,
        client: redis.Redis) -> None:
    held = lease(client, Inline())
    assert held.try_acquire()
    redis_server.kill()
    # renewals at 3 and 6 s fail; by 9 s a standby may hold the lease: stop at 80 %
    assert await keep_until_lost(held) == pytest.approx(TTL_MS * 0.8 / 1000)


async def test_holder_stops_in_time_while_a_renewal_hangs(
        autojump_clock: trio.testing.MockClock, redis_server: LocalRedis,
        client: redis.Redis) -> None:
    held = lease(client)  # worker threads, as in production: the hung call must not block
    assert held.try_acquire()
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # up, but answering nothing
    try:
        assert await keep_until_lost(held) == pytest.approx(TTL_MS * 0.8 / 1000)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_waiting_process_polls_at_a_third_of_the_ttl_and_takes_a_freed_lease(
        autojump_clock: trio.testing.MockClock, client: redis.Redis, r: redis.Redis) -> None:
    r.set(lease_key("counter"), b"other")
    inline = Inline()
    waiting = lease(client, inline)

    async def holder_stops() -> None:
        await trio.sleep(4)
        r.delete(lease_key("counter"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder_stops)
        with trio.fail_after(60):
            await waiting.acquire()
        assert trio.current_time() == pytest.approx(6.0)
    assert inline.calls == pytest.approx([0.0, 3.0, 6.0])
    assert r.get(lease_key("counter")) == b"a"
