"""The batch writer: appends the entries of the ingest buffer to the `raw:` streams.

API (used by both ingestors):

    writer = LogWriter(make_client(url), settings.retention, bound=settings.buffer_frames,
                       max_bytes=settings.buffer_bytes)
    nursery.start_soon(writer.run)              # owns the thread that talks to Redis
    writer.append_frame(key, frame, recv_ts, conn, seq)   # never blocks; False = dropped
    writer.append_control(key, "opened", {...}, conn)     # never blocks
    await writer.flush()                        # until everything appended so far is written
    writer.healthy                              # False after 30 s of an outage

How it writes, and why:
- One pipelined round trip (no MULTI) per batch over a redis-py connection, in one long-lived
  writer thread: redis-py's asyncio client does not run on Trio, and the sync client must not
  block the event loop. (Not one `trio.to_thread.run_sync` per batch: that hand-off alone costs
  ~90 µs of CPU.) The thread sleeps on a `threading.Event` while the buffer is empty; the first
  append wakes it, so at low load each frame goes out alone at once. A batch is what
  accumulated while the previous one was on the wire (up to `max_batch` entries and
  `MAX_BATCH_BYTES`). Only under heavy load (more than `LINGER_RATE` entries a second over the
  last 100 ms window) the thread pauses `linger` (10 ms) before taking the next one: the
  readers and the writer share one GIL, and many tiny batches cost the readers more CPU in
  thread switches than the writing itself (bench/bench_ingest.py). Between 10,000 and 20,000
  entries a second it pauses 1 ms, so that the back-to-back mode cannot hold the ingestor below
  the rate that starts the long pauses (`pause_after`). The rule looks at the arrival rate, not
  at the batch size: a batch grows during a pause, so a size rule would keep pausing once it
  had paused, and add up to 10 ms to every frame at ordinary rates.
  `linger=0` gives strict back-to-back batches.
- Each XADD is packed as RESP when it is appended (per-key prefixes made once; the writer
  thread then only joins, sends with `Connection.send_packed_command` and reads the replies
  with `pipeline.replies`, which sleeps until a batch's replies are in and then mostly just
  counts them): redis-py's `Pipeline` object costs ~7 µs of CPU per XADD, this ~1.6 µs,
  and the less the writer thread holds the GIL, the less the readers wait for it. The wire
  protocol is the same pipelining. An age limit (`MINID`) is computed at append time.
- No automatic retry inside redis-py (see `pipeline.redisconn`): a re-sent `XADD *` would log a
  frame twice without anyone knowing. Here the retries follow `pipeline.backoff.BatchRetry`:
  a round trip that failed is sent again as a whole, with exponential backoff and jitter,
  until Redis answers (a connection lost after Redis applied part of it logs those entries
  twice: same `conn` and `seq`, see `pipeline.eventlog`). Entries Redis refused one by one go
  again at the head of the next round trip; under a refusal of the whole server (OOM...) they
  are given up only once the buffer is full, for a refusal of their own key after
  `MAX_REFUSALS`, and then reported with Redis's error as the gap's reason.
- Everything dropped (buffer full, given up) is recorded in the buffer's `DropLedger`. Each
  round trip starts with a `gap` entry per (key, reason) the ledger holds; a gap entry Redis
  did not accept goes back into the ledger (merged with what was dropped since) and is written
  by a later round trip, so the account of a loss never hangs on the gap entry itself.
- A frozen Redis (SIGSTOP, a stuck host) accepts the connection and the bytes and answers
  nothing: the round trip would wait for the socket timeout (10 s) before anything noticed.
  Each round trip has a deadline from its size (`stall_limit`); the writer task checks it
  every 0.1 s, logs `redis not answering` once it passes, and the outage counts from when that
  round trip was sent, for `/healthz` (`healthy`) and `pipeline_redis_outage_seconds` alike.
  The round trip itself is not cut short: a frozen server cannot be written to anyway, and the
  replies that come once it runs again save sending the batch twice.
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
from pipeline.buffer import DropRecord, FrameBuffer
from pipeline.clusterwriter import ClusterRouter
from pipeline.errors import RedisUnavailable
from pipeline.eventlog import (
    DEFAULT_RETENTION,
    GAP_FAILOVER,
    Retention,
    control_entry,
    refused_reason,
    retention_family,
)
from pipeline.redisconn import SERVER_REFUSALS, is_cluster, redis_errors, reply_code
from pipeline.replies import read_replies
from projections.core.keys import KEY_USER, raw_account

log = logging.getLogger("pipeline.writer")

MAX_BATCH = 2_000
MAX_BATCH_BYTES = 8 * 1024 * 1024  # a batch is joined into one payload: bounds that copy
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024
MAX_REFUSALS = 8
FINAL_FLUSH_TIMEOUT_S = 10.0
UNHEALTHY_AFTER_S = 30.0
LINGER_S = 0.010
STOP_QUIET_S = 0.1
LINGER_RATE = 20_000.0  # entries/s: above it, pause `linger` after a batch
SHORT_LINGER_S = 0.001
SHORT_LINGER_RATE = 10_000.0  # entries/s: above it (and below LINGER_RATE), pause 1 ms
RATE_WINDOW_S = 0.1
WATCH_S = 0.1  # how often the writer task looks at the round trip in flight
STALL_BASE_S = 1.0
STALL_BYTES_PER_S = 10e6
REFUSAL_LOG_EVERY_S = 10.0

# A buffered entry: (raw key, its XADD command packed as RESP). One flat tuple per entry, so
# the writer thread's passes over a batch run in C (`map(itemgetter...)`, `Counter`); what a
# refused entry needs besides (its receipt time and connection) is read back from its bytes.
Item = tuple[str, bytes]
Batch = list[Item]
# A gap entry on its way: (raw key, reason, the drops it reports, its packed XADD).
GapItem = tuple[str, str, DropRecord, bytes]
_key_of = operator.itemgetter(0)
_command_of = operator.itemgetter(1)


def stall_limit(nbytes: int) -> float:
    """Seconds a round trip of `nbytes` may take before Redis counts as not answering. Pure.

    Redis answers a 2,000-entry batch in milliseconds; a second is far beyond any pause of a
    healthy server short of a fork of a huge dataset, and the byte term leaves a slow link
    (10 MB/s) the time to carry the largest batch."""
    return STALL_BASE_S + nbytes / STALL_BYTES_PER_S


class LogWriter:
    def __init__(
        self,
        client: redis.Redis,
        retention: Mapping[str, Retention] = DEFAULT_RETENTION,
        *,
        bound: int = 200_000,
        max_bytes: int = DEFAULT_BUFFER_BYTES,
        max_batch: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
        backoff: tuple[float, float] = (0.05, 5.0),
        rand: Callable[[], float] = random.random,
        final_flush_timeout: float = FINAL_FLUSH_TIMEOUT_S,
        linger: float = LINGER_S,
        unhealthy_after: float = UNHEALTHY_AFTER_S,
        user_wait_ms: int = 0,
    ) -> None:
        self._client = client
        # Redis Cluster: the round trip is routed per node (`pipeline.clusterwriter`); with
        # `user_wait_ms`, raw:user appends wait for a replica
        self._router = ClusterRouter(client, wait_keys=_is_user_key, wait_ms=user_wait_ms,
                                     on_lost=self._lost_in_failover, clock=clock) \
            if is_cluster(client) else None
        self._retention = retention
        self._trim_cache: dict[str, tuple[int | None, float | None]] = {}
        self._prefixes: dict[tuple[str, int], bytes] = {}
        self._frame_prefixes: dict[str, bytes] = {}
        self._conn_tails: dict[str, bytes] = {}  # per connection id: see `_conn_tail`
        self.buffer = FrameBuffer(bound, max_bytes)
        self.max_batch = max_batch
        self.clock = clock
        self.rand = rand
        self.final_flush_timeout = final_flush_timeout
        self.linger = linger
        self.unhealthy_after = unhealthy_after
        self.written = 0  # entries Redis acknowledged
        self.settled = 0  # accepted entries that were written, or given up
        self._token: trio.lowlevel.TrioToken | None = None
        self._work = threading.Event()  # set when the idle writer thread has something to do
        self._idle = False
        self._stopping = False  # drain what is buffered, then end
        self._abort = threading.Event()  # end now (the final flush ran out of time)
        self._progress = trio.Event()
        self._flush_waiters = 0
        # the writer thread's own: what goes again with the next round trip
        self._retry = BatchRetry(Backoff(*backoff, rand), MAX_REFUSALS)
        self._carry: Batch = []  # entries Redis refused, oldest first
        self._carry_refusals: list[int] = []  # how often each was refused
        self._gap_carry: list[GapItem] = []  # gap entries of a round trip that failed
        self._gap_refusals: Counter[tuple[str, str]] = Counter()
        self._rejected_seen = 0
        self._outage_logged = False
        self._refusal_logged_at = -math.inf
        self._sent = False  # whether the last round trip's bytes started on their way
        # published by the writer thread for the writer task (single attribute stores)
        self._in_flight: tuple[float, float] | None = None  # (sent at, stall limit in s)
        self._failing_since: float | None = None  # send time of the first failed round trip
        self._stall_reported: float | None = None  # trio side: stalled round trip logged

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
        packed = self._pack(key, control_entry(ctl, body, now, conn))
        if self.buffer.put_control(key, packed, now, conn):
            if self._idle:
                self._work.set()
            return True
        metrics.FRAMES_DROPPED.labels(key).inc()
        return False

    def outage_started(self) -> float | None:
        """Wall time the current outage began: when the first round trip that failed or had
        entries refused was sent, or the one still waiting past its `stall_limit`; None since
        a round trip went through whole."""
        since = self._failing_since
        flight = self._in_flight
        if flight is not None:
            sent, limit = flight
            if self.clock() - sent > limit and (since is None or sent < since):
                since = sent
        return since

    @property
    def healthy(self) -> bool:
        """False once an outage has lasted `unhealthy_after` (30) s: Redis unreachable, not
        answering, or refusing entries (out of memory, a key it keeps refusing)."""
        since = self.outage_started()
        return since is None or self.clock() - since < self.unhealthy_after

    # --- the writer task (trio side) -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled; on cancel, try for `final_flush_timeout` s to write the rest.

        The writing happens in one long-lived thread, not one `to_thread` call per batch:
        handing a batch to a worker thread costs ~90 µs of CPU, more than writing it. This
        task watches it meanwhile (`_watch`)."""
        self._token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        thread = threading.Thread(target=self._thread_main, args=(done,), name="redis-writer",
                                  daemon=True)
        thread.start()
        task_status.started()
        try:
            await self._watch(done)  # returns only if the thread died
            raise RuntimeError("the redis writer thread ended")
        finally:
            self._stopping = True
            self._work.set()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.final_flush_timeout
                await self._watch(done)
            if not done.is_set():
                self._abort.set()
                self._work.set()
                log.error("shutdown: entries not written", extra={
                    "entries": self.buffer.held,
                    "drops_not_in_a_gap": self.buffer.drops.unreported})

    async def _watch(self, done: trio.Event) -> None:
        """Until the thread ends: notice a round trip Redis does not answer, update gauges."""
        while not done.is_set():
            with trio.move_on_after(WATCH_S):
                await done.wait()
            self._check_stall()

    def _check_stall(self) -> None:
        now = self.clock()
        flight = self._in_flight
        if (flight is not None and now - flight[0] > flight[1]
                and self._stall_reported != flight[0] and self._failing_since is None):
            self._stall_reported = flight[0]
            log.warning("redis not answering: holding frames in the buffer", extra={
                "waited_s": round(now - flight[0], 3), "buffered": self.buffer.held})
        since = self.outage_started()
        metrics.REDIS_OUTAGE.set(0.0 if since is None else now - since)
        metrics.BUFFER_FILL.set(self.buffer.held)
        metrics.BUFFER_BYTES.set(self.buffer.bytes_held)

    async def flush(self) -> None:
        """Return once every entry appended before this call is written (or given up), and
        every drop recorded before it is in a gap entry Redis took."""
        target = self.buffer.accepted
        drops = self.buffer.drops
        target_drops = drops.recorded
        self._flush_waiters += 1
        try:
            while self.settled < target or drops.reported + drops.abandoned < target_drops:
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
                if not (self.buffer or self._carry or self._gap_carry or self.buffer.drops):
                    if self._stopping:
                        # tasks cancelled with us may still append their last control entries
                        # (a connection's `closed`): stop only after a short quiet spell
                        now = time.monotonic()
                        quiet_since = quiet_since or now
                        if now - quiet_since >= STOP_QUIET_S:
                            break
                    self._wait_for_work()
                    continue
                quiet_since = None
                taken = self._round_trip()
                now = time.monotonic()
                window_count += taken
                if now - window_start >= RATE_WINDOW_S:
                    rate = window_count / (now - window_start)
                    window_start, window_count = now, 0
                pause = pause_after(rate, taken, self.max_batch, self.linger)
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

    def _round_trip(self) -> int:
        """One pipelined round trip: gap entries for what was dropped, the entries to send
        again, then new ones from the buffer. Returns how many it took from the buffer."""
        carry = self._carry
        room = self.max_batch - len(carry)
        budget = MAX_BATCH_BYTES - (sum(map(len, map(_command_of, carry))) if carry else 0)
        fresh = self.buffer.take(room, budget) if room > 0 and budget > 0 else []
        entries = carry + fresh if carry else fresh
        new_gaps = self._pack_gaps() if self.buffer.drops else []
        gaps = self._gap_carry + new_gaps if new_gaps else self._gap_carry
        batch = [(key, packed) for key, _, _, packed in gaps] + entries if gaps else entries
        result = self._write_once(batch)
        if result is None:  # nothing known to be written: all of it again, after a wait
            if fresh:
                self._carry_refusals = self._carry_refusals + [0] * len(fresh)
            self._carry = entries
            if self._sent:  # Redis may have applied the gap entries: send the same bytes again
                self._gap_carry = gaps
            else:  # they never left: next time, one gap entry per key and reason, not two
                for key, reason, rec, _ in new_gaps:
                    self.buffer.drops.merge(key, reason, rec)
            self._abort.wait(self._retry.unreachable())
            return len(fresh)
        refused, nbytes = result
        if gaps:
            self._gap_carry = []
        if not refused:
            if gaps:
                self._gaps_written(gaps, {})
                nbytes -= sum(len(packed) for _, _, _, packed in gaps)
            if carry:
                self._carry, self._carry_refusals = [], []
            self._settle(len(entries), nbytes)
            self._retry.written()
            self._rejected_seen = self.buffer.rejected
            return len(fresh)
        self._after_refusals(gaps, entries, refused)
        return len(fresh)

    def _after_refusals(self, gaps: list[GapItem], entries: Batch,
                        refused: list[tuple[int, str]]) -> None:
        """Settle what Redis took; keep what it refused for the next round trip, or give it
        up (`BatchRetry.give_up`); wait when nothing got in."""
        ngaps = len(gaps)
        gaps_refused = {i: error for i, error in refused if i < ngaps}
        errors = {i - ngaps: error for i, error in refused if i >= ngaps}
        if gaps:
            self._gaps_written(gaps, gaps_refused)
        accepted = [item for i, item in enumerate(entries) if i not in errors]
        self._settle(len(accepted), sum(map(len, map(_command_of, accepted))))
        full = self.buffer.full() or self.buffer.rejected != self._rejected_seen
        self._rejected_seen = self.buffer.rejected
        refusals = self._carry_refusals + [0] * (len(entries) - len(self._carry_refusals))
        keep: Batch = []
        keep_refusals: list[int] = []
        lost: list[tuple[Item, str]] = []
        for i, error in errors.items():
            n = refusals[i] + 1
            if self._retry.give_up(n, reply_code(error) in SERVER_REFUSALS, full):
                lost.append((entries[i], error))
            else:
                keep.append(entries[i])
                keep_refusals.append(n)
        self._carry, self._carry_refusals = keep, keep_refusals
        if lost:
            self._give_up(lost, full)
        progressed = bool(accepted) or len(gaps_refused) < ngaps
        delay = self._retry.refused(progressed)
        if delay > 0:
            self._abort.wait(delay)

    def _write_once(self, batch: Batch) -> tuple[list[tuple[int, str]], int] | None:
        """The indices and errors of the entries Redis refused and the bytes sent, or None
        when Redis could not be reached."""
        sent = self.clock()
        try:
            refused, nbytes = self._write_sync(batch, sent)
        except RedisUnavailable as exc:
            if self._failing_since is None:
                self._failing_since = sent
                self._outage_logged = True
                log.warning("redis unavailable: holding frames in the buffer and retrying",
                            extra={"error": str(exc), "buffered": self.buffer.held})
            return None
        if refused:  # an outage too, until a round trip goes through with nothing refused
            if self._failing_since is None:
                self._failing_since = sent
                # one key Redis keeps refusing starts a short outage per frame: not a line each
                if time.monotonic() - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
                    self._refusal_logged_at = time.monotonic()
                    self._outage_logged = True
                    log.warning("redis refused entries: sending them again", extra={
                        "refused": len(refused), "of": len(batch),
                        "error": refused[0][1][:200], "buffered": self.buffer.held})
            return refused, nbytes
        since = self._failing_since
        if since is not None or self.clock() - sent > stall_limit(nbytes):
            self._outage_over(sent if since is None else since)
        return refused, nbytes

    def _outage_over(self, since: float) -> None:
        now = self.clock()
        if self._outage_logged or now - since > STALL_BASE_S:
            log.warning("redis back", extra={"outage_s": round(now - since, 3),
                                             "buffered": self.buffer.held})
        self._failing_since = None
        self._outage_logged = False

    def _write_sync(self, batch: Batch, sent: float) -> tuple[list[tuple[int, str]], int]:
        """Worker thread: the batch's XADDs in one pipelined round trip."""
        started = time.perf_counter()
        if self._router is not None:
            return self._write_cluster(batch, sent, started)
        payload = b"".join(map(_command_of, batch))
        self._in_flight = (sent, stall_limit(len(payload)))
        self._sent = False
        pool = self._client.connection_pool
        try:
            with redis_errors():
                conn = pool.get_connection()  # connects (and names the client) if needed
            try:
                with redis_errors():
                    self._sent = True
                    conn.send_packed_command([payload], check_health=False)
                    refused = read_replies(conn, len(batch))
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse this connection
                raise
            finally:
                pool.release(conn)
        finally:
            self._in_flight = None
        self._count(batch, refused, time.perf_counter() - started)
        return refused, len(payload)

    def _write_cluster(self, batch: Batch, sent: float, started: float
                       ) -> tuple[list[tuple[int, str]], int]:
        """Worker thread, cluster mode: one pipelined round trip per master. An unreachable
        master's entries come back refused (TRYAGAIN), the rest settle."""
        assert self._router is not None
        nbytes = sum(map(len, map(_command_of, batch)))
        self._in_flight = (sent, stall_limit(nbytes))
        self._sent = True
        try:
            refused = self._router.write(batch)
        finally:
            self._in_flight = None
        if len(refused) == len(batch) and refused and all(
                e.startswith("TRYAGAIN cluster node") for _, e in refused):
            raise RedisUnavailable("redis cluster unavailable: no node reached")
        self._count(batch, refused, time.perf_counter() - started)
        return refused, nbytes

    def _pack(self, key: str, fields: Mapping[bytes, bytes]) -> bytes:
        return self._prefix(key, 2 * len(fields)) + b"".join(
            [b"$%d\r\n%s\r\n" % (len(part), part) for kv in fields.items() for part in kv])

    def _pack_gaps(self) -> list[GapItem]:
        now = self.clock()
        return [(key, reason, rec, self._pack(key, control_entry("gap", rec.body(reason), now)))
                for (key, reason), rec in self.buffer.drops.take().items()]

    def _gaps_written(self, gaps: list[GapItem], refused: Mapping[int, str]) -> None:
        """Account for the gap entries of a round trip Redis answered: reported, or back into
        the ledger. One whose own key keeps refusing it can never be logged: it is logged
        here, as an error, instead."""
        drops = self.buffer.drops
        for i, (key, reason, rec, _) in enumerate(gaps):
            if i not in refused:
                self._gap_refusals.pop((key, reason), None)
                drops.report(rec)
                metrics.GAPS.labels(key).inc()
                log.warning("frames dropped: gap recorded", extra={
                    "key": key, "reason": reason, "dropped": rec.count,
                    "first_recv_ts": round(rec.first_ts, 6), "last_recv_ts": round(rec.last_ts, 6)})
                continue
            self._gap_refusals[(key, reason)] += 1
            if (self._gap_refusals[(key, reason)] >= MAX_REFUSALS
                    and reply_code(refused[i]) not in SERVER_REFUSALS):
                self._gap_refusals.pop((key, reason))
                drops.abandon(rec)
                log.error("frames dropped and their gap refused by redis", extra={
                    "key": key, "reason": reason, "dropped": rec.count,
                    "first_recv_ts": round(rec.first_ts, 6), "last_recv_ts": round(rec.last_ts, 6),
                    "by_conn": rec.by_conn})
            else:
                drops.merge(key, reason, rec)
        if self._flush_waiters:
            self._on_trio(self._notify_progress)

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

    def _count(self, batch: Batch, refused: list[tuple[int, str]], seconds: float) -> None:
        metrics.REDIS_WRITE_SECONDS.observe(seconds)
        metrics.BATCH_SIZE.observe(len(batch))
        counts = Counter(map(_key_of, batch))
        for i, _ in refused:
            counts[batch[i][0]] -= 1
        for key, n in counts.items():
            metrics.FRAMES_LOGGED.labels(key).inc(n)

    def _settle(self, n: int, nbytes: int) -> None:
        self.buffer.release(n, nbytes)
        self.written += n
        self.settled += n
        if self._flush_waiters:
            self._on_trio(self._notify_progress)

    def _lost_in_failover(self, key: str, recv_ts: float, conn: str) -> None:
        """Writer thread, cluster mode: an acknowledged entry its master's replica lacked
        after a failover; the next round trip reports it in a `gap` entry."""
        self.buffer.drops.add(key, GAP_FAILOVER, recv_ts, conn)
        metrics.FRAMES_DROPPED.labels(key).inc()

    def _give_up(self, lost: list[tuple[Item, str]], full: bool) -> None:
        """Entries Redis keeps refusing: dropped, and recorded with Redis's error as the
        reason of the gap that will report them."""
        nbytes = 0
        for (key, command), error in lost:
            fields = entry_fields(command)
            self.buffer.drops.add(key, refused_reason(error), float(fields[b"recv_ts"]),
                                  fields[b"conn"].decode())
            metrics.FRAMES_DROPPED.labels(key).inc()
            nbytes += len(command)
        self.buffer.release(len(lost), nbytes)
        self.settled += len(lost)
        log.error("giving up entries redis refused", extra={
            "entries": len(lost), "error": lost[0][1][:200],
            "why": "buffer full" if full else f"refused {MAX_REFUSALS} times"})
        if self._flush_waiters:
            self._on_trio(self._notify_progress)


def _is_user_key(key: str) -> bool:
    """`raw:user` and an account's `raw:user:{label}`: appends a replica must hold too."""
    return raw_account(key)[0] == KEY_USER


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
