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

Shards: with PIPELINE_SHARD=i/n the ingestor takes only the symbols of shard i
(`pipeline.streams.Shard`: a CRC-32 of the symbol's name mod n, so n ingestors on one host or
many cover the list exactly once and a listing never moves another symbol), shard 1 also the
all-market streams (`!markPrice@arr`); its connections are named `mkt-s{i}of{n}-{k}`
(`mkt-sessions-s{i}of{n}-{k}`), so connection ids, `raw:conn:market` and `pipeline status`
show the shard, and its metrics carry it (`pipeline_process_info{shard}`).

Listings: with PIPELINE_SYMBOLS=ALL, exchangeInfo is read again every
PIPELINE_LISTINGS_EVERY seconds (`Listings`): a new TRADING symbol of this shard is SUBSCRIBEd
on a connection with room (or a new connection), a delisted one UNSUBSCRIBEd, each a `listed`
or `delisted` control entry in `raw:conn:market`. The connections' control messages are paced
per connection (`WsConnection.change_streams`: 5 a second, Binance's limit being 10). Its views
are left to expire as usual.

Then one task per connection (`pipeline.wsconn.WsConnection`, all taking their connection
attempts from one bucket, `pipeline.pacing`), the writer task (`pipeline.writer.LogWriter`)
and, with kline streams and PIPELINE_KLINE_HISTORY > 0, the kline history
(`pipeline.klinehistory`: the last closed candles of each kline stream from REST, at start and
after each reconnect of its connection or frames dropped).
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

import redis
import trio

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import ExchangeError, SettingsError
from pipeline.eventlog import route_stream, stream_name
from pipeline.klinehistory import KlineHistory, kline_names
from pipeline.logs import label_lines
from pipeline.pacing import connect_pacer
from pipeline.redisconn import connect_checked
from pipeline.rest import RestClient
from pipeline.shutdown import serve_until_signal
from pipeline.streams import (
    MAX_STREAMS_PER_CONNECTION,
    MarketPlan,
    PlannedConnection,
    well_formed_symbol,
)
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
    shard = settings.shard.label if settings.shard else None
    metrics.describe("ingest-market", shard=shard)
    if shard is not None:
        label_lines(shard=shard)
    # first: a port already taken is a bad setting, found before anything connects
    server = metrics.serve(settings.metrics_port, lambda: bool(running) and running[0].healthy()
                           ) if settings.metrics_port > 0 else None
    client = None
    try:
        client = connect_checked(settings.redis_url, name="ingest-market",
                                 cluster=settings.redis_cluster)
        symbols, sessions = trio.run(resolve_market, settings)
        if settings.shard is not None and not settings.shard.take(symbols):
            log.warning("no symbol of the list falls in this shard: only listings (with ALL) "
                        "can give it any", extra={"shard": shard, "symbols": len(symbols)})
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
    """One ConnSpec per planned connection of this ingestor's shard (`MarketPlan`)."""
    plan = market_plan(settings, symbols, max_per_connection, session_symbols)
    return [conn_spec(settings, c, url_streams=url_streams,
                      params_per_message=params_per_message) for c in plan.connections]


def market_plan(settings: Settings, symbols: Sequence[str],
                max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
                session_symbols: frozenset[str] = frozenset()) -> MarketPlan:
    return MarketPlan.of(symbols, settings.market_streams, sessions=session_symbols,
                         shard=settings.shard, max_per_connection=max_per_connection)


def conn_spec(settings: Settings, planned: PlannedConnection, *,
              url_streams: int = URL_STREAMS,
              params_per_message: int = PARAMS_PER_MESSAGE,
              history: KlineHistory | None = None) -> ConnSpec:
    """The spec of a planned connection: the first `url_streams` streams it carries at each
    connect in the URL, the rest SUBSCRIBEd, `params_per_message` a message; the silence rule
    only where a stream ticks at least once a second, and never on the connections of
    symbols that trade in sessions (module doc); a connection carrying kline streams makes
    them due in `history` on every (re)connect."""
    base = f"{settings.ws_url}/{planned.path.value}/stream?streams="

    def url() -> str:
        return base + "/".join(planned.names[:url_streams])

    watched = planned.ticks and not planned.sessions

    async def connected(conn_id: str) -> None:  # the klines it carries at this connect
        if history is not None:
            history.connected(kline_names(planned.names))

    klines = history is not None and kline_names(planned.names)
    return ConnSpec(
        name=planned.name, path=planned.path.value, url=url,
        route=cached_router(history=history if klines else None),
        streams_now=planned.carried, params_per_message=params_per_message,
        on_connected=connected if klines else None,
        silence_timeout=settings.silence_timeout if watched else None,
        rotate_after=settings.rotate_after, streams=len(planned.names))


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


def kline_history(settings: Settings, plan: MarketPlan, sink: FrameSink
                  ) -> KlineHistory | None:
    """The kline history of these settings for the streams of `plan` (this shard's); None
    without kline streams or with PIPELINE_KLINE_HISTORY 0."""
    if settings.kline_history <= 0:
        return None
    streams = [n for c in plan.connections for n in kline_names(c.names)]
    if not streams:
        return None
    rest = RestClient(settings.rest_url,
                      budget=WeightBudget.for_limit(settings.rest_weight_limit))
    return KlineHistory(rest, sink, streams, settings.kline_history)


def cached_router(limit: int = 4096, history: KlineHistory | None = None
                  ) -> Callable[[bytes], str]:
    """`route_frame` with a cache keyed on the stream name: the key depends on nothing else, and
    a dict lookup costs less than decoding the name and matching its family again. With
    `history`, the first frame of a kline stream after its connect also goes to
    `history.first_frame` (`pipeline.klinehistory`: it decides whether the history is whole);
    otherwise a frame costs one test of an empty set."""
    cache: dict[bytes, str] = {}
    awaiting: set[bytes] = history.awaiting if history is not None else set()
    first_frame = history.first_frame if history is not None else None

    def routed(frame: bytes) -> str:
        name = stream_name(frame)
        if name is None:
            return KEY_OTHER
        if awaiting and name in awaiting and first_frame is not None:
            first_frame(name, frame)
        key = cache.get(name)
        if key is None:
            key = route_stream(name)
            if len(cache) < limit:
                cache[name] = key
        return key

    return routed


class MarketIngest:
    """What a running ingestor exposes to its caller (tests, the demo), and the owner of its
    connections: one task each, started and stopped as listings change the plan."""

    def __init__(self, writer: LogWriter, plan: MarketPlan, readers: trio.Nursery,
                 make: Callable[[PlannedConnection], WsConnection]) -> None:
        self.writer = writer
        self.plan = plan
        self.connections: list[WsConnection] = []
        self.listings: Listings | None = None
        self.history: KlineHistory | None = None
        self._readers = readers
        self._make = make
        self._scopes: dict[str, trio.CancelScope] = {}

    def start(self, planned: PlannedConnection) -> WsConnection:
        conn = self._make(planned)
        self.connections.append(conn)
        self._readers.start_soon(self._run, conn)
        return conn

    async def _run(self, conn: WsConnection) -> None:
        with trio.CancelScope() as scope:
            self._scopes[conn.spec.name] = scope
            await conn.run()

    def connection(self, name: str) -> WsConnection | None:
        return next((c for c in self.connections if c.spec.name == name), None)

    def stop_connection(self, name: str) -> None:
        """Close one connection (its links append `closed`, reason `shutdown`)."""
        conn = self.connection(name)
        if conn is not None:
            self.connections.remove(conn)
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()

    def stop(self) -> None:
        """Close the connections; `run_market_ingest` then flushes and returns."""
        self._readers.cancel_scope.cancel()

    def healthy(self) -> bool:
        """What /healthz answers: Redis has not been away for long (the writer) and every
        connection works (`WsConnection.healthy`: data within the silence timeout where a
        stream ticks every second, a link up otherwise)."""
        return self.writer.healthy and all(c.healthy for c in list(self.connections))


async def run_market_ingest(
    settings: Settings,
    client: redis.Redis,
    symbols: Sequence[str],
    *,
    max_per_connection: int = MAX_STREAMS_PER_CONNECTION,
    timing: Timing | None = None,
    writer: LogWriter | None = None,
    session_symbols: frozenset[str] = frozenset(),
    rest: RestClient | None = None,
    task_status: trio.TaskStatus[MarketIngest] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ingest `symbols` (this shard's part of them, with PIPELINE_SHARD) until
    `MarketIngest.stop()` (or cancel); then write what is buffered. With PIPELINE_SYMBOLS=ALL
    the symbols follow exchangeInfo (`Listings`, on `rest` or a client of the settings)."""
    writer = writer or LogWriter(client, settings.retention, bound=settings.buffer_frames,
                                 max_bytes=settings.buffer_bytes)
    plan = market_plan(settings, symbols, max_per_connection, session_symbols)
    pacer = connect_pacer(trio.current_time)

    history = kline_history(settings, plan, writer)

    def make(planned: PlannedConnection) -> WsConnection:
        return WsConnection(conn_spec(settings, planned, history=history), writer,
                            conn_key=KEY_CONN_MARKET, timing=timing or Timing(), pacer=pacer)

    follow = settings.symbols is None
    own_rest = follow and rest is None
    if follow and rest is None:
        rest = RestClient(settings.rest_url,
                          budget=WeightBudget.for_limit(settings.rest_weight_limit))
    log.info("ingesting", extra={"connections": len(plan.connections),
                                 "symbols": len(plan.symbols),
                                 "shard": settings.shard.label if settings.shard else "-"})
    try:
        async with trio.open_nursery() as top:
            await top.start(writer.run)
            if history is not None:
                top.start_soon(history.serve, writer.buffer.drops)
            try:
                async with trio.open_nursery() as readers:
                    ingest = MarketIngest(writer, plan, readers, make)
                    ingest.history = history
                    for planned in plan.connections:
                        ingest.start(planned)
                    if rest is not None and follow:
                        ingest.listings = Listings(ingest, rest, settings.listings_every)
                        readers.start_soon(ingest.listings.run)
                    task_status.started(ingest)
            finally:
                # the connections have appended their `closed` entries: write them, then stop
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + writer.final_flush_timeout
                    await writer.flush()
                top.cancel_scope.cancel()
    finally:
        if own_rest and rest is not None:
            with trio.CancelScope(shield=True):
                await rest.aclose()


# --- listings that change while running ---------------------------------------------------------

def listing_changes(plan: MarketPlan, info: object
                    ) -> tuple[list[tuple[str, bool]], list[str]]:
    """What an exchangeInfo answer changes in `plan`: ([(new TRADING symbol of this shard,
    trades in sessions)], [planned symbol no longer TRADING or no longer listed]). An answer
    listing no TRADING symbol at all changes nothing: an exchange in trouble does not delist
    the whole market."""
    rows = info.get("symbols") if isinstance(info, dict) else None
    trading = {str(r["symbol"]) for r in rows or () if isinstance(r, dict)
               and r.get("status") == "TRADING" and well_formed_symbol(r.get("symbol"))}
    if not trading:
        return [], []
    mine = set(plan.shard.take(trading)) if plan.shard else trading
    sessions = session_symbols(info)
    added = [(s, s in sessions) for s in sorted(mine - set(plan.symbols))]
    removed = sorted(set(plan.symbols) - mine)
    return added, removed


class Listings:
    """With PIPELINE_SYMBOLS=ALL, exchangeInfo is read again every `every` seconds: a new
    TRADING symbol of this shard is subscribed on a connection with room (a new connection
    when none has), a symbol no longer TRADING is unsubscribed (a connection left with no
    stream is closed), each recorded as a `listed` / `delisted` control entry in
    `raw:conn:market` (`symbol`, `streams`, `conns`: the connection names). Its views expire as
    usual. A failed exchangeInfo is a warning; the next period tries again."""

    def __init__(self, ingest: MarketIngest, rest: RestClient, every: float) -> None:
        self.ingest = ingest
        self.rest = rest
        self.every = every
        self.checks = 0

    async def run(self) -> None:
        while True:
            await trio.sleep(self.every)
            await self.check()

    async def check(self) -> tuple[list[str], list[str]]:
        """One look at exchangeInfo: (symbols subscribed, symbols unsubscribed)."""
        self.checks += 1
        try:
            info = await self.rest.exchange_info()
        except ExchangeError as exc:
            log.warning("listings: exchangeInfo failed; trying again later",
                        extra={"error": str(exc), "in_s": self.every})
            return [], []
        added, removed = listing_changes(self.ingest.plan, info)
        changes: dict[str, tuple[list[str], list[str]]] = {}
        for symbol, sessions in added:
            placed = self.ingest.plan.add(symbol, sessions)
            for planned, names, new in placed:
                if new:
                    self.ingest.start(planned)  # its URL and SUBSCRIBEs carry them
                else:
                    changes.setdefault(planned.name, ([], []))[0].extend(names)
                if self.ingest.history is not None and kline_names(names):
                    # a new list: its history, judged again by the stream's first frame
                    self.ingest.history.connected(kline_names(names))
            self._record("listed", symbol, [(c, n) for c, n, _ in placed])
        for symbol in removed:
            taken = self.ingest.plan.remove(symbol)
            for planned, names in taken:
                if planned.names:
                    changes.setdefault(planned.name, ([], []))[1].extend(names)
                else:
                    self.ingest.stop_connection(planned.name)
            self._record("delisted", symbol, taken)
        for name, (subscribe, unsubscribe) in changes.items():
            conn = self.ingest.connection(name)
            if conn is not None:
                await conn.change_streams(subscribe, unsubscribe)
        return [s for s, _ in added], removed

    def _record(self, ctl: str, symbol: str,
                where: Sequence[tuple[PlannedConnection, list[str]]]) -> None:
        streams = [n for _, names in where for n in names]
        conns = [c.name for c, _ in where]
        log.info(f"symbol {ctl}", extra={"symbol": symbol, "streams": len(streams),
                                         "conns": ",".join(conns)})
        metrics.LISTING_CHANGES.labels(ctl).inc()
        self.ingest.writer.append_control(KEY_CONN_MARKET, ctl, {
            "symbol": symbol, "streams": streams, "conns": conns})
