"""Reading the replies of one pipelined batch of XADDs straight off the writer's socket.

    refused = read_replies(conn, n)     # [(index in the batch, error message)], [] when all in

Why not redis-py's `read_response`: it costs ~0.8 µs of CPU a reply in its Python layers, and
there is one reply per logged frame, read in a thread that shares the GIL with the websocket
readers (bench/bench_ingest.py). redis-py still opens, authenticates and names the connection
(`pipeline.redisconn`: RESP2); only a batch's replies bypass its parser, whose buffer stays
empty because nothing else reads from this connection.

Two costs are avoided here, both measured in bench/bench_ingest.py:
- Wake-ups. Redis answers a large pipeline in pieces (one write per ~16 KB of commands it
  read), and every `recv` that returns wakes the writer thread, which then takes the GIL from
  the readers: ~9 wake-ups a batch at full speed. `_wait_for` first sleeps in the kernel until
  the bytes that the outstanding replies must at least fill have arrived (SO_RCVLOWAT, which
  Linux's poll honours): about one wake-up a batch.
- Parsing. A successful XADD answers a bulk string holding the new id (`$15\\r\\n<id>\\r\\n`):
  two newlines a reply, and no line that starts with anything but `$` or a digit. While every
  chunk looks like that (`bulk_newlines`), counting newlines is the whole parse; the first
  chunk that might hold anything else (an error reply `-...`, a status `+...`, a null `$-1`)
  hands the batch's bytes to hiredis, which finds each refused entry at its index.
"""

from __future__ import annotations

import select
import socket
import ssl

import hiredis
import redis

RECV_BYTES = 1 << 16  # a recv of 1 MiB costs an mmap'd allocation each time; replies are ~24 B
MIN_REPLY_BYTES = 22  # the shortest XADD reply: see `_wait_for`
REPLY_WAIT_MS = 20  # longest sleep in `_wait_for` before reading whatever has arrived

# A chunk may begin with these without a reply other than a bulk string being in it.
_BULK_STARTS = frozenset(b"$0123456789\r\n")
# Signs of a line that is neither `$<length>` nor an id: error, status, integer, array, null.
_NOT_BULK = (b"\n-", b"\n+", b"\n:", b"\n*", b"$-")


def bulk_newlines(chunk: bytes) -> int | None:
    """The newlines in `chunk` if it can only hold parts of non-null bulk-string replies, else
    None (parse it properly). Pure.

    Decides per chunk, whatever the cut: a reply that starts right at the chunk's first byte is
    seen there, one further in after its `\\n`. A chunk that begins inside an id at its `-`
    also gives None: a needless slow parse, never a wrong count."""
    if chunk[0] not in _BULK_STARTS:
        return None
    for sign in _NOT_BULK:
        if sign in chunk:
            return None
    return chunk.count(b"\n")


def read_replies(conn: redis.Connection, n: int) -> list[tuple[int, str]]:
    """Read the `n` replies of the batch just sent on `conn`; the refused entries' indices and
    error messages. A lost connection or an unreadable reply raises `redis.ConnectionError`
    (the caller then drops the connection: replies may be left unread)."""
    sock = conn._sock
    if sock is None:
        raise redis.ConnectionError("not connected")
    poller = None
    if not isinstance(sock, ssl.SSLSocket):  # TLS may hold decrypted replies poll cannot see
        poller = select.poll()
        poller.register(sock, select.POLLIN)
    chunks: list[bytes] = []
    received = newlines = 0
    while newlines < 2 * n:
        _wait_for(sock, poller, n * MIN_REPLY_BYTES - received)
        chunk = _recv(sock)
        chunks.append(chunk)
        received += len(chunk)
        count = bulk_newlines(chunk)
        if count is None:
            return _parse(sock, poller, n, b"".join(chunks))
        newlines += count
    if newlines != 2 * n:
        raise redis.ConnectionError(f"protocol error: more replies than the {n} commands sent")
    return []


def _parse(sock: socket.socket, poller: select.poll | None, n: int, head: bytes
           ) -> list[tuple[int, str]]:
    """The slow path: hiredis parses every reply, `head` first, then what is still to come.
    Error replies come back as `hiredis.ReplyError` values, not exceptions, so one refused XADD
    does not hide the rest."""
    reader = hiredis.Reader()
    refused: list[tuple[int, str]] = []
    got, received, chunk = 0, len(head), head
    while True:
        reader.feed(chunk)
        try:
            reply = reader.gets()
            while reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    refused.append((got, str(reply)))
                got += 1
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            raise redis.ConnectionError(f"protocol error: {exc}") from None
        if got >= n:
            if got > n:
                raise redis.ConnectionError(
                    f"protocol error: more replies than the {n} commands sent")
            return refused
        _wait_for(sock, poller, n * MIN_REPLY_BYTES - received)
        chunk = _recv(sock)
        received += len(chunk)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(RECV_BYTES)
    if not chunk:
        raise redis.ConnectionError("connection closed by redis")
    return chunk


def _wait_for(sock: socket.socket, poller: select.poll | None, nbytes: int) -> None:
    """Sleep until `nbytes` can be read from `sock` or `REPLY_WAIT_MS` passed, whichever comes
    first; the caller's `recv` then takes what is there.

    `MIN_REPLY_BYTES` is a floor, not an estimate: a successful XADD reply is a bulk string
    holding an id of at least 15 characters (a 13-digit millisecond time, `-`, a sequence), so
    `$15\\r\\n` + id + `\\r\\n` >= 22 bytes; Redis's XADD errors (OOM, WRONGTYPE, READONLY,
    NOPERM, LOADING...) are longer. Were the replies ever shorter, the wait would end on its
    timeout and the read go on as before: slower, never wrong. Where the option is missing, or
    on TLS (`poller` None: the SSL layer may already hold the decrypted replies while the
    socket stays quiet), `recv` simply returns what is there."""
    if poller is None or nbytes <= 1 or not hasattr(socket, "SO_RCVLOWAT"):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(nbytes, RECV_BYTES))
    try:
        poller.poll(REPLY_WAIT_MS)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
