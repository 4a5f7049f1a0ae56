"""The projector's write round trip without redis-py's pipeline: commands packed by hiredis,
sent in one write on one pooled connection, replies read one by one.

    pipe = PackedPipeline(client)        # duck-types the part of redis-py's Pipeline used here
    pipe.fcall("views", 2, k1, k2, ...)  # queued, packed at once
    pipe.xack(key, group, *ids)
    pipe.xreadgroup(group, consumer, {key: ">"}, count=500)
    results = pipe.execute(raise_on_error=False)   # one reply per command; an error reply
                                                   # is its ResponseError, in its place

The loop's own reads (`GroupIO.read`, with BLOCK) go the same way, one command each.

Why (issue #16, docs/benchmarks.md "The projector's write round trip"): a batch is one views
call carrying up to 500 writes of 6 arguments each, and redis-py's `Pipeline` costs ~3 µs of
CPU a write to pack it (its per-argument checks in Python, then hiredis) and more per command
to queue, pack into buffers and parse; `hiredis.pack_command` alone costs about half. The
projector shares one GIL between its projections, so every microsecond of a burst's last
write is latency for the projection waiting behind it.

What stays redis-py's: the connection (opened, authenticated, named and timed out as
`pipeline.redisconn` pins it), its reply parser (hiredis, RESP2; error replies become the same
exception classes, so `refused_for_now` and `function_missing` judge them as before), and the
pool. Single node only: in cluster mode the loop keeps redis-py's cluster pipeline, which
routes each command to its slot's master.

A connection whose round trip failed in any way is disconnected before it goes back to the
pool, so no reply left unread on it can be taken for the next batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import hiredis
import redis

Parse = Callable[[Any], Any] | None


class PackedPipeline:
    """Commands queued for one round trip on a single-node client's pool."""

    __slots__ = ("_commands", "_parsers", "_pool", "_xreadgroup")

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._commands: list[bytes] = []
        self._parsers: list[Parse] = []
        # the client's own XREADGROUP reply shape (`groups.parse_xreadgroup` is installed as
        # its response callback), so a read-ahead looks like a plain read
        self._xreadgroup: Parse = client.response_callbacks.get("XREADGROUP")

    def __len__(self) -> int:
        return len(self._commands)

    def execute_command(self, *args: Any, parse: Parse = None) -> PackedPipeline:
        """Queue one command: str, bytes, int or float arguments (hiredis formats a float as
        repr does, as redis-py would)."""
        self._commands.append(hiredis.pack_command(args))
        self._parsers.append(parse)
        return self

    def fcall(self, function: str, numkeys: int, *keys_and_args: Any) -> PackedPipeline:
        return self.execute_command("FCALL", function, numkeys, *keys_and_args)

    def xack(self, name: str, groupname: str, *ids: Any) -> PackedPipeline:
        return self.execute_command("XACK", name, groupname, *ids)

    def xadd(self, name: str, fields: Mapping[Any, Any]) -> PackedPipeline:
        flat = [part for pair in fields.items() for part in pair]
        return self.execute_command("XADD", name, "*", *flat)

    def xreadgroup(self, groupname: str, consumername: str, streams: Mapping[str, Any],
                   count: int | None = None, block: int | None = None) -> PackedPipeline:
        """`block` (ms) only for a read on its own: in a batch, a blocking read would hold back
        the replies of every command after it."""
        args: list[Any] = ["XREADGROUP", "GROUP", groupname, consumername]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args.append("STREAMS")
        args += list(streams)
        args += list(streams.values())
        return self.execute_command(*args, parse=self._xreadgroup)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every queued command in one write and read their replies, in order. A lost
        connection raises redis.ConnectionError / TimeoutError (the loop's `redis_errors`
        turns them into an outage); an error reply raises only with `raise_on_error`."""
        commands, parsers = self._commands, self._parsers
        self._commands, self._parsers = [], []
        if not commands:
            return []
        pool = self._pool
        conn = pool.get_connection()  # connects (and names the client) if needed
        results: list[Any] = []
        try:
            conn.send_packed_command([b"".join(commands)], check_health=False)
            for parse in parsers:
                try:
                    reply = conn.read_response()
                except redis.ResponseError as exc:
                    results.append(exc)
                    continue
                results.append(reply if parse is None else parse(reply))
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            pool.release(conn)
        if raise_on_error:
            for r in results:
                if isinstance(r, redis.ResponseError):
                    raise r
        return results
