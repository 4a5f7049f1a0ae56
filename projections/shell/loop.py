"""One projection's consumer loop: read → fold → write + ack, batch after batch.

Theory of operation. Each projection (`projections.shell.registry`) has one consumer group,
named after it, on each raw key it reads. Its loop, in one Trio task:

1. start: create the groups (`XGROUP CREATE ... 0 MKSTREAM`, a new group starts at the log's
   first entry); an exclusive projection first takes over everything pending in its group
   (`XAUTOCLAIM` idle 0: the lease says no one else runs it), then every consumer re-reads its
   own pending entries (`XREADGROUP` id 0) before new ones (`>`);
2. `_read`: a batch (`COUNT --batch`, `BLOCK --block-ms`) over all its keys at once;
3. fold it (pure: `projections.core.batch.fold_batch`; stateless last-value folds parse only
   the last frame per stream of the batch) and coalesce;
4. `_write`: the writes, the gap entries and the batch's XACKs in ONE pipeline, so an entry is
   acknowledged only together with its write; a stateless projection also reads its next
   entries (non-blocking) in that pipeline (on one node a `PackedPipeline`: the commands
   packed by hiredis and sent in one write, without redis-py's pipeline layers);
5. `_after`, on the Trio side: a fold that raised leaves its entry unacknowledged; it is read
   again from the pending list and, once it has failed on its `--max-attempts`-th delivery
   (XPENDING's delivery count), moved to `dlq:{name}`, acknowledged and counted; an entry
   whose write the store refused as implausible (an id no stream can reach: it was
   acknowledged with that write) is moved to `dlq:{name}` at once, since a redelivery would
   meet the same refusal; a `NeedSnapshot` asks the snapshot fetcher;
6. every `--claim-idle-ms / 2`, entries another consumer left pending longer than
   `--claim-idle-ms` are claimed (`XAUTOCLAIM`) and folded like any batch.

Steps 2 to 4 run in a worker thread (redis-py is sync), batch after batch in one call
(`_cycle`), so the thread goes straight from one batch's write to the next read. A lost
connection is retried with backoff, and a write that failed is sent again as it was
(forward-only writes make a repeat harmless) and never folded twice.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import redis
import trio

from pipeline import metrics
from pipeline.backoff import Backoff
from pipeline.errors import RedisUnavailable
from pipeline.eventlog import control_entry
from pipeline.redisconn import MAX_BLOCK_MS, error_code, redis_errors, refused_for_now
from projections.core.batch import Folded, RawEntry, fold_batch
from projections.core.outputs import LogGap, NeedSnapshot, Projection
from projections.core.plausible import Bounds
from projections.shell import functions
from projections.shell.groups import GroupIO
from projections.shell.health import ProjectorHealth
from projections.shell.packed import PackedPipeline
from projections.shell.snapshots import Snapshotter
from projections.shell.viewstore import REFUSED, ViewStore, write_results

log = logging.getLogger("pipeline.project")
T = TypeVar("T")
# called in the worker thread right after a batch's writes and acks returned
# (`Folded.written_at`: the instant they did); benchmarks time the views with it
OnWritten = Callable[[list[RawEntry], Folded], None]
# a written batch: its entries, what they folded to, the errors Redis answered for single writes
Done = tuple[list[RawEntry], Folded, list[Exception]]
# longest one worker-thread call keeps going before the Trio side gets a look
CYCLE_BUDGET_S = 0.05
REPAIRS_LOGGED_MAX = 1000  # view keys whose repair is logged (once each) per process


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class RunOptions:
    consumer: str = attrs.Factory(default_consumer)
    block_ms: int = 1000
    batch: int = 500
    claim_idle_ms: int = 30_000
    max_attempts: int = 3
    lease_ttl_ms: int = 10_000
    coalescing: bool = True


async def in_thread(fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
    """Run a sync Redis call in a worker thread. `abandon`: a cancel does not wait for it (a
    blocking read whose entries, if any, stay pending and are read again after a restart)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)


class ProjectionLoop:
    """One projection's consumer: read, fold, write + ack, dead-letter, claim."""

    def __init__(self, projection: Projection, client: redis.Redis, opts: RunOptions,
                 health: ProjectorHealth, snapshots: Snapshotter | None = None,
                 on_written: OnWritten | None = None, bounds: Bounds | None = None,
                 library: functions.FunctionLibrary | None = None) -> None:
        self.projection = projection
        self.name = projection.name
        self.client = client
        self.opts = opts
        self.health = health
        self.io = GroupIO(client, self.name, projection.sources, opts.consumer)
        self.store = ViewStore(client, bounds=bounds, library=library)
        self.snapshots = snapshots
        self.on_written = on_written
        self.newest_recv_ts = 0.0
        self.backoff = Backoff(base=0.05, cap=2.0)
        # True after a start or a failure: read our own pending entries before new ones
        self._reread_pending = True
        self._pending_cursor: dict[str, bytes | str] | None = None
        self._unwritten: tuple[list[RawEntry], Folded] | None = None
        # new entries read in the previous batch's write round trip (`_write`), not yet folded
        self._prefetched: list[RawEntry] | None = None
        self._next_claim = 0.0
        self._stopping = False
        self._unknown_seen: set[str] = set()
        self._repairs_logged: set[str] = set()

    async def run(self) -> None:
        await self._retrying(self.io.ensure_groups)
        if self.projection.exclusive:
            await self._claim_all(min_idle_ms=0)
        try:
            while True:
                for done in await self._retrying(self._cycle, abandon=True):
                    await self._after(*done)
        finally:
            self._stopping = True  # an abandoned worker thread ends after its current batch
            self.health.recovered(self.name)

    # --- in the worker thread -----------------------------------------------------------

    def _cycle(self, more: bool = True) -> list[Done]:
        """Read, fold, write + ack batches in ONE worker-thread call, until a batch needs the
        Trio side (effects, failures, refused writes), nothing new came within the BLOCK, or
        `CYCLE_BUDGET_S` passed. `more=False`: write the batch already folded, nothing else.

        Every hand-off between Trio and a thread waits for the scheduler, and on a busy machine
        those waits, not the work, made most of the latency. A batch whose write failed is
        kept and written again by the next call, never folded twice (an exclusive fold has
        already moved its state on).
        """
        done: list[Done] = []
        deadline = time.monotonic() + CYCLE_BUDGET_S
        while not self._stopping:
            try:
                if self._unwritten is None:
                    entries = self._read()
                    if not entries:
                        break
                    self._unwritten = (entries, fold_batch(self.projection, entries,
                                                           self.opts.coalescing))
                entries, folded = self._unwritten
                errors = self._write(folded, read_next=more)
            except (RedisUnavailable, redis.ResponseError):
                if done:
                    return done  # handled first; the failure comes back on the next call
                raise
            self._unwritten = None
            self._account(folded)
            if self.on_written is not None:
                self.on_written(entries, folded)
            done.append((entries, folded, errors))
            if (not more or folded.effects or folded.failures or folded.refused or errors
                    or time.monotonic() > deadline):
                break
        return done

    def _read(self) -> list[RawEntry]:
        """Own pending entries first (after a start or a failure), then what the last write
        read ahead, then entries another consumer left idle, then new ones."""
        if self._reread_pending:
            self._reread_pending = False
            self._pending_cursor = {k: "0" for k in self.io.keys}
            self._prefetched = None  # pending, so read again with the rest
        if self._pending_cursor is not None:
            entries = self.io.read(self._pending_cursor, self.opts.batch, None)
            if entries:
                for key, eid, _ in entries:
                    self._pending_cursor[key] = eid
                return entries
            self._pending_cursor = None
        if self._prefetched is not None:
            entries, self._prefetched = self._prefetched, None
            return entries
        if not self.projection.exclusive and time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + max(self.opts.claim_idle_ms / 2000, 0.05)
            claimed = self._claim_some(self.opts.claim_idle_ms)
            if claimed:
                return claimed
        return self.io.read({k: ">" for k in self.io.keys}, self.opts.batch,
                            min(self.opts.block_ms, MAX_BLOCK_MS))

    def _write(self, folded: Folded, read_next: bool = False) -> list[Exception]:
        """The batch's view writes, its gap entries and its XACKs in ONE non-transactional
        pipeline; returns the errors Redis answered for single commands (a script error).

        `read_next`: the same round trip also reads the next new entries (non-blocking) when
        the next read would be a plain `>` read. Entries arriving in a burst (the ingestor
        writes batches) wake the blocked read with the first of them; the rest came in the
        same instant, and fetching them here saves one round trip, and one wait for the GIL,
        per burst. Exclusive projections never read ahead: if this round trip failed, entries
        it read stay pending and are folded after newer ones, which only a stateless fold
        tolerates.
        """
        ahead = (read_next and not self.projection.exclusive and not self._reread_pending
                 and self._pending_cursor is None and self._prefetched is None
                 and not folded.effects and not folded.failures
                 and time.monotonic() < self._next_claim)
        pipe: Any = (self.client.pipeline(transaction=False) if self.io.cluster
                     else PackedPipeline(self.client))
        plan = self.store.queue_all(pipe, folded.writes)
        for gap in folded.effects:
            if isinstance(gap, LogGap):
                entry: Any = control_entry("gap", gap.body, recv_ts=time.time())
                pipe.xadd(gap.raw_key, entry)
        for key, ids in folded.acks.items():
            pipe.xack(key, self.name, *ids)
        if ahead:
            self.io.queue_read(pipe, self.opts.batch)
        try:
            with redis_errors():
                results = pipe.execute(raise_on_error=False)
        except RedisUnavailable:
            if ahead:  # the read ahead may have been delivered: read our pending ones again
                self._reread_pending = True
            raise
        if ahead:
            got = results.pop()
            # an error reply (NOGROUP): the next plain read meets it again and handles it
            self._prefetched = self.io.entries(got) if isinstance(got, list) and got else None
        errors = [r for r in results if isinstance(r, Exception)]
        if any(functions.function_missing(e) for e in errors):
            self.store.forget_loaded()  # Redis restarted: load the library, write again
            raise RedisUnavailable("redis function library missing after a redis restart")
        refused = [e for e in errors if refused_for_now(e)]
        if refused:
            # Redis is up but will not write now (out of memory, a replica, loading, an ACL
            # being fixed): write the same batch again later instead of losing its views.
            raise RedisUnavailable(f"redis refused view writes: {str(refused[0])[:80]}")
        folded.written_at = time.time()
        self._judged(folded, write_results(plan, results[:len(plan)]))
        return errors

    @staticmethod
    def _judged(folded: Folded, codes: list[Any]) -> None:
        """Note the writes the store refused as implausible (their entries go to the dead
        letters) and the views it wrote over a held value that it did not obey."""
        for write, origin, code in zip(folded.writes, folded.origins, codes, strict=False):
            if code == REFUSED:
                w: Any = write
                folded.refused.append((origin, (
                    f"ImplausibleVersion: {w.key} version {w.version} jumps further past the "
                    "held view than PIPELINE_MAX_ID_RATE allows")[:500]))
            elif code == 2:
                folded.repaired.append(getattr(write, "key", ""))

    def _claim_some(self, min_idle_ms: int) -> list[RawEntry]:
        out: list[RawEntry] = []
        for key in self.io.keys:
            _, entries = self.io.autoclaim(key, min_idle_ms, "0-0", self.opts.batch)
            out.extend(entries)
        if out:
            log.info("claimed entries left by another consumer",
                     extra={"group": self.name, "entries": len(out)})
        return out

    def _account(self, folded: Folded) -> None:
        if folded.applied:
            metrics.EVENTS_PROJECTED.labels(self.name).inc(folded.applied)
        for event_type in folded.unrecognized:
            label = event_type[:64]
            if label not in self._unknown_seen:  # a chatty new event must not flood the log
                self._unknown_seen.add(label)
                log.warning("unknown event type: ignored and counted",
                            extra={"group": self.name, "type": label})
            metrics.UNKNOWN_EVENTS.labels(type=label).inc()
        self.newest_recv_ts = max(self.newest_recv_ts, folded.newest_recv_ts)

    # --- on the Trio side ---------------------------------------------------------------

    async def _after(self, entries: list[RawEntry], folded: Folded,
                     errors: list[Exception]) -> None:
        """A written batch: log refused writes, request snapshots, retry or dead-letter
        failed entries."""
        for err in errors:
            log.error("view write refused", extra={"group": self.name, "error": str(err)})
        for key in folded.repaired:
            if key not in self._repairs_logged and len(self._repairs_logged) < REPAIRS_LOGGED_MAX:
                self._repairs_logged.add(key)
                log.warning("view repaired: its held version was implausible and is replaced",
                            extra={"group": self.name, "key": key[:200]})
        for eff in folded.effects:
            if isinstance(eff, NeedSnapshot) and self.snapshots is not None:
                self.snapshots.request(eff.symbol)
        for raw, error in folded.refused:
            await self._dead_letter(raw, error)
        if folded.failures:
            await self._failures(folded.failures)

    async def _failures(self, failures: list[tuple[RawEntry, str]]) -> None:
        for raw, error in failures:
            attempts = await self._retrying(functools.partial(self.io.deliveries, raw))
            log.warning("entry failed", extra={"group": self.name, "entry": raw[1].decode(),
                                               "attempt": attempts, "error": error})
            if attempts >= self.opts.max_attempts:
                await self._dead_letter(raw, error)
        # the failed entries are still pending: read them again before new ones
        self._reread_pending = True

    async def _dead_letter(self, raw: RawEntry, error: str) -> None:
        await self._retrying(functools.partial(self.io.dead_letter, raw, error))
        metrics.DEAD_LETTERS.labels(self.name).inc()
        log.error("entry dead-lettered", extra={"group": self.name, "entry": raw[1].decode(),
                                                "error": error})

    async def _retrying(self, fn: Callable[[], T], abandon: bool = False) -> T:
        """Call `fn` in a worker thread until it returns, waiting out Redis outages."""
        while True:
            sent = self.health.clock()  # a frozen Redis is an outage from here, not the timeout
            try:
                result = await in_thread(fn, abandon=abandon)
            except RedisUnavailable as exc:
                await self._wait_after(exc, sent)
                continue
            except redis.ResponseError as exc:
                if error_code(exc) != "NOGROUP":
                    raise
                # Redis lost the groups (restarted without persistence): create them again.
                log.warning("consumer group missing, creating it", extra={"group": self.name})
                await self._wait_after(exc)
                await self._retrying(self.io.ensure_groups)
                self._reread_pending = True
                continue
            if self.backoff.reset():
                log.info("working again", extra={"task": self.name})
                self.health.recovered(self.name)
            return result

    async def _wait_after(self, exc: Exception, sent: float | None = None) -> None:
        if not self.backoff.failing:
            if not isinstance(exc, functions.LibraryMissing):  # the library said so once
                log.warning("failed, retrying", extra={"task": self.name, "error": str(exc)})
            self.health.failed(self.name, since=sent)
        await trio.sleep(self.backoff.next_delay())

    async def _claim_all(self, min_idle_ms: int) -> None:
        for key in self.io.keys:
            start: bytes | str = "0-0"
            while True:
                def step(s: bytes | str = start, k: str = key) -> tuple[bytes, list[RawEntry]]:
                    return self.io.autoclaim(k, min_idle_ms, s, self.opts.batch)
                start, entries = await self._retrying(step)
                if entries:
                    await self.handle(entries)
                if start in (b"0-0", "0-0"):
                    break

    async def handle(self, entries: list[RawEntry]) -> None:
        """Fold and write a batch that was read outside `_cycle` (claimed entries)."""
        self._unwritten = (entries, fold_batch(self.projection, entries, self.opts.coalescing))
        # only this batch: claimed entries are older than anything new and go first
        for done in await self._retrying(functools.partial(self._cycle, False)):
            await self._after(*done)

    def report_lag(self) -> None:
        for key, lag in self.io.lag().items():
            if lag is not None:
                metrics.CONSUMER_LAG.labels(self.name, key).set(lag)
        if self.newest_recv_ts:
            metrics.VIEW_AGE.labels(self.name).set(max(0.0, time.time() - self.newest_recv_ts))
