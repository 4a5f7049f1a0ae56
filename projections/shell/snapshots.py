"""Depth snapshots for the diff-depth book: REST in, the raw log out.

The sequencer (`projections.core.depthbook`) only says `NeedSnapshot(symbol)`; this fetches
`GET /fapi/v1/depth?limit=1000` and appends the answer to `raw:depth_snapshots` as a
`snapshot` control entry (a stream only the projector writes, so the market ingestor's
`raw:market:depth` stays its alone). The book applies it from the log like any other entry, so
a replay sees exactly what the live projector saw and never calls REST. At most one request
per symbol is in flight; a failed one is retried with backoff until it lands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
import trio

from pipeline.backoff import Backoff
from pipeline.errors import ExchangeError, RedisUnavailable
from pipeline.eventlog import control_entry
from pipeline.redisconn import redis_errors
from pipeline.rest import RestClient
from pipeline.weight import depth_weight
from projections.shell.health import ProjectorHealth

log = logging.getLogger("pipeline.project.snapshots")

SNAPSHOT_LIMIT = 1000


class Snapshotter:
    """Fetches depth snapshots over REST and appends them to `raw_key` (one per symbol at once).

    `clock` gives the receipt time written into the entry (wall clock: the entry's `recv_ts`).
    """

    def __init__(self, client: redis.Redis, nursery: trio.Nursery, rest: RestClient, *,
                 raw_key: str, maxlen: int | None, health: ProjectorHealth,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.nursery = nursery
        self.rest = rest
        self.raw_key = raw_key
        self.maxlen = maxlen
        self.health = health
        self.clock = clock
        self.outstanding: set[str] = set()

    def request(self, symbol: str) -> None:
        if symbol not in self.outstanding:
            self.outstanding.add(symbol)
            self.nursery.start_soon(self._fetch, symbol)

    async def _fetch(self, symbol: str) -> None:
        task = f"snapshot {symbol}"
        backoff = Backoff(base=0.5, cap=30.0)
        try:
            while True:
                try:
                    body = await self.rest.get("/fapi/v1/depth",
                                               {"symbol": symbol, "limit": SNAPSHOT_LIMIT},
                                               weight=depth_weight(SNAPSHOT_LIMIT))
                    entry = control_entry("snapshot", {"symbol": symbol, "response": body},
                                          recv_ts=self.clock())
                    await trio.to_thread.run_sync(self._append, entry)
                    log.info("depth snapshot logged", extra={"symbol": symbol})
                    return
                except (ExchangeError, RedisUnavailable) as exc:
                    if not backoff.failing:
                        log.warning("failed, retrying", extra={"task": task, "error": str(exc)})
                        self.health.failed(task)
                    await trio.sleep(backoff.next_delay())
        finally:
            self.health.recovered(task)
            self.outstanding.discard(symbol)

    def _append(self, entry: dict[bytes, Any]) -> None:
        with redis_errors():
            self.client.xadd(self.raw_key, entry, maxlen=self.maxlen,  # type: ignore[arg-type]
                             approximate=True)
