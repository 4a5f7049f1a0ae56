"""A small HTTP/1.1 server on trio with h11 (keep-alive, bodies, one handler), and the REST
weight meter Binance applies to every answer.

h11 holds the protocol; this module is only the loop that feeds it bytes and sends its events,
in the shape trio-websocket uses for wsproto. The simulator's routes live in `server.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import trio

log = logging.getLogger("pipeline.simulator.http")

WEIGHT_LIMIT_1M = 2400
MAX_BODY = 1024 * 1024
READ_SIZE = 65536


@attrs.frozen
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-case
    body: bytes


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@attrs.define
class WeightMeter:
    """Request weight used in the current clock minute, as `X-MBX-USED-WEIGHT-1M` reports it."""

    limit: int = WEIGHT_LIMIT_1M
    used: int = 0
    minute: int = -1

    def _roll(self, now: float) -> None:
        m = int(now // 60)
        if m != self.minute:
            self.minute, self.used = m, 0

    def try_spend(self, weight: int, now: float) -> bool:
        """Count `weight`; False (and nothing counted) when it would pass the limit."""
        self._roll(now)
        if self.used + weight > self.limit:
            return False
        self.used += weight
        return True

    def current(self, now: float) -> int:
        self._roll(now)
        return self.used

    def retry_after(self, now: float) -> int:
        return max(1, int((self.minute + 1) * 60 - now) + 1)


async def serve_http(handler: Handler, host: str, port: int, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `task_status.started(port)` once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(_serve_connection, handler), listeners)
        task_status.started(bound)


async def _serve_connection(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        try:
            while True:
                request = await _read_request(conn, stream)
                if request is None:
                    return
                try:
                    response = await handler(request)
                except Exception:
                    log.exception("simulator handler failed", extra={"path": request.path})
                    response = HttpResponse(500, b'{"code":-1000,"msg":"internal error"}')
                await _send_response(conn, stream, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(data)  # b"" tells h11 the peer closed
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("body too large")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return _to_request(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _to_request(head: h11.Request, body: bytes) -> HttpRequest:
    target = urlsplit(head.target.decode("latin-1"))
    return HttpRequest(
        method=head.method.decode("ascii").upper(),
        path=target.path,
        query=dict(parse_qsl(target.query, keep_blank_values=True)),
        headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
        body=body,
    )


async def _send_response(conn: h11.Connection, stream: trio.SocketStream,
                         response: HttpResponse) -> None:
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body))), *response.headers]
    data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                  reason=_REASONS.get(response.status, "")))
    data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 418: "I'm a teapot", 429: "Too Many Requests",
            500: "Internal Server Error"}
