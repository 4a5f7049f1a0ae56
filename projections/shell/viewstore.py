"""Performs a projection's writes in Redis: each one atomic and forward-only.

The loop (`projections.shell.loop`) and replay (`projections.shell.replay`) queue a batch's
writes on one redis-py pipeline with `ViewStore.queue_all`, add its XACKs, and send it all in
one round trip. Every market write is one call of the library's views function
(`lua/views.lua`, loaded as a Redis function: `projections.shell.functions`), which compares
versions inside Redis:

- `ViewWrite`: skipped when `expire_at_ms` is not in the future by the server's clock (a
  replay of old frames brings back no stale key); else SET + PXAT only when the stored JSON's
  `version_field` is lower or the key is missing.
- `ListPushIfNewer`: LPUSH + LTRIM only when newer than the list's head.
- `ListMerge`: the values the list lacks (by version) merged in, newest first, capped (the
  kline history REST gives: candles older than the head land in order, none twice).
- both: a held value whose version cannot be right is overwritten instead of obeyed, and an id
  that jumps further than any stream can is refused (views.lua, `projections.core.plausible`).

Results, per write (`write_results`): 1 written, 2 written over a held value that was not
obeyed, 0 not newer, -1 expired, -2 refused as implausible (the loop dead-letters the entry
that produced it), or the error Redis answered for the command that carried it.

User-data writes have their own functions: the order writes (projections.shell.orderstore),
and `StreamAppend` (the account's event streams: `lua/streams.lua`, exactly once per event
key, 1 appended, 0 a duplicate, -1 too old for the stream's age limit). `PERFORMERS` maps each
write type to the function that queues it. An output of any other type is a programming error
and raises TypeError (`projections.core.outputs.check_output` already failed the entry that
produced it, and the loop dead-letters it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
import redis
import redis.client
from redis.crc import key_slot

from pipeline.redisconn import is_cluster
from projections.core.orderwrites import AlgoOrderWrite, OrderWrite
from projections.core.outputs import ListMerge, ListPushIfNewer, Output, StreamAppend, ViewWrite
from projections.core.plausible import Bounds
from projections.shell import functions
from projections.shell.orderstore import perform_order_write

Performer = Callable[[redis.client.Pipeline, Any, Bounds], None]
# per queued command: how many writes it carries (in the order queued), or, in cluster mode,
# the positions of the writes it carries (a views call carries one slot's writes)
Plan = list[int | tuple[int, ...]]


def perform_stream_append(pipe: redis.client.Pipeline, write: object, bounds: Bounds) -> None:
    """Queue one exactly-once append (`StreamAppend`) on `pipe`."""
    if not isinstance(write, StreamAppend):
        raise TypeError(f"not a stream append: {type(write).__name__}")
    flat = [part for pair in write.fields for part in pair]
    pipe.fcall(functions.APPEND_FN, 1, write.key, write.at_ms, write.event_key,
               write.max_age_ms, *flat)


# write type -> function queuing it on a pipeline (the shell knows its performers; the pure
# folds that produce these values never import Redis)
PERFORMERS: dict[type, Performer] = {
    OrderWrite: perform_order_write,
    AlgoOrderWrite: perform_order_write,
    StreamAppend: perform_stream_append,
}

REFUSED = -2  # the views function's answer to an implausible id


def _num(v: float) -> str:
    """A version as Lua's tonumber reads it back exactly (repr of a float round-trips)."""
    return str(v) if isinstance(v, int) else repr(float(v))


class ViewStore:
    """Queues writes on a pipeline. One per Redis client.

    Consecutive market writes go into ONE call of the views function (up to `per_call` of
    them): redis-py spends far more packing a command than an argument, so a batch of 50 book
    writes costs one command instead of 50. The function returns one result per write, in
    order. `bounds`: the settings' plausibility bounds, sent with every call; `library`: who
    makes sure the function library is on the server (one per process).

    Redis Cluster: a function call's keys must share a slot, and the views keep their
    single-node names (`websocket:mark_price:btcusdt`), so the run of writes is split into one
    call per slot (the cluster pipeline sends each to its master; the calls of one master go
    in one round trip), and the plan names the positions each call carries.
    """

    def __init__(self, client: redis.Redis, per_call: int = 500, bounds: Bounds | None = None,
                 library: functions.FunctionLibrary | None = None) -> None:
        self._client = client
        self.per_call = per_call
        self.bounds = bounds or Bounds()
        self._head = (self.bounds.max_ahead_ms, self.bounds.repair_slack_ms,
                      _num(self.bounds.max_id_rate))
        self.library = library or functions.DEFAULT
        self._loaded = False
        self._cluster = is_cluster(client)
        self._slots: dict[str, int] = {}
        self._pos = 0  # cluster mode: position of the next write in the queue_all call

    def forget_loaded(self) -> None:
        """After a call found the library missing (Redis restarted): check (and load) it again
        before the next use."""
        self._loaded = False

    def queue(self, pipe: redis.client.Pipeline, out: Output) -> Plan:
        return self.queue_all(pipe, (out,))

    def queue_all(self, pipe: redis.client.Pipeline, outputs: Iterable[Output]) -> Plan:
        """Queue every write in order; returns, per queued command, how many writes it carries
        (the plan `write_results` reads the replies by)."""
        keys: list[str] = []
        args: list[Any] = []
        plan: Plan = []
        self._pos = 0
        for out in outputs:
            kind = type(out)
            if kind is ViewWrite:
                w: Any = out
                keys.append(w.key)
                args += ("seti" if w.ids else "set", w.value, _num(w.version), w.version_field,
                         w.expire_at_ms, _num(w.event_s))
            elif kind is ListPushIfNewer:
                w = out
                keys.append(w.key)
                args += ("lpush", w.value, _num(w.version), w.version_field, w.cap,
                         _num(w.event_s))
            elif kind is ListMerge:
                w = out
                keys.append(w.key)
                args += ("merge", orjson.dumps([v.decode() for v in w.values]), 0,
                         w.version_field, w.cap, _num(w.event_s))
            else:
                performer = PERFORMERS.get(kind)
                if performer is None:
                    raise TypeError(f"no performer for output type {kind.__name__}")
                self._flush(pipe, keys, args, plan)
                self._ensure()
                performer(pipe, out, self.bounds)
                if self._cluster:
                    plan.append((self._pos,))
                    self._pos += 1
                else:
                    plan.append(1)
                continue
            if len(keys) >= self.per_call:
                self._flush(pipe, keys, args, plan)
        self._flush(pipe, keys, args, plan)
        return plan

    def _ensure(self) -> None:
        if not self._loaded:
            self.library.ensure(self._client)
            self._loaded = True

    def _flush(self, pipe: redis.client.Pipeline, keys: list[str], args: list[Any],
               plan: Plan) -> None:
        if not keys:
            return
        self._ensure()
        if self._cluster:
            self._flush_per_slot(pipe, keys, args, plan)
        else:
            pipe.fcall(functions.VIEWS_FN, len(keys), *keys, *self._head, *args)
            plan.append(len(keys))
        keys.clear()
        args.clear()

    def _flush_per_slot(self, pipe: redis.client.Pipeline, keys: list[str], args: list[Any],
                        plan: Plan) -> None:
        """Cluster mode: one views call per slot of the run's keys, in first-seen order."""
        width = len(args) // len(keys)  # every write carries the same number of arguments
        by_slot: dict[int, list[int]] = {}
        slots = self._slots
        for i, key in enumerate(keys):
            slot = slots.get(key)
            if slot is None:
                if len(slots) > 100_000:
                    slots.clear()
                slot = slots[key] = key_slot(key.encode())
            by_slot.setdefault(slot, []).append(i)
        base = self._pos
        for idx in by_slot.values():
            call_args = [a for i in idx for a in args[i * width:(i + 1) * width]]
            pipe.fcall(functions.VIEWS_FN, len(idx), *[keys[i] for i in idx], *self._head,
                       *call_args)
            plan.append(tuple(base + i for i in idx))
        self._pos += len(keys)


def write_results(plan: Sequence[int | tuple[int, ...]], replies: Sequence[Any]) -> list[Any]:
    """One result per write, in the order queued: the replies of the commands `plan`
    describes (a list for a views call, one number for an order write); an error reply
    stands for every write its command carried. (Cluster mode: a plan item names the
    positions of its writes.)"""
    if plan and isinstance(plan[0], tuple):
        placed: dict[int, Any] = {}
        for positions, reply in zip(plan, replies, strict=False):
            assert isinstance(positions, tuple)
            if isinstance(reply, list):
                placed.update(zip(positions, reply, strict=False))
            else:
                placed.update((p, reply) for p in positions)
        return [placed.get(i) for i in range(len(placed))]
    out: list[Any] = []
    for n, reply in zip(plan, replies, strict=False):
        assert isinstance(n, int)
        if isinstance(reply, list):
            out += reply
        else:
            out += [reply] * n
    return out
