"""`pipeline project`: runs the projector consumer groups.

Theory of operation. Each projection (projections.registry) has one consumer group, named
after it, on each raw key it reads. Its loop, in one Trio task:

1. start: create the groups (`XGROUP CREATE ... 0 MKSTREAM`, a new group starts at the log's
   first entry); an exclusive projection first takes over everything pending in its group
   (`XAUTOCLAIM` idle 0: the lease says no one else runs it), then every consumer re-reads its
   own pending entries (`XREADGROUP` id 0) before new ones (`>`);
2. read a batch (`COUNT --batch`, `BLOCK --block-ms`) over all its keys at once;
3. fold it (pure, `projections.groups.fold_batch`; stateless last-value folds parse only the
   last frame per stream of the batch), coalesce, and send the writes and the batch's XACKs in
   ONE pipeline: an entry is acknowledged only together with its write; a stateless projection
   also reads its next entries (non-blocking) in that pipeline (`ProjectionLoop._write`);
4. an entry whose fold raised is not acknowledged; it is read again from the pending list and,
   once it has failed on its `--max-attempts`-th delivery (XPENDING's delivery count), moved to
   `dlq:{name}`, acknowledged and counted;
5. every `--claim-idle-ms / 2`, entries another consumer left pending longer than
   `--claim-idle-ms` are claimed (`XAUTOCLAIM`) and folded like any batch.

Redis calls run in worker threads (redis-py is sync); a lost connection is retried with backoff,
and a write that failed is sent again as it was (forward-only writes make a repeat harmless).
Exclusive projections run only in the process holding `lease:{name}` (projections.lease).
Effects: `NeedSnapshot` makes the shell GET the depth snapshot over REST and append it to
`raw:market:depth` as a `snapshot` control entry (at most one request per symbol in flight);
`LogGap` appends a `gap` control entry to its raw key in the batch's pipeline.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import redis
import trio

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import ExchangeError, RedisUnavailable
from pipeline.eventlog import control_entry, retention_family
from pipeline.redisconn import MAX_BLOCK_MS, connect_checked, make_client, redis_errors
from pipeline.rest import RestClient, depth_weight
from projections.core import LogGap, NeedSnapshot, Projection
from projections.groups import Folded, GroupIO, RawEntry, fold_batch, write_batch
from projections.lease import Lease, run_while_holding
from projections.registry import ProjectionSpec, choose
from projections.viewstore import ViewStore

log = logging.getLogger("pipeline.project")
T = TypeVar("T")
# called in the worker thread right after a batch's writes and acks returned
# (`Folded.written_at`: the instant they did); benchmarks time the views with it
OnWritten = Callable[[list[RawEntry], Folded], None]
# a written batch: its entries, what they folded to, the errors Redis answered for single writes
Done = tuple[list[RawEntry], Folded, list[Exception]]
# longest one worker-thread call keeps going before the Trio side gets a look
CYCLE_BUDGET_S = 0.05
# GIL switch interval while projecting (CPython's default is 5 ms). Every projection is a
# thread that wakes when its XREADGROUP returns; when a burst lands on several keys at once the
# threads queue for the GIL, and a thread back from a socket call could wait the whole interval
# behind one that is folding. 0.5 ms lowered the projector leg's p99 at 5,000 frames/s and did
# not lower events/s (bench/bench_projector.py, docs/benchmarks.md).
GIL_SWITCH_S = 0.0005

DEPTH_KEY = "raw:market:depth"
SNAPSHOT_LIMIT = 1000
# Refusals a later attempt can get past: out of memory, a replica, loading, an ACL being
# fixed. redis-py maps some codes to classes (dropping the code from the text), not others.
_REFUSED_CLASSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                    redis.exceptions.BusyLoadingError, redis.exceptions.NoPermissionError,
                    redis.exceptions.MasterDownError, redis.exceptions.TryAgainError)
_REFUSED_CODES = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "NOPERM",
                  "MISCONF")


def refused_for_now(exc: Exception) -> bool:
    return isinstance(exc, _REFUSED_CLASSES) or str(exc).startswith(_REFUSED_CODES)


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


# task -> monotonic time its current run of failures began; what /healthz looks at
_FAILING_SINCE: dict[str, float] = {}
UNHEALTHY_AFTER_S = 30.0


def healthy() -> bool:
    """False once any projection (or the snapshot fetcher) has failed for 30 s on end."""
    now = time.monotonic()
    return all(now - since < UNHEALTHY_AFTER_S for since in list(_FAILING_SINCE.values()))


class Backoff:
    """Exponential wait between retries (Redis away, a snapshot request failed); logs the
    outage once and its end once."""

    def __init__(self, what: str, first: float = 0.05, cap: float = 2.0) -> None:
        self.what, self.first, self.cap = what, first, cap
        self.delay = 0.0

    async def failed(self, exc: Exception) -> None:
        if self.delay == 0:
            log.warning("failed, retrying", extra={"task": self.what, "error": str(exc)})
            _FAILING_SINCE.setdefault(self.what, time.monotonic())
        self.delay = min(self.cap, self.delay * 2 or self.first)
        await trio.sleep(self.delay)

    def ok(self) -> None:
        if self.delay:
            log.info("working again", extra={"task": self.what})
            _FAILING_SINCE.pop(self.what, None)
            self.delay = 0.0


async def in_thread(fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
    """Run a sync Redis call in a worker thread. `abandon`: a cancel does not wait for it (a
    blocking read whose entries, if any, stay pending and are read again after a restart)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)


class Snapshotter:
    """Fetches depth snapshots over REST and appends them to the log (one per symbol at once)."""

    def __init__(self, settings: Settings, client: redis.Redis, nursery: trio.Nursery,
                 rest: RestClient) -> None:
        self.client = client
        self.nursery = nursery
        self.rest = rest
        ret = settings.retention.get(retention_family(DEPTH_KEY))
        self.maxlen = ret.maxlen if ret is not None else None
        self.outstanding: set[str] = set()

    def request(self, symbol: str) -> None:
        if symbol not in self.outstanding:
            self.outstanding.add(symbol)
            self.nursery.start_soon(self._fetch, symbol)

    async def _fetch(self, symbol: str) -> None:
        backoff = Backoff(f"snapshot {symbol}", first=0.5, cap=30.0)
        try:
            while True:
                try:
                    body = await self.rest.get("/fapi/v1/depth", {"symbol": symbol,
                                                                  "limit": SNAPSHOT_LIMIT},
                                               weight=depth_weight(SNAPSHOT_LIMIT))
                    entry = control_entry("snapshot", {"symbol": symbol, "response": body},
                                          recv_ts=time.time())
                    await in_thread(self._append, entry)
                    log.info("depth snapshot logged", extra={"symbol": symbol})
                    return
                except (ExchangeError, RedisUnavailable) as exc:
                    await backoff.failed(exc)
        finally:
            self.outstanding.discard(symbol)

    def _append(self, entry: dict[bytes, bytes]) -> None:
        with redis_errors():
            self.client.xadd(DEPTH_KEY, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]


class ProjectionLoop:
    """One projection's consumer: read, fold, write + ack, dead-letter, claim."""

    def __init__(self, projection: Projection, client: redis.Redis, opts: RunOptions,
                 snapshots: Snapshotter | None = None,
                 on_written: OnWritten | None = None) -> None:
        self.projection = projection
        self.name = projection.name
        self.client = client
        self.opts = opts
        self.io = GroupIO(client, self.name, projection.sources, opts.consumer)
        self.store = ViewStore(client)
        self.snapshots = snapshots
        self.on_written = on_written
        self.newest_recv_ts = 0.0
        self.backoff = Backoff(self.name)
        # set between calls of `_cycle` only; failures ask for a re-read with the flag
        self._pending_cursor: dict[str, bytes | str] | None = None
        self._reread_pending = True
        self._unwritten: tuple[list[RawEntry], Folded] | None = None
        # new entries read in the previous batch's write round trip (`_write`), not yet folded
        self._prefetched: list[RawEntry] | None = None
        self._next_claim = 0.0
        self._stopping = False

    async def run(self) -> None:
        await self._retrying(self.io.ensure_groups)
        if self.projection.exclusive:
            await self._claim_all(min_idle_ms=0)
        try:
            while True:
                if self._reread_pending:
                    self._reread_pending = False
                    self._pending_cursor = {k: "0" for k in self.io.keys}
                    self._prefetched = None  # pending, so read again with the rest
                for done in await self._retrying(self._cycle, abandon=True):
                    await self._after(*done)
        finally:
            self._stopping = True  # an abandoned worker thread ends after its current batch

    def _cycle(self, more: bool = True) -> list[Done]:
        """Read, fold, write + ack batches in ONE worker-thread call, until a batch needs the
        Trio side (effects, failures, refused writes), nothing new came within the BLOCK, or
        `CYCLE_BUDGET_S` passed. `more=False`: write the batch already folded, nothing else.

        Every hand-off between Trio and a thread waits for the scheduler, and on a busy machine
        those waits, not the work, made most of the latency; here the thread goes straight from
        one batch's write to the next read. A batch whose write failed is kept and written again
        by the next call, never folded twice (an exclusive fold has already moved its state on).
        """
        done: list[Done] = []
        deadline = time.monotonic() + CYCLE_BUDGET_S
        while not self._stopping:
            try:
                if self._unwritten is None:
                    entries = self._next_entries()
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
            if (not more or folded.effects or folded.failures or errors
                    or time.monotonic() > deadline):
                break
        return done

    def _write(self, folded: Folded, read_next: bool = False) -> list[Exception]:
        """Write + ack `folded` in one round trip. `read_next`: the same round trip also reads
        the next new entries (non-blocking) when the next read would be a plain `>` read.

        Entries arriving in a burst (the ingestor writes batches) wake the blocked read with
        the first of them; the rest came in the same instant, and fetching them here instead
        of in a read of their own saves one round trip, and one wait for the GIL, per burst.
        Exclusive projections never read ahead: if this round trip failed, entries it read
        stay pending and are folded after newer ones, which only a stateless fold tolerates.
        """
        gaps = [e for e in folded.effects if isinstance(e, LogGap)]

        def extra(pipe: Any) -> None:
            for gap in gaps:
                pipe.xadd(gap.raw_key, control_entry("gap", gap.body, recv_ts=time.time()))

        def then(pipe: Any) -> None:
            self.io.queue_read(pipe, self.opts.batch)

        ahead = (read_next and not self.projection.exclusive and self._pending_cursor is None
                 and self._prefetched is None and not folded.effects and not folded.failures
                 and time.monotonic() < self._next_claim)
        reread = self._reread_pending
        if ahead:
            self._reread_pending = True  # until the round trip is known to have worked
        errors, got = write_batch(self.client, self.store.queue_all, self.name, folded, extra,
                                  then if ahead else None)
        if ahead:
            self._reread_pending = reread
            # an error reply (NOGROUP): the next plain read meets it again and handles it
            self._prefetched = got if isinstance(got, list) and got else None
        if any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
            self.store.forget_loaded()  # Redis restarted: load the script, write again
            raise RedisUnavailable("view script missing after a redis restart")
        refused = [e for e in errors if refused_for_now(e)]
        if refused:
            # Redis is up but will not write now (out of memory, a replica, loading, an ACL
            # being fixed): write the same batch again later instead of losing its views.
            raise RedisUnavailable(f"redis refused view writes: {str(refused[0])[:80]}")
        folded.written_at = time.time()
        return errors

    async def _retrying(self, fn: Callable[[], T], abandon: bool = False) -> T:
        while True:
            try:
                result = await in_thread(fn, abandon=abandon)
            except RedisUnavailable as exc:
                await self.backoff.failed(exc)
                continue
            except redis.ResponseError as exc:
                if refused_for_now(exc):
                    await self.backoff.failed(exc)
                    continue
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost the groups (restarted without persistence): create them again.
                log.warning("consumer group missing, creating it", extra={"group": self.name})
                await self.backoff.failed(exc)
                await self._retrying(self.io.ensure_groups)
                self._reread_pending = True
                continue
            self.backoff.ok()
            return result

    def _next_entries(self) -> list[RawEntry]:
        """Own pending entries first (after a start or a failure), then new ones."""
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

    def _claim_some(self, min_idle_ms: int) -> list[RawEntry]:
        out: list[RawEntry] = []
        for key in self.io.keys:
            _, entries = self.io.autoclaim(key, min_idle_ms, "0-0", self.opts.batch)
            out.extend(entries)
        if out:
            log.info("claimed entries left by another consumer",
                     extra={"group": self.name, "entries": len(out)})
        return out

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

    async def _after(self, entries: list[RawEntry], folded: Folded,
                     errors: list[Exception]) -> None:
        """The Trio side of a written batch: log refused writes, request snapshots, retry or
        dead-letter failed entries."""
        for err in errors:
            log.error("view write refused", extra={"group": self.name, "error": str(err)})
        for eff in folded.effects:
            if isinstance(eff, NeedSnapshot) and self.snapshots is not None:
                self.snapshots.request(eff.symbol)
        if folded.failures:
            await self._failures(folded.failures)

    def _account(self, folded: Folded) -> None:
        if folded.applied:
            metrics.EVENTS_PROJECTED.labels(self.name).inc(folded.applied)
        self.newest_recv_ts = max(self.newest_recv_ts, folded.newest_recv_ts)

    async def _failures(self, failures: list[tuple[RawEntry, str]]) -> None:
        for raw, error in failures:
            attempts = await self._retrying(functools.partial(self.io.deliveries, raw))
            log.warning("entry failed", extra={"group": self.name, "entry": raw[1].decode(),
                                               "attempt": attempts, "error": error})
            if attempts >= self.opts.max_attempts:
                await self._retrying(functools.partial(self.io.dead_letter, raw, error))
                metrics.DEAD_LETTERS.labels(self.name).inc()
                log.error("entry dead-lettered", extra={"group": self.name,
                                                        "entry": raw[1].decode()})
        # the failed entries are still pending: read them again before new ones
        self._reread_pending = True

    def report_lag(self) -> None:
        for key, lag in self.io.lag().items():
            if lag is not None:
                metrics.CONSUMER_LAG.labels(self.name, key).set(lag)
        if self.newest_recv_ts:
            metrics.VIEW_AGE.labels(self.name).set(max(0.0, time.time() - self.newest_recv_ts))


async def run_spec(spec: ProjectionSpec, settings: Settings, opts: RunOptions,
                   snapshots: Snapshotter | None, loops: list[ProjectionLoop],
                   on_written: OnWritten | None = None) -> None:
    """Run one projection: directly, or while holding its lease when it is exclusive."""
    client = make_client(settings.redis_url, name=f"project:{spec.name}")

    async def work() -> None:
        loop = ProjectionLoop(spec.factory(), client, opts, snapshots, on_written)
        loops.append(loop)
        try:
            await loop.run()
        finally:
            loops.remove(loop)

    try:
        if spec.exclusive:
            lease = Lease(client, spec.name, opts.consumer, opts.lease_ttl_ms)
            await run_while_holding(lease, work)
        else:
            await work()
    finally:
        client.close()


async def report_metrics(loops: list[ProjectionLoop], every: float = 5.0) -> None:
    while True:
        await trio.sleep(every)
        for loop in list(loops):
            try:
                await in_thread(loop.report_lag)
            except RedisUnavailable:
                pass


async def run(settings: Settings, specs: Sequence[ProjectionSpec], opts: RunOptions,
              rest: RestClient | None = None, on_written: OnWritten | None = None) -> None:
    """Every projection of `specs` until cancelled."""
    loops: list[ProjectionLoop] = []
    client = make_client(settings.redis_url, name="project:snapshots")
    own_rest = rest is None
    rest = rest or RestClient(settings.rest_url)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, GIL_SWITCH_S))
    try:
        async with trio.open_nursery() as nursery:
            snapshots = Snapshotter(settings, client, nursery, rest)
            for spec in specs:
                nursery.start_soon(run_spec, spec, settings, opts, snapshots, loops, on_written)
            nursery.start_soon(report_metrics, loops)
    finally:
        sys.setswitchinterval(switch)
        client.close()
        if own_rest:
            with trio.CancelScope(shield=True):
                await rest.aclose()


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=None, help="comma list of projection names")
    parser.add_argument("--consumer", default=None, help="consumer name (default hostname-pid)")
    parser.add_argument("--block-ms", type=int, default=1000,
                        help=f"XREADGROUP BLOCK in ms (at most {MAX_BLOCK_MS})")
    parser.add_argument("--batch", type=int, default=500, help="XREADGROUP COUNT")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000,
                        help="take over entries another consumer left pending this long")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="failed folds of one entry before it goes to dlq:{name}")
    parser.add_argument("--lease-ttl-ms", type=int, default=10_000,
                        help="TTL of the lease of an exclusive projection")
    parser.add_argument("--no-coalesce", action="store_true",
                        help="write every event instead of the newest per view (benchmarks)")


def options_from(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        consumer=args.consumer or default_consumer(),
        block_ms=max(1, min(args.block_ms, MAX_BLOCK_MS)),
        batch=max(1, args.batch),
        claim_idle_ms=max(0, args.claim_idle_ms),
        max_attempts=max(1, args.max_attempts),
        lease_ttl_ms=max(100, args.lease_ttl_ms),
        coalescing=not args.no_coalesce,
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    specs = choose(settings, args.only)
    connect_checked(settings.redis_url, name="project").close()
    opts = options_from(args)
    if settings.metrics_port > 0:
        metrics.serve(settings.metrics_port, healthy)
    log.info("projector starting", extra={"consumer": opts.consumer,
                                          "projections": ",".join(s.name for s in specs)})
    trio.run(_main_async, settings, specs, opts)
    return 0


async def _main_async(settings: Settings, specs: Sequence[ProjectionSpec],
                      opts: RunOptions) -> None:
    # SIGTERM (docker stop) and SIGINT end the process cleanly: leases are released.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop_on_signal)
            await run(settings, specs, opts)
