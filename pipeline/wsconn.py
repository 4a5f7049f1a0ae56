"""One websocket connection to the exchange, kept open for as long as the process runs.

Generic: the market ingestor runs one per planned connection, the user-data ingestor one for
the private stream. Everything that differs is in the `ConnSpec`:

    spec = ConnSpec(
        name="mkt-1",                    # connection ids are f"{name}-{6 hex}", new per connect
        path="market",                   # label for logs, metrics and the `opened` entry
        url=make_url,                    # () -> str or () -> Awaitable[str], called per connect;
                                         # logged and recorded only through redact_url
        route=route_frame,               # frame bytes -> raw key (e.g. lambda f: KEY_USER)
        subscribe=("ethusdt@aggTrade",), # SUBSCRIBEd after connect, paced (may be empty)
        params_per_message=200,          # streams per SUBSCRIBE message
        on_connected=hook,               # async (conn_id) -> None, after each (re)connect once
                                         # the subscriptions are acknowledged; runs next to the
                                         # reader; an exception from it ends the connection
        silence_timeout=30.0,            # None: no silence rule
        rotate_after=85_800.0,           # None: no rotation
        handover_on_connect=False,       # True: rotate without waiting for a data frame
    )
    await WsConnection(spec, writer, conn_key=KEY_CONN_MARKET).run()   # until cancelled

`conn_key` is the stream the connection's lifecycle entries go to: one per ingestor role
(`raw:conn:market`, `raw:conn:user`), so that no role can write another's.

What one connection does (`_run_link`): connect under a timeout, append an `opened` control
entry to `conn_key`, send the SUBSCRIBE messages (at most 5 a second, 200 streams each; Binance
drops a connection past 10 incoming messages a second), then read. Each frame is turned into
the exact bytes the server sent (a text frame arrives as `str` decoded from valid UTF-8, so
encoding it again gives the same bytes), numbered (`seq`, per connection) and handed to
`LogWriter.append_frame`, which never blocks: the reader must keep draining trio-websocket's
queue or pings stop being answered. Frames are not parsed, only routed by their first bytes,
except the rare `{"result"...}` replies, whose id says the subscriptions were taken.

Frames beyond `MAX_MESSAGE_SIZE` characters make trio-websocket close the connection (1009);
that shows as a `closed` entry with reason `message_too_big` and a reconnect. Anything smaller,
whatever its content, is logged.

The supervisor (`run`) keeps one connection alive:
- it reconnects after a close, an error or silence, with exponential backoff and jitter
  (reset once a connection has delivered data);
- silence: no frame for `silence_timeout` s. Binance accepts a stream on the wrong path and then
  sends nothing, so silence is logged loudly with that hint, recorded as a `silent` entry, and
  the connection is replaced;
- rotation: `rotate_after` s after a connection opened, a second one is opened and subscribed;
  once its subscriptions are acknowledged and it delivered a data frame, the old one gets a
  `rotated` entry and is closed. Frames that arrive on both during the overlap are logged twice.
"""

from __future__ import annotations

import inspect
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import orjson
import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from pipeline import metrics
from pipeline.backoff import backoff_delay
from pipeline.config import redact_url
from projections.core.keys import KEY_OTHER


class FrameSink(Protocol):
    """Where a connection puts what it receives: `pipeline.writer.LogWriter`, or a wrapper
    around it (the user ingestor's, which looks at each frame first). Never blocks."""

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int
                     ) -> bool: ...

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = ""
                       ) -> bool: ...

log = logging.getLogger("pipeline.wsconn")

MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # characters (text) or bytes (binary)
MESSAGE_QUEUE_SIZE = 1024
RECEIVE_BUFFER = 64 * 1024
PARAMS_PER_MESSAGE = 200
CONTROL_INTERVAL_S = 0.2  # at most 5 control messages a second (the limit is 10)
ACK_TIMEOUT_S = 10.0

UrlFactory = Callable[[], str | Awaitable[str]]


@attrs.frozen
class ConnSpec:
    name: str
    path: str
    url: UrlFactory
    route: Callable[[bytes], str]
    subscribe: Sequence[str] = ()
    params_per_message: int = PARAMS_PER_MESSAGE  # streams per SUBSCRIBE message
    on_connected: Callable[[str], Awaitable[None]] | None = None
    silence_timeout: float | None = None
    rotate_after: float | None = None
    streams: int = 0  # streams carried in total (URL + SUBSCRIBE), for the `opened` entry
    # Rotation hands over once the new connection is subscribed, without waiting for its first
    # data frame: for a stream that may stay quiet for hours (the user-data stream).
    handover_on_connect: bool = False


@attrs.frozen
class Timing:
    """Time constants of a connection; the defaults are the production ones."""

    connect_timeout: float = 10.0
    disconnect_timeout: float = 3.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    control_interval: float = CONTROL_INTERVAL_S
    ack_timeout: float = ACK_TIMEOUT_S
    max_overlap: float = 10.0  # a retiring connection is cut after this, answered or not


@attrs.define(eq=False)
class _Link:
    """One physical connection of a `WsConnection`, from connect to close."""

    id: str
    connected: trio.Event = attrs.field(factory=trio.Event)  # subscriptions acknowledged
    delivered: trio.Event = attrs.field(factory=trio.Event)  # a data frame after that
    done: trio.Event = attrs.field(factory=trio.Event)
    retire: trio.Event = attrs.field(factory=trio.Event)  # replaced: close it, reading to the end
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)  # the reading part
    reason: str = "shutdown"
    opened_at: float | None = None  # trio clock
    seq: int = 0
    counted: int = 0  # frames already added to FRAMES_RECEIVED
    pending: set[int] = attrs.field(factory=set)
    has_data: bool = False
    bad: int = 0

    def close(self, reason: str) -> None:
        """Stop reading and close gracefully (the websocket close handshake still runs)."""
        self.reason = reason
        self.scope.cancel()


class WsConnection:
    def __init__(
        self,
        spec: ConnSpec,
        writer: FrameSink,
        *,
        conn_key: str,
        timing: Timing = Timing(),
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.spec = spec
        self.writer = writer
        self.conn_key = conn_key
        self.timing = timing
        self.clock = clock
        self.rand = rand
        self.current: _Link | None = None  # the link frames are expected on
        self.links_opened = 0
        self._next_msg_id = 0

    # --- supervisor --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep one connection open (two during a rotation) until cancelled.

        `failures` counts the links in a row that ended without a data frame, connected or
        not: a server that accepts and closes at once is retried with the same growing backoff
        as one that refuses, not every 0.5 s (Binance limits connection attempts per IP)."""
        failures = 0
        async with trio.open_nursery() as nursery:
            while True:
                link = _Link(f"{self.spec.name}-{secrets.token_hex(3)}")
                nursery.start_soon(self._run_link, link)
                if not await self._await_handover(link):
                    failures = 0 if link.has_data else failures + 1
                    await self._pause(failures)
                    continue
                old, self.current = self.current, link
                if old is not None and not old.done.is_set():
                    self._rotated(old, link)
                with trio.move_on_after(self.spec.rotate_after or float("inf")):
                    await link.done.wait()
                if link.done.is_set():
                    self.current = None
                    failures = 0 if link.has_data else failures + 1
                    await self._pause(failures)
                # else: time to rotate; the loop opens the next link while this one reads on

    async def _await_handover(self, link: _Link) -> bool:
        """Wait until `link` can carry the feed alone: subscribed (and, when it replaces a live
        link, delivering data). False when it ended first."""
        while True:
            old = self.current
            replacing = old is not None and not old.done.is_set()
            wait_data = replacing and not self.spec.handover_on_connect
            ready = link.delivered if wait_data else link.connected
            waits = [ready, link.done] + ([old.done] if replacing and old else [])
            await _wait_any(waits)
            if link.done.is_set():
                return False
            if ready.is_set():
                return True
            self.current = None  # the old link ended during the overlap: stop waiting on data

    async def _pause(self, failures: int) -> None:
        delay = backoff_delay(max(1, failures), self.timing.backoff_base,
                              self.timing.backoff_cap, self.rand)
        log.info("reconnecting", extra={"conn": self.spec.name, "in_s": round(delay, 3)})
        await trio.sleep(delay)

    def _rotated(self, old: _Link, new: _Link) -> None:
        now = trio.current_time()
        age = now - (old.opened_at if old.opened_at is not None else now)
        log.info("rotated", extra={"conn": old.id, "new_conn": new.id, "age_s": round(age, 1)})
        self.writer.append_control(self.conn_key, "rotated", {"new_conn": new.id,
                                                              "age_s": round(age, 3)}, old.id)
        metrics.RECONNECTS.labels("rotation").inc()
        old.retire.set()

    # --- one connection ----------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        opened = False
        ws: trio_websocket.WebSocketConnection | None = None
        try:
            url = self.spec.url()
            if inspect.isawaitable(url):
                url = await url
            assert isinstance(url, str)
            async with trio_websocket.open_websocket_url(
                url, connect_timeout=self.timing.connect_timeout,
                disconnect_timeout=self.timing.disconnect_timeout,
                message_queue_size=MESSAGE_QUEUE_SIZE, max_message_size=MAX_MESSAGE_SIZE,
                receive_buffer_size=RECEIVE_BUFFER,
            ) as ws:
                opened = True
                self._opened(link, url)
                with link.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._subscribe, ws, link)
                        nursery.start_soon(self._watch, link)
                        nursery.start_soon(self._retire_when_asked, ws, link)
                        reason = await self._read(ws, link)
                        if not link.retire.is_set():
                            link.reason = reason
                        nursery.cancel_scope.cancel()
        except trio_websocket.HandshakeError as exc:
            link.reason = f"connect_failed: {type(exc).__name__}"
        except trio_websocket.ConnectionClosed as exc:  # the closing handshake was cut short
            if link.reason == "shutdown":
                link.reason = _close_reason(exc)
        except (OSError, trio.BrokenResourceError) as exc:
            link.reason = f"error: {type(exc).__name__}"
        except Exception as exc:  # a hook's failure must not end the supervisor
            if not link.retire.is_set():
                link.reason = f"error: {type(exc).__name__}"
                log.exception("connection failed", extra={"conn": link.id})
        finally:
            if ws is not None:
                await _close_transport(ws)
            self._closed(link, opened)

    def _opened(self, link: _Link, url: str) -> None:
        link.opened_at = trio.current_time()
        self.links_opened += 1
        safe = redact_url(url)
        log.info("connected", extra={"conn": link.id, "path": self.spec.path, "url": safe,
                                     "streams": self.spec.streams})
        self.writer.append_control(self.conn_key, "opened", {
            "path": self.spec.path, "url": safe, "streams": self.spec.streams,
            "name": self.spec.name}, link.id)
        metrics.CONNECTIONS.labels(self.spec.path).inc()

    def _closed(self, link: _Link, opened: bool) -> None:
        metrics.FRAMES_RECEIVED.labels(self.spec.path).inc(link.seq - link.counted)
        link.counted = link.seq
        if opened:
            metrics.CONNECTIONS.labels(self.spec.path).dec()
            self.writer.append_control(self.conn_key, "closed", {"reason": link.reason,
                                                                 "frames": link.seq}, link.id)
        if link.reason not in ("shutdown", "rotated"):
            metrics.RECONNECTS.labels(link.reason.split(":")[0]).inc()
        log.info("closed", extra={"conn": link.id, "reason": link.reason, "frames": link.seq})
        link.done.set()

    async def _read(self, ws: trio_websocket.WebSocketConnection, link: _Link) -> str:
        """The hot loop: every frame to the writer, never waiting on it. Returns why it ended."""
        route, append, clock, cid = self.spec.route, self.writer.append_frame, self.clock, link.id
        try:
            while True:
                msg = await ws.get_message()
                recv_ts = clock()
                data = msg.encode() if isinstance(msg, str) else msg
                link.seq += 1
                key = route(data)
                if key == KEY_OTHER:
                    self._other_frame(link, data)
                elif not link.has_data:
                    link.has_data = True
                    if link.connected.is_set():
                        link.delivered.set()
                append(key, data, recv_ts, cid, link.seq)
        except trio_websocket.ConnectionClosed as exc:
            return _close_reason(exc)

    def _other_frame(self, link: _Link, data: bytes) -> None:
        """A frame naming no known stream: a reply to SUBSCRIBE, or something bad."""
        if data.startswith(b'{"result"'):
            try:
                link.pending.discard(orjson.loads(data).get("id"))
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                pass
            if not link.pending and not link.connected.is_set():
                self._set_connected(link)
            return
        metrics.BAD_FRAMES.inc()
        link.bad += 1
        if link.bad == 1 or link.bad % 1000 == 0:
            log.warning("frame names no known stream: logged to raw:market:other",
                        extra={"conn": link.id, "size": len(data), "bad_frames": link.bad})

    def _set_connected(self, link: _Link) -> None:
        link.connected.set()
        if link.has_data:
            link.delivered.set()

    async def _subscribe(self, ws: trio_websocket.WebSocketConnection, link: _Link) -> None:
        names, per_message = list(self.spec.subscribe), self.spec.params_per_message
        try:
            for i in range(0, len(names), per_message):
                if i:
                    await trio.sleep(self.timing.control_interval)
                self._next_msg_id += 1
                link.pending.add(self._next_msg_id)
                await ws.send_message(orjson.dumps({
                    "method": "SUBSCRIBE", "params": names[i:i + per_message],
                    "id": self._next_msg_id}).decode())
        except trio_websocket.ConnectionClosed:
            return  # the reader sees the close too
        if link.pending:
            with trio.move_on_after(self.timing.ack_timeout):
                await link.connected.wait()
            if not link.connected.is_set():
                log.warning("SUBSCRIBE not acknowledged in time; going on",
                            extra={"conn": link.id, "pending": len(link.pending)})
        if not link.connected.is_set():
            self._set_connected(link)
        if self.spec.on_connected is not None:
            await self.spec.on_connected(link.id)

    async def _retire_when_asked(self, ws: trio_websocket.WebSocketConnection,
                                 link: _Link) -> None:
        """Rotation, old side: start the close handshake but keep reading, so every frame the
        server sent before it saw our Close is still logged; cut it after `max_overlap`."""
        await link.retire.wait()
        link.reason = "rotated"
        await _send_close(ws)
        await trio.sleep(self.timing.max_overlap)
        link.close("rotated")

    async def _watch(self, link: _Link) -> None:
        """Once a second: frame count to metrics; and the silence rule."""
        timeout = self.spec.silence_timeout
        interval = min(1.0, timeout / 4) if timeout else 1.0
        counter = metrics.FRAMES_RECEIVED.labels(self.spec.path)
        last_seq, last_change = link.seq, trio.current_time()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            counter.inc(link.seq - link.counted)
            link.counted = link.seq
            if link.seq != last_seq:
                last_seq, last_change = link.seq, now
            elif timeout is not None and now - last_change >= timeout:
                self._silent(link, now - last_change)
                return

    def _silent(self, link: _Link, seconds: float) -> None:
        log.error("no frame for %.1f s: replacing the connection. A stream on the wrong path "
                  "(/public vs /market) is accepted and stays silent: check the routing",
                  seconds, extra={"conn": link.id, "path": self.spec.path})
        self.writer.append_control(self.conn_key, "silent", {"seconds": round(seconds, 3),
                                                             "path": self.spec.path}, link.id)
        link.close("silent")


async def _send_close(ws: trio_websocket.WebSocketConnection) -> None:
    """Send a Close frame without closing trio-websocket's message queue.

    `WebSocketConnection.aclose()` closes the queue at once, dropping the frames still on their
    way; here the reader goes on until the server's Close arrives after its last frame. This
    reaches into trio-websocket 0.12 (`_send`, `_wsproto`; pinned in pyproject.toml, checked by
    tests/test_wsconn_internals.py): without them the old connection is simply read until
    `max_overlap` runs out."""
    send = getattr(ws, "_send", None)
    proto = getattr(ws, "_wsproto", None)
    if send is None or proto is None or proto.state != ConnectionState.OPEN:
        return
    try:
        await send(CloseConnection(code=1000, reason="rotated"))
    except trio_websocket.ConnectionClosed:
        pass


async def _close_transport(ws: trio_websocket.WebSocketConnection) -> None:
    """Close the TCP stream under the websocket.

    trio-websocket 0.12 leaves a client's socket open when the server started the close (its
    aclose returns early once a close reason is set), which leaks one socket per server close;
    a stream's aclose is idempotent, so closing it again after a clean close is harmless."""
    stream = getattr(ws, "_stream", None)
    if stream is not None:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _close_reason(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "server_closed"
    if reason.code == 1009:
        return "message_too_big"
    return f"server_closed: {reason.code}"


async def _wait_any(events: Sequence[trio.Event]) -> None:
    """Return as soon as one of `events` is set."""
    if any(e.is_set() for e in events):
        return
    async with trio.open_nursery() as nursery:
        async def waiter(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(waiter, event)
