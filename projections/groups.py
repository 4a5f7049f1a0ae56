"""The Redis side of one projection's consumer group: reads, claims, acks, dead letters.

Sync redis-py calls, each wrapped in `redis_errors()`; the runner calls them from worker
threads. The fold itself (`fold_batch`) is pure and lives here too because it decides what the
batch acknowledges.

Keys this module writes besides the views (for the ACL, see docs/architecture.md):
`dlq:{projection}`, the entries that failed `max_attempts` deliveries, with `source_key`,
`entry_id`, `error` and the original fields. Attempts are the delivery count Redis keeps in
the group's pending list (XPENDING `times_delivered`; re-reading our own pending entries
increments it), so they survive a restart and need no key of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import attrs
import redis

from pipeline.eventlog import decode_entry
from pipeline.redisconn import redis_errors
from projections.core import (
    ListPushIfNewer,
    LogGap,
    NeedSnapshot,
    Output,
    Projection,
    ViewWrite,
    coalesce,
)
from projections.viewstore import check_performable

log = logging.getLogger("pipeline.project")

# (source key, entry id, fields); fields are empty for an entry trimmed while it was pending
RawEntry = tuple[str, bytes, dict[bytes, bytes]]

DLQ_PREFIX = "dlq:"
ERROR_TEXT_MAX = 500
_CORE_TYPES = frozenset((ViewWrite, ListPushIfNewer, NeedSnapshot, LogGap))


def parse_xreadgroup(response: Sequence[Any] | None, **_options: object) -> list[RawEntry]:
    """XREADGROUP's raw reply `[[key, [[id, [f, v, ...]], ...]], ...]` as one list of RawEntry.

    Installed as the client's response callback (`GroupIO`): redis-py's own parser builds
    nested tuples and dicts that we would flatten again, at a cost per entry that the hot path
    notices (~1.5 µs of ~15 µs).
    """
    out: list[RawEntry] = []
    for key, entries in response or ():
        skey = key.decode() if isinstance(key, bytes) else key
        for eid, flat in entries:
            if flat:
                it = iter(flat)
                out.append((skey, eid, dict(zip(it, it, strict=False))))
            else:
                out.append((skey, eid, {}))  # trimmed from the stream while pending
    return out


@attrs.define
class Folded:
    """What one batch comes to: the writes, the effects, the acks and the failures."""

    writes: list[Output] = attrs.Factory(list)
    effects: list[NeedSnapshot | LogGap] = attrs.Factory(list)
    acks: dict[str, list[bytes]] = attrs.Factory(dict)
    failures: list[tuple[RawEntry, str]] = attrs.Factory(list)
    applied: int = 0
    newest_recv_ts: float = 0.0
    written_at: float = 0.0  # wall clock right after the write + ack pipeline returned


def fold_batch(projection: Projection, entries: Sequence[RawEntry],
               coalescing: bool = True) -> Folded:
    """Apply each entry; an entry that raises is a failure and is not acknowledged.

    With coalescing, a projection that has `last_value_key(frame)` (the stateless market
    folds) gets only the last frame of each key in the batch: the others would be coalesced
    away anyway, and parsing them was most of the fold's cost. Superseded entries count as
    applied and are acknowledged; they are not parsed (see `superseded`).

    Hot path (every entry of every batch): plain locals, no per-entry allocation beyond what
    the fold returns.
    """
    folded = Folded()
    outputs: list[Output] = []
    acks = folded.acks
    apply = projection.apply
    keyer = getattr(projection, "last_value_key", None) if coalescing else None
    skip = superseded(entries, keyer) if keyer is not None else ()
    newest = 0.0
    for i, raw in enumerate(entries):
        key, eid, fields = raw
        if i in skip:
            folded.applied += 1
        elif fields:
            try:
                entry = decode_entry(eid, fields)
                outs = apply(entry)
                if type(outs) is not list:
                    outs = list(outs)
                for out in outs:
                    if type(out) not in _CORE_TYPES:
                        check_performable(out)
            except Exception as exc:  # any failure of a fold is the entry's, not the process's
                folded.failures.append((raw, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]))
                continue
            outputs += outs
            folded.applied += 1
            if entry.recv_ts > newest:
                newest = entry.recv_ts
        ids = acks.get(key)
        if ids is None:
            acks[key] = [eid]
        else:
            ids.append(eid)
    folded.newest_recv_ts = newest
    for out in coalesce(outputs) if coalescing else outputs:
        if type(out) is NeedSnapshot or type(out) is LogGap:
            folded.effects.append(out)
        else:
            folded.writes.append(out)
    return folded


def superseded(entries: Sequence[RawEntry],
               keyer: Callable[[bytes], bytes | None]) -> set[int]:
    """Indexes of the frame entries that a later entry with the same `keyer(frame)` (the
    stream name, which also decides the source key) supersedes. `keyer` returns None for a
    frame that must always be folded (not a well-formed wrapper, a closed candle, a list
    payload)."""
    last: dict[bytes, int] = {}
    skip: set[int] = set()
    for i, (_key, _eid, fields) in enumerate(entries):
        frame = fields.get(b"frame")
        if frame is None:
            continue
        name = keyer(frame)
        if name is None:
            continue
        held = last.get(name)
        if held is not None:
            skip.add(held)
        last[name] = i
    return skip


class GroupIO:
    """One projection's group on its source keys, for one consumer."""

    def __init__(self, client: redis.Redis, group: str, keys: Sequence[str], consumer: str):
        self.client = client
        client.set_response_callback("XREADGROUP", parse_xreadgroup)
        self.group = group
        self.keys = list(keys)
        self.consumer = consumer

    def ensure_groups(self) -> None:
        """XGROUP CREATE ... 0 MKSTREAM: a new group starts at the log's first entry."""
        with redis_errors():
            for key in self.keys:
                if self._has_group(key):
                    continue  # (XGROUP CREATE needs memory even when the group exists)
                try:
                    self.client.xgroup_create(key, self.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def _has_group(self, key: str) -> bool:
        try:
            infos: Any = self.client.xinfo_groups(key)
        except redis.ResponseError:  # no such key
            return False
        return any(_text(i.get("name")) == self.group for i in infos)

    def read(self, ids: Mapping[str, bytes | str], count: int,
             block_ms: int | None) -> list[RawEntry]:
        """XREADGROUP over the keys at once: `>` for new entries, an id for our own pending."""
        with redis_errors():
            reply: Any = self.client.xreadgroup(self.group, self.consumer, dict(ids),  # type: ignore[arg-type]
                                                count=count, block=block_ms)
        return cast(list[RawEntry], reply)

    def queue_read(self, pipe: Any, count: int) -> None:
        """Queue a non-blocking read of new entries (`>`) on `pipe` (see `write_batch`)."""
        pipe.xreadgroup(self.group, self.consumer, {k: ">" for k in self.keys}, count=count)

    def autoclaim(self, key: str, min_idle_ms: int, start: bytes | str,
                  count: int) -> tuple[bytes, list[RawEntry]]:
        """Take over entries idle for `min_idle_ms`; returns (next start, entries)."""
        with redis_errors():
            nxt, entries, *_ = self.client.xautoclaim(key, self.group, self.consumer,
                                                      min_idle_ms, start, count=count)
        return nxt, [(key, eid, fields or {}) for eid, fields in entries]

    def deliveries(self, raw: RawEntry) -> int:
        """How many times the group has delivered this entry (1 if no longer pending)."""
        with redis_errors():
            rows: Any = self.client.xpending_range(raw[0], self.group, min=raw[1], max=raw[1],
                                                   count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    def dead_letter(self, raw: RawEntry, error: str) -> None:
        """XADD to `dlq:{group}` then XACK, in one round trip."""
        key, eid, fields = raw
        pipe = self.client.pipeline(transaction=False)
        dead: dict[Any, Any] = {b"source_key": key.encode(), b"entry_id": eid,
                                b"error": error.encode(), **fields}
        pipe.xadd(DLQ_PREFIX + self.group, dead)
        pipe.xack(key, self.group, eid)
        with redis_errors():
            pipe.execute()

    def lag(self) -> dict[str, int | None]:
        """XINFO GROUPS `lag` of this group per key (None when Redis cannot tell)."""
        out: dict[str, int | None] = {}
        with redis_errors():
            for key in self.keys:
                for info in self.client.xinfo_groups(key):
                    if _text(info.get("name")) == self.group:
                        out[key] = info.get("lag")
        return out


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def write_batch(client: redis.Redis, queue_all: Callable[[Any, list[Output]], object],
                group: str, folded: Folded,
                extra: Callable[[Any], None] | None = None,
                then: Callable[[Any], None] | None = None) -> tuple[list[Exception], Any]:
    """The batch's writes, then its XACKs, in ONE non-transactional pipeline.

    `then` queues one more command after the XACKs (the next non-blocking read, see
    `ProjectionLoop._write`); its reply is returned apart from the errors, None without it.
    Returns the errors Redis answered for single commands (a script error, NOGROUP after a
    Redis restart); raises RedisUnavailable when the round trip itself failed, in which case
    the caller sends the same batch again (every write is forward-only, so a repeat is safe).
    """
    pipe = client.pipeline(transaction=False)
    queue_all(pipe, folded.writes)
    if extra is not None:
        extra(pipe)
    for key, ids in folded.acks.items():
        pipe.xack(key, group, *ids)
    if then is not None:
        then(pipe)
    with redis_errors():
        results = pipe.execute(raise_on_error=False)
    tail = results.pop() if then is not None else None
    return [r for r in results if isinstance(r, Exception)], tail
