"""One active process for an exclusive projection: a lease in Redis.

An exclusive projection keeps state in memory (the diff-depth book, the order state machine),
so two processes folding the same entries side by side would each hold half a book. The lease
`lease:{name}` is a string whose value is the holder (the consumer name), taken by a small Lua
script (GET, then SET PX when the lease is free or already ours) with a TTL (default 10 s),
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

log = logging.getLogger("pipeline.project.lease")


# Take the lease if free or already ours; returns 1 when held by us afterwards.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# Extend (or delete, with ttl 0) only when still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else
    redis.call('DEL', KEYS[1]) end
  return 1
end
return 0
"""


class Lease:
    """The lease on one projection. Sync methods; the async ones call them from threads."""

    def __init__(self, client: redis.Redis, name: str, holder: str, ttl_ms: int = 10_000,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.key = lease_key(name)
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.clock = clock
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    def try_acquire(self) -> bool:
        with redis_errors():
            return bool(self._acquire(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def renew(self) -> bool:
        with redis_errors():
            return bool(self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        with redis_errors():
            self._renew(keys=[self.key], args=[self.holder, 0])

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
