"""Consumers left in the groups by projector processes that are gone.

A projector reads as `hostname-pid` (`--consumer`), so every restart leaves a consumer in every
group it read, and XINFO CONSUMERS (and `pipeline status`'s consumer counts) grow for ever.
Each projection's task removes, from its own groups, every consumer that holds no pending
entry and has been idle (no read, claim or ack) for more than `REAP_IDLE_S`, at start and
every `REAP_EVERY_S`:
- a stateless projection's live consumer reads at least once a block (at most 2 s), so one
  idle for an hour belongs to a dead process;
- an exclusive projection's group is read only by the lease holder, and standbys keep idle
  consumers from their own turns; so only the holder removes them, while holding the lease
  (the task runs inside the lease), and a standby that takes over later reads as a new
  consumer again.
A consumer with pending entries is never removed: XGROUP DELCONSUMER would drop them from the
pending list, and they would never be delivered again. They are claimed first (at
`--claim-idle-ms` by a stateless projection, at takeover by an exclusive one), which empties
it. The check and the removal are two commands (the projector's ACL allows no script on the
log's keys): a consumer idle for an hour that reads in the instant between them is the one
case this does not cover.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
import trio

from pipeline.errors import RedisUnavailable
from pipeline.redisconn import redis_errors

log = logging.getLogger("pipeline.project")

REAP_IDLE_S = 3600.0
REAP_EVERY_S = 600.0


def remove_idle_consumers(client: redis.Redis, group: str, keys: Sequence[str], own: str,
                          idle_s: float = REAP_IDLE_S) -> list[str]:
    """Remove `group`'s consumers on `keys` that hold nothing and were idle longer than
    `idle_s`, except `own`; returns `key/consumer` of each removed."""
    removed = []
    with redis_errors():
        for key in keys:
            try:
                rows: Any = client.xinfo_consumers(key, group)
            except redis.ResponseError:  # no such key or group yet: nothing to remove
                continue
            for row in rows:
                name = _text(row["name"])
                if name != own and not row["pending"] and row["idle"] > idle_s * 1000:
                    client.xgroup_delconsumer(key, group, name)
                    removed.append(f"{key}/{name}")
    return removed


async def remove_idle_consumers_every(client: redis.Redis, group: str, keys: Sequence[str],
                                      own: str, idle_s: float = REAP_IDLE_S,
                                      every_s: float = REAP_EVERY_S) -> None:
    """`remove_idle_consumers` now and every `every_s` until cancelled; a Redis outage only
    skips a round."""
    while True:
        try:
            removed = await trio.to_thread.run_sync(remove_idle_consumers, client, group, keys,
                                                    own, idle_s, abandon_on_cancel=True)
        except (RedisUnavailable, redis.ResponseError) as exc:
            log.debug("idle consumers not checked", extra={"group": group, "error": str(exc)})
        else:
            if removed:
                log.info("idle consumers removed", extra={
                    "group": group, "consumers": ",".join(removed)})
        await trio.sleep(every_s)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
