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
        streams_now=None,                # or () -> every stream it carries now, for a
                                         # connection whose streams change while it runs
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

Streams that change while the connection runs (a listing, a delisting): the caller keeps the
list `streams_now()` returns (its URL factory names the first ones), changes it, then calls
`change_streams(added, removed)`, which sends SUBSCRIBE/UNSUBSCRIBE on every open link. A link
that opens later SUBSCRIBEs what its URL did not name and UNSUBSCRIBEs what it named and is no
longer carried. Every control message of a link, at connect or live, goes through one paced
sender (`control_interval` apart: 5 a second against Binance's 10), and a live change waits for
a link's own initial SUBSCRIBEs, so the two cannot cross.

What one connection does (`_run_link`): connect under a timeout, append an `opened` control
entry to `conn_key`, send the SUBSCRIBE messages (at most 5 a second, 200 streams each; Binance
drops a connection past 10 incoming messages a second), then read. Each frame is turned into
the exact bytes the server sent (a text frame arrives as `str` decoded from valid UTF-8, so
encoding it again gives the same bytes), numbered (`seq`, per connection) and handed to
`LogWriter.append_frame`, which never blocks: trio-websocket's reader task, which also answers
pings, must never wait on us. That happens where the reader completes each message, with no
task switch per frame: the link puts a `_Deliver` in place of the reader's send channel
(`_read`; the memory channel hand-off cost a third of a bare receive loop's CPU). Frames are
not parsed, only routed by their first bytes, except the rare `{"result"...}` replies, whose
id says the subscriptions were taken.

Frames beyond `MAX_MESSAGE_SIZE` characters make trio-websocket close the connection (1009);
that shows as a `closed` entry with reason `message_too_big` and a reconnect. Anything smaller,
whatever its content, is logged.

A link that cannot make progress ends within seconds, with a `closed` entry saying why, and is
replaced:
- a protocol error (a text frame that is not UTF-8, a malformed frame): trio-websocket marks
  the connection closed (1007, 1002) but goes on waiting for the server, which may never close
  the TCP connection; the transport is aborted at once (`closed`, `protocol_error: <code>`);
- the server's Close: once it is answered the transport is closed, without waiting for the
  server to close TCP first (every frame before the Close has been read by then);
- our Close (shutdown, silence, rotation) that the server never answers: cut after
  `Timing.disconnect_timeout`, the reason kept;
- a link quiet for `Timing.ping_after` whose server does not answer a Ping within
  `Timing.ping_timeout` (a TCP connection that died without a word): `ping_timeout`;
- a connect that fails (DNS, refused, handshake rejected or timed out): a `closed` entry with
  `connect_failed: <error>` (and `name`, `path`, `url`, since no `opened` entry names them),
  one per attempt; attempts are paced by the backoff and the process's bucket below.

The supervisor (`run`) keeps one connection alive:
- it reconnects after a close, an error or silence, with exponential backoff and jitter
  (reset once a connection has delivered data), and every attempt takes a token from the
  process's connection bucket (`pipeline.pacing`: Binance limits attempts per IP);
- silence: no frame for `silence_timeout` s. Binance accepts a stream on the wrong path and then
  sends nothing, so silence is logged loudly with that hint, recorded as a `silent` entry, and
  the connection is replaced;
- rotation: `rotate_after` s after a connection opened, a second one is opened and subscribed;
  once its subscriptions are acknowledged and it delivered a data frame, the old one gets a
  `rotated` entry and is closed. Frames that arrive on both during the overlap are logged twice;
- health (`healthy`, read by /healthz from another thread): false while a connection with a
  silence rule has delivered no data frame for its silence timeout, or one without (the user
  stream) has had no link up for a whole `Timing.down_after`; true again once it does.
"""

from __future__ import annotations

import inspect
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import attrs
import orjson
import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from pipeline import metrics
from pipeline.backoff import backoff_delay
from pipeline.config import redact_url
from pipeline.pacing import TokenBucket, connect_pacer
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
    # the streams carried now, for a connection whose streams change while it runs (module
    # doc); when set, `subscribe` is not used and `streams` is its length
    streams_now: Callable[[], Sequence[str]] | None = None
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
    # a connection without a silence rule is unhealthy after this long with no link up
    down_after: float = 30.0
    ping_after: float = 60.0  # a link quiet this long is asked for a Pong...
    ping_timeout: float = 10.0  # ...and replaced when none comes in this time


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
    others: int = 0  # frames routed to raw:market:other (replies, bad frames)
    judged: int = 0  # data frames already seen by the health check
    url: str = ""
    ws: trio_websocket.WebSocketConnection | None = None  # once open
    control: trio.Lock = attrs.field(factory=trio.Lock)  # one control message at a time
    last_control: float = float("-inf")  # trio clock

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
        pacer: TokenBucket | None = None,
    ) -> None:
        """`pacer`: the process's connection bucket, shared by all its connections (a new one
        of this connection's own by default)."""
        self.spec = spec
        self.writer = writer
        self.conn_key = conn_key
        self.timing = timing
        self.clock = clock
        self.rand = rand
        self.pacer = pacer or connect_pacer(trio.current_time)
        self.current: _Link | None = None  # the link frames are expected on
        self.links_opened = 0
        self.healthy = True  # read from the /healthz thread: a plain attribute, set by `_judge`
        self._links: set[_Link] = set()  # every link not yet done
        self._next_msg_id = 0

    # --- supervisor --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep one connection open (two during a rotation) until cancelled.

        `failures` counts the links in a row that ended without a data frame, connected or
        not: a server that accepts and closes at once is retried with the same growing backoff
        as one that refuses, not every 0.5 s (Binance limits connection attempts per IP)."""
        failures = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._judge)
            while True:
                await self._paced()
                link = _Link(f"{self.spec.name}-{secrets.token_hex(3)}")
                self._links.add(link)
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

    async def _paced(self) -> None:
        wait = self.pacer.take()
        if wait > 0:
            log.info("connection attempts paced", extra={"conn": self.spec.name,
                                                         "in_s": round(wait, 3)})
            await trio.sleep(wait)

    async def _judge(self) -> None:
        """Once a tick: is the connection working? With a silence rule it works while data
        frames arrive; without one, while the same link stays up from one tick to the next
        (a server that accepts and closes at once never does)."""
        limit = self.spec.silence_timeout or self.timing.down_after
        interval = min(1.0, limit / 4)
        last_working = trio.current_time()
        was_current = None
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            delivered = False
            for link in self._links:
                data = link.seq - link.others
                delivered = delivered or data > link.judged
                link.judged = data
            up = self.current is not None and self.current is was_current
            was_current = self.current
            if delivered or (up and not self.spec.silence_timeout):
                last_working = now
            self.healthy = now - last_working < limit

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
        url: str | None = None
        try:
            made = self.spec.url()
            url = await made if inspect.isawaitable(made) else made
            assert isinstance(url, str)
            await self._connect_and_use(link, url)
        except* trio_websocket.HandshakeError as group:
            link.reason = f"connect_failed: {_connect_error(_first(group))}"
        except* trio_websocket.ConnectionClosed as group:  # a send met the close
            closed = _first(group)
            if link.reason == "shutdown" and isinstance(closed, trio_websocket.ConnectionClosed):
                link.reason = _close_reason(closed, None)
        except* Exception as group:  # a hook's failure must not end the supervisor
            exc = _first(group)
            if link.opened_at is None:
                link.reason = f"connect_failed: {_connect_error(exc)}"
            elif not link.retire.is_set():
                link.reason = f"error: {type(exc).__name__}"
            if not isinstance(exc, (OSError, trio.BrokenResourceError)):
                log.error("connection failed", exc_info=exc, extra={"conn": link.id})
        finally:
            self._closed(link, url)

    async def _connect_and_use(self, link: _Link, url: str) -> None:
        """Connect, use the link, and end it: the socket closed, trio-websocket's reader task
        cancelled, however the link ended.

        This nursery owns that reader. trio-websocket's own `open_websocket_url` runs it in a
        nursery of its own and waits for it on leaving, and after a handshake that timed out,
        a protocol error or a Close the server never follows by closing TCP, the reader waits
        on the socket for ever, and the connection with it."""
        host, port, resource, ssl_context = _target(url)
        stream: Transport | None = None
        async with trio.open_nursery() as nursery:
            try:
                try:
                    with trio.fail_after(self.timing.connect_timeout):
                        stream = await _open_stream(host, port, ssl_context)
                        ws = await trio_websocket.wrap_client_stream(
                            nursery, stream, _host_header(host, port), resource,
                            message_queue_size=MESSAGE_QUEUE_SIZE,
                            max_message_size=MAX_MESSAGE_SIZE,
                            receive_buffer_size=RECEIVE_BUFFER)
                except trio.TooSlowError:
                    raise trio_websocket.ConnectionTimeout from None
                except OSError as exc:  # DNS, refused, unreachable, TLS
                    raise trio_websocket.HandshakeError from exc
                link.url, link.ws = url, ws
                self._opened(link, url)
                try:
                    await self._use(ws, link)
                finally:
                    await self._goodbye(ws)
            finally:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()

    async def _use(self, ws: trio_websocket.WebSocketConnection, link: _Link) -> None:
        """Subscribe, read and watch until the link ends."""
        with link.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._subscribe, ws, link)
                nursery.start_soon(self._watch, link)
                nursery.start_soon(self._check_alive, ws, link)
                nursery.start_soon(self._retire_when_asked, ws, link)
                reason = await self._read(ws, link)
                if not link.retire.is_set():
                    link.reason = reason
                nursery.cancel_scope.cancel()

    async def _goodbye(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Our Close, when the link ends on our side (shutdown, silence, a hook's failure),
        answered within the disconnect timeout or not at all. A link the server closed, or a
        protocol error ended, has nothing left to say: every frame before it has been read."""
        if ws.closed is not None:
            return
        with trio.CancelScope(shield=True) as scope:  # a shutdown still says goodbye
            scope.deadline = trio.current_time() + self.timing.disconnect_timeout
            await ws.aclose()

    def _opened(self, link: _Link, url: str) -> None:
        link.opened_at = trio.current_time()
        self.links_opened += 1
        safe = redact_url(url)
        now = self.spec.streams_now
        streams = len(now()) if now is not None else self.spec.streams
        log.info("connected", extra={"conn": link.id, "path": self.spec.path, "url": safe,
                                     "streams": streams})
        self.writer.append_control(self.conn_key, "opened", {
            "path": self.spec.path, "url": safe, "streams": streams,
            "name": self.spec.name}, link.id)
        metrics.CONNECTIONS.labels(self.spec.path).inc()

    def _closed(self, link: _Link, url: str | None) -> None:
        metrics.FRAMES_RECEIVED.labels(self.spec.path).inc(link.seq - link.counted)
        link.counted = link.seq
        if link.opened_at is not None:
            metrics.CONNECTIONS.labels(self.spec.path).dec()
            self.writer.append_control(self.conn_key, "closed", {"reason": link.reason,
                                                                 "frames": link.seq}, link.id)
        elif link.reason != "shutdown":
            # no `opened` entry names this attempt: the failure carries its own names
            body = {"reason": link.reason, "frames": 0, "name": self.spec.name,
                    "path": self.spec.path}
            if url is not None:
                body["url"] = redact_url(url)
            self.writer.append_control(self.conn_key, "closed", body, link.id)
        self._links.discard(link)
        if link.reason not in ("shutdown", "rotated"):
            metrics.RECONNECTS.labels(link.reason.split(":")[0]).inc()
        log.info("closed", extra={"conn": link.id, "reason": link.reason, "frames": link.seq})
        link.done.set()

    async def _read(self, ws: trio_websocket.WebSocketConnection, link: _Link) -> str:
        """The hot path: every frame to the writer, never waiting on it. Returns why the link
        ended.

        trio-websocket's reader task hands each message to `get_message` through a memory
        channel: two checkpoints and a task switch per frame, a third of a bare receive
        loop's CPU (docs/benchmarks.md, issue #16). Once the channel is drained, the reader's
        send channel is replaced by a `_Deliver` that takes each message where the reader
        made it, in order, without a switch (`_deliverer` checks the internal it replaces).
        The reader still answers pings, closes on a message too big and sees the end of the
        connection; it closes the real channel when it ends, which ends the wait below."""
        deliver = self._deliverer(link)
        channel = getattr(ws, "_recv_channel", None)
        original = getattr(ws, "_send_channel", None)
        if channel is not None and original is not None:
            while True:  # what the reader queued before the switch goes first, in order
                try:
                    deliver(channel.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            ws._send_channel = _Deliver(deliver, original)  # type: ignore[assignment]
        try:
            while True:  # messages come only through `deliver` now: this waits for the end
                deliver(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            return _close_reason(exc, ws)
        finally:
            if original is not None:
                # the link stopped reading (silence, rotation done, shutdown): what the reader
                # still gets until the socket closes is queued and dropped, as before
                ws._send_channel = original

    def _deliverer(self, link: _Link) -> Callable[[str | bytes], None]:
        """The per-frame work: exact bytes, seq, route, append; never blocks."""
        route, append, clock, cid = self.spec.route, self.writer.append_frame, self.clock, link.id
        other = self._other_frame

        def deliver(msg: str | bytes) -> None:
            recv_ts = clock()
            data = msg.encode() if isinstance(msg, str) else msg
            link.seq += 1
            key = route(data)
            if key == KEY_OTHER:
                other(link, data)
            elif not link.has_data:
                link.has_data = True
                if link.connected.is_set():
                    link.delivered.set()
            append(key, data, recv_ts, cid, link.seq)
        return deliver

    def _other_frame(self, link: _Link, data: bytes) -> None:
        """A frame naming no known stream: a reply to SUBSCRIBE, or something bad."""
        link.others += 1
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
        try:
            async with link.control:
                if self.spec.streams_now is None:
                    await self._send_control(ws, link, "SUBSCRIBE", self.spec.subscribe, True)
                else:
                    carried = list(self.spec.streams_now())
                    named = _url_streams(link.url)
                    await self._send_control(ws, link, "SUBSCRIBE",
                                             [n for n in carried if n not in named], True)
                    await self._send_control(ws, link, "UNSUBSCRIBE",
                                             sorted(named - set(carried)), True)
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

    async def _send_control(self, ws: trio_websocket.WebSocketConnection, link: _Link,
                            method: str, names: Sequence[str], acked: bool = False) -> None:
        """`method` for `names`, `params_per_message` a message, each at least
        `control_interval` after the link's previous control message. Hold `link.control`.
        `acked`: the link counts as subscribed once these are answered."""
        per_message = self.spec.params_per_message
        for i in range(0, len(names), per_message):
            wait = link.last_control + self.timing.control_interval - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._next_msg_id += 1
            if acked:
                link.pending.add(self._next_msg_id)
            link.last_control = trio.current_time()
            await ws.send_message(orjson.dumps({
                "method": method, "params": list(names[i:i + per_message]),
                "id": self._next_msg_id}).decode())

    async def change_streams(self, added: Sequence[str], removed: Sequence[str]) -> None:
        """SUBSCRIBE `added` and UNSUBSCRIBE `removed` on every open link (module doc: the
        caller has changed what `streams_now` returns first). A link that closes meanwhile
        is skipped: its successor subscribes from `streams_now`."""
        for link in list(self._links):
            ws = link.ws
            if ws is None or link.done.is_set() or link.retire.is_set():
                continue
            try:
                async with link.control:
                    await self._send_control(ws, link, "SUBSCRIBE", added)
                    await self._send_control(ws, link, "UNSUBSCRIBE", removed)
            except trio_websocket.ConnectionClosed:
                continue
            log.info("streams changed", extra={"conn": link.id, "subscribed": len(added),
                                               "unsubscribed": len(removed)})

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

    async def _check_alive(self, ws: trio_websocket.WebSocketConnection, link: _Link) -> None:
        """A link that said nothing for `ping_after` gets a Ping. No Pong within
        `ping_timeout`: the TCP connection died without a word (a NAT that forgot it, a host
        gone), which nothing else would notice on a stream without a silence rule."""
        seen = link.seq
        while True:
            await trio.sleep(self.timing.ping_after)
            if link.retire.is_set():
                return  # our Close is sent: no Ping may follow it, and the overlap is short
            if link.seq != seen:
                seen = link.seq
                continue
            with trio.move_on_after(self.timing.ping_timeout) as waited:
                try:
                    await ws.ping()
                except trio_websocket.ConnectionClosed:
                    return  # the reader sees the close too
            if waited.cancelled_caught:
                log.error("no pong in %.0f s: replacing the connection", self.timing.ping_timeout,
                          extra={"conn": link.id, "path": self.spec.path})
                link.close("ping_timeout")
                return

    def _silent(self, link: _Link, seconds: float) -> None:
        log.error("no frame for %.1f s: replacing the connection. A stream on the wrong path "
                  "(/public vs /market) is accepted and stays silent: check the routing",
                  seconds, extra={"conn": link.id, "path": self.spec.path})
        self.writer.append_control(self.conn_key, "silent", {"seconds": round(seconds, 3),
                                                             "path": self.spec.path}, link.id)
        link.close("silent")


class _Deliver:
    """Stands in for trio-websocket's send channel (`WebSocketConnection._send_channel`, 0.12):
    its reader task calls `await _send_channel.send(message)` for each message it completes;
    this hands the message to the link's `deliver` and returns without a checkpoint. When the
    connection closes, trio-websocket closes the channel (`aclose`): the real one, so the wait
    in `_read` ends."""

    __slots__ = ("channel", "deliver")

    def __init__(self, deliver: Callable[[str | bytes], None],
                 channel: trio.MemorySendChannel[Any]) -> None:
        self.deliver = deliver
        self.channel = channel

    async def send(self, message: str | bytes) -> None:
        self.deliver(message)

    async def aclose(self) -> None:
        await self.channel.aclose()


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


def _url_streams(url: str) -> set[str]:
    """The streams a combined-stream URL names (`...?streams=a/b`)."""
    for name, value in parse_qsl(urlsplit(url).query):
        if name == "streams":
            return set(filter(None, value.split("/")))
    return set()


def _target(url: str) -> tuple[str, int, str, ssl.SSLContext | None]:
    """(host, port, resource, TLS context or None) of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("not a ws:// or wss:// URL with a host")
    tls = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, parts.port or (443 if tls else 80), resource,
            ssl.create_default_context() if tls else None)


def _host_header(host: str, port: int) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port in (80, 443) else f"{name}:{port}"


Transport = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def _open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> Transport:
    if ssl_context is None:
        return await trio.open_tcp_stream(host, port)
    return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context,
                                               https_compatible=True)


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a group, nested groups opened."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _close_reason(exc: trio_websocket.ConnectionClosed,
                  ws: trio_websocket.WebSocketConnection | None) -> str:
    reason = exc.reason
    if reason is None:
        return "server_closed"
    if reason.code == 1009:
        return "message_too_big"
    proto = getattr(ws, "_wsproto", None)
    if proto is not None and proto.state is ConnectionState.OPEN:
        # no Close frame came or went: wsproto failed to parse what the server sent (1007 a
        # text frame that is not UTF-8, 1002 a malformed frame) and made the close up itself
        return f"protocol_error: {reason.code}"
    return f"server_closed: {reason.code}"


def _connect_error(exc: BaseException) -> str:
    """What made a connect fail, in a word: `timeout`, `rejected 429`, or the OS error."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"rejected {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "timeout"
    cause = exc.__cause__ if isinstance(exc, trio_websocket.HandshakeError) else exc
    # trio's "all attempts to connect failed" carries one error per address tried
    first = cause.__cause__ if isinstance(cause, OSError) else None
    if isinstance(first, BaseExceptionGroup) and first.exceptions:
        cause = first.exceptions[0]
    return type(cause or exc).__name__


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
