"""What one websocket connection of the simulator holds, apart from sockets: its SUBSCRIBE
protocol (with Binance's limits), its pacing, and the framing of what it sends. Pure.

`ControlProtocol` answers SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS and enforces at most 10
incoming messages in any one second (more: the server drops the connection) and at most 1024
streams (more: an error reply). `Pacer` decides which of the connection's streams are due at a
given monotonic time: Binance's own speeds, a fixed rate round-robin, or flat out, plus bursts.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable

import attrs
import orjson

from pipeline.simulator.market import StreamState

MAX_STREAMS = 1024
MAX_MESSAGES_PER_SECOND = 10


# --- websocket framing (server to client: unmasked, never fragmented) ------------------------

def ws_frame(payload: bytes, binary: bool = False) -> bytes:
    first = 0x82 if binary else 0x81
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


# --- live subscription control ---------------------------------------------------------------

@attrs.frozen
class ControlResult:
    reply: str | None = None
    close: bool = False  # too many messages: the server drops the connection
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def _error(code: int, msg: str, req_id: object) -> str:
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id}).decode()


class ControlProtocol:
    """Incoming messages of one connection: SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS."""

    def __init__(self, initial: Iterable[str] = ()) -> None:
        self.streams: dict[str, None] = dict.fromkeys(initial)
        self._times: deque[float] = deque()

    def subscribe_from_url(self, names: list[str]) -> ControlResult:
        """The streams named in the connection URL: not counted as messages; no reply unless
        there are too many."""
        added = tuple(dict.fromkeys(names))
        if len(added) > MAX_STREAMS:
            return ControlResult(_error(
                2, f"Invalid request: more than {MAX_STREAMS} streams on one connection", None))
        self.streams.update(dict.fromkeys(added))
        return ControlResult(None, added=added)

    def receive(self, message: str | bytes, now: float) -> ControlResult:
        self._times.append(now)
        while self._times and self._times[0] <= now - 1.0:
            self._times.popleft()
        if len(self._times) > MAX_MESSAGES_PER_SECOND:
            return ControlResult(close=True)
        try:
            req = orjson.loads(message)
        except orjson.JSONDecodeError:
            return ControlResult(_error(3, "Invalid JSON", None))
        if not isinstance(req, dict):
            return ControlResult(_error(3, "Invalid JSON: expected an object", None))
        req_id, method, params = req.get("id"), req.get("method"), req.get("params", [])
        if method == "LIST_SUBSCRIPTIONS":
            return ControlResult(orjson.dumps({"result": list(self.streams), "id": req_id})
                                 .decode())
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE"):
            return ControlResult(_error(2, f"Invalid request: unknown method {method!r}", req_id))
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return ControlResult(_error(2, "Invalid request: params must be stream names",
                                        req_id))
        ok = orjson.dumps({"result": None, "id": req_id}).decode()
        if method == "UNSUBSCRIBE":
            removed = tuple(p for p in params if p in self.streams)
            for p in removed:
                del self.streams[p]
            return ControlResult(ok, removed=removed)
        added = tuple(p for p in dict.fromkeys(params) if p not in self.streams)
        if len(self.streams) + len(added) > MAX_STREAMS:
            return ControlResult(_error(
                2, f"Invalid request: more than {MAX_STREAMS} streams on one connection",
                req_id))
        self.streams.update(dict.fromkeys(added))
        return ControlResult(ok, added=added)


# --- pacing ----------------------------------------------------------------------------------

FLAT_OUT_BATCH = 64  # frames per write when rate=0: one syscall carries many frames
MAX_BATCH = 4096


class Pacer:
    """Which streams of one connection are due at time `now` (seconds, monotonic).

    rate None: each stream at its own Binance speed; rate N: N frames a second round-robin
    over the streams; rate 0: FLAT_OUT_BATCH frames per call, as fast as the caller writes.
    `burst` extra frames every `burst_every` seconds come on top in every mode. At Binance's
    speeds, `activity(symbol)` (1.0 by default) slows the irregular streams (trades,
    liquidations) of a symbol that trades thinly, such as a TradFi symbol outside its session.
    """

    def __init__(self, rng: random.Random, now: float,
                 activity: Callable[[str | None], float] | None = None) -> None:
        self.rng = rng
        self.activity = activity
        self.rate: float | None = None
        self.burst = 0
        self.burst_every = 0.1
        self._streams: list[StreamState] = []
        self._rr = 0
        self._heap: list[tuple[float, int, StreamState]] = []
        self._seq = itertools.count()
        self._t0 = now
        self._paced = 0
        self._next_burst = now

    def configure(self, rate: float | None, burst: int, burst_every: float, now: float) -> None:
        self.rate, self.burst, self.burst_every = rate, burst, burst_every
        self._t0, self._paced, self._next_burst = now, 0, now + burst_every

    def set_streams(self, streams: list[StreamState], now: float) -> None:
        known = {id(s) for s in self._streams}
        self._streams = list(streams)
        keep = {id(s) for s in self._streams}
        self._heap = [e for e in self._heap if id(e[2]) in keep]
        for s in self._streams:
            if id(s) not in known:
                heapq.heappush(self._heap, (now, next(self._seq), s))
        heapq.heapify(self._heap)

    def _round_robin(self, n: int) -> list[StreamState]:
        streams, k = self._streams, len(self._streams)
        out = [streams[(self._rr + i) % k] for i in range(n)]
        self._rr = (self._rr + n) % k
        return out

    def due(self, now: float) -> list[StreamState]:
        if not self._streams:
            return []
        out = self._bursts(now)
        if self.rate is None:
            out.extend(self._realistic(now))
        elif self.rate == 0:
            out.extend(self._round_robin(FLAT_OUT_BATCH))
        else:
            owed = int((now - self._t0) * self.rate) - self._paced
            if owed > MAX_BATCH:  # fell far behind (a stalled reader): do not flood later
                self._paced += owed - MAX_BATCH
                owed = MAX_BATCH
            if owed > 0:
                self._paced += owed
                out.extend(self._round_robin(owed))
        return out

    def _bursts(self, now: float) -> list[StreamState]:
        if self.burst <= 0 or now < self._next_burst:
            return []
        self._next_burst += self.burst_every
        if self._next_burst < now:
            self._next_burst = now + self.burst_every
        return self._round_robin(self.burst)

    def _realistic(self, now: float) -> list[StreamState]:
        out: list[StreamState] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(out) < MAX_BATCH:
            due, _, s = heapq.heappop(heap)
            out.append(s)
            step = s.spec.interval
            if s.spec.jitter:
                step *= self.rng.uniform(0.3, 1.7)
                if self.activity is not None:
                    step /= self.activity(s.spec.symbol)
            nxt = due + step if due + step > now - 1.0 else now + step
            heapq.heappush(heap, (nxt, next(self._seq), s))
        return out

    def next_time(self, now: float) -> float:
        """When `due` will next return something (inf: never, until streams or rate change)."""
        if not self._streams:
            return float("inf")
        if self.rate == 0:
            return now
        t = self._next_burst if self.burst > 0 else float("inf")
        if self.rate is None:
            return min(t, self._heap[0][0]) if self._heap else t
        return min(t, self._t0 + (self._paced + 1) / self.rate)
