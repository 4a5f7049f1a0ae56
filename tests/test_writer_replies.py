"""How the batch writer reads a batch's XADD replies straight off the socket (real Redis): all
of them, whatever the size, and a refused entry in the middle is found at its index."""

from __future__ import annotations

import socket

import hiredis
import redis

from pipeline.redisconn import make_client
from pipeline.writer import _read_replies


def xadd(key: str, value: bytes) -> bytes:
    args = [b"XADD", key.encode(), b"*", b"frame", value]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def send(r: redis.Redis, commands: list[bytes]) -> list[tuple[int, str]]:
    conn = r.connection_pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)], check_health=False)
        replies = _read_replies(conn, len(commands))
        assert len(replies) == len(commands)
        return [(i, str(x)) for i, x in enumerate(replies) if isinstance(x, hiredis.ReplyError)]
    finally:
        r.connection_pool.release(conn)


def test_a_large_accepted_batch_reports_nothing_and_every_entry_is_there(r: redis.Redis) -> None:
    client = make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0")
    assert send(client, [xadd("raw:test", b"x" * 100)] * 20_000) == []
    assert r.xlen("raw:test") == 20_000
    # the connection is left clean: the next command reads its own reply
    assert client.ping()


def test_refused_entries_are_found_at_their_index(r: redis.Redis) -> None:
    client = make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0")
    r.set("not-a-stream", "x")
    batch = [xadd("raw:test", b"a")] * 5000 + [xadd("not-a-stream", b"b")] + \
        [xadd("raw:test", b"c")] * 5000 + [xadd("not-a-stream", b"d")]
    refused = send(client, batch)
    assert [i for i, _ in refused] == [5000, 10001]
    assert all("WRONGTYPE" in error for _, error in refused)
    assert r.xlen("raw:test") == 10_000
    assert client.ping()


def test_replies_shorter_than_the_xadd_floor_are_still_all_read(r: redis.Redis) -> None:
    # The reader waits for n x 22 bytes before reading (an XADD reply is never shorter); ten
    # `+OK` replies are 50 bytes, so the wait ends on its timeout and the read goes on.
    client = make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0")
    conn = client.connection_pool.get_connection()
    try:
        command = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
        conn.send_packed_command([command * 10], check_health=False)
        assert _read_replies(conn, 10) == [b"OK"] * 10
        # and the socket is back to waking on any byte: the next command reads its reply
        assert conn._sock is not None
        assert conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    finally:
        client.connection_pool.release(conn)
    assert client.ping()
