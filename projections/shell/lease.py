"""One active process for an exclusive projection: a lease in Redis.

An exclusive projection keeps state in memory (the diff-depth book, the order state machine),
so two processes folding the same entries side by side would each hold half a book. The lease
`lease:{name}` is a string whose value is the holder (the consumer name), taken by a small Lua
function (lua/lease.lua: GET, then SET PX when the lease is free or already ours; a function of
the library in projections.shell.functions) with a TTL (default 10 s),
renewed at a third of its TTL, deleted on a clean shutdown. Other processes wait as hot
standbys and take over when it expires. A holder that cannot renew before the TTL runs out stops
its projection at once: by then another process may hold the lease.

A process started again with the same `--consumer` name takes its own lease back at once,
instead of waiting out the TTL of the process it replaces.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import redis
import trio

from pipeline.errors import RedisUnavailable
from pipeline.redisconn import redis_errors
from projections.core.keys import lease_key
from projections.shell import functions

log = logging.getLogger("pipeline.project.lease")


class Lease:
    """The lease on one projection. Sync methods; the async ones call them from threads."""

    def __init__(self, client: redis.Redis, name: str, holder: str, ttl_ms: int = 10_000,
                 clock: Callable[[], float] = trio.current_time,
                 library: functions.FunctionLibrary | None = None) -> None:
        self.key = lease_key(name)
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.clock = clock
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

    async def acquire(self) -> None:
        """Wait until this process holds the lease (polling at a third of the TTL)."""
        while True:
            try:
                if await trio.to_thread.run_sync(self.try_acquire):
                    return
            except RedisUnavailable:
                pass
            await trio.sleep(self.ttl_ms / 3000)

    async def keep(self, on_lost: Callable[[], object]) -> None:
        """Renew until cancelled; call `on_lost` when the lease is lost or may be."""
        last_ok = self.clock()
        while True:
            await trio.sleep(self.ttl_ms / 3000)
            try:
                if not await trio.to_thread.run_sync(self.renew):
                    log.warning("lease lost", extra={"lease": self.key})
                    on_lost()
                    return
                last_ok = self.clock()
            except RedisUnavailable:
                # Past most of the TTL without a renewal someone else may take over: stop first.
                if (self.clock() - last_ok) * 1000 > self.ttl_ms * 0.8:
                    log.warning("lease not renewed in time", extra={"lease": self.key})
                    on_lost()
                    return


async def run_while_holding(lease: Lease, work: Callable[[], Awaitable[object]]) -> None:
    """Forever: wait for the lease, run `work` while holding it, start over if it is lost.

    `work` is called anew after every acquisition, so an exclusive projection starts from a
    fresh state each time (the other holder may have moved the views on meanwhile).
    """
    while True:
        await lease.acquire()
        log.info("lease acquired", extra={"lease": lease.key, "holder": lease.holder})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lease.keep, nursery.cancel_scope.cancel)
                await work()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(lease.release)
                except RedisUnavailable:
                    pass
