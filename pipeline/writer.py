"""The batch writer: appends the entries of the ingest buffer to the `raw:` streams.

API (used by both ingestors):

    writer = LogWriter(make_client(url), settings.retention, bound=settings.buffer_frames)
    nursery.start_soon(writer.run)              # owns the thread that talks to Redis
    writer.append_frame(key, frame, recv_ts, conn, seq)   # never blocks; False = dropped
    writer.append_control(key, "opened", {...}, conn)     # never blocks
    await writer.flush()                        # until everything appended so far is written

How it writes, and why:
- One pipelined round trip (no MULTI) per batch over a redis-py connection, in one long-lived
  writer thread: redis-py's asyncio client does not run on Trio, and the sync client must not
  block the event loop. (Not one `trio.to_thread.run_sync` per batch: that hand-off alone costs
  ~90 µs of CPU.) The thread sleeps on a `threading.Event` while the buffer is empty; the first
  append wakes it, so at low load each frame goes out alone at once. A batch is what
  accumulated while the previous one was on the wire (up to `max_batch`). Only under heavy
  load (more than `LINGER_RATE` entries a second over the last 100 ms window) the thread pauses
  `linger` (10 ms) before taking the next one: the readers and the writer share one GIL, and
  many tiny batches cost the readers more CPU in thread switches than the writing itself
  (bench/bench_ingest.py). Between 10,000 and 20,000 entries a second it pauses 1 ms, so that
  the back-to-back mode cannot hold the ingestor below the rate that starts the long pauses
  (`pause_after`). The rule looks at the arrival rate, not at the batch size: a batch
  grows during a pause, so a size rule would keep pausing once it had paused, and add up to
  10 ms to every frame at ordinary rates.
  `linger=0` gives strict back-to-back batches.
- Each XADD is packed as RESP when it is appended (per-key prefixes made once; the writer
  thread then only joins, sends with `Connection.send_packed_command` and reads the replies
  with `pipeline.replies`, which sleeps until a batch's replies are in and then mostly just
  counts them): redis-py's `Pipeline` object costs ~7 µs of CPU per XADD, this ~1.6 µs,
  and the less the writer thread holds the GIL, the less the readers wait for it. The wire
  protocol is the same pipelining. An age limit (`MINID`) is computed at append time.
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
import operator
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import hiredis
import redis
import trio

from pipeline import metrics
from pipeline.backoff import Backoff, BatchRetry
from pipeline.buffer import FrameBuffer
from pipeline.errors import RedisUnavailable
from pipeline.eventlog import (
    DEFAULT_RETENTION,
    Retention,
    control_entry,
    retention_family,
)
from pipeline.redisconn import redis_errors
from pipeline.replies import read_replies

log = logging.getLogger("pipeline.writer")

MAX_BATCH = 2_000
MAX_REFUSALS = 8
FINAL_FLUSH_TIMEOUT_S = 10.0
LINGER_S = 0.010
STOP_QUIET_S = 0.1
LINGER_RATE = 20_000.0  # entries/s: above it, pause `linger` after a batch
SHORT_LINGER_S = 0.001
SHORT_LINGER_RATE = 10_000.0  # entries/s: above it (and below LINGER_RATE), pause 1 ms
RATE_WINDOW_S = 0.1

# A buffered entry: (raw key, its XADD command packed as RESP). One flat tuple per entry, so
# the writer thread's passes over a batch run in C (`map(itemgetter...)`, `Counter`); what a
# refused entry needs besides (its receipt time and connection) is read back from its bytes.
Item = tuple[str, bytes]
Batch = list[Item]
_key_of = operator.itemgetter(0)
_command_of = operator.itemgetter(1)


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
        linger: float = LINGER_S,
    ) -> None:
        self._client = client
        self._retention = retention
        self._trim_cache: dict[str, tuple[int | None, float | None]] = {}
        self._prefixes: dict[tuple[str, int], bytes] = {}
        self._frame_prefixes: dict[str, bytes] = {}
        self._conn_tails: dict[str, bytes] = {}  # per connection id: see `_conn_tail`
        self.buffer = FrameBuffer(bound)
        self.max_batch = max_batch
        self.clock = clock
        self.backoff = backoff
        self.rand = rand
        self.final_flush_timeout = final_flush_timeout
        self.linger = linger
        self.written = 0  # entries Redis acknowledged
        self.settled = 0  # accepted entries that were written, or given up after MAX_REFUSALS
        self.outage_since: float | None = None  # wall time of the first failure of an outage
        self._token: trio.lowlevel.TrioToken | None = None
        self._work = threading.Event()  # set when the idle writer thread has something to do
        self._idle = False
        self._stopping = False  # drain what is buffered, then end
        self._abort = threading.Event()  # end now (the final flush ran out of time)
        self._progress = trio.Event()
        self._flush_waiters = 0
        self._gaps_scheduled = False

    # --- producers (never block; trio thread) ------------------------------------------------

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        """Queue one frame for `key`. False: the buffer was full and the frame was counted as
        dropped (it will be reported in a `gap` entry)."""
        # hot path (every frame): cached prefix per key and tail per connection, one format
        prefix = self._frame_prefixes.get(key) or self._prefix(key)
        tail = self._conn_tails.get(conn) or self._conn_tail(conn)
        ts, sq = b"%.6f" % recv_ts, b"%d" % seq  # as eventlog.format_ts
        packed = b"%s$5\r\nframe\r\n$%d\r\n%s\r\n$7\r\nrecv_ts\r\n$%d\r\n%s%s$%d\r\n%s\r\n" % (
            prefix, len(frame), frame, len(ts), ts, tail, len(sq), sq)
        if self.buffer.put(key, packed, recv_ts, conn):
            if self._idle:
                self._work.set()
            return True
        metrics.FRAMES_DROPPED.labels(key).inc()
        return False

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = "") -> bool:
        """Queue a control entry (no `frame` field) for `key`."""
        now = self.clock()
        fields = control_entry(ctl, body, now, conn)
        packed = self._prefix(key, 2 * len(fields)) + b"".join(
            [b"$%d\r\n%s\r\n" % (len(part), part) for kv in fields.items() for part in kv])
        if self.buffer.put_control(key, packed, now, conn):
            if self._idle:
                self._work.set()
            return True
        metrics.FRAMES_DROPPED.labels(key).inc()
        return False

    @property
    def healthy(self) -> bool:
        """False while Redis has refused writes for more than 30 s."""
        return self.outage_since is None or self.clock() - self.outage_since < 30.0

    # --- the writer task (trio side) -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled; on cancel, try for `final_flush_timeout` s to write the rest.

        The writing happens in one long-lived thread, not one `to_thread` call per batch:
        handing a batch to a worker thread costs ~90 µs of CPU, more than writing it."""
        self._token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        thread = threading.Thread(target=self._thread_main, args=(done,), name="redis-writer",
                                  daemon=True)
        thread.start()
        task_status.started()
        try:
            await done.wait()  # returns only if the thread died
            raise RuntimeError("the redis writer thread ended")
        finally:
            self._stopping = True
            self._work.set()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.final_flush_timeout
                await done.wait()
            if not done.is_set():
                self._abort.set()
                self._work.set()
                log.error("shutdown: entries not written", extra={"entries": len(self.buffer)})

    async def flush(self) -> None:
        """Return once every entry appended before this call is written (or given up)."""
        target = self.buffer.accepted
        self._flush_waiters += 1
        try:
            while self.settled < target:
                with trio.move_on_after(0.1):  # a missed wake-up costs 0.1 s, not a hang
                    await self._progress.wait()
        finally:
            self._flush_waiters -= 1

    def _on_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn` in the trio thread soon (from the writer thread)."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # --- the writer thread ---------------------------------------------------------------------

    def _thread_main(self, done: trio.Event) -> None:
        quiet_since: float | None = None
        window_start, window_count, rate = time.monotonic(), 0, 0.0
        try:
            while not self._abort.is_set():
                if not self.buffer:
                    if self._stopping and not self._gaps_scheduled:
                        # tasks cancelled with us may still append their last control entries
                        # (a connection's `closed`): stop only after a short quiet spell
                        now = time.monotonic()
                        quiet_since = quiet_since or now
                        if now - quiet_since >= STOP_QUIET_S:
                            break
                    self._wait_for_work()
                    continue
                quiet_since = None
                batch = self.buffer.take(self.max_batch)
                metrics.BUFFER_FILL.set(len(self.buffer))
                now = time.monotonic()
                window_count += len(batch)
                if now - window_start >= RATE_WINDOW_S:
                    rate = window_count / (now - window_start)
                    window_start, window_count = now, 0
                self._write_until_done(batch)
                pause = pause_after(rate, len(batch), self.max_batch, self.linger)
                if pause > 0:  # frames arrive back to back: let the readers fill the next batch
                    self._abort.wait(pause)
        except BaseException:
            log.exception("redis writer thread failed")
        finally:
            self._on_trio(done.set)

    def _wait_for_work(self) -> None:
        # `_idle` before the re-check: an append after the check sees it and sets `_work`
        self._idle = True
        self._work.clear()
        if not self.buffer:
            self._work.wait(0.01 if self._stopping else 1.0)
        self._idle = False

    def _write_until_done(self, batch: Batch) -> None:
        """Write `batch`, retrying with backoff until every entry is settled."""
        retry = BatchRetry(Backoff(*self.backoff, self.rand), MAX_REFUSALS)
        while batch and not self._abort.is_set():
            failed = self._write_once(batch)
            if failed is None:  # Redis unreachable: nothing known to be written
                self._abort.wait(retry.unreachable())
                continue
            self._settle(len(batch) - len(failed))
            batch = [batch[i] for i in failed]
            if batch:
                delay = retry.refused()
                if delay is None:
                    self._give_up(batch)
                    return
                self._abort.wait(delay)
        if self.buffer.has_drops() and not self._gaps_scheduled:
            self._gaps_scheduled = True
            self._on_trio(self._append_gaps)

    def _write_once(self, batch: Batch) -> list[int] | None:
        """Indices of the entries Redis refused, or None when Redis could not be reached."""
        try:
            failed, errors = self._write_sync(batch, self.clock())
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
        """Worker thread: the batch's XADDs in one pipelined round trip."""
        started = time.perf_counter()
        payload = b"".join(map(_command_of, batch))
        pool = self._client.connection_pool
        with redis_errors():
            conn = pool.get_connection()  # connects (and names the client) if needed
        failed: list[int] = []
        errors: list[str] = []
        try:
            with redis_errors():
                conn.send_packed_command([payload], check_health=False)
                for i, error in read_replies(conn, len(batch)):
                    failed.append(i)
                    errors.append(error)
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            pool.release(conn)
        self._count(batch, failed, time.perf_counter() - started)
        return failed, errors[:1]

    def _prefix(self, key: str, nfields: int = 8) -> bytes:
        """`*<argc> XADD key <trim> *` for an entry of `nfields` field and value args."""
        cached = self._prefixes.get((key, nfields))
        if cached is not None:
            return cached
        maxlen, age = self._trim(key)
        args = [b"XADD", key.encode()]
        if maxlen is not None:
            args += [b"MAXLEN", b"~", b"%d" % maxlen]
        elif age is not None:
            args += [b"MINID", b"~", b"%d-0" % math.floor((self.clock() - age) * 1000)]
        args.append(b"*")
        prefix = b"*%d\r\n" % (len(args) + nfields) + b"".join(
            [b"$%d\r\n%s\r\n" % (len(a), a) for a in args])
        if age is None:  # an age limit moves with the clock: not cached
            self._prefixes[(key, nfields)] = prefix
            if nfields == 8:
                self._frame_prefixes[key] = prefix
        return prefix

    def _conn_tail(self, conn: str) -> bytes:
        """A frame entry's RESP from the end of its `recv_ts` value to the `seq` value: the
        `conn` field and value and the `seq` field name, the same for every frame of `conn`."""
        if len(self._conn_tails) > 10_000:  # connection ids are not reused: keep the recent
            self._conn_tails.clear()
        connb = conn.encode()
        tail = self._conn_tails[conn] = b"\r\n$4\r\nconn\r\n$%d\r\n%s\r\n$3\r\nseq\r\n" % (
            len(connb), connb)
        return tail

    def _trim(self, key: str) -> tuple[int | None, float | None]:
        trim = self._trim_cache.get(key)
        if trim is None:
            ret = self._retention.get(retention_family(key), Retention())
            trim = self._trim_cache[key] = (ret.maxlen, ret.max_age_s)
        return trim

    def _count(self, batch: Batch, failed: list[int], seconds: float) -> None:
        metrics.REDIS_WRITE_SECONDS.observe(seconds)
        metrics.BATCH_SIZE.observe(len(batch))
        counts = Counter(map(_key_of, batch))
        for i in failed:
            counts[batch[i][0]] -= 1
        for key, n in counts.items():
            metrics.FRAMES_LOGGED.labels(key).inc(n)

    def _settle(self, n: int) -> None:
        self.written += n
        self.settled += n
        if self._flush_waiters:
            self._on_trio(self._notify_progress)

    def _give_up(self, batch: Batch) -> None:
        """Entries Redis keeps refusing: count them as dropped so a gap entry reports them."""
        log.error("giving up on entries redis keeps refusing", extra={"entries": len(batch)})
        self._gaps_scheduled = True
        self._on_trio(self._record_given_up, batch)
        self.settled += len(batch)
        if self._flush_waiters:
            self._on_trio(self._notify_progress)

    def _record_given_up(self, batch: Batch) -> None:  # trio thread: the buffer's drop records
        for key, command in batch:
            fields = entry_fields(command)
            if fields.get(b"ctl") == b"gap":
                continue  # a refused gap entry is not reported by another one
            self.buffer.record_drop(key, float(fields[b"recv_ts"]), fields[b"conn"].decode())
            metrics.FRAMES_DROPPED.labels(key).inc()
        self._append_gaps()

    def _append_gaps(self) -> None:  # trio thread
        self._gaps_scheduled = False
        for key, rec in self.buffer.take_drops().items():
            metrics.GAPS.labels(key).inc()
            log.warning("frames dropped: recording a gap", extra={"key": key,
                                                                  "dropped": rec.count})
            self.append_control(key, "gap", rec.body())


def pause_after(rate: float, batch_len: int, max_batch: int, linger: float) -> float:
    """Seconds the writer thread waits after a batch before taking the next one. Pure.

    Below `SHORT_LINGER_RATE` (entries a second over the last 100 ms) none: latency first.
    Above `LINGER_RATE`, `linger`: batches of hundreds, few GIL hand-offs. In between 1 ms,
    which adds at most 1 ms to a frame. Without it the rule could hold itself down under a heavy
    feed: batches back to back cost the readers so much CPU that the ingestor would persist
    about as many frames a second as start the long pauses, and stay there; 1 ms pauses get it
    well past (`bench/bench_ingest.py --pauses` compares 0, 1 and 10 ms). A batch of half
    `max_batch` or more is a backlog: no pause."""
    if linger <= 0 or batch_len >= max_batch // 2:
        return 0.0
    if rate >= LINGER_RATE:
        return linger
    if rate >= SHORT_LINGER_RATE:
        return min(linger, SHORT_LINGER_S)
    return 0.0


def entry_fields(command: bytes) -> dict[bytes, bytes]:
    """The field/value pairs of one packed `XADD key [trim] * f v ...` command. Pure.

    The writer keeps only the packed bytes of a buffered entry; the rare entry Redis refuses
    for good is read back with this to report its receipt time and connection in a gap."""
    reader = hiredis.Reader()
    reader.feed(command)
    args = reader.gets()
    if not isinstance(args, list) or args[:1] != [b"XADD"]:
        raise ValueError("not a packed XADD command")
    start = args.index(b"*", 2) + 1  # the id argument: fields follow
    return dict(zip(args[start::2], args[start + 1::2], strict=True))
