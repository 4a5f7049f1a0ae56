"""A small hostile websocket server for the tests: it does the opening handshake by hand and
then writes exactly the bytes a test names, correct or not.

    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.text(b"\\xff\\xfe not UTF-8")   # a text frame no UTF-8 decoder accepts
        await peer.hang()                           # keep the TCP connection, say nothing more

    server = HostileServer(lambda n: script)        # n: 1 for the first connection, 2, ...
    url = await nursery.start(server.run)            # ws://127.0.0.1:PORT

Every connection is a `Peer`; the server keeps them (`server.peers`) so a test can check what
the client did: when it closed the TCP connection (`client_closed_at`, trio time), whether it
sent a Close frame. Trio tasks and loopback sockets only, so it runs on the MockClock.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Awaitable, Callable

import attrs
import trio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (server to client)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


@attrs.define(eq=False)
class Peer:
    """One accepted TCP connection and what the client did on it."""

    number: int
    stream: trio.SocketStream
    accepted_at: float = attrs.field(factory=trio.current_time)  # TCP accepted (trio time)
    request: bytes = b""
    received: bytearray = attrs.field(factory=bytearray)
    client_closed_at: float | None = None

    @property
    def path(self) -> str:
        return self.request.split(b" ", 2)[1].decode() if self.request else ""

    def client_frames(self) -> list[tuple[int, bytes]]:
        """(opcode, unmasked payload) of every whole frame the client sent after the
        handshake."""
        out, data, i = [], bytes(self.received), 0
        while i + 2 <= len(data):
            opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
            i += 2
            if n >= 126:
                size = 2 if n == 126 else 8
                n = int.from_bytes(data[i:i + size], "big")
                i += size
            mask, i = data[i:i + 4], i + 4
            if i + n > len(data):
                break
            out.append((opcode, bytes(b ^ mask[j % 4] for j, b in enumerate(data[i:i + n]))))
            i += n
        return out

    @property
    def client_sent_close(self) -> bool:
        return any(op == CLOSE for op, _ in self.client_frames())

    async def read_request(self) -> None:
        while b"\r\n\r\n" not in self.received:
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("client went away during the handshake")
            self.received += data
        head, _, rest = bytes(self.received).partition(b"\r\n\r\n")
        self.request, self.received = head, bytearray(rest)

    async def accept(self, then: bytes = b"") -> None:
        """The 101 answer; `then`: bytes sent in the same write (frames that arrive with the
        handshake, in the client's first read)."""
        await self.read_request()
        key = next(line.split(b":", 1)[1].strip() for line in self.request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await self.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + then)

    async def reject(self, status: int) -> None:
        await self.read_request()
        await self.stream.send_all(f"HTTP/1.1 {status} Refused\r\nContent-Length: 0\r\n"
                                   "Connection: close\r\n\r\n".encode())

    async def text(self, payload: bytes) -> None:
        await self.stream.send_all(frame(TEXT, payload))

    async def close_frame(self, code: int = 1000) -> None:
        await self.stream.send_all(frame(CLOSE, struct.pack("!H", code)))

    async def hang(self, pong: bool = False) -> None:
        """Keep the connection open and answer nothing (only Pings, with `pong`), until the
        client closes it."""
        answered = 0
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.client_closed_at = trio.current_time()
                return
            self.received += data
            pings = [p for op, p in self.client_frames() if op == PING]
            if pong:
                for payload in pings[answered:]:
                    await self.stream.send_all(frame(PONG, payload))
            answered = len(pings)


Script = Callable[[Peer], Awaitable[None]]


class HostileServer:
    """Runs `scripts(n)` on the n-th connection (from 1); the TCP connection is closed when the
    script returns (after `hang`, the client has closed it already)."""

    def __init__(self, scripts: Callable[[int], Script]) -> None:
        self.scripts = scripts
        self.peers: list[Peer] = []

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._serve, listeners)
            task_status.started(f"ws://127.0.0.1:{port}")

    async def _serve(self, stream: trio.SocketStream) -> None:
        peer = Peer(len(self.peers) + 1, stream)
        self.peers.append(peer)
        try:
            await self.scripts(peer.number)(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer.client_closed_at = trio.current_time()
        finally:
            await stream.aclose()


async def silent_forever(peer: Peer) -> None:
    """Accept TCP and never answer the handshake."""
    await peer.read_request()
    await peer.hang()
