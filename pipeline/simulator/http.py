"""A small HTTP/1.1 server on trio with h11 (keep-alive, bodies, one handler), the REST weight
meter Binance applies to every answer, and the REST faults a test can switch on.

h11 holds the protocol; this module is only the loop that feeds it bytes and sends its events,
in the shape trio-websocket uses for wsproto. The simulator's routes live in `restapi.py`.

Faults (`RestFaults`, switched by `POST /sim/account/rest_fault`), for one path or all, for the
next N calls or until cleared:
- `429`: code -1003 with a chosen `Retry-After` (seconds), the call is not run;
- `418`: the IP ban, code -1003 and `Retry-After`, the call is not run;
- `5xx`: a chosen status (500-599) with Binance's -1001 body, the call is not run;
- `truncated`, `empty`, `empty_object`: the call runs and its 200 answer's body is cut in half,
  empty, or `{}` (Content-Length matches what is sent: the HTTP is valid, the JSON is not);
- `hang`: no answer for `seconds`, then the normal one (a client that gave up has gone by then).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import orjson
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

FAULT_KINDS = frozenset({"429", "418", "5xx", "truncated", "empty", "empty_object", "hang"})
BODY_FAULTS = frozenset({"truncated", "empty", "empty_object"})


@attrs.define
class RestFault:
    """One switched-on fault; `path` None means every Binance path, `count` None until cleared."""

    kind: str
    path: str | None = None
    count: int | None = None
    retry_after: int = 60
    status: int = 503
    seconds: float = 30.0

    @classmethod
    def from_json(cls, body: dict[str, object]) -> RestFault:
        kind = str(body.get("kind", ""))
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {sorted(FAULT_KINDS)}, not {kind!r}")
        count = None if body.get("count") is None else int(str(body["count"]))
        fault = cls(kind, str(body["path"]) if body.get("path") else None, count,
                    int(str(body.get("retry_after", 60))), int(str(body.get("status", 503))),
                    float(str(body.get("seconds", 30.0))))
        if (count is not None and count < 1) or fault.retry_after < 0 or fault.seconds < 0:
            raise ValueError("count must be >= 1, retry_after and seconds >= 0")
        if not 500 <= fault.status <= 599:
            raise ValueError("status must be a 5xx")
        return fault

    def summary(self) -> dict[str, object]:
        return attrs.asdict(self)

    def reply(self, used_weight: int) -> HttpResponse | None:
        """The answer given instead of running the call, or None when the call runs."""
        used = ("X-MBX-USED-WEIGHT-1M", str(used_weight))
        if self.kind in ("429", "418"):
            msg = ("Too many requests; current limit of IP is 2400 requests per minute."
                   if self.kind == "429" else
                   "Way too much request weight used; IP banned. Please use WebSocket Streams "
                   "for live updates to avoid bans.")
            return HttpResponse(int(self.kind), orjson.dumps({"code": -1003, "msg": msg}),
                                (used, ("Retry-After", str(self.retry_after))))
        if self.kind == "5xx":
            return HttpResponse(self.status, orjson.dumps({
                "code": -1001, "msg": "Internal error; unable to process your request. Please "
                                      "try again."}), (used,))
        return None

    def spoil(self, response: HttpResponse) -> HttpResponse:
        """The body faults: the call's own answer, made unreadable."""
        if self.kind not in BODY_FAULTS:
            return response
        body = {"truncated": response.body[:len(response.body) // 2], "empty": b"",
                "empty_object": b"{}"}[self.kind]
        return attrs.evolve(response, status=200, body=body)


@attrs.define
class RestFaults:
    """The faults switched on, first match wins; each call it hits counts down its `count`."""

    active: list[RestFault] = attrs.Factory(list)

    def add(self, fault: RestFault) -> None:
        self.active.append(fault)

    def clear(self, path: str | None = None) -> int:
        kept = [f for f in self.active if path is not None and f.path != path]
        cleared, self.active = len(self.active) - len(kept), kept
        return cleared

    def take(self, path: str) -> RestFault | None:
        for fault in self.active:
            if fault.path in (None, path):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count == 0:
                        self.active.remove(fault)
                return fault
        return None


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

    def force(self, weight: int, now: float) -> None:
        """Count `weight` even past the limit: a call that already ran, or another client's."""
        self._roll(now)
        self.used += weight

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
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}
