"""The batch writer: appends the entries of the ingest buffer to the `raw:` streams.

API (used by both ingestors):

    writer = LogWriter(make_client(url), settings.retention, bound=settings.buffer_frames)
    nursery.start_soon(writer.run)              # the one task that talks to Redis
    writer.append_frame(key, frame, recv_ts, conn, seq)   # never blocks; False = dropped
    writer.append_control(key, "opened", {...}, conn)     # never blocks
    await writer.flush()                        # until everything appended so far is written

How it writes, and why:
- One redis-py pipeline (no MULTI) per batch, run in a worker thread: redis-py's asyncio client
  does not run on Trio, and the sync client must not block the event loop. A batch holds what
  accumulated while the previous one was on the wire (up to `max_batch`), so at low load each
  frame goes out alone at once, and at high load batches grow by themselves.
- No automatic retry inside redis-py (see `pipeline.redisconn`): a re-sent `XADD *` would log a
  frame twice without anyone knowing. Here a failed batch is retried as a whole, with
  exponential backoff and jitter, until Redis answers. A connection lost after Redis applied
  part of the batch logs those entries twice: a duplicate is an entry with the same `conn` and
  `seq` as an earlier one (documented in `pipeline.eventlog`). Entries Redis refused one by one
  (an error reply such as OOM) are retried alone; after `MAX_REFUSALS` attempts they are dropped
  and accounted like buffer drops, so a permanently refused key cannot stall the whole log.
- While Redis is down the readers keep filling the bounded `FrameBuffer`; past its bound frames
  are dropped and counted per key. When a batch goes through again, a `gap` control entry is
  appended to each affected key with the count, the receipt-time range and the connections.
- Retention per raw key from `Settings.retention`: `XADD key MAXLEN ~ n` or `MINID ~ now-age`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import trio

from pipeline import metrics
from pipeline.backoff import backoff_delay
from pipeline.buffer import FrameBuffer
from pipeline.errors import RedisUnavailable
from pipeline.eventlog import (
    DEFAULT_RETENTION,
    Retention,
    control_entry,
    frame_entry,
    retention_family,
)
from pipeline.redisconn import redis_errors

log = logging.getLogger("pipeline.writer")

MAX_BATCH = 2_000
MAX_REFUSALS = 8
FINAL_FLUSH_TIMEOUT_S = 10.0

Batch = list[tuple[str, dict[bytes, bytes]]]


class LogWriter:
    def __init__(
        self,
        client: redis.Redis,
        retention: Mapping[str, Retention] = DEFAULT_RETENTION,
        *,
        bound: int = 200_000,
        max_batch: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
        backoff: tuple[float, float] = (0.05, 5.0),
        rand: Callable[[], float] = random.random,
        final_flush_timeout: float = FINAL_FLUSH_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._retention = retention
        self._trim_cache: dict[str, tuple[int | None, float | None]] = {}
        self.buffer = FrameBuffer(bound)
        self.max_batch = max_batch
        self.clock = clock
        self.backoff = backoff
        self.rand = rand
        self.final_flush_timeout = final_flush_timeout
        self.written = 0  # entries Redis acknowledged
        self.settled = 0  # accepted entries that were written, or given up after MAX_REFUSALS
        self.outage_since: float | None = None  # wall time of the first failure of an outage
        self._inflight: Batch = []
        self._wake = trio.Event()
        self._progress = trio.Event()

    # --- producers (never block) -----------------------------------------------------------

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        """Queue one frame for `key`. False: the buffer was full and the frame was counted as
        dropped (it will be reported in a `gap` entry)."""
        if self.buffer.put(key, frame_entry(frame, recv_ts, conn, seq), recv_ts, conn):
            if not self._wake.is_set():
                self._wake.set()
            return True
        metrics.FRAMES_DROPPED.labels(key).inc()
        return False

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = "") -> bool:
        """Queue a control entry (no `frame` field) for `key`."""
        now = self.clock()
        if self.buffer.put_control(key, control_entry(ctl, body, now, conn), now, conn):
            if not self._wake.is_set():
                self._wake.set()
            return True
        metrics.FRAMES_DROPPED.labels(key).inc()
        return False

    @property
    def healthy(self) -> bool:
        """False while Redis has refused writes for more than 30 s."""
        return self.outage_since is None or self.clock() - self.outage_since < 30.0

    # --- the writer task -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled; on cancel, try for `final_flush_timeout` s to write the rest."""
        task_status.started()
        try:
            while True:
                while not self.buffer:
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._inflight = self._take_batch()
                await self._write_until_done()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.final_flush_timeout
                await self._drain()
            left = len(self._inflight) + len(self.buffer)
            if left:
                log.error("shutdown: entries not written", extra={"entries": left})

    async def flush(self) -> None:
        """Return once every entry appended before this call is written (or given up)."""
        target = self.buffer.accepted
        while self.settled < target:
            await self._progress.wait()

    async def _drain(self) -> None:
        if self._inflight:
            await self._write_until_done()
        while self.buffer:
            self._inflight = self._take_batch()
            await self._write_until_done()

    def _take_batch(self) -> Batch:
        batch = self.buffer.take(self.max_batch)
        metrics.BUFFER_FILL.set(len(self.buffer))
        return batch

    async def _write_until_done(self) -> None:
        """Write `self._inflight`, retrying with backoff until every entry is settled."""
        attempt = 0
        refusals = 0
        while self._inflight:
            batch = self._inflight
            failed = await self._write_once(batch)
            if failed is None:  # Redis unreachable: nothing known to be written
                attempt += 1
                await trio.sleep(backoff_delay(attempt, *self.backoff, self.rand))
                continue
            self._settle(len(batch) - len(failed))
            self._inflight = [batch[i] for i in failed]
            if self._inflight:
                refusals += 1
                if refusals >= MAX_REFUSALS:
                    self._give_up(self._inflight)
                    break
                attempt += 1
                await trio.sleep(backoff_delay(attempt, *self.backoff, self.rand))
        self._inflight = []
        if self.buffer.has_drops():
            self._append_gaps()

    async def _write_once(self, batch: Batch) -> list[int] | None:
        """Indices of the entries Redis refused, or None when Redis could not be reached."""
        try:
            failed, errors = await trio.to_thread.run_sync(self._write_sync, batch, self.clock())
        except RedisUnavailable as exc:
            if self.outage_since is None:
                self.outage_since = self.clock()
                log.warning("redis unavailable: holding frames in the buffer and retrying",
                            extra={"error": str(exc), "buffered": len(self.buffer)})
            return None
        if self.outage_since is not None:
            log.warning("redis back", extra={"outage_s": round(self.clock() - self.outage_since, 3),
                                             "buffered": len(self.buffer)})
            self.outage_since = None
        if errors:
            log.warning("redis refused entries", extra={"refused": len(failed), "error": errors[0]})
        return failed

    def _write_sync(self, batch: Batch, now: float) -> tuple[list[int], list[str]]:
        """Worker thread: one pipeline with one XADD per entry."""
        started = time.perf_counter()
        pipe = self._client.pipeline(transaction=False)
        for key, fields in batch:
            maxlen, age = self._trim(key)
            if maxlen is not None:
                pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            elif age is not None:
                minid = f"{math.floor((now - age) * 1000)}-0"
                pipe.xadd(key, fields, minid=minid, approximate=True)  # type: ignore[arg-type]
            else:
                pipe.xadd(key, fields)  # type: ignore[arg-type]
        with redis_errors():
            results = pipe.execute(raise_on_error=False)
        failed = [i for i, res in enumerate(results) if isinstance(res, Exception)]
        metrics.REDIS_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        counts: dict[str, int] = {}
        for key, _ in batch:
            counts[key] = counts.get(key, 0) + 1
        for i in failed:
            counts[batch[i][0]] -= 1
        for key, n in counts.items():
            metrics.FRAMES_LOGGED.labels(key).inc(n)
        return failed, [str(results[i]) for i in failed[:1]]

    def _trim(self, key: str) -> tuple[int | None, float | None]:
        trim = self._trim_cache.get(key)
        if trim is None:
            ret = self._retention.get(retention_family(key), Retention())
            trim = self._trim_cache[key] = (ret.maxlen, ret.max_age_s)
        return trim

    def _settle(self, n: int) -> None:
        self.written += n
        self.settled += n
        self._progress.set()
        self._progress = trio.Event()

    def _give_up(self, batch: Batch) -> None:
        """Entries Redis keeps refusing: count them as dropped so a gap entry reports them."""
        log.error("giving up on entries redis keeps refusing", extra={"entries": len(batch)})
        for key, fields in batch:
            ts = float(fields.get(b"recv_ts", b"0"))
            self.buffer.record_drop(key, ts, fields.get(b"conn", b"").decode())
            metrics.FRAMES_DROPPED.labels(key).inc()
        self.settled += len(batch)
        self._progress.set()
        self._progress = trio.Event()

    def _append_gaps(self) -> None:
        for key, rec in self.buffer.take_drops().items():
            metrics.GAPS.labels(key).inc()
            log.warning("frames dropped: recording a gap", extra={"key": key,
                                                                  "dropped": rec.count})
            self.append_control(key, "gap", rec.body())
