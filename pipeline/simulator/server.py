"""The simulated exchange's I/O shell: websocket and REST servers, fault switches, `pipeline
simulate`.

Websockets. Each TCP connection is wrapped by trio-websocket (handshake, pings, pongs, close,
incoming messages). Data frames take a faster road: the market payloads of one turn of the
pacer are framed by hand (server frames are unmasked and never fragmented, see
`market.ws_frame`) and written with one `send_all`, so flat out one system call carries 64
frames. Both roads share the socket through `LockedStream`, which keeps every write whole.

Per connection three tasks run under one cancel scope: the reader (SUBSCRIBE and friends), the
sender (the pacer's frames, malformed frames on request), the pinger (ping every
`ping_interval`; no pong within `pong_timeout` closes). The scope ends at `lifetime` (closed
politely) or on `drop` (the TCP socket is closed without a close frame, as a network fault
would). `/private/ws` and `/private/stream` go to the accounts (`pipeline.simulator.account`,
written separately; the market side runs without it).

The exchange's clock is an `ExchangeClock` around the `clock` given: `POST
/sim/account/advance_clock` moves it (and every timestamp, REST and stream) forward.

Paths, as Binance routes them since 2026-04-23: `/public/...` (depth, bookTicker),
`/market/...` (everything else), `/private/ws`; the unrouted legacy `/ws/...` and
`/stream?streams=...` still connect and serve the `/public` streams, while `/market` streams and
user data named there are accepted and never sent. Any other path is refused with 404.

Cadence mode (`SimConfig.cadence`, issue #16): one more task, the market's clock, wakes every
5 ms (`CADENCE_TICK`) and makes every event due by then (`Market.advance`, see `cadence.py`),
each queued in the outbox of every connection that reads its stream. It then writes each
connection's new frames itself, in the order they were made, with one non-blocking write
(`_write_now`): a turn of the scheduler per connection and tick would cost more than the
market. What a full socket does not take, and whatever else it cannot write at once (another
write under way, malformed frames to send first, silence), it leaves to the connection's
sender task, which writes it before anything newer. A big tick (a whole second: 550 mark
prices, 550 klines and the depth streams at once) is made in chunks of `CADENCE_CHUNK` clocks,
each chunk's frames written before the next is made, so the first frames of the burst leave
before the last are made. An event's `E` is the tick it was made in (chunks or not), so a
frame leaves as soon as its `E` has come and its turn in the tick is made.

Listings change while running (`list_symbol`, `delist`): a connection keeps every name it
subscribed to, and serves those of a symbol from the moment it trades until it is delisted.

REST: `http.py` serves HTTP/1.1 with h11; `restapi.py` routes Binance's market endpoints (with
their weights), the account's endpoints and the control API under `/sim/` to this object.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import trio
import trio_websocket

from pipeline.config import Settings
from pipeline.errors import SettingsError
from pipeline.simulator.cadence import Crash
from pipeline.simulator.config import SimConfig
from pipeline.simulator.http import RestFaults, WeightMeter, serve_http
from pipeline.simulator.listings import market_symbols
from pipeline.simulator.market import (
    LEGACY,
    MARKET,
    PUBLIC,
    Market,
    Outbox,
    StreamState,
    malformed_frames,
    parse_stream,
    serves,
    streams_of_query,
)
from pipeline.simulator.restapi import RestApi
from pipeline.simulator.session import ControlProtocol, Pacer, ws_frame

log = logging.getLogger("pipeline.simulator")

HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
CLOSED_KEPT = 200  # closed connections remembered in stats
# The market's clock wakes on a 5 ms grid and makes everything due by then: every trio wake
# costs an exception (its deadline cancels a scope), and thousands a second would cost the
# simulator a tenth of a core.
CADENCE_TICK = 0.005
MAX_WRITE = 4096  # frames per write in cadence mode
# Clocks fired between two turns of the senders in cadence mode (~1 ms of making): the first
# frames of a big tick leave while the rest are made.
CADENCE_CHUNK = 200
MARKET_PATHS = (PUBLIC, MARKET, LEGACY)


class LockedStream(trio.abc.Stream):
    """The TCP stream, with one lock around every write (trio-websocket's and the data path's)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()
        self.torn = False  # a write was cancelled half-way: no more frames can follow
        self.backlog = b""  # the rest of a `write_now` the socket did not take at once
        self.short_writes = 0  # `write_now`s that left a backlog

    def write_now(self, data: bytes) -> bool:
        """Write `data` without waiting, if no other write is under way (False: the caller
        must send it itself). What the socket does not take at once is kept in `backlog`, and
        every locked write sends it first. Raises OSError if the connection is gone."""
        if self.lock.locked() or self.backlog:
            return False
        try:
            sent = os.write(self.stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.backlog = data[sent:]
            self.torn = True
            self.short_writes += 1
        return True

    async def send_backlog(self) -> None:
        """With the lock held: what `write_now` left, before anything else goes out."""
        if self.backlog:
            self.torn = True
            data, self.backlog = self.backlog, b""
            await self.stream.send_all(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self.lock:
            self.torn = True
            await self.send_backlog()
            await self.stream.send_all(data)
            self.torn = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class Connection:
    """The server's record of one open websocket."""

    def __init__(self, cid: str, path: str, combined: bool, ws: trio_websocket.WebSocketConnection,
                 stream: LockedStream, pacer: Pacer, opened: float) -> None:
        self.id = cid
        self.path = path
        self.combined = combined
        self.ws = ws
        self.stream = stream
        self.pacer = pacer
        self.opened = opened
        self.protocol = ControlProtocol()
        self.served: dict[str, StreamState] = {}  # streams this path carries
        self.scope = trio.CancelScope()
        self.abrupt = False
        self.close_reason = "lifetime"
        self.wake = trio.Event()
        self.bad: list[str | bytes] = []
        self.frames = 0
        self.target = ""  # the request target: the private stream reads its repeated params
        self.outbox = Outbox(self.poke)  # cadence mode: what the market made for this one

    def summary(self) -> dict[str, object]:
        return {"id": self.id, "path": self.path, "combined": self.combined,
                "streams": len(self.protocol.streams), "served": len(self.served),
                "frames": self.frames, "opened": self.opened}

    def poke(self) -> None:
        self.wake.set()


def _load_accounts(config: SimConfig, clock: Callable[[], float], weight: WeightMeter,
                   faults: RestFaults) -> Any:
    """The account side, if its module is there (it is written separately)."""
    try:
        module = importlib.import_module("pipeline.simulator.account")
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.simulator.account":
            raise
        log.warning("simulator account module missing: market data only")
        return None
    return module.Accounts(config, clock, weight, faults)


def _exchange_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """`clock` made movable by the account side's `advance_clock` (as is, without it)."""
    try:
        from pipeline.simulator.account import ExchangeClock
    except ModuleNotFoundError:
        return clock
    return clock if isinstance(clock, ExchangeClock) else ExchangeClock(clock)


class Simulator:
    """A local exchange speaking Binance's USD-M futures protocol over real sockets.

        sim = Simulator(SimConfig(symbols=("BTCUSDT",), rate=0))
        ws_url, rest_url = await nursery.start(sim.run)

    Control it with the methods below or over HTTP on the REST port (`/sim/...`).
    """

    def __init__(self, config: SimConfig | None = None,
                 clock: Callable[[], float] = time.time, record: int = 0) -> None:
        """`record`: keep the last `record` frames sent, as (connection id, exact payload
        bytes), in `self.sent`, for tests that compare what a client stored byte for byte."""
        self.config = config or SimConfig()
        self.sent: deque[tuple[str, bytes]] | None = deque(maxlen=record) if record else None
        self.clock = _exchange_clock(clock)
        self.market = _market(self.config, int(self.clock() * 1000))
        self._t0 = 0.0  # trio time of market time 0 (cadence mode)
        self._market_changed = trio.Event()
        self.weight = WeightMeter()
        self.rest_faults = RestFaults()
        self.accounts = _load_accounts(self.config, self.clock, self.weight, self.rest_faults)
        # the main account: what single-account tests and the demo script drive
        self.account = self.accounts.primary if self.accounts is not None else None
        if self.accounts is not None:
            # fills and positionRisk of the accounts price off the same book the streams show
            self.accounts.set_mark_source(self.market.mid_price)
        self.connections: dict[str, Connection] = {}
        self.closed: deque[dict[str, object]] = deque(maxlen=CLOSED_KEPT)
        self.silent = False
        self.rate, self.burst, self.burst_every = (self.config.rate, self.config.burst,
                                                   self.config.burst_every)
        self.frames_by_stream: dict[str, int] = {}
        self.frames_total = 0
        self.malformed_sent = 0
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self.ws_url = ""
        self.rest_url = ""

    # --- serving ---------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[tuple[str, str]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; `task_status.started((ws_url, rest_url))` once listening."""
        cfg = self.config
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(cfg.ws_port, host=cfg.host)
            ws_port = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, self._serve_tcp, listeners)
            rest_port = await nursery.start(serve_http, RestApi(self), cfg.host, cfg.rest_port)
            if cfg.script_account and self.account is not None:
                nursery.start_soon(self.account.run_script)
            self._t0 = trio.current_time() - (self.clock() * 1000 - self.market.base_ms) / 1000
            if self.market.cadence:
                self.market.tick = CADENCE_TICK
                nursery.start_soon(self._drive_market)
            self.ws_url = f"ws://{cfg.host}:{ws_port}"
            self.rest_url = f"http://{cfg.host}:{rest_port}"
            log.info("simulator listening", extra={"ws": self.ws_url, "rest": self.rest_url})
            task_status.started((self.ws_url, self.rest_url))

    async def _serve_tcp(self, tcp: trio.SocketStream) -> None:
        stream = LockedStream(tcp)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._serve_websocket(nursery, stream)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:  # one connection's failure must not stop the server
            log.exception("simulator connection failed")
        finally:
            await trio.aclose_forcefully(tcp)

    async def _serve_websocket(self, nursery: trio.Nursery, stream: LockedStream) -> None:
        request = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request = await trio_websocket.wrap_server_stream(nursery, stream)
        if request is None:
            return
        route = _route(request.path)
        try:
            if route is None:
                await request.reject(404, body=b"unknown path")
                return
            ws = await request.accept()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            return  # the client left during the handshake
        path, combined, names, query = route
        pacer = Pacer(self.market.rng, trio.current_time(), self._activity)
        conn = Connection(f"sim-{next(self._ids)}", path, combined, ws, stream, pacer,
                          self.clock())
        conn.pacer.configure(self.rate, self.burst, self.burst_every, trio.current_time())
        conn.target = request.path
        if self.market.cadence and self.sent is None:
            conn.outbox.flush = functools.partial(self._write_now, conn)
        self.connections[conn.id] = conn
        self._notify()
        log.info("simulator connection opened", extra={"conn": conn.id, "path": path})
        try:
            await self._run_connection(conn, names, query)
        finally:
            for state in conn.served.values():
                self.market.close_stream(state)
            del self.connections[conn.id]
            self.closed.append({**conn.summary(), "closed": self.clock(),
                                "reason": conn.close_reason})
            self._notify()
            log.info("simulator connection closed",
                     extra={"conn": conn.id, "reason": conn.close_reason, "frames": conn.frames})

    async def _run_connection(self, conn: Connection, names: list[str],
                              query: dict[str, str]) -> None:
        with conn.scope, trio.move_on_after(self.config.lifetime):
            async with trio.open_nursery() as tasks:
                tasks.start_soon(self._pinger, conn)
                if conn.path == "private":
                    tasks.start_soon(self._serve_private, conn, query, tasks.cancel_scope)
                else:
                    if not await self._subscribe_initial(conn, names):
                        return
                    tasks.start_soon(self._reader, conn, tasks.cancel_scope)
                    sender = self._cadence_sender if self.market.cadence else self._sender
                    tasks.start_soon(sender, conn)
        if conn.abrupt or conn.stream.torn:
            await trio.aclose_forcefully(conn.stream.stream)
            return
        with trio.move_on_after(CLOSE_TIMEOUT):
            code = 1008 if conn.close_reason == "too many messages" else 1000
            await conn.ws.aclose(code, conn.close_reason)

    async def _serve_private(self, conn: Connection, query: dict[str, str],
                             done: trio.CancelScope) -> None:
        conn.close_reason = "closed"
        if self.accounts is not None:
            try:
                await self.accounts.serve_user_ws(conn.ws, conn.target)
            except trio_websocket.ConnectionClosed:
                pass
        else:
            await conn.ws.aclose(1011, "no account on this simulator")
        done.cancel()

    async def _subscribe_initial(self, conn: Connection, names: list[str]) -> bool:
        result = conn.protocol.subscribe_from_url(names)
        if result.reply is None:
            self._apply_streams(conn, result.added, ())
            return True
        conn.close_reason = "too many streams"
        try:
            await conn.ws.send_message(result.reply or "")
        except trio_websocket.ConnectionClosed:
            pass
        return False

    def _apply_streams(self, conn: Connection, added: Iterable[str],
                       removed: Iterable[str]) -> None:
        market = self.market
        for name in removed:
            state = conn.served.pop(name, None)
            if state is not None:
                market.close_stream(state)
        cadence = market.cadence
        at = self.market_time() if cadence else 0.0
        for name in added:
            spec = parse_stream(name, market.streaming())
            # a stream asked for on the wrong path is accepted and then never sent
            if spec is not None and serves(conn.path, spec.path) and name not in conn.served:
                conn.served[name] = market.open_stream(
                    spec, conn.combined, conn.outbox if cadence else None, at)
        if cadence:
            self._market_changed.set()
        else:
            conn.pacer.set_streams(list(conn.served.values()), trio.current_time())
        conn.poke()

    async def _reader(self, conn: Connection, done: trio.CancelScope) -> None:
        try:
            while True:
                message = await conn.ws.get_message()
                result = conn.protocol.receive(message, trio.current_time())
                if result.close:
                    conn.close_reason = "too many messages"
                    break
                if result.reply is not None:
                    await conn.ws.send_message(result.reply)
                if result.added or result.removed:
                    self._apply_streams(conn, result.added, result.removed)
        except trio_websocket.ConnectionClosed:
            conn.close_reason = "closed by client"
        done.cancel()

    async def _pinger(self, conn: Connection) -> None:
        try:
            while True:
                await trio.sleep(self.config.ping_interval)
                with trio.move_on_after(self.config.pong_timeout) as waited:
                    await conn.ws.ping()
                if waited.cancelled_caught:
                    conn.close_reason, conn.abrupt = "pong timeout", True
                    conn.scope.cancel()
                    return
        except trio_websocket.ConnectionClosed:
            return

    async def _sender(self, conn: Connection) -> None:
        market, pacer = self.market, conn.pacer
        while True:
            if conn.bad:
                await self._send_malformed(conn)
            now = trio.current_time()
            due = [] if self.silent else pacer.due(now)
            if due:
                now_ms = int(self.clock() * 1000)
                counts = self.frames_by_stream
                parts: list[bytes] = []
                payloads: list[bytes] = []
                for state in due:
                    text = market.frame(state, now_ms)
                    while text is not None:
                        payload = text.encode()
                        parts.append(ws_frame(payload))
                        payloads.append(payload)
                        name = state.spec.name
                        counts[name] = counts.get(name, 0) + 1
                        # the rest of a multi-message tick (TradFi rows, one session a market)
                        text = (market.frame(state, now_ms)
                                if state.spec.multi and state.seq < state.feed.next else None)
                await self._send_frames(conn, parts, payloads)
                if pacer.rate == 0:
                    continue
            wake_at = float("inf") if self.silent else pacer.next_time(trio.current_time())
            with trio.move_on_at(wake_at):
                await conn.wake.wait()
            if conn.wake.is_set():
                conn.wake = trio.Event()

    async def _send_frames(self, conn: Connection, parts: list[bytes],
                           payloads: list[bytes]) -> None:
        if not parts and not conn.stream.backlog:
            await trio.lowlevel.checkpoint()
            return
        sent = await self._write(conn, b"".join(parts), len(parts))
        if sent and self.sent is not None:
            # recorded only once on the wire: a frame cut by the client's Close is not
            self.sent.extend((conn.id, p) for p in payloads)

    async def _cadence_sender(self, conn: Connection) -> None:
        """Cadence mode: write what the market's clock made for this connection, in order, when
        the clock could not (`_write_now`)."""
        pending, stream = conn.outbox.pending, conn.stream
        while True:
            if conn.bad:
                await self._send_malformed(conn)
            if pending and self.silent:
                pending.clear()
            if pending or stream.backlog:
                parts, payloads = self._take(conn)
                await self._send_frames(conn, parts, payloads)
                continue
            await conn.wake.wait()
            conn.wake = trio.Event()

    def _take(self, conn: Connection) -> tuple[list[bytes], list[bytes]]:
        """The next frames (at most MAX_WRITE) of `conn`'s outbox, framed, and their payloads."""
        market, pending, counts = self.market, conn.outbox.pending, self.frames_by_stream
        parts: list[bytes] = []
        payloads: list[bytes] = []
        while pending and len(parts) < MAX_WRITE:
            state = pending.popleft()
            text = market.take(state) if state.active else None
            if text is None:
                continue
            payload = text.encode()
            parts.append(ws_frame(payload))
            payloads.append(payload)
            name = state.spec.name
            counts[name] = counts.get(name, 0) + 1
        return parts, payloads

    def _write_now(self, conn: Connection) -> bool:
        """Cadence mode, from the market's clock: write what `conn`'s outbox holds at once,
        without waking its sender (a quiet market's cost is mostly turns of the scheduler, one
        per connection and tick). False leaves it to the sender: bad frames to go first,
        silence, another write under way or unfinished, more than MAX_WRITE frames."""
        stream = conn.stream
        if (conn.bad or self.silent or stream.backlog or stream.lock.locked()
                or conn.ws.closed is not None):
            return False
        parts, _ = self._take(conn)
        if parts:
            try:
                stream.write_now(b"".join(parts))
            except OSError:  # the peer went away; the reader notices too
                conn.close_reason = "closed by client"
                conn.scope.cancel()
                return True
            conn.frames += len(parts)
            self.frames_total += len(parts)
        return not (conn.outbox.pending or stream.backlog)

    def market_time(self) -> float:
        """Seconds on the market's clock (cadence mode): 0 at the simulator's start."""
        return trio.current_time() - self._t0

    async def _drive_market(self) -> None:
        """The exchange's own clock: make every event when it is due."""
        market = self.market
        while True:
            due = market.schedule.next_due()
            wake_at = (math.inf if due == math.inf
                       else self._t0 + math.ceil(round(due / CADENCE_TICK, 6)) * CADENCE_TICK)
            with trio.move_on_at(wake_at):
                await self._market_changed.wait()
            if self._market_changed.is_set():
                self._market_changed = trio.Event()
            while not self.advance_market(CADENCE_CHUNK):
                # a big tick (a whole second: 550 mark prices, 550 klines, ...), made a chunk
                # at a time: each chunk's frames are written (by `_write_now`, or by a sender
                # this wakes, which sends in its first turn) before the next is made. Two
                # turns of this task, so that it is not the first of the next batch either.
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()

    def advance_market(self, limit: float = math.inf) -> bool:
        """Cadence mode: make what is due up to the last tick of the market's clock (REST then
        answers what the streams show); never later, so no `E` is in the future. With `limit`,
        at most that many clocks fire; True when nothing due by that tick is left."""
        if not self.market.cadence:
            return True
        t = math.floor(round(self.market_time() / CADENCE_TICK, 6)) * CADENCE_TICK
        self.market.advance(t, limit)
        return self.market.schedule.next_due() > t

    def _activity(self, symbol: str | None) -> float:
        return self.market.activity(symbol, int(self.clock() * 1000))

    async def _write(self, conn: Connection, data: bytes, frames: int) -> bool:
        """Send `data` unless the connection is closing; True when it went out."""
        stream = conn.stream
        lock = stream.lock
        try:
            # free nearly always: taken without a turn of the scheduler (`acquire` yields once
            # even then), so the frames reach the socket in the sender's first turn
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            closed = conn.ws.closed is not None
            if not closed:
                stream.torn = True
                try:
                    await stream.send_backlog()
                    if data:
                        await stream.stream.send_all(data)
                    stream.torn = False
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed = True
        finally:
            lock.release()
        if closed:
            # the peer went away; the reader notices too, this only stops the writing
            conn.close_reason = "closed by client"
            conn.scope.cancel()
            await trio.lowlevel.checkpoint()
            return False
        conn.frames += frames
        self.frames_total += frames
        return True

    async def _send_malformed(self, conn: Connection) -> None:
        bad, conn.bad = conn.bad, []
        for frame in bad:
            payload = frame if isinstance(frame, bytes) else frame.encode()
            if await self._write(conn, ws_frame(payload, binary=isinstance(frame, bytes)), 1):
                if self.sent is not None:
                    self.sent.append((conn.id, payload))
                self.malformed_sent += 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_connections(self, count: int, path: str | None = None) -> None:
        """Return once exactly `count` connections (on `path`, or any) are open."""
        while sum(path is None or c.path == path for c in self.connections.values()) != count:
            await self._changed.wait()

    # --- control (Python API; the same over HTTP under /sim/) ----------------------------

    def set_silence(self, on: bool = True) -> None:
        """Market connections stay open but send no data frames (pings still answered)."""
        self.silent = on
        for conn in self.connections.values():
            conn.poke()

    def drop(self, path: str | None = None) -> int:
        """Close connections on `path` ("market", "public", "private"; None: all) abruptly."""
        dropped = 0
        for conn in list(self.connections.values()):
            if path is None or conn.path == path:
                conn.abrupt, conn.close_reason = True, "dropped"
                conn.scope.cancel()
                dropped += 1
        return dropped

    def send_malformed(self, count: int = 5) -> int:
        """Every market connection gets `count` bad frames (see `market.malformed_frames`)."""
        conns = [c for c in self.connections.values() if c.path in MARKET_PATHS]
        frames = malformed_frames(count, int(self.clock() * 1000))
        for conn in conns:
            conn.bad.extend(frames)
            conn.poke()
        return len(conns)

    def sequence_break(self, symbol: str) -> None:
        """The diff-depth stream of `symbol` skips one event: `pu` != the previous `u`."""
        self.market.sequence_break(symbol.upper())

    def set_rate(self, rate: float | None, burst: int | None = None,
                 burst_every: float | None = None) -> None:
        """rate None: Binance's speeds; N: frames/s per connection; 0: flat out."""
        if self.market.cadence:
            raise ValueError("cadence mode paces every stream itself: no rate to set")
        if rate is not None and rate < 0:
            raise ValueError("rate must be None or >= 0")
        self.rate = rate
        self.burst = self.burst if burst is None else int(burst)
        self.burst_every = self.burst_every if burst_every is None else float(burst_every)
        if self.burst_every <= 0:
            raise ValueError("burst_every must be > 0")
        now = trio.current_time()
        for conn in self.connections.values():
            conn.pacer.configure(self.rate, self.burst, self.burst_every, now)
            conn.poke()

    def stats(self) -> dict[str, object]:
        market = self.market
        return {
            "frames_total": self.frames_total,
            "frames_by_stream": dict(self.frames_by_stream),
            "malformed_sent": self.malformed_sent,
            "connections": [c.summary() for c in self.connections.values()],
            "closed_connections": list(self.closed),
            "silent": self.silent,
            "rate": self.rate, "burst": self.burst, "burst_every": self.burst_every,
            "weight_used_1m": self.weight.current(self.clock()),
            "cadence": market.cadence,
            "crash": market.cadence and market.crash.on(self.market_time()),
            "symbols_trading": len(market.symbols),
        }

    # --- the market's listings, sessions and crash (also under /sim/market/) ---------------

    def list_symbol(self, symbol: str, contract_type: str | None = None) -> dict[str, object]:
        """List `symbol` now (TRADING); connections that named its streams start serving."""
        symbol = symbol.upper()
        listing = self.market.list_symbol(symbol, contract_type, int(self.clock() * 1000))
        self._restream(symbol, start=True)
        return {"symbol": listing.symbol, "contractType": listing.contract_type,
                "status": listing.status}

    def delist(self, symbol: str) -> dict[str, object]:
        """Delist `symbol` now (SETTLING): its streams go quiet on every connection."""
        symbol = symbol.upper()
        listing = self.market.delist(symbol, int(self.clock() * 1000))
        self._restream(symbol, start=False)
        return {"symbol": listing.symbol, "status": listing.status}

    def _restream(self, symbol: str, start: bool) -> None:
        head = symbol.lower() + "@"
        for conn in self.connections.values():
            if conn.path not in MARKET_PATHS:
                continue
            names = [n for n in conn.protocol.streams if n.startswith(head)]
            if names:
                self._apply_streams(conn, names if start else (), () if start else names)

    def set_session(self, market: str, session_type: str | None) -> dict[str, object]:
        """Force the session of a TradFi underlying market (EQUITY, COMMODITY, KR_EQUITY, or a
        TradFi symbol's own) from now until cleared with None."""
        listing = self.market.listings.get(market.upper())
        name = listing.tradfi_market if listing is not None else market.upper()
        if name is None:
            raise ValueError(f"{market} is not a TradFi symbol")
        now_ms = int(self.clock() * 1000)
        self.market.hours.force(name, session_type, now_ms)
        current = self.market.hours.current(name, now_ms)
        return {"market": name, "type": current.type, "startTime": current.start}

    def set_crash(self, on: bool | None, multiplier: float | None = None) -> dict[str, object]:
        """Start or stop the crash phase of cadence mode (None: back to the schedule)."""
        if not self.market.cadence:
            raise ValueError("the crash phase needs cadence mode")
        self.market.set_crash(on, multiplier)
        return {"crash": self.market.crash.on(self.market_time()),
                "multiplier": self.market.crash.multiplier}


def _market(config: SimConfig, now_ms: int) -> Market:
    symbols = (market_symbols(config.symbols, config.market_size) if config.market_size
               else config.symbols)
    return Market(
        symbols, config.seed, coinm=config.coinm_symbols if config.coinm_in_arr else (),
        tradfi=config.tradfi, tradfi_hours=config.tradfi_hours,
        off_hours=config.tradfi_off_hours, cadence_mode=config.cadence,
        crash=Crash(config.crash_multiplier, config.crash_after, config.crash_seconds),
        now_ms=now_ms)


def _route(target: str) -> tuple[str, bool, list[str], dict[str, str]] | None:
    """(path kind, combined?, stream names, query) of a websocket request target, or None."""
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if segments and segments[0] in ("ws", "stream"):
        kind, form, rest = LEGACY, segments[0], segments[1:]
    elif len(segments) >= 2 and segments[0] in (PUBLIC, MARKET, "private"):
        kind, form, rest = segments[0], segments[1], segments[2:]
    else:
        return None
    if kind == "private":
        if form not in ("ws", "stream") or (form == "stream" and rest):
            return None
        if rest and "listenKey" not in query:
            query["listenKey"] = rest[0]
        return kind, form == "stream", [], query
    if form == "stream" and not rest:
        return kind, True, streams_of_query(query.get("streams", "")), query
    if form == "ws":
        return kind, False, rest, query
    return None


# --- `pipeline simulate` -------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ws-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--rest-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--rate", type=float, default=None,
                        help="frames/s per connection (0: flat out); default: Binance's speeds")
    parser.add_argument("--burst", type=int, default=0, help="extra frames every --burst-every")
    parser.add_argument("--burst-every", type=float, default=0.1)
    parser.add_argument("--lifetime", type=float, default=86400.0,
                        help="seconds before the server closes a connection")
    parser.add_argument("--ping-interval", type=float, default=180.0)
    parser.add_argument("--pong-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--script-account", action="store_true",
                        help="random orders, fills and stops for the demo")
    parser.add_argument("--hedge-mode", action="store_true")
    parser.add_argument("--listen-key-ttl", type=float, default=3600.0)
    # not BINANCE_API_KEY: a real key in the environment must not become the simulator's
    parser.add_argument("--api-key", default="sim-api-key", help="the simulated account's key")
    parser.add_argument("--api-secret", default="sim-api-secret")
    parser.add_argument("--ed25519-public-key-file", default=None,
                        help="PEM file: the account also accepts Ed25519-signed requests")
    parser.add_argument("--account", action="append", default=[], metavar="NAME:KEY:SECRET",
                        help="one more simulated account (repeatable), its own books and "
                             "listenKey")
    parser.add_argument("--legacy-algo-rows", action="store_true",
                        help="algo order rows as before Binance's 2026-06-09 change (with "
                             "tpTriggerPrice/tpPrice/slTriggerPrice/slPrice/tpOrderType, "
                             "without actualType/actualQty)")
    _add_market_arguments(parser)


def _add_market_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tradfi", default="",
                        help="TradFi perpetuals to list too, e.g. TSLAUSDT,XAUUSDT")
    parser.add_argument("--tradfi-hours", default="weekly", choices=("weekly", "open", "closed"),
                        help="sessions of their underlying markets")
    parser.add_argument("--tradfi-off-hours", default="thin", choices=("thin", "quiet"),
                        help="outside a session: thin trading (Binance) or no frames at all")
    parser.add_argument("--no-coinm", action="store_true",
                        help="no COIN-M rows in !markPrice@arr (as before 2026-06-30)")
    parser.add_argument("--cadence", action="store_true",
                        help="whole-market mode: every stream at its own rate (no --rate)")
    parser.add_argument("--market-size", type=int, default=0,
                        help="list generated symbols after --symbols until there are this many")
    parser.add_argument("--crash-multiplier", type=float, default=5.0)
    parser.add_argument("--crash-after", type=float, default=None,
                        help="cadence mode: seconds until a crash phase starts")
    parser.add_argument("--crash-seconds", type=float, default=60.0)


def config_from(settings: Settings, args: argparse.Namespace) -> SimConfig:
    pem = None
    if args.ed25519_public_key_file:
        try:
            pem = Path(args.ed25519_public_key_file).read_bytes()
        except OSError as exc:
            raise SettingsError("--ed25519-public-key-file", f"cannot read it: {exc.strerror}"
                                ) from None
    try:
        return SimConfig(
            symbols=settings.symbols or SimConfig().symbols, seed=args.seed, host=args.host,
            ws_port=args.ws_port, rest_port=args.rest_port, lifetime=args.lifetime,
            ping_interval=args.ping_interval, pong_timeout=args.pong_timeout, rate=args.rate,
            burst=args.burst, burst_every=args.burst_every,
            api_key=args.api_key, api_secret=args.api_secret,
            listen_key_ttl=args.listen_key_ttl, hedge_mode=args.hedge_mode,
            script_account=args.script_account, ed25519_public_key_pem=pem,
            accounts=tuple(args.account), legacy_algo_rows=args.legacy_algo_rows,
            **_market_settings(args))
    except ValueError as exc:
        # SimConfig's messages start with the field's name, which is the flag's name
        field = str(exc).split(" ", 1)[0]
        raise SettingsError(f"--{field.replace('_', '-')}", str(exc)) from None


def _market_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"tradfi": args.tradfi, "tradfi_hours": args.tradfi_hours,
            "tradfi_off_hours": args.tradfi_off_hours, "coinm_in_arr": not args.no_coinm,
            "cadence": args.cadence, "market_size": args.market_size,
            "crash_multiplier": args.crash_multiplier, "crash_after": args.crash_after,
            "crash_seconds": args.crash_seconds}


def main(settings: Settings, args: argparse.Namespace) -> int:
    config = config_from(settings, args)
    try:
        sim = Simulator(config)
    except ValueError as exc:  # the account refused its key material
        raise SettingsError("--ed25519-public-key-file", str(exc)) from None
    try:
        trio.run(_serve_until_signal, sim)
    except (OSError, BaseExceptionGroup) as exc:
        err = _os_error(exc)
        if err is None:
            raise
        raise SettingsError("--ws-port/--rest-port",
                            f"cannot listen on {config.host}: {err.strerror}") from None
    return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (a port taken, an address not ours) inside trio's exception groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


async def _serve_until_signal(sim: Simulator) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            ws_url, rest_url = await nursery.start(sim.run)
            print(f"simulator ready ws={ws_url} rest={rest_url}", flush=True)
            async for signum in signals:
                log.info("simulator stopping", extra={"signal": signal.Signals(signum).name})
                nursery.cancel_scope.cancel()
                break
    sys.stdout.flush()
