"""`pipeline replay`: rebuild chosen views from the log, then exit.

Reads each projection's source keys with XRANGE in chunks (no consumer group, no acks), merged
in entry-id order when a projection reads several keys, folds them with a fresh instance of the
same projection and performs the same forward-only writes (projections.shell.viewstore). It stops at
the last entry each key held when the replay started, so it ends even while ingestors append.

Live projectors may keep running meanwhile: both sides write only when newer, so the views end
the same whichever writes last. `--reset` first deletes the projection's view keys (SCAN by
its key patterns, projections.shell.registry) so they are rebuilt from scratch; frames older than a
view's TTL write nothing, so a reset view holds only what is still fresh.

Replay never calls REST and never appends to the log: `NeedSnapshot` and `LogGap` are ignored,
because the live projector already logged the snapshots and gaps that a replay then reads. An
entry whose fold fails is counted and skipped (the live projector dead-lettered it).

Sync code: there is nothing to wait for concurrently, and plain calls are fastest here.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import redis

from pipeline.config import Settings
from pipeline.errors import RedisUnavailable, SettingsError
from pipeline.redisconn import connect_checked, make_client, redis_errors
from projections.core.batch import RawEntry, fold_batch
from projections.shell.functions import function_missing
from projections.shell.registry import ProjectionSpec, choose
from projections.shell.viewstore import ViewStore

log = logging.getLogger("pipeline.replay")

CHUNK = 5_000
_ID_RE = re.compile(r"^(\d+)-(\d+)$")
_MAX_ID_PART = 2**64 - 1  # each half of a stream id is an unsigned 64-bit number


def parse_from(value: str | None) -> str:
    """`--from`: a stream id (`1700000000000-0`), an ISO time, or unix seconds -> XRANGE start.
    Anything else, a negative or not finite number, or an id Redis cannot hold, is a bad
    setting naming `--from` (rather than a silent replay of everything)."""
    if value is None or value in ("", "-", "0"):
        return "-"
    v = value.strip()
    if m := _ID_RE.match(v):
        if max(int(m[1]), int(m[2])) > _MAX_ID_PART:
            raise SettingsError("--from", f"{value!r} is larger than any stream id")
        return v
    try:
        seconds = float(v)
    except ValueError:
        try:
            when = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise SettingsError("--from", f"{value!r} is not a stream id, ISO time or unix "
                                          "seconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise SettingsError("--from", f"{value!r} is not a time after 1970 (unix seconds >= 0)")
    ms = int(seconds * 1000)
    if ms > _MAX_ID_PART:
        raise SettingsError("--from", f"{value!r} is larger than any stream id")
    return f"{ms}-0"


def check_start(client: redis.Redis, specs: Sequence[ProjectionSpec], start: str,
                value: str | None) -> None:
    """Refuse a `--from` past the newest entry of every key the chosen projections read: the
    replay would do nothing (and `--reset` would only delete), which is almost always a
    mistyped time (milliseconds given as seconds, a wrong year). An empty log passes."""
    if start == "-":
        return
    newest = [e for spec in specs for k in spec.factory().sources
              if (e := log_end(client, k)) is not None]
    if not newest:
        return
    last = max(newest, key=_id_key)
    if _id_key(start.encode()) > _id_key(last):
        when = datetime.fromtimestamp(_id_key(last)[0] / 1000, UTC).isoformat(
            timespec="seconds")
        raise SettingsError("--from", f"{value!r} ({start}) is after the newest entry the "
                                      f"chosen projections read ({last.decode()}, {when}): "
                                      "nothing to replay")


def _id_key(eid: bytes) -> tuple[int, int]:
    ms, _, seq = eid.partition(b"-")
    return int(ms), int(seq or 0)


def log_end(client: redis.Redis, key: str) -> bytes | None:
    """The id of the last entry `key` holds now (None when empty or missing)."""
    last: Any = client.xrevrange(key, "+", "-", count=1)
    return last[0][0] if last else None


def merged_entries(client: redis.Redis, ends: dict[str, bytes], start: str,
                   chunk: int = CHUNK) -> Iterator[list[RawEntry]]:
    """Chunks of entries from every key in `ends`, in id order, up to each key's end id."""
    cursors: dict[str, str] = {k: start for k in ends}
    buffers: dict[str, list[RawEntry]] = {k: [] for k in ends}
    open_keys = set(ends)
    while open_keys or any(buffers.values()):
        for key in sorted(open_keys):
            if buffers[key]:
                continue
            got: Any = client.xrange(key, cursors[key], ends[key], count=chunk)
            buffers[key] = [(key, eid, fields) for eid, fields in got]
            if len(got) < chunk:
                open_keys.discard(key)
            else:
                cursors[key] = "(" + got[-1][0].decode()
        # entries up to the smallest last-fetched id of the keys not yet exhausted are in order
        bound = min((_id_key(buffers[k][-1][1]) for k in open_keys), default=None)
        out: list[RawEntry] = []
        for key, buf in buffers.items():
            n = len(buf) if bound is None else sum(1 for e in buf if _id_key(e[1]) <= bound)
            out.extend(buf[:n])
            buffers[key] = buf[n:]
        if len(ends) > 1:
            out.sort(key=lambda e: _id_key(e[1]))
        if out:
            yield out


@attrs.define
class ReplayResult:
    entries: int = 0
    failed: int = 0
    writes: int = 0
    seconds: float = 0.0


class Progress:
    """rich.progress on a terminal, else a log line every few seconds."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        self.total, self.every, self.done = total, every, 0
        self.t0 = self.last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from rich import progress as rp  # only a terminal needs it

            # no refresh thread: worker processes are forked while the bar is shown
            self._bar = rp.Progress(
                rp.TextColumn("replay"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[rate]} entries/s"), rp.TimeRemainingColumn(),
                transient=False, auto_refresh=False)
            self._task = self._bar.add_task("replay", total=total, rate="-")
            self._bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        rate = self.done / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{rate:,.0f}")
            self._bar.refresh()
        elif now - self.last >= self.every:
            self.last = now
            log.info("replay progress", extra={"done": self.done, "per_s": round(rate),
                                               "remaining": max(0, self.total - self.done)})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def reset_views(client: redis.Redis, patterns: Sequence[str]) -> int:
    """UNLINK every key matching the patterns; returns how many."""
    n = 0
    for pattern in patterns:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += client.unlink(*batch)
                batch = []
        if batch:
            n += client.unlink(*batch)
    return n


def replay_one(client: redis.Redis, spec: ProjectionSpec, start: str,
               progress: Progress | None, result: ReplayResult, counts: Any = None) -> None:
    """Fold every entry of the projection's keys into its views. In a worker process
    `counts` (a shared array: entries, failed, writes) tells the parent how far it got."""
    projection = spec.factory()
    store = ViewStore(client, bounds=spec.bounds)
    ends = {k: e for k in projection.sources if (e := log_end(client, k)) is not None}
    for entries in merged_entries(client, ends, start):
        folded = fold_batch(projection, entries)
        _write(client, store, folded.writes)
        result.entries += len(entries)
        result.failed += len(folded.failures)
        result.writes += len(folded.writes)
        if progress is not None:
            progress.advance(len(entries))
        if counts is not None:
            counts[:] = [result.entries, result.failed, result.writes]


def _write(client: redis.Redis, store: ViewStore, writes: list[Any]) -> None:
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        store.queue_all(pipe, writes)
        try:
            pipe.execute()
            return
        except redis.ResponseError as exc:
            if attempt == 2 or not function_missing(exc):
                raise
            store.forget_loaded()  # Redis restarted under us; forward-only writes repeat safely


def _replay_child(url: str, spec: ProjectionSpec, start: str, counts: Any) -> None:
    client = make_client(url, name=f"replay:{spec.name}")
    with redis_errors():
        replay_one(client, spec, start, None, ReplayResult(), counts)
    client.close()


def replay_in_processes(url: str, specs: Sequence[ProjectionSpec], start: str,
                        progress: Progress, result: ReplayResult, jobs: int) -> list[str]:
    """One forked process per projection, at most `jobs` at once (the folds are CPU-bound and
    independent, so they scale with cores). Returns the names of projections whose process
    failed."""
    ctx = mp.get_context("fork")  # the CLI's __main__ must not run again in the workers
    counts = {s.name: ctx.Array("q", 3) for s in specs}
    waiting = list(specs)
    running: dict[str, Any] = {}
    failed: list[str] = []
    seen = 0
    while waiting or running:
        while waiting and len(running) < jobs:
            spec = waiting.pop(0)
            proc = ctx.Process(target=_replay_child, args=(url, spec, start, counts[spec.name]),
                               name=f"replay-{spec.name}")
            proc.start()
            running[spec.name] = proc
        time.sleep(0.05)
        for name, proc in list(running.items()):
            if proc.exitcode is not None:
                proc.join()
                del running[name]
                if proc.exitcode != 0:
                    failed.append(name)
        done = sum(c[0] for c in counts.values())
        progress.advance(done - seen)
        seen = done
    for c in counts.values():
        result.entries += c[0]
        result.failed += c[1]
        result.writes += c[2]
    return failed


def replay(client: redis.Redis, specs: Sequence[ProjectionSpec], start: str = "-",
           reset: bool = False, jobs: int = 1, url: str | None = None) -> ReplayResult:
    """Rebuild the views of `specs`; `jobs` > 1 (with `url`) folds them in parallel processes.
    Raises RedisUnavailable when Redis failed (in a worker too)."""
    result = ReplayResult()
    t0 = time.monotonic()
    with redis_errors():
        if reset:
            for spec in specs:
                gone = reset_views(client, spec.key_patterns)
                log.info("views reset", extra={"projection": spec.name, "keys": gone})
        total = sum(client.xlen(k) for spec in specs for k in spec.factory().sources)
    progress = Progress(total)
    try:
        if jobs > 1 and len(specs) > 1 and url is not None:
            failed = replay_in_processes(url, specs, start, progress, result, jobs)
            if failed:
                raise RedisUnavailable(f"replay of {', '.join(failed)} failed")
        else:
            with redis_errors():
                for spec in specs:
                    replay_one(client, spec, start, progress, result)
    finally:
        progress.close()
    result.seconds = time.monotonic() - t0
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=None, help="comma list of projection names")
    parser.add_argument("--from", dest="from_", default=None, metavar="WHEN",
                        help="start at a stream id (1700000000000-0), an ISO time or unix "
                             "seconds (default: the log's start). A malformed or negative "
                             "value, or one after the newest entry of every key the chosen "
                             "projections read (nothing to replay), is a bad setting: exit 2, "
                             "before --reset deletes anything")
    parser.add_argument("--reset", action="store_true",
                        help="delete the chosen projections' view keys first")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="projections replayed in parallel processes (default: CPUs)")


def main(settings: Settings, args: argparse.Namespace) -> int:
    specs = choose(settings, args.only)
    start = parse_from(args.from_)
    client = connect_checked(settings.redis_url, name="replay",
                             cluster=settings.redis_cluster)
    try:
        with redis_errors():
            check_start(client, specs, start, args.from_)
        result = replay(client, specs, start, args.reset, max(1, args.jobs), settings.redis_url)
    except RedisUnavailable as exc:
        print(f"pipeline replay: {exc}; views may be partly rebuilt, run it again",
              file=sys.stderr)
        return 1
    finally:
        client.close()
    rate = result.entries / max(result.seconds, 1e-9)
    print(f"replayed {result.entries} entries for {', '.join(s.name for s in specs)} in "
          f"{result.seconds:.2f} s ({rate:,.0f} entries/s), {result.writes} writes, "
          f"{result.failed} failed entries skipped", file=sys.stderr)
    return 0
