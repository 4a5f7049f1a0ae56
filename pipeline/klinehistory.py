"""Kline history for `ingest market`: the last closed candles of each kline stream from REST,
into the log, so `P:klines:{symbol}:{interval}` is whole within seconds of start.

The stream sends a candle only as it happens: without history, a list of 500 one-minute
candles needs 500 minutes of running. So for each configured kline stream the ingestor asks
`GET /fapi/v1/klines?symbol=S&interval=I&limit=N+1` (N = PIPELINE_KLINE_HISTORY, 500 by
default; the last row is the candle still open) and appends the answer, as REST sent it, to
the stream's own raw key as a control entry:

    ctl=snapshot  {"kind": "klines", "symbol": S, "interval": I, "limit": N + 1,
                   "fetched_at_ms": <local clock>, "weight_used_1m": ..., "response": [rows]}

The kline projection merges its closed rows into the list (projections.core.market): rows the
list lacks land in order, none twice, and a replay rebuilds the same list from the log without
REST.

When: a stream is due at start and again after anything that may have cost it candles:
- each (re)connect of the connection that carries it (`ConnSpec.on_connected`): the exchange
  does not replay what it sent while no connection was open;
- frames dropped by the writer (the buffer's bound reached while Redis was away): once the
  drops are in a `gap` entry, every kline stream is due again.
Due streams are fetched one at a time, each call through the weight budget (`RestClient` waits
before passing 80 % of PIPELINE_REST_WEIGHT_LIMIT: the whole market's history is paced over
minutes instead of tripping a 429); a failed call is retried with a backoff of 1 s to 60 s.

The first frame after a (re)connect (or a SUBSCRIBE of a listed symbol) decides whether the
answer was enough. The stream sends the close (`"x":true`) only of a candle it showed: its
first frame on a connection shows candle C, and from there on every candle comes. REST gives
every candle closed when it answered, the last row (the one still open then, O) left out.
The REST call is made at connect, typically before the stream's first frame (streams named in
the URL need no acknowledgement), so a candle that closes between the two (O < C) is in
neither: a hole for good, one candle wide, at start as after a reconnect, more likely the
slower the connect or the call. So the ingestor's router hands each stream's first frame after
a connect to `first_frame`, which keeps its candle's open time C; the history is whole once
an answer's open row O is not older than C (O >= C: REST gave every candle before C). When it
is older, the stream is due again, at once if no call is under way; a call that was under way
is judged when it answers (and the stream fetched again after the backoff). A call made after
the first frame always has O >= C (the exchange answers after it sent that frame), so it takes
at most one more call, and only when a candle closed in that window. Chosen over always
fetching again after the first closed candle (twice the weight of every reconnect, and a wait
of a whole interval) and over keeping the answer's last row when its close time has passed
(at O's answer it had not: the window is after the answer).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import orjson
import trio

from pipeline.backoff import Backoff
from pipeline.errors import ExchangeError
from pipeline.rest import RestClient
from pipeline.streams import Subscription
from pipeline.weight import klines_weight
from pipeline.wsconn import FrameSink
from projections.core.keys import market_key

log = logging.getLogger("pipeline.klinehistory")

PATH = "/fapi/v1/klines"
DROPS_CHECK_S = 1.0


class DropCounts(Protocol):
    """The writer's account of dropped frames (`pipeline.buffer.DropLedger`)."""

    recorded: int

    @property
    def unreported(self) -> int: ...


def kline_streams(subs: Iterable[Subscription]) -> tuple[str, ...]:
    """The kline stream names among `subs` (`btcusdt@kline_1m`)."""
    return tuple(s.name for s in subs if s.kind.family.startswith("kline_"))


def kline_names(names: Iterable[str]) -> tuple[str, ...]:
    """The kline stream names among stream names (`btcusdt@kline_1m`)."""
    return tuple(n for n in names if n.partition("@")[2].startswith("kline_"))


def frame_candle(frame: bytes) -> int | None:
    """The open time (`k.t`) of the candle a combined kline frame shows; None if it shows
    none (not a kline event)."""
    try:
        t = orjson.loads(frame)["data"]["k"]["t"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return t if type(t) is int else None


def answer_open_row(rows: object) -> int | None:
    """The open time of the last row of a `GET /fapi/v1/klines` answer (the candle open when
    REST answered); None when the answer has no such row."""
    if isinstance(rows, list) and rows and isinstance(rows[-1], list) and rows[-1]:
        t = rows[-1][0]
        return t if type(t) is int else None
    return None


class KlineHistory:
    """Fetches and logs the history of due kline streams (module docstring)."""

    def __init__(self, rest: RestClient, sink: FrameSink, streams: Iterable[str], limit: int,
                 *, clock: Callable[[], float] = time.time,
                 backoff: Backoff | None = None) -> None:
        self.rest = rest
        self.sink = sink
        self.streams = tuple(dict.fromkeys(streams))
        self.limit = limit  # closed candles wanted; REST is asked one more (the open one)
        self.clock = clock
        self.backoff = backoff or Backoff(1.0, 60.0, random.random)
        self.due: set[str] = set()
        self.logged = 0  # snapshot entries handed to the writer
        # the first frame after a connect decides (module docstring): the stream names whose
        # first frame the routers hand to `first_frame` (one set, changed in place: every
        # router holds it), the candle each such frame showed, each answer's open row
        self.awaiting: set[bytes] = set()
        self.shown: dict[str, int] = {}
        self.open_rows: dict[str, int] = {}
        self._wake = trio.Event()

    def request(self, streams: Iterable[str] | None = None) -> None:
        """Make `streams` (None: every kline stream) due; never blocks. A stream not seen
        before (a symbol listed while running) joins the streams asked again after a gap."""
        if streams is not None:
            streams = tuple(streams)
            self.streams = tuple(dict.fromkeys((*self.streams, *streams)))
        self.due.update(self.streams if streams is None else streams)
        self._wake.set()

    def connected(self, streams: Iterable[str]) -> None:
        """`streams` were (re)connected or SUBSCRIBEd: due now, and each stream's next frame
        goes to `first_frame` (module docstring)."""
        names = tuple(streams)
        for name in names:
            self.shown.pop(name, None)
            self.awaiting.add(name.encode())
        self.request(names)

    def on_connected(self, streams: Iterable[str]) -> Callable[[str], Awaitable[None]]:
        """The `ConnSpec.on_connected` hook of a connection carrying `streams`."""
        names = tuple(streams)

        async def connected(conn_id: str) -> None:
            self.connected(names)

        return connected

    def first_frame(self, name: bytes, frame: bytes) -> None:
        """The router's call for the first frame of an awaited stream (`awaiting`) since its
        connect: if the last answer's open row is older than the candle it shows, the stream
        is due again (a call under way is judged when it answers). Never blocks."""
        t = frame_candle(frame)
        if t is None:
            return  # shows no candle: the next frame decides
        self.awaiting.discard(name)
        stream = name.decode()
        self.shown[stream] = t
        if stream not in self.due and not self.whole(stream):
            log.info("a candle closed between the kline history and the stream's first frame:"
                     " history asked again", extra={"stream": stream})
            self.request((stream,))

    def whole(self, stream: str) -> bool:
        """Do the last answer and the stream leave no candle out? True until both are known
        (an answer with no open row cannot be judged: the projection refuses it anyway)."""
        shown, opened = self.shown.get(stream), self.open_rows.get(stream)
        return shown is None or opened is None or opened >= shown

    async def serve(self, drops: DropCounts) -> None:
        """`run` and `watch_drops` until cancelled; then the REST client is closed, after both
        (a request cut short closes its own connection first)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.run)
                nursery.start_soon(self.watch_drops, drops)
        finally:
            with trio.CancelScope(shield=True):
                await self.rest.aclose()

    async def run(self) -> None:
        """Fetch due streams until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self.due:
                name = min(self.due)
                if await self._fetch(name) and self.whole(name):
                    self.due.discard(name)
                    self.backoff.reset()
                else:  # failed, or answered before a candle closed that the stream skipped
                    await trio.sleep(self.backoff.next_delay())

    async def watch_drops(self, drops: DropCounts, every: float = DROPS_CHECK_S) -> None:
        """After frames were dropped and their gap written, every kline stream is due."""
        seen = drops.recorded
        while True:
            await trio.sleep(every)
            if drops.recorded > seen and drops.unreported == 0:
                seen = drops.recorded
                log.info("frames were dropped: kline history asked again",
                         extra={"streams": len(self.streams)})
                self.request()

    async def _fetch(self, name: str) -> bool:
        symbol, _, kind = name.partition("@")
        interval = kind[len("kline_"):]
        params = {"symbol": symbol.upper(), "interval": interval, "limit": self.limit + 1}
        try:
            rows = await self.rest.get(PATH, params, weight=klines_weight(self.limit + 1),
                                       expect=list)
        except ExchangeError as exc:
            log.warning("kline history failed; retrying", extra={"stream": name,
                                                                 "error": str(exc)})
            return False
        self.sink.append_control(market_key(kind), "snapshot", {
            "kind": "klines", "symbol": symbol.upper(), "interval": interval,
            "limit": self.limit + 1, "fetched_at_ms": int(self.clock() * 1000),
            "weight_used_1m": self.rest.budget.used, "response": rows})
        self.logged += 1
        opened = answer_open_row(rows)
        if opened is None:
            self.open_rows.pop(name, None)
        else:
            self.open_rows[name] = opened
        if not self.whole(name):
            log.info("a candle closed between the kline history and the stream's first frame:"
                     " history asked again", extra={"stream": name})
        return True
