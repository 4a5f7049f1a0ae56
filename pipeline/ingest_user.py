"""`pipeline ingest user`: the user-data ingestor.

Start-up, in this order, so that a bad setting stops the command before anything connects:
1. `Settings.require_api_key()`: no BINANCE_API_KEY (or _SECRET) is a settings error (exit 2);
   a secret that is a PEM Ed25519 private key signs with Ed25519, anything else with HMAC;
2. `connect_checked(REDIS_URL)` (exit 2 when unreachable);
3. `start_checks`: clock offset (`GET /fapi/v1/time`), listenKey, one signed call; an
   unreachable REST URL, a refused key or a wrong secret is a settings error naming it.

Then, in one nursery:
- the writer (`pipeline.writer.LogWriter`): every frame of the private stream goes to `raw:user`
  byte-exact, as market frames go to theirs; connection lifecycle to `raw:conn:user`;
- the connection (`pipeline.wsconn.WsConnection`) to `/private/ws?listenKey=K&events=...`
  naming every event type the projections consume. The URL is built per connect from the
  current key, and is logged and recorded only through `redact_url`. No silence rule: a quiet
  account sends nothing for hours. Rotation before 24 h as for market connections;
- the listenKey keep-alive (`pipeline.listenkey`): PUT every `--keepalive-every` seconds; on
  -1125 a new key and a reconnect;
- reconciliation (`pipeline.reconcile`) on every connect and reconnect (the connection's
  `on_connected` hook) and every `--reconcile-every` seconds;
- a `listenKeyExpired` frame (logged with the dead key masked, see `redact_key`) makes a new
  key; the connection is closed and reopened with it; the reconnect reconciles.

SIGINT/SIGTERM: the connection closes (its `closed` entry), the key is DELETEd, the writer gets
up to `LogWriter.final_flush_timeout` s for what is buffered, and the command exits 0. A
failure at the exchange that no setting explains ends the command with one line, exit 1.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httpx
import orjson
import redis
import trio

from pipeline import metrics
from pipeline.config import Secret, Settings, redact_url
from pipeline.errors import ExchangeError, SettingsError
from pipeline.listenkey import DEFAULT_KEEPALIVE_S, ListenKeys
from pipeline.reconcile import Reconciler
from pipeline.redisconn import connect_checked, make_client
from pipeline.rest import RestClient
from pipeline.shutdown import serve_until_signal
from pipeline.signing import (
    DEFAULT_RECV_WINDOW_MS,
    MAX_RECV_WINDOW_MS,
    SignedRest,
    Signer,
    make_signer,
)
from pipeline.writer import LogWriter
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from projections.core.keys import KEY_CONN_USER, KEY_USER

log = logging.getLogger("pipeline.ingest_user")

# Every user-data event type the projections consume (the `events=` filter of /private/ws).
USER_EVENTS = (
    "ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE", "TRADE_LITE", "MARGIN_CALL",
    "ACCOUNT_CONFIG_UPDATE", "STRATEGY_UPDATE", "listenKeyExpired",
)
DEFAULT_RECONCILE_S = 300.0
CONN_NAME = "usr"
CLOSE_KEY_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reconcile-every", type=float, default=DEFAULT_RECONCILE_S,
                        help="seconds between periodic REST reconciliations (default 300)")
    parser.add_argument("--keepalive-every", type=float, default=DEFAULT_KEEPALIVE_S,
                        help="seconds between listenKey keep-alives (default 1800; key lives 3600)")
    parser.add_argument("--recv-window", type=int, default=DEFAULT_RECV_WINDOW_MS,
                        help="recvWindow of signed requests in ms (default 5000, max 60000)")


@attrs.frozen
class UserOptions:
    reconcile_every: float = DEFAULT_RECONCILE_S
    keepalive_every: float = DEFAULT_KEEPALIVE_S
    recv_window_ms: int = DEFAULT_RECV_WINDOW_MS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UserOptions:
        opts = cls(float(getattr(args, "reconcile_every", DEFAULT_RECONCILE_S)),
                   float(getattr(args, "keepalive_every", DEFAULT_KEEPALIVE_S)),
                   int(getattr(args, "recv_window", DEFAULT_RECV_WINDOW_MS)))
        if opts.reconcile_every <= 0:
            raise SettingsError("--reconcile-every", f"{opts.reconcile_every:g} must be > 0")
        if not 0 < opts.keepalive_every < 3600:
            raise SettingsError("--keepalive-every",
                                f"{opts.keepalive_every:g} must be between 0 and 3600 (key life)")
        if not 0 < opts.recv_window_ms <= MAX_RECV_WINDOW_MS:
            raise SettingsError("--recv-window", f"{opts.recv_window_ms} must be 1..60000")
        return opts


def main(settings: Settings, args: argparse.Namespace) -> int:
    api_key, api_secret = settings.require_api_key()
    signer = make_signer(api_secret)
    opts = UserOptions.from_args(args)
    client = connect_checked(settings.redis_url, name="ingest-user")
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


async def start_checks(api: SignedRest, keys: ListenKeys, rest_url: str) -> None:
    """Clock offset, listenKey, and one signed call (GET /fapi/v2/balance, weight 5), so that
    an unreachable REST URL, a refused key or a wrong secret stops the command at start with a
    settings error instead of failing every reconciliation later."""
    try:
        offset = await api.sync_time()
        log.info("clock offset to the exchange", extra={"offset_ms": offset})
        await keys.create()
        try:
            await api.signed("GET", "/fapi/v2/balance", weight=5)
        except ExchangeError:
            await keys.close()
            raise
    except ExchangeError as exc:
        if exc.status is None:
            raise SettingsError("BINANCE_REST_URL",
                                f"cannot reach {redact_url(rest_url)}: {exc}") from None
        if exc.code in SETTING_OF_CODE:
            raise SettingsError(SETTING_OF_CODE[exc.code],
                                f"refused by the exchange: {exc}") from None
        raise


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
    """The writer as the connection sees it: frames pass `tap` on their way to the log.

    WsConnection calls only `append_frame` and `append_control`; routing stays a pure function.
    """

    def __init__(self, writer: LogWriter, tap: Callable[[bytes], bytes]) -> None:
        self.writer = writer
        self.tap = tap

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        return self.writer.append_frame(key, self.tap(frame), recv_ts, conn, seq)

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = "") -> bool:
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
        """Close the connection; `run_user_ingest` then closes the key, flushes and returns."""
        self._readers.cancel()

    def healthy(self) -> bool:
        return self.writer.healthy and self.connection.current is not None


class _Session:
    """The parts that react to each other: key changes reconnect, connects reconcile."""

    def __init__(self, settings: Settings, api: SignedRest, writer: LogWriter,
                 views: redis.Redis, opts: UserOptions, timing: Timing) -> None:
        self.settings = settings
        self.writer = writer
        self.keys = ListenKeys(api, keepalive_every=opts.keepalive_every)
        self.reconciler = Reconciler(api, views, settings.view_prefix, self._append)
        self.expired = trio.Event()
        self.stale: Secret | None = None  # a key the stream said is expired, until replaced
        self.connection = WsConnection(ConnSpec(
            name=CONN_NAME, path="private", url=self._url, route=self._route,
            on_connected=self._on_connected, silence_timeout=None,
            rotate_after=settings.rotate_after, streams=1,
            # a quiet account may send nothing for hours: hand over as soon as the new
            # connection is up; both carry every event meanwhile, so none is missed
            handover_on_connect=True),
            _FrameTap(writer, self.on_frame), conn_key=KEY_CONN_USER, timing=timing)

    def _append(self, ctl: str, body: Mapping[str, Any]) -> None:
        self.writer.append_control(KEY_USER, ctl, body)

    async def _url(self) -> str:
        if self.stale is not None:
            # the stream announced expiry before the watcher replaced the key: do it now
            await self.keys.replace(self.stale)
            self.stale = None
        return private_url(self.settings.ws_url, self.keys.current())

    def _route(self, frame: bytes) -> str:
        return KEY_USER

    def on_frame(self, frame: bytes) -> bytes:
        """Sees each frame before it is logged: notices the expiry announcement, and takes the
        (dead) key out of it, the one change ever made to a logged frame (see `redact_key`)."""
        if not is_listen_key_expired(frame):
            return frame
        self.stale = self.keys.key
        self.expired.set()
        return redact_key(frame)

    async def _on_connected(self, conn_id: str) -> None:
        await self.reconciler.run_once(f"connected {conn_id}")

    async def watch_expiry(self) -> None:
        while True:
            await self.expired.wait()
            self.expired = trio.Event()
            log.warning("listenKeyExpired on the stream: new key, reconnect, reconcile")
            if self.stale is not None:
                await self.keys.replace(self.stale)
                self.stale = None
            self.reconnect("listen_key_expired")

    async def key_replaced(self) -> None:
        self.reconnect("listen_key_replaced")

    def reconnect(self, reason: str) -> None:
        link = self.connection.current
        if link is not None:
            link.close(reason)


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
    """Ingest the user stream until `UserIngest.stop()` (or cancel); then close the key and
    write what is buffered."""
    writer = LogWriter(client, settings.retention, bound=settings.buffer_frames,
                       max_bytes=settings.buffer_bytes)
    rest = RestClient(settings.rest_url, transport=transport)
    api = SignedRest(rest, api_key, signer, recv_window_ms=opts.recv_window_ms)
    views = make_client(settings.redis_url, name="ingest-user-views")
    session = _Session(settings, api, writer, views, opts, timing or Timing())
    try:
        await start_checks(api, session.keys, settings.rest_url)
        async with trio.open_nursery() as top:
            await top.start(writer.run)
            try:
                async with trio.open_nursery() as readers:
                    readers.start_soon(session.connection.run)
                    readers.start_soon(session.keys.keep_alive, session.key_replaced)
                    readers.start_soon(session.reconciler.every, opts.reconcile_every)
                    readers.start_soon(session.watch_expiry)
                    task_status.started(UserIngest(writer, session.connection, session.keys,
                                                   session.reconciler, readers.cancel_scope))
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + CLOSE_KEY_TIMEOUT_S
                    await session.keys.close()
                # the writer's own shutdown writes what is buffered (`closed` entry included)
                top.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await rest.aclose()
        views.close()
