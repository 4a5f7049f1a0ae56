"""Performs a projection's writes in Redis: each one atomic and forward-only.

The loop (`projections.shell.loop`) and replay (`projections.shell.replay`) queue a batch's
writes on one redis-py pipeline with `ViewStore.queue_all`, add its XACKs, and send it all in
one round trip. Every
market write is one call of `lua/views.lua`, which compares versions inside Redis:

Results: one list per script call, one number per write (1 written, 0 not newer, -1 expired).

- `ViewWrite`: skipped when `expire_at_ms` is not in the future by the server's clock (a
  replay of old frames brings back no stale key); else SET + PXAT only when the stored JSON's
  `version_field` is lower or the key is missing.
- `ListPushIfNewer`: LPUSH + LTRIM only when newer than the list's head.

User-data writes (projections.shell.orderstore) have their own script; `PERFORMERS` maps each write
type to the function that queues it. An output of any other type is a programming error and
raises TypeError (`projections.core.outputs.check_output` already failed the entry that
produced it, and the loop dead-letters it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import redis
import redis.client

from projections.core.orderwrites import AlgoOrderWrite, OrderWrite
from projections.core.outputs import ListPushIfNewer, Output, ViewWrite
from projections.shell.orderstore import perform_order_write

Performer = Callable[[redis.client.Pipeline, Any], None]

# write type -> function queuing it on a pipeline (the shell knows its performers; the pure
# folds that produce these values never import Redis)
PERFORMERS: dict[type, Performer] = {
    OrderWrite: perform_order_write,
    AlgoOrderWrite: perform_order_write,
}

VIEWS_LUA = resources.files("projections.shell").joinpath("lua/views.lua").read_text()


def _num(v: float) -> str:
    """A version as Lua's tonumber reads it back exactly (repr of a float round-trips)."""
    return str(v) if isinstance(v, int) else repr(float(v))


class ViewStore:
    """Queues writes on a pipeline. One per Redis client (the script is registered on it).

    Consecutive market writes go into ONE call of the script (up to `per_call` of them): redis-py
    spends far more packing a command than an argument, so a batch of 50 book writes costs one
    command instead of 50. The script returns one result per write, in order.
    """

    def __init__(self, client: redis.Redis, per_call: int = 500) -> None:
        self._client = client
        self.sha = client.register_script(VIEWS_LUA).sha
        self.per_call = per_call
        self._loaded = False

    def forget_loaded(self) -> None:
        """After a NoScriptError (Redis restarted): load the script again before the next use."""
        self._loaded = False

    def queue(self, pipe: redis.client.Pipeline, out: Output) -> None:
        self.queue_all(pipe, (out,))

    def queue_all(self, pipe: redis.client.Pipeline, outputs: Iterable[Output]) -> int:
        """Queue every write in order; returns how many commands were queued."""
        keys: list[str] = []
        args: list[Any] = []
        commands = 0
        for out in outputs:
            kind = type(out)
            if kind is ViewWrite or kind is ListPushIfNewer:
                w: Any = out
                keys.append(w.key)
                args += ("set", w.value, _num(w.version), w.version_field, w.expire_at_ms) \
                    if kind is ViewWrite else \
                    ("lpush", w.value, _num(w.version), w.version_field, w.cap)
                if len(keys) >= self.per_call:
                    commands += self._flush(pipe, keys, args)
                continue
            performer = PERFORMERS.get(kind)
            if performer is None:
                raise TypeError(f"no performer for output type {kind.__name__}")
            commands += self._flush(pipe, keys, args)
            performer(pipe, out)
            commands += 1
        return commands + self._flush(pipe, keys, args)

    def _flush(self, pipe: redis.client.Pipeline, keys: list[str], args: list[Any]) -> int:
        if not keys:
            return 0
        # EVALSHA queued directly: a pipeline holding a redis-py Script object first sends
        # SCRIPT EXISTS, one more round trip per batch on the latency path. We load the script
        # once per client instead (again after a NoScriptError, see `forget_loaded`).
        if not self._loaded:
            self._client.script_load(VIEWS_LUA)
            self._loaded = True
        pipe.evalsha(self.sha, len(keys), *keys, *args)
        keys.clear()
        args.clear()
        return 1
