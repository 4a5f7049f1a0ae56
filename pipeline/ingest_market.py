"""`pipeline ingest market`: the market-data ingestor.

Start-up, in this order, so that a bad setting stops the command before anything connects:
1. when PIPELINE_METRICS_PORT > 0, /metrics and /healthz listen (a port in use: exit 2);
2. `connect_checked(REDIS_URL)`: unreachable Redis is a settings error (exit 2);
3. `PIPELINE_SYMBOLS=ALL` is resolved from `GET /fapi/v1/exchangeInfo` (TRADING symbols);
4. `plan_connections` splits the streams by path and into connections of at most 1024 streams.

Symbols that trade in sessions (contract type TRADIFI_PERPETUAL, named by exchangeInfo when
`ALL` is resolved) are quiet outside their session (`tradingSession` stream, GET
/fapi/v1/tradingSchedule): they get connections of their own, named `mkt-sessions-{n}`,
without the silence rule, and `pipeline status` does not judge those by silence
(`pipeline.health.trades_in_sessions`). Every other connection keeps the rule, so a session's
quiet never hides a wrong path on them.

Then one task per connection (`pipeline.wsconn.WsConnection`, all taking their connection
attempts from one bucket, `pipeline.pacing`) and the writer task (`pipeline.writer.LogWriter`).
/healthz is 503 while Redis has been away for long or any connection is not working
(`MarketIngest.healthy`).
SIGINT/SIGTERM stop the connections (each appends its `closed` entry), the writer then gets up
to `LogWriter.final_flush_timeout` seconds to write what is buffered, and the command exits 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence

import attrs
import redis
import trio

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import ExchangeError, SettingsError
from pipeline.eventlog import route_stream, stream_name
from pipeline.health import SESSION_CONN_NAME
from pipeline.pacing import connect_pacer
from pipeline.redisconn import connect_checked
from pipeline.rest import RestClient
from pipeline.shutdown import serve_until_signal
from pipeline.streams import MAX_STREAMS_PER_CONNECTION, Path, Subscription, plan_connections
from pipeline.weight import WeightBudget
from pipeline.writer import LogWriter
from pipeline.wsconn import PARAMS_PER_MESSAGE, ConnSpec, FrameSink, Timing, WsConnection
from projections.core.keys import KEY_CONN_MARKET, KEY_OTHER

log = logging.getLogger("pipeline.ingest_market")

URL_STREAMS = 200  # streams named in the URL; the rest of a connection's streams are SUBSCRIBEd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-streams-per-connection", type=int,
                        default=MAX_STREAMS_PER_CONNECTION,
                        help="split connections above this many streams (Binance: 1024)")


def main(settings: Settings, args: argparse.Namespace) -> int:
    max_per = int(getattr(args, "max_streams_per_connection", MAX_STREAMS_PER_CONNECTION))
    if not 1 <= max_per <= MAX_STREAMS_PER_CONNECTION:
        raise SettingsError("--max-streams-per-connection",
                            f"{max_per} is not between 1 and {MAX_STREAMS_PER_CONNECTION}")
    # The readers and the Redis writer thread share one GIL; a waiting thread gets it after at
    # most this interval (default 5 ms). At 1 ms the ingestor logs ~10 % more frames per
    # CPU-second (bench/bench_ingest.py).
    sys.setswitchinterval(0.001)
    running: list[MarketIngest] = []
    # first: a port already taken is a bad setting, found before anything connects
    server = metrics.serve(settings.metrics_port, lambda: bool(running) and running[0].healthy()
                           ) if settings.metrics_port > 0 else None
    client = None
    try:
        client = connect_checked(settings.redis_url, name="ingest-market")
        symbols, sessions = trio.run(resolve_market, settings)
        trio.run(serve_until_signal, functools.partial(
            run_market_ingest, settings, client, symbols, max_per_connection=max_per,
            session_symbols=sessions), running)
    finally:
        if server is not None:
            server.shutdown()
        if client is not None:
            client.close()
    return 0


async def resolve_symbols(settings: Settings) -> tuple[str, ...]:
    return (await resolve_market(settings))[0]


async def resolve_market(settings: Settings) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the symbols, those of them that trade in sessions). Only `ALL` reads exchangeInfo;
    a list given is taken as it is, with no session symbols."""
    if settings.symbols is not None:
        return settings.symbols, frozenset()
    rest = RestClient(settings.rest_url,
                      budget=WeightBudget.for_limit(settings.rest_weight_limit))
    try:
        info = await rest.exchange_info()
        symbols = [s["symbol"] for s in info["symbols"] if s.get("status") == "TRADING"]
    except (ExchangeError, KeyError, TypeError) as exc:
        raise SettingsError("PIPELINE_SYMBOLS",
                            f"ALL needs GET /fapi/v1/exchangeInfo from BINANCE_REST_URL: {exc}"
                            ) from None
    finally:
        await rest.aclose()
    if not symbols:
        raise SettingsError("PIPELINE_SYMBOLS", "ALL: exchangeInfo lists no TRADING symbol")
    sessions = session_symbols(info) & set(symbols)
    log.info("symbols resolved from exchangeInfo",
             extra={"symbols": len(symbols), "in_sessions": len(sessions)})
    return tuple(symbols), frozenset(sessions)


# contract types whose symbols trade in sessions (Binance, 2026: TradFi perpetuals)
SESSION_CONTRACT_TYPES = frozenset({"TRADIFI_PERPETUAL"})


def session_symbols(info: object) -> frozenset[str]:
    """The symbols of an exchangeInfo answer that trade in sessions."""
    rows = info.get("symbols") if isinstance(info, dict) else None
    return frozenset(str(r["symbol"]) for r in rows or () if isinstance(r, dict)
                     and r.get("contractType") in SESSION_CONTRACT_TYPES and "symbol" in r)


def market_specs(settings: Settings, symbols: Sequence[str],
                 max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
                 session_symbols: frozenset[str] = frozenset(), *,
                 url_streams: int = URL_STREAMS,
                 params_per_message: int = PARAMS_PER_MESSAGE) -> list[ConnSpec]:
    """One ConnSpec per planned connection: the first `url_streams` streams in the URL, the
    rest SUBSCRIBEd, `params_per_message` a message; the silence rule only where a stream ticks
    at least once a second, and never on the connections of symbols that trade in sessions
    (module doc)."""
    always = [s for s in symbols if s not in session_symbols]
    sessions = [s for s in symbols if s in session_symbols]
    plans = [(f"mkt-{i}", path, subs, True) for i, (path, subs)
             in enumerate(plan_connections(always, settings.market_streams,
                                           max_per_connection), start=1)]
    if sessions:
        plans += [(f"{SESSION_CONN_NAME}-{i}", path, subs, False) for i, (path, subs)
                  in enumerate(plan_connections(sessions, settings.market_streams,
                                                max_per_connection), start=1)]
    return [_spec(settings, name, path, subs, watched=watched, url_streams=url_streams,
                  params_per_message=params_per_message)
            for name, path, subs, watched in plans]


def _spec(settings: Settings, name: str, path: Path, subs: Sequence[Subscription], *,
          watched: bool, url_streams: int, params_per_message: int) -> ConnSpec:
    names = [s.name for s in subs]
    url = f"{settings.ws_url}/{path.value}/stream?streams=" + "/".join(names[:url_streams])
    return ConnSpec(
        name=name, path=path.value, url=_constant(url), route=cached_router(),
        subscribe=tuple(names[url_streams:]), params_per_message=params_per_message,
        silence_timeout=settings.silence_timeout if watched and _ticks(subs) else None,
        rotate_after=settings.rotate_after, streams=len(names))


def market_connections(settings: Settings, symbols: Sequence[str], sink: FrameSink, *,
                       timing: Timing | None = None,
                       max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
                       session_symbols: frozenset[str] = frozenset(),
                       ) -> list[WsConnection]:
    """One `WsConnection` per planned connection, all taking their connection attempts from
    one bucket: Binance counts attempts per IP, whatever connection makes them."""
    pacer = connect_pacer(trio.current_time)
    return [WsConnection(spec, sink, conn_key=KEY_CONN_MARKET, timing=timing or Timing(),
                         pacer=pacer)
            for spec in market_specs(settings, symbols, max_per_connection, session_symbols)]


def cached_router(limit: int = 4096) -> Callable[[bytes], str]:
    """`route_frame` with a cache keyed on the stream name: the key depends on nothing else, and
    a dict lookup costs less than decoding the name and matching its family again."""
    cache: dict[bytes, str] = {}

    def routed(frame: bytes) -> str:
        name = stream_name(frame)
        if name is None:
            return KEY_OTHER
        key = cache.get(name)
        if key is None:
            key = route_stream(name)
            if len(cache) < limit:
                cache[name] = key
        return key

    return routed


def _ticks(subs: Sequence[Subscription]) -> bool:
    return any(s.kind.ticks_every_second for s in subs)


def _constant(url: str) -> Callable[[], str]:
    return lambda: url


@attrs.define(eq=False)
class MarketIngest:
    """What a running ingestor exposes to its caller (tests, the demo)."""

    writer: LogWriter
    connections: list[WsConnection]
    _readers: trio.CancelScope

    def stop(self) -> None:
        """Close the connections; `run_market_ingest` then flushes and returns."""
        self._readers.cancel()

    def healthy(self) -> bool:
        """What /healthz answers: Redis has not been away for long (the writer) and every
        connection works (`WsConnection.healthy`: data within the silence timeout where a
        stream ticks every second, a link up otherwise)."""
        return self.writer.healthy and all(c.healthy for c in self.connections)


async def run_market_ingest(
    settings: Settings,
    client: redis.Redis,
    symbols: Sequence[str],
    *,
    max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
    timing: Timing | None = None,
    writer: LogWriter | None = None,
    session_symbols: frozenset[str] = frozenset(),
    task_status: trio.TaskStatus[MarketIngest] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ingest until `MarketIngest.stop()` (or cancel); then write what is buffered."""
    writer = writer or LogWriter(client, settings.retention, bound=settings.buffer_frames,
                                 max_bytes=settings.buffer_bytes)
    conns = market_connections(settings, symbols, writer, timing=timing,
                               max_per_connection=max_per_connection,
                               session_symbols=session_symbols)
    log.info("ingesting", extra={"connections": len(conns), "symbols": len(symbols)})
    async with trio.open_nursery() as top:
        await top.start(writer.run)
        try:
            async with trio.open_nursery() as readers:
                for conn in conns:
                    readers.start_soon(conn.run)
                task_status.started(MarketIngest(writer, conns, readers.cancel_scope))
        finally:
            # the connections have appended their `closed` entries: write them, then stop
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + writer.final_flush_timeout
                await writer.flush()
            top.cancel_scope.cancel()
