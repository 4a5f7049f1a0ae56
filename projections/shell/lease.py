"""One active process for an exclusive projection: a lease in Redis.

An exclusive projection keeps state in memory (the diff-depth book, the order state machine),
so two processes folding the same entries side by side would each hold half a book. The lease
`lease:{name}` is a string whose value is the holder (the consumer name), taken by a small Lua
function (lua/lease.lua: GET, then SET PX when the lease is free or already ours; a function of
the library in projections.shell.functions) with a TTL (default 10 s),
renewed at a third of its TTL, deleted on a clean shutdown. Other processes wait as hot
standbys and take over when it expires. A holder whose last good renewal was sent 80 % of the
TTL ago stops its projection, whether Redis refused, failed or still has not answered (a hung
call is abandoned): at 100 % another process may hold the lease.

A process started again with the same `--consumer` name takes its own lease back at once,
instead of waiting out the TTL of the process it replaces.

Health (`ProjectorHealth`, task `lease:{name}`): failing from the first renewal or acquisition
attempt that got no answer from Redis, recovered at the first one that did. So a projection
that lost its lease to an outage counts as failing for as long as it cannot try for it again,
though its loop has stopped, and a standby is healthy as long as Redis answers it, whoever
holds the lease.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import trio

from pipeline.errors import RedisUnavailable
from pipeline.redisconn import redis_errors
from projections.core.keys import lease_key
from projections.shell import functions
from projections.shell.health import ProjectorHealth

log = logging.getLogger("pipeline.project.lease")


# How the async methods make their blocking Redis calls: in a worker thread, abandoned when
# cancelled (a renewal stuck on a hung Redis must not keep the holder past its deadline).
RunSync = Callable[[Callable[[], Any]], Awaitable[Any]]
IN_THREAD: RunSync = functools.partial(trio.to_thread.run_sync, abandon_on_cancel=True)


class Lease:
    """The lease on one projection. Sync methods; the async ones run them through `run_sync`
    (worker threads by default)."""

    def __init__(self, client: redis.Redis, name: str, holder: str, ttl_ms: int = 10_000,
                 clock: Callable[[], float] = trio.current_time,
                 run_sync: RunSync = IN_THREAD, health: ProjectorHealth | None = None,
                 library: functions.FunctionLibrary | None = None) -> None:
        self.key = lease_key(name)
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.clock = clock
        self.run_sync = run_sync
        self.health = health or ProjectorHealth()
        self._client = client
        self._library = library or functions.DEFAULT

    def _call(self, fn: str, ttl_ms: int) -> bool:
        """FCALL of a lease function; when the library is missing (a Redis restart), make sure
        it is there (`FunctionLibrary.ensure`) and call once more."""
        with redis_errors():
            try:
                return bool(self._client.fcall(fn, 1, self.key, self.holder, ttl_ms))
            except redis.ResponseError as exc:
                if not functions.function_missing(exc):
                    raise
        self._library.ensure(self._client)
        with redis_errors():
            return bool(self._client.fcall(fn, 1, self.key, self.holder, ttl_ms))

    def try_acquire(self) -> bool:
        return self._call(functions.LEASE_ACQUIRE_FN, self.ttl_ms)

    def renew(self) -> bool:
        return self._call(functions.LEASE_RENEW_FN, self.ttl_ms)

    def release(self) -> None:
        self._call(functions.LEASE_RENEW_FN, 0)

    async def acquire(self) -> float:
        """Wait until this process holds the lease (polling at a third of the TTL). Returns
        the clock reading taken just before the successful attempt: the lease runs at least
        one TTL from then."""
        while True:
            sent = self.clock()
            try:
                got = await self.run_sync(self.try_acquire)
            except RedisUnavailable:
                self.health.failed(self.key)
            else:
                self.health.recovered(self.key)  # Redis answered: a standby is healthy
                if got:
                    return sent
            await trio.sleep(self.ttl_ms / 3000)

    async def keep(self, on_lost: Callable[[], object], since: float | None = None) -> None:
        """Renew at every third of the TTL until cancelled; call `on_lost` and return when a
        renewal finds the lease gone, or once 80 % of the TTL has passed since the last good
        renewal (or the acquisition at `since`) was sent, whether Redis refuses, fails or hangs:
        the lease runs out at 100 %, and another process may take it over then."""
        good = self.clock() if since is None else since
        while True:
            stop_at = good + self.ttl_ms * 0.8 / 1000
            await trio.sleep(max(0.0, min(self.ttl_ms / 3000, stop_at - self.clock())))
            sent = self.clock()
            if sent >= stop_at:
                log.warning("lease not renewed in time", extra={"lease": self.key})
                self.health.failed(self.key)  # unanswered: the outage goes on after the stop
                on_lost()
                return
            with trio.move_on_after(stop_at - sent):  # a hung call is abandoned at the limit
                try:
                    renewed = await self.run_sync(self.renew)
                except RedisUnavailable:
                    self.health.failed(self.key)
                    continue  # tried again at the next third, or given up at the limit
                self.health.recovered(self.key)
                if not renewed:
                    log.warning("lease lost", extra={"lease": self.key})
                    on_lost()
                    return
                good = sent


async def run_while_holding(lease: Lease, work: Callable[[], Awaitable[object]]) -> None:
    """Forever: wait for the lease, run `work` while holding it, start over if it is lost.

    `work` is called anew after every acquisition, so an exclusive projection starts from a
    fresh state each time (the other holder may have moved the views on meanwhile).
    """
    while True:
        since = await lease.acquire()
        log.info("lease acquired", extra={"lease": lease.key, "holder": lease.holder})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lease.keep, nursery.cancel_scope.cancel, since)
                await work()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await lease.run_sync(lease.release)
                except RedisUnavailable:
                    pass
