"""The Redis side of one projection's consumer group: reads, claims, acks, dead letters.

Sync redis-py calls, each wrapped in `redis_errors()`; the loop (`projections.shell.loop`)
calls them from worker threads. The fold between read and write is pure
(`projections.core.batch.fold_batch`).

Keys this module writes besides the views (for the ACL, see docs/architecture.md):
`dlq:{projection}`, the entries that failed `max_attempts` deliveries, with `source_key`,
`entry_id`, `error` and the original fields. Attempts are the delivery count Redis keeps in
the group's pending list (XPENDING `times_delivered`; re-reading our own pending entries
increments it), so they survive a restart and need no key of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis

from pipeline.redisconn import error_code, is_cluster, redis_errors
from projections.core.batch import RawEntry
from projections.core.keys import dlq_key
from projections.shell.packed import PackedPipeline

log = logging.getLogger("pipeline.project")



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


def from_parsed(response: Any) -> list[RawEntry]:
    """Cluster mode: XREADGROUP as redis-py's own parser left it (`[[key, [(id, {f: v})]]]`:
    a RedisCluster applies a response callback only after its node's parser ran) as RawEntry."""
    out: list[RawEntry] = []
    for key, entries in response or ():
        skey = key.decode() if isinstance(key, bytes) else key
        out += [(skey, eid, fields or {}) for eid, fields in entries]
    return out


class GroupIO:
    """One projection's group on its source keys, for one consumer."""

    def __init__(self, client: redis.Redis, group: str, keys: Sequence[str], consumer: str):
        self.client = client
        self.cluster = is_cluster(client)
        if not self.cluster:
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
                    if error_code(exc) != "BUSYGROUP":
                        raise

    def _has_group(self, key: str) -> bool:
        try:
            infos: Any = self.client.xinfo_groups(key)
        except redis.ResponseError:  # no such key
            return False
        return any(_text(i.get("name")) == self.group for i in infos)

    def read(self, ids: Mapping[str, bytes | str], count: int,
             block_ms: int | None) -> list[RawEntry]:
        """XREADGROUP over the keys at once: `>` for new entries, an id for our own pending.
        (One node: packed by hiredis, `projections.shell.packed`, as the write round trip.)"""
        with redis_errors():
            if self.cluster:
                reply: Any = self.client.xreadgroup(self.group, self.consumer, dict(ids),  # type: ignore[arg-type]
                                                    count=count, block=block_ms)
            else:
                reply, = PackedPipeline(self.client).xreadgroup(
                    self.group, self.consumer, ids, count=count, block=block_ms).execute()
        return self.entries(reply)

    def entries(self, reply: Any) -> list[RawEntry]:
        """The RawEntry list of an XREADGROUP reply read through this client."""
        return from_parsed(reply) if self.cluster else cast(list[RawEntry], reply)

    def queue_read(self, pipe: Any, count: int) -> None:
        """Queue a non-blocking read of new entries (`>`) on `pipe` (the loop's read-ahead)."""
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
        pipe.xadd(dlq_key(self.group), dead)
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
