"""Helpers of the simulator tests: a simulator in the test's nursery, a websocket client, a
clock that runs faster than the wall's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio
import trio_websocket

from pipeline.simulator import SimConfig, Simulator

Start = Callable[..., Awaitable[tuple[Simulator, str, str]]]


def sim_starter(nursery: trio.Nursery) -> Start:
    """The body of each test module's `start_sim` fixture: start a simulator on free ports in
    the test's nursery, `await start_sim(**SimConfig fields)`."""
    async def start(record: int = 0, **kwargs: Any) -> tuple[Simulator, str, str]:
        sim = Simulator(SimConfig(**kwargs), record=record)
        ws_url, rest_url = await nursery.start(sim.run)
        return sim, ws_url, rest_url
    return start


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client that also closes its socket when the server closed first
    (trio-websocket's own `open_websocket` leaves it to the garbage collector then)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, parts.hostname, resource, max_message_size=4 * 1024 * 1024)
            try:
                yield ws
            finally:
                await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def until_reply(ws: trio_websocket.WebSocketConnection, req_id: int) -> Any:
    """Read past data frames to the answer of control message `req_id`."""
    while True:
        msg = orjson.loads(await ws.get_message())
        if isinstance(msg, dict) and msg.get("id") == req_id:
            return msg


def fast_clock(speed: float, start: float | None = None) -> Callable[[], float]:
    """A wall clock that runs `speed` times faster, from `start` (unix seconds; now)."""
    wall, mono = time.time() if start is None else start, time.monotonic()
    return lambda: wall + (time.monotonic() - mono) * speed
