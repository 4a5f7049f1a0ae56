"""Performs a projection's writes in Redis: each one atomic and forward-only.

The shell (`projections.runner`, `projections.replay`) queues a batch's writes on one redis-py
pipeline with `ViewStore.queue`, adds its XACKs, and sends it all in one round trip. Every
market write is one call of `lua/views.lua`, which compares versions inside Redis:

- `ViewWrite`: skipped when `expire_at_ms` is not in the future by the server's clock (a
  replay of old frames brings back no stale key); else SET + PXAT only when the stored JSON's
  `version_field` is lower or the key is missing.
- `ListPushIfNewer`: LPUSH + LTRIM only when newer than the list's head.

User-data writes (projections.orderstore) have their own scripts; that module registers a
performer per write type in `PERFORMERS` when it is imported. An output of any other type is a
programming error and raises TypeError (the runner dead-letters the entry that produced it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import redis
import redis.client

from projections.core import ListPushIfNewer, LogGap, NeedSnapshot, Output, ViewWrite

Performer = Callable[[redis.client.Pipeline, Any], None]

# write type -> function queuing it on a pipeline; filled by projections.orderstore on import
PERFORMERS: dict[type, Performer] = {}

VIEWS_LUA = resources.files("projections").joinpath("lua/views.lua").read_text()

# Outputs the shell acts on itself (REST snapshot, gap entry): never sent to the store.
EFFECT_TYPES = (NeedSnapshot, LogGap)


def _num(v: float) -> str:
    """A version as Lua's tonumber reads it back exactly (repr of a float round-trips)."""
    return str(v) if isinstance(v, int) else repr(float(v))


class ViewStore:
    """Queues writes on a pipeline. One per Redis client (the script is registered on it)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(VIEWS_LUA)

    def queue(self, pipe: redis.client.Pipeline, out: Output) -> None:
        if isinstance(out, ViewWrite):
            self._script(keys=[out.key], client=pipe, args=[
                "set", out.value, _num(out.version), out.version_field, out.expire_at_ms])
        elif isinstance(out, ListPushIfNewer):
            self._script(keys=[out.key], client=pipe, args=[
                "lpush", out.value, _num(out.version), out.version_field, out.cap])
        else:
            performer = PERFORMERS.get(type(out))
            if performer is None:
                raise TypeError(f"no performer for output type {type(out).__name__}")
            performer(pipe, out)

    def queue_all(self, pipe: redis.client.Pipeline, outputs: Iterable[Output]) -> int:
        """Queue every write; returns how many commands were queued."""
        n = 0
        for out in outputs:
            self.queue(pipe, out)
            n += 1
        return n


def check_performable(out: Output) -> None:
    """Raise TypeError now, while the entry that produced `out` is known, if no one can write it."""
    if isinstance(out, ViewWrite | ListPushIfNewer | NeedSnapshot | LogGap):
        return
    if type(out) not in PERFORMERS:
        raise TypeError(f"no performer for output type {type(out).__name__}")
