"""The projector's packed write round trip (projections.shell.packed) against real Redis: the
same replies, in the same places, as redis-py's pipeline for the commands a batch sends; an
error reply kept at its index without losing the replies after it; and a connection cut in the
middle of a batch's replies (a proxy that forwards only part of them) raises, is never reused,
and the next round trip answers right."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from pipeline.redisconn import make_client
from projections.core.outputs import ViewWrite
from projections.shell import functions
from projections.shell.groups import GroupIO
from projections.shell.packed import PackedPipeline
from projections.shell.viewstore import ViewStore, write_results

FAR_FUTURE_MS = int(time.time() * 1000) + 3_600_000


def mark(symbol: str, ts_ms: int) -> ViewWrite:
    value = b'{"symbol":"%s","markPrice":"1.5","timestamp":%d}' % (symbol.encode(), ts_ms)
    return ViewWrite(key=f"websocket:mark_price:{symbol.lower()}", value=value,
                     version=float(ts_ms), version_field="timestamp",
                     expire_at_ms=FAR_FUTURE_MS, event_s=ts_ms / 1000)


def batch(pipe: object, store: ViewStore, io: GroupIO, writes: list[ViewWrite],
          acks: dict[str, list[bytes]]) -> list[object]:
    """What `ProjectionLoop._write` queues: views call, XACKs, a gap entry, a read-ahead."""
    p: object = pipe
    plan = store.queue_all(p, writes)  # type: ignore[arg-type]
    for key, ids in acks.items():
        p.xack(key, io.group, *ids)  # type: ignore[attr-defined]
    p.xadd("raw:market:other", {b"ctl": b"gap", b"body": b"{}"})  # type: ignore[attr-defined]
    io.queue_read(p, 10)
    results: list[object] = p.execute(raise_on_error=False)  # type: ignore[attr-defined]
    return [write_results(plan, results[:len(plan)]), *results[len(plan):]]


def test_same_replies_as_redis_py(r: redis.Redis) -> None:
    client = make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}")
    io = GroupIO(client, "mark", ["raw:market:markPrice"], "c1")
    io.ensure_groups()
    ids = [client.xadd("raw:market:markPrice", {b"frame": b"x%d" % i}) for i in range(4)]
    assert len(io.read({"raw:market:markPrice": ">"}, 2, None)) == 2  # 2 pending, 2 new
    store = ViewStore(client)
    # redis-py's pipeline, then the packed one, on the same views: same answers
    old = batch(client.pipeline(transaction=False), store, io,
                [mark("AUSDT", 2000), mark("BUSDT", 2000)], {"raw:market:markPrice": ids[:1]})
    new = batch(PackedPipeline(client), store, io,
                [mark("AUSDT", 1000), mark("BUSDT", 3000), mark("CUSDT", 3000)],
                {"raw:market:markPrice": ids[1:2]})
    assert old[0] == [1, 1] and new[0] == [0, 1, 1]  # written / older than held / new key
    assert old[1] == new[1] == 1  # XACK: one acknowledged each
    assert isinstance(old[2], bytes) and isinstance(new[2], bytes)  # XADD ids
    # the read-ahead comes back as the client's own read shape (RawEntry list)
    assert [e[1] for e in old[3]] == ids[2:]  # type: ignore[attr-defined]
    assert new[3] == []  # nothing new left: a nil reply, parsed as the client does
    assert client.get("websocket:mark_price:busdt") == mark("BUSDT", 3000).value
    assert client.get("websocket:mark_price:ausdt") == mark("AUSDT", 2000).value
    assert client.xpending("raw:market:markPrice", "mark")["pending"] == 2
    client.close()


def test_error_reply_stays_in_its_place(r: redis.Redis) -> None:
    functions.DEFAULT.ensure(r)
    pipe = PackedPipeline(r)
    pipe.execute_command("SET", "a", "1")
    pipe.fcall("no_such_function", 0)
    pipe.execute_command("INCR", "a")
    pipe.execute_command("GET", "a")
    ok, missing, incr, got = pipe.execute(raise_on_error=False)
    assert ok == b"OK" and incr == 2 and got == b"2"
    assert isinstance(missing, redis.ResponseError) and functions.function_missing(missing)
    assert len(pipe) == 0  # executed: nothing queued for the next round trip
    pipe.fcall("no_such_function", 0)
    with pytest.raises(redis.ResponseError):
        pipe.execute()
    assert PackedPipeline(r).execute() == []


class CuttingProxy:
    """Forwards TCP to Redis; once `cut_after` is set, it forwards that many bytes of the
    next reply, then closes both sides (a connection lost in the middle of a batch)."""

    def __init__(self, port: int) -> None:
        self.port_to = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_after: int | None = None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port_to))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if replies and self.cut_after is not None:
                    dst.sendall(data[:self.cut_after])
                    self.cut_after = None
                    self.cuts += 1
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(r: redis.Redis) -> Iterator[CuttingProxy]:
    p = CuttingProxy(r.connection_pool.connection_kwargs["port"])
    yield p
    p.close()


def test_connection_cut_mid_replies_is_not_reused(r: redis.Redis, proxy: CuttingProxy) -> None:
    client = make_client(f"redis://127.0.0.1:{proxy.port}", socket_timeout=5.0)
    pipe = PackedPipeline(client)
    pipe.execute_command("SET", "k", "v0")
    assert pipe.execute() == [b"OK"]  # connected through the proxy
    proxy.cut_after = 7  # "$2\r\nv0\r" of the GET's reply, then the line is gone
    pipe.execute_command("GET", "k")
    pipe.execute_command("INCR", "n")
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        pipe.execute()
    assert proxy.cuts == 1
    # the next round trip opens a new connection: its replies are its own
    pipe.execute_command("INCR", "n")
    pipe.execute_command("GET", "k")
    assert pipe.execute() == [2, b"v0"]  # the cut batch's INCR ran on the server: 1, then 2
    client.close()


def test_failure_between_replies_leaves_none_unread(r: redis.Redis) -> None:
    """A reply that cannot be taken (its parser raised) ends the round trip with replies still
    on the socket: that connection is dropped, so the next batch never reads them as its own."""
    def boom(reply: object) -> object:
        raise ValueError("unexpected reply shape")

    pipe = PackedPipeline(r)
    pipe.execute_command("SET", "k", "old")
    pipe.execute_command("GET", "k", parse=boom)
    pipe.execute_command("SET", "k", "new")
    pipe.execute_command("GET", "k")
    with pytest.raises(ValueError):
        pipe.execute()
    pipe.execute_command("GET", "k")
    assert pipe.execute() == [b"new"]  # not the stale "OK" of the batch that failed


def test_the_loops_blocking_read_is_a_packed_read(r: redis.Redis) -> None:
    """`GroupIO.read` on one node: a blocking XREADGROUP on its own, the same entries as
    redis-py's read, and NOGROUP raised as the ResponseError the loop recreates groups on."""
    client = make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}")
    io = GroupIO(client, "g", ["raw:a", "raw:b"], "c1")
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        io.read({"raw:a": ">", "raw:b": ">"}, 10, 10)
    io.ensure_groups()
    started = time.monotonic()
    assert io.read({"raw:a": ">", "raw:b": ">"}, 10, 50) == []  # blocked 50 ms, nothing came
    assert time.monotonic() - started >= 0.04
    a = r.xadd("raw:a", {b"frame": b"1"})
    b = r.xadd("raw:b", {b"frame": b"2"})
    got = io.read({"raw:a": ">", "raw:b": ">"}, 10, 50)
    assert got == [("raw:a", a, {b"frame": b"1"}), ("raw:b", b, {b"frame": b"2"})]
    assert io.read({"raw:a": "0", "raw:b": "0"}, 10, None) == got  # our pending, re-read
    client.close()
