"""The private stream's connections: which listenKeys and event types one asks for, and serving it.

Binance (USDⓈ-M, "Important WebSocket Change Notice", 2026):
- ws mode `/private/ws?listenKey=K&events=E1/E2` (also `/private/ws/K`): one key, events unwrapped;
- stream mode `/private/stream?listenKey=K1&events=E1&listenKey=K2&events=E2/E3`: several keys,
  each `events=` belonging to the listenKey before it. Binance does not show the wrapper; the
  simulator wraps as every combined stream is wrapped, `{"stream": <listenKey>, "data": event}`,
  the form its legacy `/stream?streams=<listenKey>` had.
- `events=` names the types delivered; a key with no (or an empty) `events=` gets every type.
  The rule holds for all ten 2026 types, `listenKeyExpired` included, and for types no client
  knows.

A connection naming a key that is not live (never issued, DELETEd, expired) is accepted and then
closed with code 4001 (what the issue observed against Binance); a DELETE closes the connections
on that key the same way. When a key's 60 minutes run out instead, Binance pushes
`listenKeyExpired` and leaves the connection open and silent. Close reasons never echo a key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed

SUBSCRIBER_BUFFER = 10_000  # a consumer this far behind is dropped, as Binance drops slow ones
KEY_GONE_CODE = 4001
KEY_GONE_REASON = "listenKey does not exist or has expired"


class KeyHolder(Protocol):
    """What a connection needs from the account that issued a key (`account.Account`)."""

    def key_is_live(self, key: str) -> bool: ...
    def attach(self, sub: Subscriber) -> None: ...
    def detach(self, sub: Subscriber) -> None: ...
    async def expire_when_due(self, key: str) -> None: ...


@attrs.frozen
class Wanted:
    """One listenKey a connection asks for, and its event types (None: all)."""

    listen_key: str
    events: frozenset[str] | None


def parse_events(value: str) -> frozenset[str] | None:
    return frozenset(e for e in value.split("/") if e) or None


def parse_target(target: str) -> tuple[bool, list[Wanted]]:
    """(stream mode?, the keys asked for) of a `/private/...` request target."""
    parts = urlsplit(target)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if segments[1:2] == ["stream"]:
        return True, list(_stream_mode(pairs))
    query = dict(pairs)
    key = query.get("listenKey") or (segments[2] if len(segments) > 2 else "")
    return False, [Wanted(key, parse_events(query.get("events", "")))] if key else []


def _stream_mode(pairs: list[tuple[str, str]]) -> Iterator[Wanted]:
    key: str | None = None
    events: frozenset[str] | None = None
    for name, value in pairs:
        if name == "listenKey":
            if key:
                yield Wanted(key, events)
            key, events = value, None
        elif name == "events":
            events = parse_events(value)
    if key:
        yield Wanted(key, events)


@attrs.define(eq=False)
class Connection:
    """One private-stream connection: its queue of texts, its wrapping, how it is to close."""

    combined: bool
    send: trio.MemorySendChannel[str]
    receive: trio.MemoryReceiveChannel[str]
    close_code: int = 1000
    close_reason: str = "stream closed"
    closing: bool = False

    @classmethod
    def open(cls, combined: bool) -> Connection:
        send, receive = trio.open_memory_channel[str](SUBSCRIBER_BUFFER)
        return cls(combined, send, receive)

    def offer(self, listen_key: str, event: dict[str, Any], text: str) -> None:
        if self.combined:
            text = orjson.dumps({"stream": listen_key, "data": event}).decode()
        try:
            self.send.send_nowait(text)
        except trio.WouldBlock:
            self.close(1008, "consumer too slow")
        except trio.ClosedResourceError:
            pass

    def close(self, code: int, reason: str) -> None:
        """End the connection once what is queued is sent; the first reason given wins."""
        if not self.closing:
            self.closing, self.close_code, self.close_reason = True, code, reason
        self.send.close()


@attrs.define(eq=False)
class Subscriber:
    """One listenKey of one connection, attached to the account that issued the key."""

    holder: KeyHolder
    listen_key: str
    events: frozenset[str] | None
    connection: Connection

    def wants(self, event_type: object) -> bool:
        return self.events is None or event_type in self.events


async def serve(ws: Any, wanted: Sequence[tuple[KeyHolder | None, Wanted]],
                combined: bool) -> None:
    """Serve one private-stream connection until it ends (`ws` accepted or not yet)."""
    if hasattr(ws, "accept"):  # handed the handshake request, not yet the connection
        ws = await ws.accept()
    if not wanted or any(h is None or not h.key_is_live(w.listen_key) for h, w in wanted):
        await ws.aclose(code=KEY_GONE_CODE, reason=KEY_GONE_REASON)
        return
    conn = Connection.open(combined)
    subs = [Subscriber(h, w.listen_key, w.events, conn) for h, w in wanted if h is not None]
    for sub in subs:
        sub.holder.attach(sub)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_closed, ws, nursery.cancel_scope)
            for sub in subs:
                nursery.start_soon(sub.holder.expire_when_due, sub.listen_key)
            await _forward(ws, conn.receive)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(1):
            await ws.aclose(code=conn.close_code, reason=conn.close_reason)
    finally:
        for sub in subs:
            sub.holder.detach(sub)


async def _forward(ws: Any, receive: trio.MemoryReceiveChannel[str]) -> None:
    try:
        async for text in receive:
            await ws.send_message(text)
    except ConnectionClosed:
        pass


async def _read_until_closed(ws: Any, scope: trio.CancelScope) -> None:
    """Client messages are ignored; reading notices the client going away."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        scope.cancel()
