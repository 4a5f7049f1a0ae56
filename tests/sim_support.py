"""A client of a running simulator for the simulator's own tests: real HTTP, real websockets.

    async with running(SimConfig(...)) as ex:
        key = (await ex.listen_key()).json()["listenKey"]
        async with ex.user_stream(f"/private/ws?listenKey={key}") as ws: ...
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import attrs
import httpx
import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from pipeline.simulator import SimConfig, Simulator

KEY, SECRET = "sim-api-key", "sim-api-secret"


def sign(query: dict[str, str], now_ms: int, secret: str = SECRET) -> dict[str, str]:
    full = {**query, "timestamp": str(now_ms)}
    full["signature"] = hmac.new(secret.encode(), urlencode(full).encode(),
                                 hashlib.sha256).hexdigest()
    return full


@attrs.define
class Exchange:
    sim: Simulator
    ws_url: str
    http: httpx.AsyncClient

    def now_ms(self) -> int:
        return int(self.sim.clock() * 1000)

    async def control(self, name: str, **body: Any) -> Any:
        reply = await self.http.post(f"/sim/account/{name}", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    async def signed(self, path: str, query: dict[str, str] | None = None, *, key: str = KEY,
                     secret: str = SECRET) -> httpx.Response:
        """A signed GET with the exchange's own time, as a client synced to it would send."""
        return await self.http.get(path, params=sign(query or {}, self.now_ms(), secret),
                                   headers={"X-MBX-APIKEY": key})

    async def ok(self, path: str, query: dict[str, str] | None = None, **kw: Any) -> Any:
        reply = await self.signed(path, query, **kw)
        assert reply.status_code == 200, reply.text
        return reply.json()

    async def listen_key(self, method: str = "POST", *, key: str = KEY,
                         params: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.request(method, "/fapi/v1/listenKey", params=params,
                                       headers={"X-MBX-APIKEY": key})

    async def new_key(self, key: str = KEY) -> str:
        reply = await self.listen_key(key=key)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["listenKey"])

    @asynccontextmanager
    async def user_stream(self, target: str, attached: int = 1
                          ) -> AsyncIterator[WebSocketConnection]:
        """A websocket on `target`; waits until `attached` subscriptions of the main account
        are on (0: do not wait, for connections the server is expected to refuse)."""
        async with client(self.ws_url + target) as ws:
            if attached:
                await self.sim.account.wait_for_connections(attached)
            yield ws


# A fixed exchange time, one second into a clock minute: the weight minute cannot roll under a
# test, and only `advance_clock` moves it.
T0 = 29_916_667 * 60 + 1.0


@asynccontextmanager
async def running(config: SimConfig | None = None,
                  clock: Callable[[], float] | None = None) -> AsyncIterator[Exchange]:
    """A simulator on free ports; `clock` (default: fixed at T0) is the exchange's base clock."""
    sim = Simulator(config or SimConfig(symbols=("BTCUSDT", "ETHUSDT")),
                    clock=clock or (lambda: T0))
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        async with httpx.AsyncClient(base_url=rest_url) as http:
            yield Exchange(sim, ws_url, http)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[WebSocketConnection]:
    opened: list[WebSocketConnection] = []
    try:
        async with open_websocket_url(url) as ws:
            opened.append(ws)
            yield ws
    finally:
        # trio-websocket 0.12's client leaves its TCP socket to the GC when the server closes
        # first, which warns; close it here so that warnings-as-errors sees no leak.
        for ws in opened:
            await ws._stream.aclose()


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):  # a guard against hanging, not a speed assertion
        return orjson.loads(await ws.get_message())


async def events_until(ws: WebSocketConnection,
                       last: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    seen = [await next_event(ws)]
    while not last(seen[-1]):
        seen.append(await next_event(ws))
    return seen
