"""`pipeline ingest user` against the simulator over real sockets and HTTP, on a real Redis.

What a user of the log checks: every user frame in `raw:user` as sent, REST reconciliation
entries after every (re)connect, the listenKey kept alive and replaced when the exchange drops
it, the final state of orders that closed while the stream was down, and no secret anywhere.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import attrs
import httpx
import orjson
import pytest
import redis
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from pipeline.config import Secret, Settings, load_settings
from pipeline.eventlog import ControlEntry, FrameEntry, decode_entry
from pipeline.ingest_user import (
    UserIngest,
    UserOptions,
    private_url,
    redact_key,
    run_user_ingest,
)
from pipeline.listenkey import ListenKeys
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.rest import RestClient
from pipeline.signing import SignedRest, make_signer
from pipeline.simulator import SimConfig, Simulator
from pipeline.wsconn import ConnSpec, Timing, WsConnection
from projections.core.keys import KEY_CONN_USER, KEY_USER
from tests.conftest import run_cli
from tests.recorder import Recorder

# The tests that run the whole ingestor (`running`) use the real clock: its writer thread and
# its reconciliation talk to Redis from worker threads, which a MockClock would jump under.
# Short timings keep their reconnects and rotations quick.
FAST = Timing(connect_timeout=5.0, disconnect_timeout=1.0, backoff_base=0.05, backoff_cap=0.5)
# a reconnect slow enough that the test can act while the stream is down
SLOW_RECONNECT = Timing(connect_timeout=5.0, disconnect_timeout=1.0, backoff_base=1.0,
                        backoff_cap=1.0)
API_KEY, API_SECRET = "sim-api-key", "sim-api-secret"


@attrs.define
class Running:
    sim: Simulator
    rest_url: str
    ingest: UserIngest
    r: redis.Redis
    settings: Settings


def settings_for(redis_url: str, ws_url: str, rest_url: str, **extra: str) -> Settings:
    return load_settings({"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url,
                          "BINANCE_REST_URL": rest_url, "BINANCE_API_KEY": API_KEY,
                          "BINANCE_API_SECRET": API_SECRET, **extra}, env={})


def ed25519_pair() -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh Ed25519 key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    public = key.public_key().public_bytes(Encoding.PEM,
                                           PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@asynccontextmanager
async def running(redis_server: LocalRedis, *, opts: UserOptions | None = None,
                  timing: Timing = FAST, sim_config: SimConfig | None = None,
                  secret: str = API_SECRET,
                  before_start: Callable[[Simulator], object] | None = None,
                  transport: httpx.AsyncBaseTransport | None = None,
                  **extra: str) -> AsyncIterator[Running]:
    """The simulator and the user ingestor; on exit the ingestor stops as on SIGTERM (closes
    its connection, flushes) before the simulator goes. `before_start` may switch the
    simulator's faults on before the ingestor's start checks."""
    sim = Simulator(sim_config or SimConfig(symbols=("BTCUSDT", "ETHUSDT")))
    if before_start is not None:
        before_start(sim)
    client = make_client(redis_server.url)
    r = redis_server.client()
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = settings_for(redis_server.url, ws_url, rest_url, BINANCE_API_SECRET=secret,
                                **extra)
        with trio.fail_after(60):
            async with trio.open_nursery() as ingestor:
                ingest = await ingestor.start(functools.partial(
                    run_user_ingest, settings, client, Secret(API_KEY),
                    make_signer(Secret(secret)), opts or UserOptions(), timing=timing,
                    transport=transport))
                try:
                    yield Running(sim, rest_url, ingest, r, settings)
                finally:
                    ingest.stop()
        nursery.cancel_scope.cancel()
    client.close()
    r.close()


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def xrange(r: redis.Redis, key: str) -> Entries:
    return cast(Entries, r.xrange(key))


def user_entries(r: redis.Redis) -> list[FrameEntry | ControlEntry]:
    return [decode_entry(i, f) for i, f in xrange(r, KEY_USER)]


def frames(r: redis.Redis) -> list[FrameEntry]:
    return [e for e in user_entries(r) if isinstance(e, FrameEntry)]


def controls(r: redis.Redis, ctl: str) -> list[ControlEntry]:
    return [e for e in user_entries(r) if isinstance(e, ControlEntry) and e.ctl == ctl]


def events(r: redis.Redis, event_type: str) -> list[dict[str, Any]]:
    docs = [orjson.loads(f.frame) for f in frames(r)]
    return [d for d in docs if d.get("e") == event_type]


async def until(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Wait for a condition the ingestor brings about (reads Redis off the event loop)."""
    with trio.fail_after(within):
        while True:
            value = await trio.to_thread.run_sync(check)
            if value:
                return value
            await trio.sleep(0.02)


async def snapshots_after(run: Running, count: int) -> None:
    """Wait until `count` complete reconciliations (4 snapshots each) are in the log."""
    await until(lambda: len(controls(run.r, "snapshot")) >= 4 * count)


def place(sim: Simulator, **order: Any) -> dict[str, Any]:
    body = {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.010", **order}
    result = sim.account.control("place", body)
    assert isinstance(result, dict)
    return result


# --- the stream and its log ------------------------------------------------------------------

async def test_user_frames_are_logged_byte_exact_and_connect_reconciles(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        await snapshots_after(run, 1)
        kinds = [c.body["kind"] for c in controls(run.r, "snapshot")]
        assert kinds[:4] == ["openOrders", "openAlgoOrders", "positionRisk", "balance"]

        # non-ASCII content must reach the log as the exact UTF-8 bytes the server sent
        order = place(run.sim, type="LIMIT", price="50000", newClientOrderId="ordre-été-✓")
        run.sim.account.control("fill", {"orderId": order["orderId"], "quantity": "0.004"})
        await until(lambda: events(run.r, "TRADE_LITE"))

        logged = frames(run.r)
        statuses = [d["o"]["X"] for d in events(run.r, "ORDER_TRADE_UPDATE")]
        assert statuses == ["NEW", "PARTIALLY_FILLED"]
        assert events(run.r, "ACCOUNT_UPDATE") and events(run.r, "TRADE_LITE")
        for entry in logged:
            # the simulator serialises with orjson: a frame logged as sent round-trips exactly
            assert orjson.dumps(orjson.loads(entry.frame)) == entry.frame
        assert '"c":"ordre-été-✓"'.encode() in logged[0].frame
        assert [f.seq for f in logged] == list(range(1, len(logged) + 1))


async def test_ed25519_key_signs_the_reconciliation_the_simulator_accepts(
        redis_server: LocalRedis) -> None:
    private_pem, public_pem = ed25519_pair()
    cfg = SimConfig(symbols=("BTCUSDT",), ed25519_public_key_pem=public_pem)
    async with running(redis_server, sim_config=cfg, secret=private_pem) as run:
        await snapshots_after(run, 1)  # the connect's reconciliation went through
        order = place(run.sim, type="LIMIT", price="50000")
        await until(lambda: events(run.r, "ORDER_TRADE_UPDATE"))
        await run.ingest.reconciler.run_once("test")
        await run.ingest.writer.flush()
        result = controls(run.r, "snapshot")[-4]
        assert result.body["kind"] == "openOrders"
        assert [o["orderId"] for o in result.body["response"]] == [order["orderId"]]


async def test_snapshot_entries_carry_the_rest_answers_and_the_weight_used(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        order = place(run.sim, type="LIMIT", price="50000")
        algo = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        await snapshots_after(run, 1)
        await run.ingest.reconciler.run_once("test")
        await run.ingest.writer.flush()
        by_kind = {c.body["kind"]: c.body for c in controls(run.r, "snapshot")}
        assert [o["orderId"] for o in by_kind["openOrders"]["response"]] == [order["orderId"]]
        assert [a["algoId"] for a in by_kind["openAlgoOrders"]["response"]] == [algo["algoId"]]
        assert by_kind["openOrders"]["symbol"] is None
        # the last snapshot of a round has paid 40 + 40 + 5 + 5 in each of two rounds
        assert by_kind["balance"]["weight_used_1m"] >= 180
        assert abs(by_kind["balance"]["fetched_at_ms"] - time.time() * 1000) < 5000


async def test_all_ten_documented_event_types_reach_raw_user(redis_server: LocalRedis) -> None:
    from pipeline.ingest_user import USER_EVENTS

    async with running(redis_server) as run:
        await snapshots_after(run, 1)
        account = run.sim.account
        order = place(run.sim, type="LIMIT", price="50000")
        account.control("fill", {"orderId": order["orderId"]})  # + ACCOUNT_UPDATE, TRADE_LITE
        algo = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        # the legacy reject event Binance still documents: CONDITIONAL_ORDER_TRIGGER_REJECT
        account.control("trigger_reject", {"algoId": algo["algoId"], "legacy": True})
        account.control("margin_call", {"symbol": "BTCUSDT"})
        account.control("leverage", {"symbol": "BTCUSDT", "leverage": 10})
        account.control("strategy_update", {"symbol": "BTCUSDT"})
        account.control("grid_update", {"symbol": "BTCUSDT"})
        await until(lambda: events(run.r, "GRID_UPDATE"))
        assert account.expire_listen_key()
        await until(lambda: events(run.r, "listenKeyExpired"))
        seen = {orjson.loads(f.frame).get("e") for f in frames(run.r)}
        assert len(USER_EVENTS) == 10
        assert set(USER_EVENTS) <= seen, sorted(set(USER_EVENTS) - seen)


# --- listenKey lifecycle -----------------------------------------------------------------------

# On Trio's MockClock: the keep-alive against the simulator's REST API and private stream, with
# the simulator's clock being the trio clock, so the key's 60-minute life, the 30-minute
# keep-alive and the 60 s retry all run in virtual time. Only Trio tasks and loopback sockets:
# nothing for the clock to jump under.

@asynccontextmanager
async def keyed_simulator() -> AsyncIterator[tuple[Simulator, SignedRest, str]]:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)), clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        ws_url, _ = await nursery.start(sim.run)
        rest = RestClient(sim.rest_url)
        try:
            yield sim, SignedRest(rest, Secret(API_KEY), make_signer(Secret(API_SECRET))), ws_url
        finally:
            with trio.CancelScope(shield=True):
                await rest.aclose()
            nursery.cancel_scope.cancel()


async def never_replaced() -> None:
    raise AssertionError("the key was replaced")


async def test_listen_key_is_kept_alive_past_its_lifetime_and_expires_without_keep_alives(
        autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    async with keyed_simulator() as (sim, api, ws_url):
        keys = ListenKeys(api)  # a PUT every 1800 s; the simulator's keys live 3600 s
        await keys.create()
        spec = ConnSpec("usr", "private", lambda: private_url(ws_url, keys.current()),
                        lambda frame: KEY_USER, streams=1)
        async with trio.open_nursery() as stream:
            stream.start_soon(WsConnection(spec, rec, conn_key=KEY_CONN_USER).run)
            async with trio.open_nursery() as keeper:
                keeper.start_soon(keys.keep_alive, never_replaced)
                await trio.sleep(2 * 3600 + 1)  # two lifetimes of the key
                assert keys.extended == 4
                assert sim.account.state()["listenKeyLive"]
                keeper.cancel_scope.cancel()
            # without keep-alives the key dies one lifetime after the last PUT (at 7200 s)
            expired = await rec.until(lambda: [f for f in rec.frames()
                                               if b"listenKeyExpired" in f.frame], within=3600)
            stream.cancel_scope.cancel()
    assert expired[0].at == pytest.approx(4 * 1800 + 3600)
    assert len(sim.account.issued_listen_keys) == 1
    assert len(rec.controls("opened")) == 1  # one stream, open throughout


async def test_a_refused_keep_alive_is_retried_after_60_s(
        autojump_clock: trio.testing.MockClock) -> None:
    async with keyed_simulator() as (sim, api, _):
        keys = ListenKeys(api)
        await keys.create()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keys.keep_alive, never_replaced)
            api.api_key = Secret("revoked-for-a-while")  # the PUT at 1800 s is refused
            await trio.sleep(1800 + 30)
            assert keys.extended == 0
            api.api_key = Secret(API_KEY)
            await trio.sleep(31)  # 1861 s: retried at 1860, not at 3600
            assert keys.extended == 1
            await trio.sleep(1800)  # and every 1800 s from there
            assert keys.extended == 2
            nursery.cancel_scope.cancel()
        assert sim.account.state()["listenKeyLive"]


async def test_listen_key_unknown_on_keep_alive_is_replaced_at_that_keep_alive(
        autojump_clock: trio.testing.MockClock) -> None:
    replaced_at: list[float] = []

    async def on_replaced() -> None:
        replaced_at.append(trio.current_time())

    async with keyed_simulator() as (sim, api, _):
        keys = ListenKeys(api)
        old = await keys.create()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keys.keep_alive, on_replaced)
            await trio.sleep(100)
            # another process with the same API key closes it: the next PUT answers -1125
            await api.keyed("DELETE", "/fapi/v1/listenKey", {"listenKey": old.value})
            await trio.sleep(1800)
            nursery.cancel_scope.cancel()
        assert replaced_at == pytest.approx([1800])
        assert sim.account.issued_listen_keys == [old.value, keys.current().value]
        assert sim.account.state()["listenKeyLive"]


# trio-websocket 0.12 never closes a client's TCP stream when the server closed the websocket
# first (here: the closed key's stream, then each reconnect refused with 4001); the socket is
# freed when collected, with a ResourceWarning. Not this code's leak, so not this test's failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_listen_key_unknown_on_keep_alive_is_replaced_and_stream_reconnects(
        redis_server: LocalRedis) -> None:
    # Real clock: the whole ingestor, whose writer thread and reconciliation talk to Redis (the
    # keep-alive's timing alone is checked on the MockClock above).
    opts = UserOptions(keepalive_every=0.2)
    async with running(redis_server, opts=opts) as run:
        await snapshots_after(run, 1)
        # someone else closes the key: the stream ends and the next PUT answers -1125
        async with httpx.AsyncClient(base_url=run.rest_url) as http:
            resp = await http.delete("/fapi/v1/listenKey", headers={"X-MBX-APIKEY": API_KEY})
            assert resp.status_code == 200
        await until(lambda: len(run.sim.account.issued_listen_keys) == 2)
        await until(lambda: run.sim.account.connection_count() == 1)
        await snapshots_after(run, 2)
        assert run.ingest.keys.current().value == run.sim.account.issued_listen_keys[-1]
        place(run.sim, type="LIMIT", price="50000")
        await until(lambda: events(run.r, "ORDER_TRADE_UPDATE"))


async def test_listen_key_expired_mid_stream_gives_new_key_reconnect_and_reconcile(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        await snapshots_after(run, 1)
        place(run.sim, type="LIMIT", price="50000")
        await until(lambda: events(run.r, "ORDER_TRADE_UPDATE"))
        assert run.sim.account.expire_listen_key()

        await until(lambda: events(run.r, "listenKeyExpired"))
        await until(lambda: len(run.sim.account.issued_listen_keys) == 2)
        await until(lambda: run.sim.account.connection_count() == 1)
        await snapshots_after(run, 2)
        # the stream after the reconnect carries the account's events again
        place(run.sim, type="LIMIT", price="51000")
        await until(lambda: len(events(run.r, "ORDER_TRADE_UPDATE")) == 2)
        closed = [decode_entry(i, f) for i, f in xrange(run.r, KEY_CONN_USER)]
        reasons = [e.body["reason"] for e in closed
                   if isinstance(e, ControlEntry) and e.ctl == "closed"]
        assert "listen_key_expired" in reasons


def test_expired_key_is_masked_in_the_logged_frame_and_nothing_else_changes() -> None:
    key = "A" * 20 + "b" * 44
    frame = b'{"e":"listenKeyExpired","E":"1700000000000","listenKey":"' + key.encode() + b'"}'
    assert redact_key(frame) == b'{"e":"listenKeyExpired","E":"1700000000000","listenKey":"***"}'
    assert redact_key(b"not json") == b"not json"


async def test_rotation_opens_a_new_connection_on_the_same_key_and_reconciles_on_it(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, PIPELINE_ROTATE_AFTER="0.5") as run:
        await until(lambda: conn_entries(run.r, "opened") == 1)
        # the new connection takes over once it carries data: keep the account busy
        with trio.fail_after(10):
            while not conn_entries(run.r, "rotated"):
                place(run.sim, type="LIMIT", price="50000")
                await trio.sleep(0.05)
        assert len(run.sim.account.issued_listen_keys) == 1
        await until(lambda: len(controls(run.r, "snapshot")) >= 8)  # the new link reconciled


# --- outage and reconciliation -----------------------------------------------------------------

def seed_open_views(r: redis.Redis, prefix: str, order: dict[str, Any],
                    algo: dict[str, Any]) -> None:
    """What the orders projection holds while both orders are open."""
    r.hset(f"{prefix}:open_orders:btcusdt", str(order["orderId"]), orjson.dumps(order))
    r.hset(f"{prefix}:open_algo_orders:btcusdt", str(algo["algoId"]), orjson.dumps(algo))


async def test_order_filled_and_stop_triggered_during_outage_are_reconciled_after_reconnect(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, timing=SLOW_RECONNECT) as run:
        await snapshots_after(run, 1)
        order = place(run.sim, type="LIMIT", price="50000")
        algo = place(run.sim, type="STOP_MARKET", side="SELL", quantity="0.010",
                     triggerPrice="40000")
        await until(lambda: events(run.r, "ALGO_UPDATE"))
        seed_open_views(run.r, run.settings.view_prefix, order, algo)

        assert run.sim.drop("private") == 1
        await until(lambda: run.sim.account.connection_count() == 0)
        run.sim.account.control("fill", {"orderId": order["orderId"]})
        triggered = run.sim.account.control("trigger", {"algoId": algo["algoId"]})
        assert isinstance(triggered, dict) and triggered["actualOrderId"]

        await until(lambda: run.sim.account.connection_count() == 1)
        finals = await until(lambda: len(controls(run.r, "final_state")) >= 3 and
                             controls(run.r, "final_state"))
        by_id = {(c.body["kind"], str(c.body["response"].get("orderId") or
                                      c.body["response"].get("algoId"))): c.body
                 for c in finals}
        filled = by_id[("order", str(order["orderId"]))]
        assert filled["symbol"] == "BTCUSDT" and filled["response"]["status"] == "FILLED"
        stop = by_id[("algoOrder", str(algo["algoId"]))]
        assert stop["response"]["algoStatus"] != "NEW"
        market = by_id[("order", str(triggered["actualOrderId"]))]
        assert market["response"]["status"] == "FILLED"
        # the stream never carried those fills: only reconciliation tells
        assert [d["o"]["X"] for d in events(run.r, "ORDER_TRADE_UPDATE")] == ["NEW"]
        # final states follow the snapshot that no longer listed the orders
        snaps = controls(run.r, "snapshot")
        assert snaps[-4].id < min(c.id for c in finals)


# --- command line and secrets -----------------------------------------------------------------

def test_missing_api_key_exits_2_naming_binance_api_key(redis_server: LocalRedis) -> None:
    result = run_cli("ingest", "user", env={"REDIS_URL": redis_server.url})
    assert result.returncode == 2
    assert "BINANCE_API_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def conn_entries(r: redis.Redis, ctl: str) -> int:
    return sum(1 for _, f in xrange(r, KEY_CONN_USER) if f.get(b"ctl") == ctl.encode())


def snapshots_since_expiry(r: redis.Redis) -> int:
    """Snapshots logged after the `listenKeyExpired` frame (the reconnect's reconciliation)."""
    after = False
    count = 0
    for entry in user_entries(r):
        if isinstance(entry, FrameEntry) and b"listenKeyExpired" in entry.frame:
            after = True
        elif after and isinstance(entry, ControlEntry) and entry.ctl == "snapshot":
            count += 1
    return count


def dump_everything(r: redis.Redis) -> bytes:
    """Every key and every value in the database, whatever its type."""
    out: list[Any] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            out += [b for kv in cast(dict[bytes, bytes], r.hgetall(key)).items() for b in kv]
        elif kind == b"list":
            out += cast(list[bytes], r.lrange(key, 0, -1))
        elif kind == b"set":
            out += list(cast(set[bytes], r.smembers(key)))
        elif kind == b"zset":
            out += [m for m, _ in cast(list[tuple[bytes, float]],
                                       r.zrange(key, 0, -1, withscores=True))]
        elif kind == b"stream":
            for entry_id, fields in xrange(r, key):
                out += [entry_id, *(b for kv in fields.items() for b in kv)]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {key!r}")
    return b"\n".join(out)


async def test_no_key_secret_or_listen_key_in_redis_or_in_the_log_output(
        redis_server: LocalRedis, tmp_path: Any) -> None:
    api_key, api_secret = "K3y-" + "q7Xz" * 15, "S3cr3t-" + "pW9v" * 15
    cfg = SimConfig(symbols=("BTCUSDT",), api_key=api_key, api_secret=api_secret)
    sim = Simulator(cfg)
    log_path = tmp_path / "ingest-user.log"
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
        env.update({"BINANCE_API_KEY": api_key, "BINANCE_API_SECRET": api_secret})
        cmd = [sys.executable, "-m", "pipeline", "ingest", "user", "--log-format", "json",
               "--redis-url", redis_server.url, "--ws-url", ws_url, "--rest-url", rest_url]
        with log_path.open("wb") as log_file:
            proc = await nursery.start(functools.partial(
                trio.run_process, cmd, stderr=log_file, env=env, check=False))
            r = redis_server.client()
            try:
                await until(lambda: sim.account.connection_count() == 1, within=20)
                order = place(sim, type="LIMIT", price="50000")
                sim.account.control("fill", {"orderId": order["orderId"]})
                assert sim.account.expire_listen_key()
                await until(lambda: len(sim.account.issued_listen_keys) == 2)
                await until(lambda: conn_entries(r, "opened") == 2)  # on the new key
                place(sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
                await until(lambda: events(r, "ALGO_UPDATE"))
                await until(lambda: snapshots_since_expiry(r) >= 4)
                # a run is logged as done once it has also searched the outage's orders
                await until(lambda: b"reconciled" in log_path.read_bytes())
            finally:
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    await proc.wait()
            assert proc.returncode == 0
            last = decode_entry(*xrange(r, KEY_CONN_USER)[-1])
            assert isinstance(last, ControlEntry) and last.ctl == "closed"
            assert last.body["reason"] == "shutdown"
            # the key is the account's, shared with any other process: left to live its hour
            assert sim.account.state()["listenKeyLive"]
            everything = dump_everything(r)
            r.close()
        nursery.cancel_scope.cancel()

    output = log_path.read_bytes()
    assert b"listenKey created" in output and b"reconciled" in output
    secrets = [api_key, api_secret, *sim.account.issued_listen_keys]
    assert len(secrets) == 4
    for secret in secrets:
        assert secret.encode() not in everything
        assert secret.encode() not in output


async def test_listener_sees_fills_of_the_outage_on_p_orders_soon_after_reconnect(
        redis_server: LocalRedis) -> None:
    """The whole path: stream -> log -> orders projection -> views; stream down; reconnect ->
    reconciliation -> final states -> entries on P:orders the listener reads."""
    from projections.shell.project import RunOptions
    from projections.shell.project import run as run_projector
    from projections.shell.registry import choose

    async with running(redis_server, timing=SLOW_RECONNECT) as run:
        prefix = run.settings.view_prefix
        async with trio.open_nursery() as projector:
            projector.start_soon(functools.partial(
                run_projector, run.settings, choose(run.settings, "orders"),
                RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
            # first reconciliation done before the orders exist: every reconciliation entry
            # for them below comes from the reconnect
            await snapshots_after(run, 1)
            order = place(run.sim, type="LIMIT", price="50000")
            algo = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
            await until(lambda: run.r.hexists(f"{prefix}:open_orders:btcusdt",
                                              str(order["orderId"])) and
                        run.r.hexists(f"{prefix}:open_algo_orders:btcusdt", str(algo["algoId"])))

            assert run.sim.drop("private") == 1
            await until(lambda: run.sim.account.connection_count() == 0)
            run.sim.account.control("fill", {"orderId": order["orderId"]})
            triggered = run.sim.account.control("trigger", {"algoId": algo["algoId"]})
            assert isinstance(triggered, dict)
            market_id = str(triggered["actualOrderId"])

            def reconciled() -> dict[str, dict[bytes, bytes]]:
                return {f[b"order_id"].decode(): f for _, f in xrange(run.r, f"{prefix}:orders")
                        if f.get(b"source") == b"reconciliation"}

            with trio.fail_after(10):  # "within seconds of the reconnect"
                seen = await until(lambda: {str(order["orderId"]), market_id,
                                            str(algo["algoId"])} <= set(reconciled())
                                   and reconciled())
            assert seen[str(order["orderId"])][b"status"] == b"FILLED"
            assert seen[str(algo["algoId"])][b"kind"] == b"algo"
            assert seen[str(algo["algoId"])][b"status"] != b"NEW"
            assert seen[market_id][b"status"] == b"FILLED"
            await until(lambda: not run.r.hexists(f"{prefix}:open_orders:btcusdt",
                                                  str(order["orderId"])))
            projector.cancel_scope.cancel()


@pytest.mark.parametrize(("key", "secret", "setting"), [
    ("wrong-api-key", API_SECRET, "BINANCE_API_KEY"),
    (API_KEY, "wrong-api-secret", "BINANCE_API_SECRET"),
])
async def test_key_or_secret_refused_by_the_exchange_exits_2_naming_it(
        redis_server: LocalRedis, key: str, secret: str, setting: str) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        env = {"REDIS_URL": redis_server.url, "BINANCE_WS_URL": ws_url,
               "BINANCE_REST_URL": rest_url, "BINANCE_API_KEY": key,
               "BINANCE_API_SECRET": secret}
        result = await trio.to_thread.run_sync(
            functools.partial(run_cli, "ingest", "user", env=env))
        assert not sim.account.state()["listenKeyLive"]  # a key it made was closed again
        nursery.cancel_scope.cancel()
    assert result.returncode == 2
    assert f"bad setting {setting}" in result.stderr
    assert secret not in result.stderr and "Traceback" not in result.stderr
