"""What `pipeline.wsconn` takes from trio-websocket beyond its public API, checked against the
installed version over a real loopback connection.

A rotation must keep reading the old connection after asking it to close, so
`wsconn._send_close` sends the Close frame through the connection's private `_send`, judged by
`_wsproto.state`, instead of `aclose()` (which drops the frames still queued); the same state
tells a protocol error from the server's Close (`wsconn._close_reason`). The link takes each
message where the reader task makes it: `wsconn.WsConnection._read` drains `_recv_channel`,
then puts a `_Deliver` in place of `_send_channel`, which the reader's message handler sends
to by attribute for each message (tests/test_wsconn_delivery.py). pyproject.toml pins
trio-websocket to the tested range; a version that moves these fails here, by name, instead of
silently reading every retired connection for `Timing.max_overlap`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio_websocket
from wsproto.connection import ConnectionState

from pipeline.wsconn import _send_close

VERSION = trio_websocket.__version__
Handler = Callable[[trio_websocket.WebSocketRequest], Awaitable[None]]


def require(condition: object, what: str) -> None:
    assert condition, (
        f"pipeline.wsconn relies on a trio-websocket internal that {VERSION} changed: {what}. "
        "Revisit wsconn._send_close, wsconn._close_reason and WsConnection._read, then the "
        "trio-websocket pin in "
        "pyproject.toml.")


def proto_state(ws: trio_websocket.WebSocketConnection) -> object:
    return getattr(getattr(ws, "_wsproto", None), "state", None)


async def serve(nursery: trio.Nursery, handler: Handler) -> str:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/"


async def test_the_private_parts_wsconn_uses_are_there(nursery: trio.Nursery) -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()

    url = await serve(nursery, handler)
    async with trio_websocket.open_websocket_url(url) as ws:
        send = getattr(ws, "_send", None)
        require(send is not None and inspect.iscoroutinefunction(send)
                and list(inspect.signature(send).parameters) == ["event"],
                "WebSocketConnection._send(event) is no longer a coroutine taking a wsproto event")
        require(isinstance(getattr(ws, "_send_channel", None), trio.MemorySendChannel)
                and isinstance(getattr(ws, "_recv_channel", None), trio.MemoryReceiveChannel),
                "WebSocketConnection._send_channel / _recv_channel are no longer the two ends "
                "of a trio memory channel")
        uses = re.findall(r"self\._send_channel\b[^\n]*", inspect.getsource(type(ws)))
        require(sorted(set(uses)) == [
            "self._send_channel, self._recv_channel = trio.open_memory_channel[",
            "self._send_channel.aclose()", "self._send_channel.send(msg)",
            "self._send_channel:"],
            "WebSocketConnection uses _send_channel for more than `send(msg)` per message, "
            f"`aclose()` and the reader's `async with`: {sorted(set(uses))}")
        require(proto_state(ws) is ConnectionState.OPEN,
                "WebSocketConnection._wsproto.state is not wsproto's ConnectionState.OPEN on an "
                "open connection")


async def test_send_close_keeps_every_frame_the_server_sent_before_it(
        nursery: trio.Nursery) -> None:
    sent, server_saw = trio.Event(), []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for i in range(5):
            await ws.send_message(f"frame {i}")
        sent.set()
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            server_saw.append(exc.reason)

    url = await serve(nursery, handler)
    async with trio_websocket.open_websocket_url(url) as ws:
        await sent.wait()  # all five are on their way to us, none read yet
        await _send_close(ws)
        require(proto_state(ws) is ConnectionState.LOCAL_CLOSING,
                "_send(CloseConnection) did not move _wsproto to LOCAL_CLOSING")
        require(ws.closed is None, "_send(CloseConnection) closed the message queue")
        got = [await ws.get_message() for _ in range(5)]
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    # 0.12 leaves a client's socket open when the server closed the TCP connection first
    # (wsconn owns its sockets and closes them itself)
    await trio.aclose_forcefully(ws._stream)
    assert got == [f"frame {i}" for i in range(5)]
    assert closed.value.reason is not None and closed.value.reason.code == 1000
    assert [(r.code, r.reason) for r in server_saw] == [(1000, "rotated")]
