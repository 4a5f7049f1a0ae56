"""`pipeline ingest user`: the user-data ingestor.

Start-up, in this order, so that a bad setting stops the command before anything connects:
1. `Settings.require_api_key()`: no BINANCE_API_KEY (or _SECRET) is a settings error (exit 2);
   a secret that is a PEM Ed25519 private key signs with Ed25519, anything else with HMAC;
2. `connect_checked(REDIS_URL)` (exit 2 when unreachable);
3. `start_checks`: clock offset (`GET /fapi/v1/time`), one signed call, then the listenKey.
   A refused key or a wrong secret is a settings error naming it (exit 2); no answer, a 5xx, a
   429/418 or a body that is not the expected JSON is retried with backoff for
   `--start-retry-for` seconds (a 429/418 waits as long as the exchange says, so a restarted
   container cannot ignore it), then: still no answer names BINANCE_REST_URL (exit 2), anything
   else is an exchange failure (one line, exit 1). The signed call comes before the key, so a
   failed start never touches the key every process of this API key shares.

Then, in one nursery:
- the writer (`pipeline.writer.LogWriter`): every frame of the private stream goes to `raw:user`
  byte-exact, as market frames go to theirs; connection lifecycle to `raw:conn:user`, and there
  too each REST back-off after a 429/418 (`rest_backoff`, which `pipeline status` shows);
- the connection (`pipeline.wsconn.WsConnection`) to `/private/ws?listenKey=K&events=...`
  naming every event type Binance documents (`USER_EVENTS`: `/private` delivers only the types
  `events=` names). The URL is built per connect from the current key, and is logged and
  recorded only through `redact_url`. No silence rule: a quiet account sends nothing for
  hours. Rotation before 24 h as for market connections;
- the listenKey keep-alive (`pipeline.listenkey`): PUT every `--keepalive-every` seconds; on
  -1125 a new key and a reconnect;
- reconciliation (`pipeline.reconcile`) on every connect and reconnect (the connection's
  `on_connected` hook) and every `--reconcile-every` seconds;
- a `listenKeyExpired` frame (logged with the dead key masked, see `redact_key`) makes a new
  key; the connection is closed and reopened with it; the reconnect reconciles.

The key is the account's: another process with the same API key holds the same one, and its
DELETE (a redeploy's shutdown) closes this process's connection with code 4001. Any
connection the server ended is therefore followed by a POST for the account's live key before
the reconnect (with the connection's backoff), and the reconnect reconciles, searching the
orders of the outage (`Reconciler.note_outage`).

Several accounts: one process per account. `PIPELINE_ACCOUNT=a1` (with that account's API key
and secret) logs to `raw:user:a1` and `raw:conn:user:a1`, reconciles against the open orders of
`P:acct:a1:...` (`projections.core.keys`), names its connection `usr-a1` and labels its
metrics and log lines with the account; unset, every name is as it always was. Binance's
combined `/private/stream` would carry several accounts' `listenKey`/`events` pairs on one
connection, but then one process would hold every account's secret, one connection's fate
(a 4001, a ban, a crash) would be every account's, and `/healthz` could not say which account
is down. One process each keeps an account's key, listenKey, connection, REST budget and
failure to itself.

SIGINT/SIGTERM: the connection closes (its `closed` entry), the writer gets up to
`LogWriter.final_flush_timeout` s for what is buffered, and the command exits 0. The key is
left to live out its hour (other processes may be using it) unless `--close-listen-key` asks
for a DELETE. A failure at the exchange that no setting explains ends the command with one
line, exit 1.
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import httpx
import orjson
import redis
import trio

from pipeline import metrics
from pipeline.backoff import Backoff
from pipeline.config import Secret, Settings, redact_url
from pipeline.errors import ExchangeError, SettingsError
from pipeline.listenkey import DEFAULT_KEEPALIVE_S, ListenKeys
from pipeline.logs import label_lines
from pipeline.reconcile import Reconciler
from pipeline.redisconn import connect_checked, make_client
from pipeline.rest import BackoffNotice, BadAnswer, RateLimited, RestClient
from pipeline.shutdown import serve_until_signal
from pipeline.signing import (
    DEFAULT_RECV_WINDOW_MS,
    MAX_RECV_WINDOW_MS,
    SignedRest,
    Signer,
    make_signer,
)
from pipeline.weight import WeightBudget
from pipeline.writer import LogWriter
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from projections.core.keys import Keys

log = logging.getLogger("pipeline.ingest_user")

# Every event type of the USDⓈ-M user data stream, as Binance's documentation lists them on
# 2026-12-01 (ten). `/private` delivers only the types `events=` names, so a type missing here
# never reaches the log: this is the one list, and a new type Binance documents goes here.
USER_EVENTS_AS_OF = "2026-12-01"
USER_EVENTS = (
    "ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE", "TRADE_LITE", "MARGIN_CALL",
    "ACCOUNT_CONFIG_UPDATE", "STRATEGY_UPDATE", "GRID_UPDATE",
    "CONDITIONAL_ORDER_TRIGGER_REJECT", "listenKeyExpired",
)
DEFAULT_RECONCILE_S = 300.0
DEFAULT_START_RETRY_S = 300.0
DEFAULT_OUTAGE_LOOKBACK_S = 86_400.0
CONN_NAME = "usr"  # an account's connection: `usr-{label}`
CLOSE_KEY_TIMEOUT_S = 5.0
# an outage is searched from a little before the stream last showed it was up: a dead
# connection is noticed late, and the clocks of the two ends differ by up to this
OUTAGE_MARGIN_MS = 60_000
# closes that are not an outage: ours (shutdown, rotation, a key we replaced on purpose)
PLANNED_CLOSES = ("shutdown", "rotated")
KEY_REPLACED_CLOSES = ("listen_key_expired", "listen_key_replaced")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reconcile-every", type=float, default=DEFAULT_RECONCILE_S,
                        help="seconds between periodic REST reconciliations (default 300)")
    parser.add_argument("--keepalive-every", type=float, default=DEFAULT_KEEPALIVE_S,
                        help="seconds between listenKey keep-alives (default 1800; key lives 3600)")
    parser.add_argument("--recv-window", type=int, default=DEFAULT_RECV_WINDOW_MS,
                        help="recvWindow of signed requests in ms (default 5000, max 60000)")
    parser.add_argument("--start-retry-for", type=float, default=DEFAULT_START_RETRY_S,
                        help="seconds the start checks retry an exchange that fails or does "
                             "not answer (default 300)")
    parser.add_argument("--outage-lookback", type=float, default=DEFAULT_OUTAGE_LOOKBACK_S,
                        help="at start, search orders opened and closed this many seconds "
                             "back, the outage before this process being unknown (default "
                             "86400; 0: none)")
    parser.add_argument("--close-listen-key", action="store_true",
                        help="DELETE the listenKey at shutdown. It is the account's, shared by "
                             "every process with this API key: their streams close too")


@attrs.frozen
class UserOptions:
    reconcile_every: float = DEFAULT_RECONCILE_S
    keepalive_every: float = DEFAULT_KEEPALIVE_S
    recv_window_ms: int = DEFAULT_RECV_WINDOW_MS
    start_retry_for: float = DEFAULT_START_RETRY_S
    outage_lookback: float = DEFAULT_OUTAGE_LOOKBACK_S
    close_listen_key: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UserOptions:
        opts = cls(float(getattr(args, "reconcile_every", DEFAULT_RECONCILE_S)),
                   float(getattr(args, "keepalive_every", DEFAULT_KEEPALIVE_S)),
                   int(getattr(args, "recv_window", DEFAULT_RECV_WINDOW_MS)),
                   float(getattr(args, "start_retry_for", DEFAULT_START_RETRY_S)),
                   float(getattr(args, "outage_lookback", DEFAULT_OUTAGE_LOOKBACK_S)),
                   bool(getattr(args, "close_listen_key", False)))
        if opts.reconcile_every <= 0:
            raise SettingsError("--reconcile-every", f"{opts.reconcile_every:g} must be > 0")
        if not 0 < opts.keepalive_every < 3600:
            raise SettingsError("--keepalive-every",
                                f"{opts.keepalive_every:g} must be between 0 and 3600 (key life)")
        if not 0 < opts.recv_window_ms <= MAX_RECV_WINDOW_MS:
            raise SettingsError("--recv-window", f"{opts.recv_window_ms} must be 1..60000")
        if opts.start_retry_for < 0:
            raise SettingsError("--start-retry-for", f"{opts.start_retry_for:g} must be >= 0")
        if opts.outage_lookback < 0:
            raise SettingsError("--outage-lookback", f"{opts.outage_lookback:g} must be >= 0")
        return opts


def main(settings: Settings, args: argparse.Namespace) -> int:
    api_key, api_secret = settings.require_api_key()
    signer = make_signer(api_secret)
    opts = UserOptions.from_args(args)
    role = f"ingest-user-{settings.account}" if settings.account else "ingest-user"
    client = connect_checked(settings.redis_url, name=role,
                             cluster=settings.redis_cluster)
    metrics.describe("ingest-user", account=settings.account)
    if settings.account:
        label_lines(account=settings.account)
    running: list[UserIngest] = []
    server = metrics.serve(settings.metrics_port, lambda: bool(running) and running[0].healthy()
                           ) if settings.metrics_port > 0 else None
    try:
        try:
            trio.run(serve_until_signal, functools.partial(
                run_user_ingest, settings, client, api_key, signer, opts), running)
        except BaseExceptionGroup as group:
            raise _first_of(group) from None  # one line for the CLI, not a nursery's traceback
    except ExchangeError as exc:
        # the exchange failed in a way no setting explains: one line, no secret, exit 1
        log.error("cannot run the user stream", extra={"error": str(exc)})
        return 1
    finally:
        if server is not None:
            server.shutdown()
        client.close()
    return 0


def _first_of(group: BaseExceptionGroup) -> BaseException:
    """The SettingsError or ExchangeError a nursery wrapped, else the group itself."""
    found: BaseException | None = group.subgroup(
        lambda e: isinstance(e, SettingsError | ExchangeError))
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found or group


# Binance codes that mean a setting is wrong, and which one.
SETTING_OF_CODE = {-2014: "BINANCE_API_KEY", -2015: "BINANCE_API_KEY",
                   -1022: "BINANCE_API_SECRET"}
START_BACKOFF_BASE_S = 1.0
START_BACKOFF_CAP_S = 30.0
T = TypeVar("T")


def transient(exc: ExchangeError) -> bool:
    """A failure a later attempt can get past: no answer, a 5xx, a rate limit, a lost body."""
    return (exc.status is None or exc.status >= 500 or isinstance(exc, RateLimited | BadAnswer))


async def start_checks(api: SignedRest, keys: ListenKeys, rest_url: str,
                       retry_for: float = DEFAULT_START_RETRY_S,
                       rand: Callable[[], float] = random.random) -> None:
    """Clock offset, one signed call (GET /fapi/v2/balance, weight 5), then the listenKey, so
    that an unreachable REST URL, a refused key or a wrong secret stops the command at start
    with a settings error instead of failing every reconciliation later (module doc)."""
    deadline = trio.current_time() + retry_for
    retry = functools.partial(_retrying, rest_url=rest_url, retry_for=retry_for,
                              backoff=Backoff(START_BACKOFF_BASE_S, START_BACKOFF_CAP_S, rand),
                              wall=api.rest.clock)
    offset, deadline = await retry("clock offset", api.sync_time, deadline)
    log.info("clock offset to the exchange", extra={"offset_ms": offset})
    _, deadline = await retry("signed call", functools.partial(
        api.signed, "GET", "/fapi/v2/balance", weight=5, expect=list), deadline)
    await retry("listenKey", keys.create, deadline)


async def _retrying(what: str, call: Callable[[], Awaitable[T]], deadline: float, *,
                    rest_url: str, retry_for: float, backoff: Backoff,
                    wall: Callable[[], float]) -> tuple[T, float]:
    """`call()` until it answers; (its result, the deadline, pushed back past a rate limit's
    end so that the calls after the wait get their retries too)."""
    while True:
        try:
            return await call(), deadline
        except ExchangeError as exc:
            if exc.code in SETTING_OF_CODE:
                raise SettingsError(SETTING_OF_CODE[exc.code],
                                    f"refused by the exchange: {exc}") from None
            if not transient(exc):
                raise
            if isinstance(exc, RateLimited):
                # the client itself waits for the back-off before its next call
                # (`until` is on the client's clock, the deadline on trio's)
                deadline = max(deadline, trio.current_time() + max(0.0, exc.until - wall()) +
                               min(retry_for, START_BACKOFF_CAP_S))
                delay = 0.0
            else:
                delay = backoff.next_delay()
            if trio.current_time() + delay > deadline:
                _give_up(what, exc, rest_url, retry_for)
            log.warning("start check failed; retrying", extra={
                "check": what, "error": str(exc), "in_s": round(delay, 2)})
            await trio.sleep(delay)


def _give_up(what: str, exc: ExchangeError, rest_url: str, retry_for: float) -> None:
    if exc.status is None:
        raise SettingsError("BINANCE_REST_URL", f"cannot reach {redact_url(rest_url)} "
                            f"(retried for {retry_for:g} s): {exc}") from None
    raise ExchangeError(f"start check '{what}' still failing after {retry_for:g} s: {exc}",
                        status=exc.status, code=exc.code) from None


def private_url(ws_base: str, key: Secret, events: tuple[str, ...] = USER_EVENTS) -> str:
    """The private stream URL. It holds the key: pass it only through redact_url to logs."""
    return f"{ws_base}/private/ws?listenKey={key.value}&events={'/'.join(events)}"


def is_listen_key_expired(frame: bytes) -> bool:
    """True for the `listenKeyExpired` event. The substring test keeps other frames unparsed."""
    if b"listenKeyExpired" not in frame:
        return False
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("e") == "listenKeyExpired"


def redact_key(frame: bytes) -> bytes:
    """`listenKeyExpired` names the expired key (`"listenKey":"..."`). A key never goes to
    Redis, so its value is replaced by `***` in that frame; every other byte stays as sent."""
    try:
        key = orjson.loads(frame).get("listenKey")
    except (orjson.JSONDecodeError, AttributeError):
        return frame
    if not isinstance(key, str) or not key:
        return frame
    return frame.replace(key.encode(), b"***")


class _FrameTap:
    """The writer as the connection sees it: frames pass `tap` on their way to the log, and
    the connection's lifecycle entries pass `watch` (the session learns why a link ended).

    WsConnection calls only `append_frame` and `append_control`; routing stays a pure function.
    """

    def __init__(self, writer: LogWriter, tap: Callable[[bytes], bytes],
                 watch: Callable[[str, Mapping[str, Any]], None]) -> None:
        self.writer = writer
        self.tap = tap
        self.watch = watch

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        return self.writer.append_frame(key, self.tap(frame), recv_ts, conn, seq)

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = "") -> bool:
        self.watch(ctl, body)
        return self.writer.append_control(key, ctl, body, conn)


@attrs.define(eq=False)
class UserIngest:
    """What a running user ingestor exposes to its caller (tests, the demo)."""

    writer: LogWriter
    connection: WsConnection
    keys: ListenKeys
    reconciler: Reconciler
    _readers: trio.CancelScope

    def stop(self) -> None:
        """Close the connection; `run_user_ingest` then flushes (and closes the key only with
        `--close-listen-key`) and returns."""
        self._readers.cancel()

    def healthy(self) -> bool:
        """What /healthz answers: Redis has not been away for long (the writer) and the
        private connection works (`WsConnection.healthy`: a link up within `down_after`)."""
        return self.writer.healthy and self.connection.healthy


_ORDER_EVENTS = (b'"ORDER_TRADE_UPDATE"', b'"ALGO_UPDATE"', b'"TRADE_LITE"')


def event_symbol(frame: bytes) -> str | None:
    """The symbol of an order event (ORDER_TRADE_UPDATE, ALGO_UPDATE, TRADE_LITE), else None;
    other frames are not parsed."""
    if not any(tag in frame for tag in _ORDER_EVENTS):
        return None
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    inner = doc.get("o") if isinstance(doc.get("o"), dict) else doc
    symbol = inner.get("s") if isinstance(inner, dict) else None
    return symbol if isinstance(symbol, str) and symbol else None


class _Session:
    """The parts that react to each other: key changes reconnect, connects reconcile, a link
    the server ended renews the key and makes the next reconciliation search the outage."""

    def __init__(self, settings: Settings, api: SignedRest, writer: LogWriter,
                 views: redis.Redis, opts: UserOptions, timing: Timing) -> None:
        self.settings = settings
        self.api = api
        self.writer = writer
        self.names = Keys(settings.view_prefix, account=settings.account)
        self.raw_key = self.names.raw_user()
        self.keys = ListenKeys(api, keepalive_every=opts.keepalive_every)
        self.reconciler = Reconciler(api, views, settings.view_prefix, self._append,
                                     symbols=settings.symbols or (), account=settings.account)
        self.expired = trio.Event()
        self.stale: Secret | None = None  # a key the stream said is expired, until replaced
        self.renew_key = False  # the last link ended by the server's doing: POST first
        self.last_frame_ms: int | None = None  # exchange clock, the newest frame's receipt
        self.connection = WsConnection(ConnSpec(
            name=conn_name(settings.account), path="private", url=self._url, route=self._route,
            on_connected=self._on_connected, silence_timeout=None,
            rotate_after=settings.rotate_after, streams=1,
            # a quiet account may send nothing for hours: hand over as soon as the new
            # connection is up; both carry every event meanwhile, so none is missed
            handover_on_connect=True),
            _FrameTap(writer, self.on_frame, self.on_lifecycle),
            conn_key=self.names.raw_conn_user(), timing=timing)

    def _append(self, ctl: str, body: Mapping[str, Any]) -> None:
        self.writer.append_control(self.raw_key, ctl, body)

    def rest_backoff(self, notice: BackoffNotice) -> None:
        """A 429/418 answer: recorded where `pipeline status` reads the user ingestor."""
        self.writer.append_control(self.names.raw_conn_user(), "rest_backoff",
                                   notice.to_json())

    async def _url(self) -> str:
        if self.stale is not None:
            # the stream announced expiry before the watcher replaced the key: do it now
            await self._replace_stale()
        elif self.renew_key:
            await self._renew()
        return private_url(self.settings.ws_url, self.keys.current())

    async def _replace_stale(self) -> None:
        try:
            await self.keys.replace(self.stale)
        except ExchangeError as exc:
            # kept stale: the next connect tries again, after the connection's backoff
            log.warning("cannot replace the expired listenKey", extra={"error": str(exc)})
            return
        self.stale = None
        self.renew_key = False

    async def _renew(self) -> None:
        """The account's live key before reconnecting (another process's DELETE or expiry
        leaves the held key dead: connecting with it would only be closed again, 4001)."""
        rest = self.api.rest
        if rest.budget.delay_before(1, rest.clock(), essential=True) > 0:
            # banned (418): waiting for the ban's end here would hold the websocket back too
            log.warning("REST banned: reconnecting with the key held, renewing later")
            return
        try:
            await self.keys.renew()
            self.renew_key = False
        except ExchangeError as exc:
            # try the held key; a close by the server brings us back here, after the backoff
            log.warning("cannot renew the listenKey before reconnecting",
                        extra={"error": str(exc)})

    def _route(self, frame: bytes) -> str:
        return self.raw_key

    def on_frame(self, frame: bytes) -> bytes:
        """Sees each frame before it is logged: notes the symbols the account trades, notices
        the expiry announcement, and takes the (dead) key out of it, the one change ever made
        to a logged frame (see `redact_key`)."""
        self.last_frame_ms = self.api.server_clock.now_ms()
        symbol = event_symbol(frame)
        if symbol is not None:
            self.reconciler.saw_symbol(symbol)
        if not is_listen_key_expired(frame):
            return frame
        self.stale = self.keys.key
        self.expired.set()
        return redact_key(frame)

    def on_lifecycle(self, ctl: str, body: Mapping[str, Any]) -> None:
        """A link's `closed` entry: unless we closed it on purpose, the stream is down from
        about its last frame, and the key it used may be dead."""
        if ctl != "closed":
            return
        reason = str(body.get("reason", ""))
        if reason in PLANNED_CLOSES:
            return
        now = self.api.server_clock.now_ms()
        since = min(now, self.last_frame_ms or now) - OUTAGE_MARGIN_MS
        self.reconciler.note_outage(since)
        if reason not in KEY_REPLACED_CLOSES:
            self.renew_key = True
        log.warning("user stream down: renewing the key, reconnecting, then reconciling",
                    extra={"reason": reason})

    async def _on_connected(self, conn_id: str) -> None:
        self.reconciler.stream_up()
        await self.reconciler.run_once(f"connected {conn_id}")

    async def watch_expiry(self) -> None:
        while True:
            await self.expired.wait()
            self.expired = trio.Event()
            log.warning("listenKeyExpired on the stream: new key, reconnect, reconcile")
            if self.stale is not None:
                await self._replace_stale()
            self.reconnect("listen_key_expired")

    async def key_replaced(self) -> None:
        self.reconnect("listen_key_replaced")

    def reconnect(self, reason: str) -> None:
        link = self.connection.current
        if link is not None:
            link.close(reason)


def conn_name(account: str | None) -> str:
    """`usr`, or `usr-a1` for account `a1`: its connection ids are `usr-a1-{6 hex}`."""
    return f"{CONN_NAME}-{account}" if account else CONN_NAME


def rest_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None,
                **kw: Any) -> RestClient:
    """The REST client with the weight budget of the settings (`PIPELINE_REST_WEIGHT_LIMIT`)."""
    return RestClient(settings.rest_url, transport=transport,
                      budget=WeightBudget.for_limit(settings.rest_weight_limit), **kw)


async def run_user_ingest(
    settings: Settings,
    client: redis.Redis,
    api_key: Secret,
    signer: Signer,
    opts: UserOptions = UserOptions(),
    *,
    timing: Timing | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[UserIngest] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ingest the user stream until `UserIngest.stop()` (or cancel); then write what is
    buffered (and DELETE the key with `opts.close_listen_key`)."""
    writer = LogWriter(client, settings.retention, bound=settings.buffer_frames,
                       max_bytes=settings.buffer_bytes, user_wait_ms=settings.user_wait_ms)
    notices: list[Callable[[BackoffNotice], None]] = []
    rest = rest_client(settings, transport, on_backoff=lambda n: [f(n) for f in notices])
    api = SignedRest(rest, api_key, signer, recv_window_ms=opts.recv_window_ms)
    views = make_client(settings.redis_url, name="ingest-user-views")
    session = _Session(settings, api, writer, views, opts, timing or Timing())
    notices.append(session.rest_backoff)
    try:
        async with trio.open_nursery() as top:
            await top.start(writer.run)  # first: a back-off during the checks is recorded
            try:
                await start_checks(api, session.keys, settings.rest_url, opts.start_retry_for)
                if opts.outage_lookback > 0:
                    session.reconciler.note_outage(
                        api.server_clock.now_ms() - int(opts.outage_lookback * 1000))
                await _stream(session, opts, task_status)
            finally:
                if opts.close_listen_key:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + CLOSE_KEY_TIMEOUT_S
                        await session.keys.close()
                # the writer's own shutdown writes what is buffered (`closed` entry included)
                top.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await rest.aclose()
        views.close()


async def _stream(session: _Session, opts: UserOptions,
                  task_status: trio.TaskStatus[UserIngest]) -> None:
    """The connection and its companions, until `UserIngest.stop()`."""
    async with trio.open_nursery() as readers:
        readers.start_soon(session.connection.run)
        readers.start_soon(session.keys.keep_alive, session.key_replaced)
        readers.start_soon(session.reconciler.every, opts.reconcile_every)
        readers.start_soon(session.watch_expiry)
        task_status.started(UserIngest(session.writer, session.connection, session.keys,
                                       session.reconciler, readers.cancel_scope))
