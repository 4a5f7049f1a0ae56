"""The ACL file, rendered from deploy/redis/users.acl.template, on a real redis-server.

Each role can do its job and is refused the rest. The server loads exactly the file the
compose deployment loads: rendered by deploy/redis/render-acl.sh from secret files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.errors import SettingsError
from pipeline.eventlog import control_entry, frame_entry
from pipeline.localredis import LocalRedis
from pipeline.redisconn import connect_checked, make_client
from projections.core.outputs import ViewWrite
from projections.shell import functions
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("ingest_market", "ingest_user", "projector", "reader", "listener", "status", "admin")
MARK = b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUpdate","E":1,"s":"BTCUSDT"}}'


ACCOUNTS = ("a1", "a2")  # the module's server also has the users of two labelled accounts


def render_acl(folder: Path, prefix: str = "websocket", accounts: tuple[str, ...] = ()) -> Path:
    """The ACL file compose's redis service renders, from secret files `pw-{role}` (with
    `accounts`, PIPELINE_ACCOUNTS, also each account's `ingest_user_{a}`, `listener_{a}`)."""
    secrets = folder / "secrets"
    secrets.mkdir(parents=True)
    roles = [*ROLES, *(f"{r}_{a}" for a in accounts for r in ("ingest_user", "listener"))]
    for role in roles:
        (secrets / f"redis_password_{role}").write_text(f"pw-{role}\n")
    out = folder / "users.acl"
    subprocess.run(
        ["sh", str(ROOT / "deploy/redis/render-acl.sh"),
         str(ROOT / "deploy/redis/users.acl.template"), str(out)],
        env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets),
             "PIPELINE_VIEW_PREFIX": prefix, "PIPELINE_ACCOUNTS": ",".join(accounts)},
        check=True, timeout=10)
    return out


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    folder = tmp_path_factory.mktemp("acl")
    acl = render_acl(folder, accounts=ACCOUNTS)
    server = LocalRedis(folder / "redis", args=["--aclfile", str(acl)]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def as_role(acl_server: LocalRedis) -> Iterator[Callable[[str], redis.Redis]]:
    """A client logged in as the role's user, made the way the pipeline makes its clients."""
    clients: list[redis.Redis] = []

    def connect(user: str) -> redis.Redis:
        password = f"pw-{user.replace('-', '_')}"
        client = connect_checked(f"redis://{user}:{password}@127.0.0.1:{acl_server.port}/0",
                                 name=f"test-{user}")
        clients.append(client)
        return client

    yield connect
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def admin(as_role: Callable[[str], redis.Redis]) -> redis.Redis:
    client = as_role("admin")
    functions.load(client)  # as `pipeline functions load` does at deployment
    client.xadd("raw:market:markPrice", frame_entry(MARK, 1.0, "c1", 1))
    client.set("websocket:mark_price:btcusdt", b'{"timestamp": 1}')
    client.hset("websocket:open_orders:btcusdt", "42", b'{"orderId": 42}')
    client.xadd("websocket:orders", {"order_id": "42", "status": "NEW", "data": "{}"})
    for account in ACCOUNTS:  # each labelled account's own keys (projections/core/keys.py)
        client.set(f"websocket:acct:{account}:position:btcusdt", b'{"timestamp": 1}')
        client.hset(f"websocket:acct:{account}:open_orders:btcusdt", "7", b'{"orderId": 7}')
        client.xadd(f"websocket:acct:{account}:orders", {"order_id": "7", "status": "NEW"})
    return client


def refused(call: Callable[[], object]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:  # NOPERM raised from inside a Lua script
        return "NOPERM" in str(exc) or "permission" in str(exc).lower()
    return False


def test_nobody_gets_in_without_a_user_and_the_right_password(acl_server: LocalRedis) -> None:
    anonymous = make_client(acl_server.url)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    with pytest.raises(SettingsError) as err:
        connect_checked(f"redis://reader:wrong-pw@127.0.0.1:{acl_server.port}/0")
    assert "REDIS_URL" in str(err.value) and "wrong-pw" not in str(err.value)


def test_market_ingestor_appends_to_raw_streams_and_nothing_else(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    ing = as_role("ingest-market")
    with ing.pipeline(transaction=False) as pipe:
        pipe.xadd("raw:market:markPrice", frame_entry(MARK, 2.0, "c1", 2),
                  maxlen=1000, approximate=True)
        pipe.xadd("raw:conn:market", control_entry("opened", {"path": "market"}, 2.0, "c1"))
        pipe.execute()
    assert admin.xlen("raw:market:markPrice") >= 2
    assert refused(lambda: ing.delete("websocket:mark_price:btcusdt"))
    assert refused(lambda: ing.set("websocket:mark_price:btcusdt", b"{}"))
    assert refused(lambda: ing.xadd("raw:user", {"frame": b"{}"}))
    assert refused(lambda: ing.xrange("raw:market:markPrice"))
    assert refused(lambda: ing.get("websocket:mark_price:btcusdt"))
    assert refused(lambda: ing.flushall())


def test_user_ingestor_appends_user_frames_and_reads_only_open_orders(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    ing = as_role("ingest-user")
    ing.xadd("raw:user", frame_entry(b'{"e":"ORDER_TRADE_UPDATE"}', 3.0, "u1", 1))
    ing.xadd("raw:conn:user", control_entry("opened", {"path": "private"}, 3.0, "u1"))
    keys = list(ing.scan_iter(match="websocket:open_orders:*", count=100))
    assert keys == [b"websocket:open_orders:btcusdt"]
    assert ing.hgetall(keys[0]) == {b"42": b'{"orderId": 42}'}
    assert refused(lambda: ing.delete("websocket:open_orders:btcusdt"))
    assert refused(lambda: ing.hset("websocket:open_orders:btcusdt", "43", "{}"))
    assert refused(lambda: ing.xadd("raw:market:depth", {"frame": b"{}"}))
    assert refused(lambda: ing.xrange("raw:user"))
    assert refused(lambda: ing.get("websocket:mark_price:btcusdt"))


def test_projector_consumes_raw_streams_and_writes_views_through_the_functions(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    from projections.shell.viewstore import ViewStore

    proj = as_role("projector")
    proj.xgroup_create("raw:market:markPrice", "mark_price", id="0", mkstream=True)
    got = proj.xreadgroup("mark_price", "p1", {"raw:market:markPrice": ">"}, count=10, block=100)
    ids = [entry_id for _, entries in got for entry_id, _ in entries]
    assert ids
    store = ViewStore(proj)
    write = ViewWrite("websocket:mark_price:ethusdt", b'{"timestamp": 5.0}', 5.0, "timestamp",
                      expire_at_ms=2**42)
    with proj.pipeline(transaction=False) as pipe:
        store.queue(pipe, write)
        pipe.xack("raw:market:markPrice", "mark_price", *ids)
        assert pipe.execute()[-1] == len(ids)  # the view write, then the XACK
    assert admin.get("websocket:mark_price:ethusdt") == b'{"timestamp": 5.0}'
    proj.xautoclaim("raw:market:markPrice", "mark_price", "p2", min_idle_time=0)
    proj.xpending("raw:market:markPrice", "mark_price")
    proj.xinfo_groups("raw:market:markPrice")
    proj.xadd("raw:depth_snapshots", control_entry("snapshot", {"symbol": "BTCUSDT"}, 4.0))
    proj.xadd("dlq:mark_price", {"source": "raw:market:markPrice", "error": "bad"})
    assert proj.set("lease:depth_book", "p1", nx=True, px=10_000)
    assert list(proj.scan_iter(match="websocket:*", count=100))
    proj.unlink("websocket:mark_price:ethusdt")  # replay --reset


def test_projector_cannot_rewrite_the_log_or_the_server(
    as_role: Callable[[str], redis.Redis],
) -> None:
    proj = as_role("projector")
    assert refused(lambda: proj.xadd("raw:market:markPrice", {"frame": b"{}"}))
    assert refused(lambda: proj.xadd("raw:user", {"frame": b"{}"}))
    assert refused(lambda: proj.delete("raw:market:markPrice"))
    assert refused(lambda: proj.xtrim("raw:user", maxlen=0))
    assert refused(lambda: proj.xgroup_destroy("raw:market:markPrice", "mark_price"))
    assert refused(lambda: proj.eval("return redis.call('DEL', KEYS[1])", 1, "raw:user"))
    assert refused(lambda: proj.flushall())
    assert refused(lambda: proj.config_get("*"))


def test_projector_runs_the_library_functions_and_no_lua_of_its_own(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    proj = as_role("projector")
    spin = "while true do end"
    assert refused(lambda: proj.eval(spin, 0))
    assert refused(lambda: proj.evalsha("0" * 40, 0))
    assert refused(lambda: proj.eval_ro(spin, 0))
    assert refused(lambda: proj.script_load(spin))
    assert refused(lambda: proj.script_exists("0" * 40))
    assert refused(lambda: proj.script_flush())
    assert refused(lambda: proj.function_load(
        f"#!lua name=spin\nredis.register_function('spin', function() {spin} end)"))
    assert refused(lambda: proj.function_load(functions.CODE, replace=True))
    assert refused(lambda: proj.function_delete(functions.LIBRARY))
    assert refused(lambda: proj.function_flush())
    # what it may: call this version's functions (loaded by the admin)
    assert proj.fcall_ro(functions.VERSION_FN, 0) == functions.VERSION.encode()
    assert proj.fcall(functions.LEASE_ACQUIRE_FN, 1, "lease:acl-test", "p1", 1000) == 1


def test_reader_reads_views(as_role: Callable[[str], redis.Redis], admin: redis.Redis) -> None:
    reader = as_role("reader")
    assert reader.get("websocket:mark_price:btcusdt") == b'{"timestamp": 1}'
    assert reader.hgetall("websocket:open_orders:btcusdt")
    assert reader.ttl("websocket:mark_price:btcusdt") == -1
    assert reader.xrevrange("websocket:orders", count=1)
    assert reader.xinfo_stream("websocket:orders")["length"] >= 1


def test_listener_reads_views_and_consumes_the_orders_stream_with_its_group(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    listener = as_role("listener")
    assert listener.get("websocket:mark_price:btcusdt") == b'{"timestamp": 1}'
    listener.xgroup_create("websocket:orders", "listener", id="0")
    got = listener.xreadgroup("listener", "l1", {"websocket:orders": ">"}, count=10)
    (entry_id, fields), = got[0][1]
    assert fields[b"order_id"] == b"42"
    listener.xautoclaim("websocket:orders", "listener", "l2", min_idle_time=0)
    assert listener.xpending("websocket:orders", "listener")["pending"] == 1
    assert listener.xack("websocket:orders", "listener", entry_id) == 1


def test_projector_appends_the_account_streams_and_merges_kline_history_under_its_user(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    """The writes of issue #13 go through the library's functions with the projector's own
    rights: an exactly-once append (XREVRANGE, XRANGE, XADD with MINID) and the list merge
    (LRANGE, DEL, LPUSH)."""
    from projections.core.outputs import ListMerge, StreamAppend
    from projections.shell.viewstore import ViewStore, write_results

    proj = as_role("projector")
    now_ms = int(time.time() * 1000)
    append = StreamAppend("websocket:position_events", now_ms, "k1",
                          (("kind", b"opened"), ("data", b"{}")), 86_400_000)
    merge = ListMerge("websocket:klines:btcusdt:1m", (b'{"open_time":60000,"timestamp":60.0}',
                                                     b'{"open_time":0,"timestamp":0.0}'),
                      "open_time", 500, 60.0)
    store = ViewStore(proj)
    with proj.pipeline(transaction=False) as pipe:
        plan = store.queue_all(pipe, [merge, append, append])
        results = write_results(plan, pipe.execute(raise_on_error=False))
    assert results == [1, 1, 0]
    assert admin.xlen("websocket:position_events") == 1
    assert admin.lrange("websocket:klines:btcusdt:1m", 0, -1) == [
        b'{"open_time":60000,"timestamp":60.0}', b'{"open_time":0,"timestamp":0.0}']


def test_listener_consumes_the_account_and_position_event_streams_with_its_groups(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    listener, proj = as_role("listener"), as_role("projector")
    for stream in ("websocket:account_events", "websocket:position_events"):
        proj.xadd(stream, {"type": "MARGIN_CALL", "data": "{}"})
        listener.xgroup_create(stream, "risk", id="0")
        got = listener.xreadgroup("risk", "l1", {stream: ">"}, count=10)
        entry_id = got[0][1][0][0]
        assert listener.xack(stream, "risk", entry_id) == 1
        assert refused(lambda s=stream: listener.xadd(s, {"type": "fake"}))
        assert refused(lambda s=stream: listener.xtrim(s, maxlen=0))
        assert refused(lambda s=stream: listener.xgroup_destroy(s, "risk"))
    assert refused(lambda: listener.xgroup_create("websocket:leverage:btcusdt", "g", id="0",
                                                  mkstream=True))


def test_reader_is_refused_every_write_and_the_raw_log(
    as_role: Callable[[str], redis.Redis],
) -> None:
    reader = as_role("reader")
    assert refused(lambda: reader.xadd("websocket:orders", {"order_id": "1"}))
    assert refused(lambda: reader.xadd("raw:market:markPrice", {"frame": b"{}"}))
    assert refused(lambda: reader.set("websocket:mark_price:btcusdt", b"{}"))
    assert refused(lambda: reader.delete("websocket:mark_price:btcusdt"))
    assert refused(lambda: reader.hdel("websocket:open_orders:btcusdt", "42"))
    assert refused(lambda: reader.xrange("raw:market:markPrice"))
    assert refused(lambda: reader.xgroup_create("raw:user", "sneaky", id="0"))
    assert refused(lambda: reader.eval("return 1", 0))


def test_status_user_reads_everything_and_writes_nothing(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    status = as_role("status")
    assert status.xinfo_stream("raw:market:markPrice")["length"] >= 1
    assert status.memory_usage("raw:market:markPrice", samples=5)
    assert status.xinfo_groups("raw:market:markPrice")
    assert refused(lambda: status.delete("websocket:mark_price:btcusdt"))
    assert refused(lambda: status.xadd("raw:conn:market", {"ctl": "opened"}))


def test_a_different_view_prefix_is_rendered_into_every_view_pattern(tmp_path: Path) -> None:
    text = render_acl(tmp_path, prefix="ws2").read_text()
    assert "websocket" not in text
    assert "%R~ws2:* " in text and "(~ws2:orders " in text and "~ws2:* ~dlq:*" in text


# --- issue #17: no role can trim, block or write another role's stream -------------------

MAX_ID = "18446744073709551615-18446744073709551615"


def abuses(client: redis.Redis, key: str) -> list[Callable[[], object]]:
    """What an append-only right let a role do to a stream: append, trim it to nothing, and
    append the largest id, after which no XADD * succeeds."""
    entry = control_entry("opened", {"path": "x"}, 9.0)
    return [lambda: client.xadd(key, entry),
            lambda: client.xadd(key, entry, maxlen=0),
            lambda: client.xadd(key, entry, id=MAX_ID)]


def test_each_ingestor_is_refused_every_abuse_of_the_other_ones_streams(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    market, user = as_role("ingest-market"), as_role("ingest-user")
    for key in ("raw:conn:user", "raw:user", "raw:depth_snapshots", "raw:conn"):
        assert all(refused(abuse) for abuse in abuses(market, key)), key
    for key in ("raw:conn:market", "raw:market:depth", "raw:market:other",
                "raw:depth_snapshots", "raw:conn"):
        assert all(refused(abuse) for abuse in abuses(user, key)), key
    # the victims append as before
    user.xadd("raw:conn:user", control_entry("closed", {"reason": "shutdown"}, 9.5, "u1"))
    market.xadd("raw:conn:market", control_entry("closed", {"reason": "shutdown"}, 9.5, "c1"))
    assert admin.xlen("raw:conn:user") >= 1 and admin.xlen("raw:conn:market") >= 1


def test_projector_is_refused_every_abuse_of_the_ingestors_streams(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    proj, market = as_role("projector"), as_role("ingest-market")
    for key in ("raw:market:depth", "raw:market:markPrice", "raw:user", "raw:conn:market",
                "raw:conn:user"):
        assert all(refused(abuse) for abuse in abuses(proj, key)), key
        assert refused(lambda key=key: proj.xtrim(key, maxlen=0)), key
    # its own control entries go where no ingestor writes, and the depth stream is untouched
    proj.xadd("raw:depth_snapshots", control_entry("gap", {"symbol": "BTCUSDT"}, 9.0))
    market.xadd("raw:market:depth", frame_entry(b'{"stream":"btcusdt@depth@100ms"}', 9.0,
                                                "c1", 3))
    assert admin.xlen("raw:market:depth") >= 1


def test_reader_is_strictly_read_only(as_role: Callable[[str], redis.Redis],
                                      admin: redis.Redis) -> None:
    reader = as_role("reader")
    assert refused(lambda: reader.xgroup_create("websocket:orders", "mine", id="0"))
    assert refused(lambda: reader.xreadgroup("listener", "r1", {"websocket:orders": ">"}))
    assert refused(lambda: reader.xack("websocket:orders", "listener", "0-1"))
    assert refused(lambda: reader.xautoclaim("websocket:orders", "listener", "r1", 0))
    # Redis's own account of the user: no selector, and not one command that writes
    user: Any = admin.acl_getuser("reader")
    writes = {c.decode() for c in admin.command_list(category="write")}
    allowed = {str(w)[1:].split("|")[0] for w in user["commands"] if str(w)[0] == "+"}
    assert not user["selectors"] and allowed and not allowed & writes, allowed & writes


def test_listener_runs_groups_on_the_orders_stream_and_nothing_more(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    listener, proj = as_role("listener"), as_role("projector")
    stream = "websocket:orders"
    listener.xgroup_create(stream, "late", id="$")
    assert refused(lambda: listener.xadd(stream, {"order_id": "1"}))
    assert refused(lambda: listener.xtrim(stream, maxlen=0))
    assert refused(lambda: listener.delete(stream))
    assert refused(lambda: listener.xgroup_destroy(stream, "late"))
    assert refused(lambda: listener.xgroup_setid(stream, "late", id="0"))
    assert refused(lambda: listener.xgroup_delconsumer(stream, "late", "someone"))
    assert refused(lambda: listener.xgroup_create("websocket:orders:btcusdt", "g", id="0"))
    assert refused(lambda: listener.xgroup_create("raw:user", "g", id="0"))
    assert refused(lambda: listener.set("websocket:mark_price:btcusdt", b"{}"))
    assert refused(lambda: listener.eval("return 1", 0))
    # a group is no lever on the stream: one created at the largest id blocks no append
    listener.xgroup_create(stream, "at-the-end", id=MAX_ID)
    assert proj.xadd(stream, {"order_id": "43", "status": "NEW", "data": "{}"})


def test_what_a_role_can_still_do_to_its_own_streams_is_flagged_by_status(
    tmp_path: Path,
) -> None:
    """XADD cannot be granted without its options: each role may still trim its own streams or
    append a future id to them. That harms only the role itself, and `pipeline status`
    (as the status user) names it."""
    server = LocalRedis(tmp_path / "redis", args=["--aclfile", str(render_acl(tmp_path))]).start()

    def url(user: str) -> str:
        return f"redis://{user}:pw-{user.replace('-', '_')}@127.0.0.1:{server.port}/0"

    try:
        user, market, proj = (connect_checked(url(u)) for u in ("ingest-user", "ingest-market",
                                                                "projector"))
        for i in range(5):
            user.xadd("raw:user", frame_entry(b'{"e":"ORDER_TRADE_UPDATE"}', 1.0 + i, "u1", i))
            market.xadd("raw:conn:market", control_entry("closed", {"reason": "shutdown"}, 1.0))
        clean = run_cli("status", "--json", env={"REDIS_URL": url("status")})
        assert clean.returncode == 0, clean.stdout

        user.xadd("raw:user", frame_entry(b"{}", 7.0, "u1", 6), maxlen=0)
        market.xadd("raw:conn:market", control_entry("closed", {}, 7.0), id=MAX_ID)
        ahead_ms = int(time.time() * 1000) + 86_400_000
        proj.xadd("raw:depth_snapshots", control_entry("gap", {}, 7.0), id=f"{ahead_ms}-0")
        for c in (user, market, proj):
            c.close()
        done = run_cli("status", "--json", env={"REDIS_URL": url("status")})
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr
    problems = json.loads(done.stdout)["problems"]
    assert any(p.startswith("stream raw:user:") and "never trimmed" in p for p in problems)
    assert any(p.startswith("stream raw:conn:market:") and "largest possible" in p
               for p in problems)
    assert any(p.startswith("stream raw:depth_snapshots:") and "ahead" in p for p in problems)


# --- the real commands, each logged in as its own user -------------------------------------

def _wait(condition: Callable[[], object], timeout: float = 25.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


def test_every_command_does_its_job_under_its_own_user(tmp_path: Path) -> None:
    """Ingestors (with the kline history), projector (with the diff-depth book's snapshot
    entries, the account's event streams), status, replay --reset, the listener's and the
    reader's library run against the simulator with the ACL on, and no log line says NOPERM.
    The projector starts before the admin loaded the function library: it says what to run in
    one line, waits, and works with its own rights once it is loaded."""
    import httpx

    from projections.client import (
        AccountEventsConsumer,
        AccountReader,
        MarketReader,
        OrdersConsumer,
        PositionEventsConsumer,
        open_orders,
    )

    server = LocalRedis(tmp_path / "redis", args=["--aclfile", str(render_acl(tmp_path))]).start()

    def url(user: str) -> str:
        return f"redis://{user}:pw-{user.replace('-', '_')}@127.0.0.1:{server.port}/0"

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, argv: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
        with open(tmp_path / f"{name}.log", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                                    env=env, stderr=err, text=True, **kw)
        procs.append(proc)
        return proc

    admin = server.client(username="admin", password="pw-admin")
    try:
        sim = start("sim", ["simulate", "--script-account", "--symbols", "BTCUSDT,ETHUSDT"],
                    base, stdout=subprocess.PIPE)
        assert sim.stdout is not None
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", sim.stdout.readline())
        env = {**base, "BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest,
               "PIPELINE_SYMBOLS": "BTCUSDT,ETHUSDT",
               "PIPELINE_MARKET_STREAMS": "markPrice@1s,depth@100ms,aggTrade,bookTicker,kline_1m"}
        start("ingest-market", ["ingest", "market"], {**env, "REDIS_URL": url("ingest-market")})
        start("ingest-user", ["ingest", "user"], {
            **env, "REDIS_URL": url("ingest-user"), "BINANCE_API_KEY": "sim-api-key",
            "BINANCE_API_SECRET": "sim-api-secret"})
        start("project", ["project", "--block-ms", "200"], {**env, "REDIS_URL": url("projector")})
        # no library yet: the projector says what to run, in one line, and writes nothing
        _wait(lambda: functions.MISSING_LINE in (tmp_path / "project.log").read_text())
        assert admin.exists("websocket:mark_price:btcusdt") == 0
        as_projector = run_cli("functions", "load", env={**env, "REDIS_URL": url("projector")})
        assert as_projector.returncode == 1 and "admin" in as_projector.stderr
        loaded = run_cli("functions", "load", env={**env, "REDIS_URL": url("admin")})
        assert loaded.returncode == 0, loaded.stderr
        assert functions.LIBRARY in loaded.stdout

        _wait(lambda: admin.exists("websocket:mark_price:btcusdt",
                                   "websocket:orderbook:btcusdt:20",
                                   "websocket:book_ticker:btcusdt") == 3
              and admin.xlen("websocket:orders") > 0)
        snapshots = admin.xrevrange("raw:depth_snapshots", count=10_000)
        assert any(f.get(b"ctl") == b"snapshot" for _, f in snapshots)  # the projector's XADD
        assert admin.xlen("raw:conn:market") and admin.xlen("raw:conn:user")

        httpx.post(f"{rest}/sim/account/leverage", json={"symbol": "BTCUSDT", "leverage": 7},
                   timeout=5).raise_for_status()
        _wait(lambda: admin.llen("websocket:klines:btcusdt:1m") >= 400
              and admin.xlen("websocket:account_events") > 0
              and admin.xlen("websocket:position_events") > 0)

        listener = connect_checked(url("listener"))
        events: list[object] = []
        for make in (OrdersConsumer, AccountEventsConsumer, PositionEventsConsumer):
            consumer = make(listener, group="listener", handler=events.append, start_id="0",
                            block_ms=100)
            assert consumer.poll_once() > 0
        listener.close()
        reader = connect_checked(url("reader"))
        assert MarketReader(reader, fallback=False).mark_price("BTCUSDT", max_age=60)
        assert len(MarketReader(reader, fallback=False).klines("BTCUSDT", "1m", 400)) == 400
        assert AccountReader(reader).leverage("BTCUSDT") is not None
        open_orders(reader)  # SCAN + HVALS of the open-order views
        reader.close()

        status = run_cli("status", "--json", env={**env, "REDIS_URL": url("status")})
        assert status.returncode in (0, 1), status.stderr
        assert json.loads(status.stdout)["streams"]
        replay = run_cli("replay", "--only", "mark_price", "--reset",
                         env={**env, "REDIS_URL": url("projector")})
        assert replay.returncode == 0, replay.stderr
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        admin.close()
        server.stop()
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}
    assert not [name for name, text in logs.items() if "NOPERM" in text or "no permissions"
                in text], logs
    assert logs["project.log"].count(functions.MISSING_LINE) == 1


# --- the users of one labelled account (deploy/redis/account.acl.template) ----------------------

def test_an_account_listener_reads_and_consumes_its_own_account_and_nothing_of_another(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    from projections.client import OrderEvent, OrdersConsumer, open_orders
    from projections.client.views import MarketReader

    listener = as_role("listener-a1")
    seen: list[OrderEvent] = []
    consumer = OrdersConsumer(listener, group="desk", consumer="c1", handler=seen.append,
                              block_ms=10, start_id="0", account="a1")
    assert consumer.poll_once() == 1 and [e.order_id for e in seen] == ["7"]
    assert open_orders(listener, account="a1") == [{"orderId": 7}]
    reader = MarketReader(listener, fallback=False, account="a1")
    assert reader.position("BTCUSDT") == {"timestamp": 1}
    # account a2's keys, the unlabelled account's and the market's: refused
    assert refused(lambda: open_orders(listener, account="a2"))
    assert refused(lambda: listener.get("websocket:acct:a2:position:btcusdt"))
    assert refused(lambda: OrdersConsumer(listener, group="desk", handler=seen.append,
                                          account="a2"))
    assert refused(lambda: listener.xrange("websocket:acct:a2:orders"))
    assert refused(lambda: listener.xreadgroup("desk", "c1", {"websocket:orders": ">"}))
    assert refused(lambda: listener.hgetall("websocket:open_orders:btcusdt"))
    assert refused(lambda: listener.get("websocket:mark_price:btcusdt"))
    # and it writes nothing, not even in its own account
    assert refused(lambda: listener.xadd("websocket:acct:a1:orders", {"order_id": "8"}))
    assert refused(lambda: listener.hset("websocket:acct:a1:open_orders:btcusdt", "8", "{}"))
    assert refused(lambda: listener.xgroup_destroy("websocket:acct:a1:orders", "desk"))
    assert refused(lambda: listener.xtrim("websocket:acct:a1:orders", maxlen=0))


def test_an_account_user_ingestor_appends_to_its_own_log_and_reads_its_own_open_orders(
    as_role: Callable[[str], redis.Redis], admin: redis.Redis,
) -> None:
    ing = as_role("ingest-user-a2")
    ing.xadd("raw:user:a2", frame_entry(b'{"e":"ORDER_TRADE_UPDATE"}', 3.0, "usr-a2-1", 1))
    ing.xadd("raw:conn:user:a2", control_entry("opened", {"path": "private"}, 3.0, "usr-a2-1"))
    keys = list(ing.scan_iter(match="websocket:acct:a2:open_orders:*", count=100))
    assert keys == [b"websocket:acct:a2:open_orders:btcusdt"]
    assert ing.hgetall(keys[0]) == {b"7": b'{"orderId": 7}'}
    for other in ("raw:user", "raw:user:a1", "raw:conn:user", "raw:conn:user:a1",
                  "raw:market:depth"):
        assert refused(lambda key=other: ing.xadd(key, {"frame": b"{}"})), other
    assert refused(lambda: ing.hgetall("websocket:acct:a1:open_orders:btcusdt"))
    assert refused(lambda: ing.hgetall("websocket:open_orders:btcusdt"))
    assert refused(lambda: ing.xrange("raw:user:a2"))
    assert refused(lambda: ing.hset("websocket:acct:a2:open_orders:btcusdt", "8", "{}"))
    # the unlabelled account's user ingestor cannot write account a2's log either
    assert refused(lambda: as_role("ingest-user").xadd("raw:user:a2", {"frame": b"{}"}))


def test_acl_renderer_refuses_a_bad_account_label_and_a_missing_account_secret(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for role in ROLES:
        (secrets / f"redis_password_{role}").write_text(f"pw-{role}")

    def render(accounts: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(ROOT / "deploy/redis/render-acl.sh"),
             str(ROOT / "deploy/redis/users.acl.template"), str(tmp_path / "users.acl")],
            env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets),
                 "PIPELINE_ACCOUNTS": accounts}, capture_output=True, text=True, timeout=10)

    for bad in ("A1", "a*", "-x", "a" * 33):
        done = render(bad)
        assert done.returncode == 2 and "label" in done.stderr, bad
    done = render("-,b1")
    assert done.returncode == 2 and "redis_password_ingest_user_b1" in done.stderr
    assert not (tmp_path / "users.acl").exists() and not (tmp_path / "users.acl.tmp").exists()
    (secrets / "redis_password_ingest_user_b1").write_text("pw-i")
    (secrets / "redis_password_listener_b1").write_text("pw-l")
    assert render("-,b1").returncode == 0
    users = [line.split()[1] for line in (tmp_path / "users.acl").read_text().splitlines()]
    assert users == ["default", "ingest-market", "ingest-user", "projector", "reader",
                     "listener", "status", "admin", "ingest-user-b1", "listener-b1"]
