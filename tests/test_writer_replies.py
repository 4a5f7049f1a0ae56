"""How the batch writer packs entries and reads a batch's XADD replies straight off the socket
(real Redis): all of them, whatever the size, and a refused entry in the middle is found at its
index. Plus the pure check that decides when counting newlines is enough, tried at every cut of
the bytes, the read-back of a packed entry's fields, and what becomes of a loss whose gap entry
its own key refuses. (Redis out of memory and frozen: tests/test_redis_faults.py.)"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import redis
import trio

from pipeline.eventlog import Retention, frame_entry
from pipeline.localredis import LocalRedis, free_port
from pipeline.redisconn import make_client
from pipeline.replies import bulk_newlines, read_replies
from pipeline.writer import LogWriter, entry_fields, pause_after, stall_limit


def xadd(key: str, value: bytes) -> bytes:
    args = [b"XADD", key.encode(), b"*", b"frame", value]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def send(r: redis.Redis, commands: list[bytes]) -> list[tuple[int, str]]:
    conn = r.connection_pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)], check_health=False)
        return read_replies(conn, len(commands))
    finally:
        r.connection_pool.release(conn)


def client_of(r: redis.Redis) -> redis.Redis:
    return make_client(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0")


def test_a_large_accepted_batch_reports_nothing_and_every_entry_is_there(r: redis.Redis) -> None:
    client = client_of(r)
    assert send(client, [xadd("raw:test", b"x" * 100)] * 20_000) == []
    assert r.xlen("raw:test") == 20_000
    # the connection is left clean: the next command reads its own reply
    assert client.ping()


def test_refused_entries_are_found_at_their_index(r: redis.Redis) -> None:
    client = client_of(r)
    r.set("not-a-stream", "x")
    batch = [xadd("raw:test", b"a")] * 5000 + [xadd("not-a-stream", b"b")] + \
        [xadd("raw:test", b"c")] * 5000 + [xadd("not-a-stream", b"d")]
    refused = send(client, batch)
    assert [i for i, _ in refused] == [5000, 10001]
    assert all("WRONGTYPE" in error for _, error in refused)
    assert r.xlen("raw:test") == 10_000
    assert client.ping()


def test_a_refused_first_entry_and_replies_shorter_than_the_xadd_floor(r: redis.Redis) -> None:
    # The reader waits for n x 22 bytes before reading (an XADD reply is never shorter); ten
    # `+OK` replies are 50 bytes, so the wait ends on its timeout and the read goes on.
    client = client_of(r)
    r.set("not-a-stream", "x")
    set_ok = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    assert send(client, [set_ok] * 10) == []
    refused = send(client, [xadd("not-a-stream", b"a"), xadd("raw:test", b"b")])
    assert [i for i, _ in refused] == [0]
    conn = client.connection_pool.get_connection()
    try:  # the socket is back to waking on any byte
        assert conn._sock is not None
        assert conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    finally:
        client.connection_pool.release(conn)
    assert client.ping()


BULK = [b"$15\r\n1732450000123-0\r\n", b"$17\r\n1732450000123-417\r\n"]
OTHERS = [b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
          b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
          b"+OK\r\n", b":1\r\n", b"$-1\r\n", b"*0\r\n"]


def test_counting_newlines_is_trusted_only_where_every_reply_is_a_bulk_string() -> None:
    all_bulk = b"".join(BULK * 3)
    for cut in range(1, len(all_bulk)):
        counts = [bulk_newlines(all_bulk[:cut]), bulk_newlines(all_bulk[cut:])]
        # a cut right before an id's `-` asks for a real parse; any other gives the count
        if None not in counts:
            assert sum(c for c in counts if c is not None) == 2 * 6
        else:
            assert all_bulk[cut:cut + 1] == b"-"
    for other in OTHERS:
        for at in range(3):
            replies = BULK * 3
            stream = b"".join([*replies[:at], other, *replies[at:]])
            assert bulk_newlines(stream) is None
            for cut in range(1, len(stream)):
                # wherever the bytes are cut, some chunk sends them to the real parser
                assert None in (bulk_newlines(stream[:cut]), bulk_newlines(stream[cut:])), \
                    (other, at, cut)


def test_a_packed_entry_reads_back_as_the_fields_the_log_gets() -> None:
    # what the writer reports for an entry Redis refused for good comes from its own bytes
    writer = LogWriter(make_client("redis://127.0.0.1:1/0"),  # never connected here
                       {"aggTrade": Retention(max_age_s=60), "conn": Retention(maxlen=10)})
    writer.append_frame("raw:market:aggTrade", b'{"p":"1.5"}\r\n*', 1732450000.25, "mkt-1-ab", 7)
    writer.append_control("raw:conn", "gap", {"dropped": 3}, "mkt-1-ab")
    (key1, frame_cmd), (key2, gap_cmd) = writer.buffer.take(2)
    assert key1 == "raw:market:aggTrade" and key2 == "raw:conn"
    assert b"MINID" in frame_cmd and b"MAXLEN" in gap_cmd
    assert entry_fields(frame_cmd) == frame_entry(b'{"p":"1.5"}\r\n*', 1732450000.25,
                                                  "mkt-1-ab", 7)
    gap = entry_fields(gap_cmd)
    assert (gap[b"ctl"], gap[b"conn"], gap[b"body"]) == (b"gap", b"mkt-1-ab", b'{"dropped":3}')


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_the_writer_logs_every_frame_over_tls(tmp_path: Path,
                                                     tls_cert: tuple[Path, Path]) -> None:
    # rediss:// must work (SPEC): the reply reader may not wait on the raw socket there, since
    # the TLS layer can already hold the decrypted replies
    cert, key = tls_cert
    tls_port = free_port()
    with LocalRedis(tmp_path / "redis", args=[
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]) as server:
        url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={cert}"
        writer = LogWriter(make_client(url))
        frames = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i % 700)) for i in range(3000)]
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i, frame in enumerate(frames, 1):
                writer.append_frame("raw:market:aggTrade", frame, 1732450000.0 + i, "c-1", i)
                if i % 500 == 0:
                    await trio.sleep(0.002)  # let batches of several sizes go out
            with trio.fail_after(20):
                await writer.flush()
            nursery.cancel_scope.cancel()
        plain = server.client()
        logged = plain.xrange("raw:market:aggTrade")
        assert [fields[b"frame"] for _, fields in logged] == frames
        assert [fields[b"seq"] for _, fields in logged] == [b"%d" % i for i in range(1, 3001)]
        plain.close()


def test_the_writer_pauses_after_a_batch_only_under_load() -> None:
    # latency first at ordinary rates; 1 ms between 10,000 and 20,000 entries/s so that back-
    # to-back batches cannot hold the ingestor under the rate that starts the 10 ms pauses
    assert pause_after(5_000, 3, 2000, 0.010) == 0.0
    assert pause_after(9_999, 30, 2000, 0.010) == 0.0
    assert pause_after(12_000, 10, 2000, 0.010) == 0.001
    assert pause_after(20_000, 200, 2000, 0.010) == 0.010
    assert pause_after(50_000, 400, 2000, 0.010) == 0.010
    assert pause_after(50_000, 1000, 2000, 0.010) == 0.0  # a backlog: straight on
    assert pause_after(50_000, 400, 2000, 0.0) == 0.0  # linger=0: always back to back
    assert pause_after(12_000, 10, 2000, 0.0005) == 0.0005  # never longer than linger


async def test_a_loss_whose_own_key_refuses_its_gap_is_logged_as_an_error_with_the_count(
        redis_server: LocalRedis, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # WRONGTYPE for good: the frames are given up after 8 refusals, and so is their gap entry
    # in that same key; the account then lives in an error line, not nowhere
    r.set("raw:market:markPrice", "not a stream")
    writer = LogWriter(make_client(redis_server.url), backoff=(0.001, 0.002))
    with caplog.at_level(logging.WARNING, "pipeline.writer"):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(1, 31):
                writer.append_frame("raw:market:markPrice", b"m", 1732450000.0 + i, "c-1", i)
            with trio.fail_after(10):
                await writer.flush()
            nursery.cancel_scope.cancel()
    lost = [rec for rec in caplog.records
            if rec.getMessage() == "frames dropped and their gap refused by redis"]
    assert sum(rec.dropped for rec in lost) == 30  # type: ignore[attr-defined]
    assert all(rec.levelno == logging.ERROR and rec.reason.startswith("refused: WRONGTYPE")
               for rec in lost)  # type: ignore[attr-defined]
    assert writer.buffer.drops.unreported == 0


def test_a_round_trip_may_take_a_second_plus_the_time_a_slow_link_needs_for_its_bytes() -> None:
    assert stall_limit(0) == 1.0
    assert stall_limit(8 * 1024 * 1024) == pytest.approx(1.84, abs=0.01)
