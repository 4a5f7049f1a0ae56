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
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

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
        self._wake = trio.Event()

    def request(self, streams: Iterable[str] | None = None) -> None:
        """Make `streams` (None: every kline stream) due; never blocks. A stream not seen
        before (a symbol listed while running) joins the streams asked again after a gap."""
        if streams is not None:
            streams = tuple(streams)
            self.streams = tuple(dict.fromkeys((*self.streams, *streams)))
        self.due.update(self.streams if streams is None else streams)
        self._wake.set()

    def on_connected(self, streams: Iterable[str]) -> Callable[[str], Awaitable[None]]:
        """The `ConnSpec.on_connected` hook of a connection carrying `streams`."""
        names = tuple(streams)

        async def connected(conn_id: str) -> None:
            self.request(names)

        return connected

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
                if await self._fetch(name):
                    self.due.discard(name)
                    self.backoff.reset()
                else:
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
        return True
