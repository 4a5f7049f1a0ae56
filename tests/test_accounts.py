"""Several accounts: each account's log, views, open orders, positions and orders stream under
its own label (`PIPELINE_ACCOUNT`), one `ingest user` per account, one projector serving every
account, and an account's ACL users limited to that account's keys.

The unit tests pin the key layout and the settings; the last test runs the deployment's shape
on the simulator with two accounts: two user ingestors, one projector, the ACL on, each
process logged in as its own user, and the listener of one account consumes its orders and is
refused the other's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import load_settings
from pipeline.eventlog import retention_family
from pipeline.localredis import LocalRedis, free_port
from pipeline.redisconn import connect_checked
from projections.client import OrderEvent, OrdersConsumer, open_orders
from projections.core.keys import (
    ACCOUNT_FAMILIES,
    Keys,
    check_account,
    conn_user_key,
    projection_base,
    projection_name,
    raw_account,
    user_key,
)
from projections.core.orders import OrdersProjection
from projections.shell import functions
from projections.shell.registry import available, choose
from tests.conftest import ROOT, run_cli
from tests.test_acl import refused, render_acl
from tests.test_ingest_user import dump_everything
from tests.test_metrics import wait_for

# --- the key layout --------


def test_an_account_label_scopes_its_user_data_and_shares_the_market_views() -> None:
    a1 = Keys("websocket", account="a1")
    assert a1.open_orders("BTCUSDT") == "websocket:acct:a1:open_orders:btcusdt"
    assert a1.open_orders("BTCUSDT", "algo") == "websocket:acct:a1:open_algo_orders:btcusdt"
    assert a1.order_state("BTCUSDT", "algo") == "websocket:acct:a1:algo_order_state:btcusdt"
    assert a1.position("BTCUSDT", "long") == "websocket:acct:a1:position:btcusdt:long"
    assert a1.balance("USDT") == "websocket:acct:a1:balance:usdt"
    assert a1.orders_stream() == "websocket:acct:a1:orders"
    assert a1.orders_stream("ETHUSDT") == "websocket:acct:a1:orders:ethusdt"
    assert a1.order_keys("BTCUSDT", "order") == [
        "websocket:acct:a1:order_state:btcusdt", "websocket:acct:a1:open_orders:btcusdt",
        "websocket:acct:a1:orders:btcusdt", "websocket:acct:a1:orders"]
    # the market's views are every account's
    assert a1.mark_price("BTCUSDT") == Keys("websocket").mark_price("BTCUSDT")
    assert a1.orderbook("BTCUSDT", 20) == "websocket:orderbook:btcusdt:20"
    assert a1.kline("BTCUSDT", "1m") == "websocket:kline:btcusdt:1m"
    # its log and its projections' names
    assert (a1.raw_user(), a1.raw_conn_user()) == ("raw:user:a1", "raw:conn:user:a1")
    assert a1.projection("orders") == "orders@a1" == projection_name("orders", "a1")
    assert projection_base("orders@a1") == ("orders", "a1")
    assert projection_base("orders") == ("orders", None)
    assert raw_account("raw:conn:user:a1") == ("raw:conn:user", "a1")
    assert raw_account("raw:user") == ("raw:user", None)
    # unset: today's names, byte for byte
    plain = Keys("websocket", account=None)
    assert (plain.raw_user(), plain.raw_conn_user()) == ("raw:user", "raw:conn:user")
    assert (user_key(), conn_user_key()) == ("raw:user", "raw:conn:user")
    assert plain.orders_stream() == "websocket:orders" and plain.projection("orders") == "orders"


def test_keys_of_an_account_read_back_and_never_match_another_accounts_patterns() -> None:
    a1, a2, plain = (Keys("desk", account=a) for a in ("a1", "a2", None))
    key = a1.open_orders("BTCUSDT")
    assert a1.pattern("open_orders") == "desk:acct:a1:open_orders:*"
    assert plain.family_of(key) == "open_orders" and plain.account_of(key) == "a1"
    assert plain.account_of(plain.open_orders("BTCUSDT")) is None
    assert a1.held_orders(key) == ("open_orders", "BTCUSDT")
    # reconciliation of one account never takes another's (or the unlabelled) open orders
    assert a2.held_orders(key) is None and plain.held_orders(key) is None
    assert a1.held_orders(plain.open_orders("BTCUSDT")) is None
    assert not re.fullmatch(a2.pattern("open_orders").replace("*", ".*"), key)
    assert not re.fullmatch(plain.pattern("open_orders").replace("*", ".*"), key)


def test_a_user_data_family_added_later_is_scoped_by_being_in_the_set_alone() -> None:
    # issue #13's views: builders that call `view` get the account's scope with no code of
    # their own
    a1 = Keys("websocket", account="a1")
    assert {"account_events", "leverage", "position_events"} <= ACCOUNT_FAMILIES
    assert a1.view("leverage", "BTCUSDT") == "websocket:acct:a1:leverage:btcusdt"
    assert a1.view("account_events") == "websocket:acct:a1:account_events"
    assert Keys("websocket").view("leverage", "BTCUSDT") == "websocket:leverage:btcusdt"
    assert a1.view("kline_history", "BTCUSDT") == "websocket:kline_history:btcusdt"


def test_an_accounts_log_is_never_trimmed_like_the_unlabelled_one() -> None:
    assert retention_family("raw:user:a1") == retention_family("raw:user") == "user"
    assert retention_family("raw:conn:user:a1") == "conn"


# --- settings --------

def test_account_labels_are_checked_and_the_projector_serves_the_listed_ones() -> None:
    s = load_settings(env={"PIPELINE_ACCOUNT": "desk-b_2"})
    assert (s.account, s.accounts) == ("desk-b_2", ("desk-b_2",))
    s = load_settings(env={"PIPELINE_ACCOUNTS": "a1, -, a2,a1"})
    assert (s.account, s.accounts) == (None, ("a1", None, "a2"))
    assert load_settings(env={}).accounts == (None,)
    for bad in ("A1", "a:1", "a*", "_a", "x" * 33, "a1 b"):
        with pytest.raises(ValueError):
            check_account(bad)
    done = run_cli("status", env={"PIPELINE_ACCOUNT": "a:1", "REDIS_URL": "redis://127.0.0.1:1"})
    assert done.returncode == 2
    assert done.stderr.startswith("pipeline: bad setting PIPELINE_ACCOUNT:")
    done = run_cli("project", "--all-accounts", "a1,B2",
                   env={"REDIS_URL": "redis://127.0.0.1:1"})
    assert done.returncode == 2 and "PIPELINE_ACCOUNTS" in done.stderr


def test_the_projector_runs_the_user_data_projections_once_per_account() -> None:
    settings = load_settings(env={"PIPELINE_ACCOUNTS": "a1,a2"})
    specs = available(settings)
    assert {"orders@a1", "account@a1", "orders@a2", "account@a2"} <= set(specs)
    assert "orders" not in specs and "account" not in specs
    orders = specs["orders@a2"].factory()
    assert (orders.name, list(orders.sources)) == ("orders@a2", ["raw:user:a2"])
    assert specs["orders@a2"].exclusive
    assert "websocket:acct:a2:open_orders:*" in specs["orders@a2"].key_patterns
    assert specs["account@a1"].key_patterns == (
        "websocket:acct:a1:position:*", "websocket:acct:a1:balance:*",
        "websocket:acct:a1:leverage:*", "websocket:acct:a1:multi_assets_margin")
    events = specs["account_events@a1"].factory()
    assert (events.name, list(events.sources)) == ("account_events@a1", ["raw:user:a1"])
    # a base name picks that projection of every account; a full name one
    assert [s.name for s in choose(settings, "orders")] == ["orders@a1", "orders@a2"]
    assert [s.name for s in choose(settings, "account@a2,mark_price")] == [
        "account@a2", "mark_price"]
    # unset: exactly today's projections
    assert {"orders", "account"} <= set(available(load_settings(env={})))


def test_a_user_data_fold_that_ignores_the_account_is_refused_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from projections.shell import registry

    class Unscoped(OrdersProjection):
        def __init__(self, prefix: str, **options: Any) -> None:
            options.pop("account", None)
            super().__init__(prefix, **options)

    monkeypatch.setitem(registry._USER, "orders", (Unscoped, registry._USER["orders"][1]))
    with pytest.raises(TypeError, match="did not take account='a1'"):
        available(load_settings(env={"PIPELINE_ACCOUNTS": "a1"}))


# --- two accounts side by side, the deployment's shape --------

KEY_1, SECRET_1 = "Acct1Key-" + "k1Q" * 16, "Acct1Secret-" + "s1W" * 16
KEY_2, SECRET_2 = "Acct2Key-" + "k2E" * 16, "Acct2Secret-" + "s2R" * 16


def _wait(condition: Callable[[], object], timeout: float = 30.0) -> Any:
    """Until `condition()` is truthy (state in other processes: nothing to await but polls)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)
    return value


def _place(http: httpx.Client, account: str | None, **order: str) -> str:
    body = {"side": "BUY", "type": "LIMIT", "quantity": "0.010", **order}
    if account:
        body["account"] = account
    reply = http.post("/sim/account/place", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["orderId"])


def test_two_accounts_side_by_side_have_separate_views_and_orders_streams_behind_the_acl(
        tmp_path: Path) -> None:
    accounts = ("a1", "a2")
    server = LocalRedis(tmp_path / "redis", args=[
        "--aclfile", str(render_acl(tmp_path / "acl", accounts=accounts))]).start()

    def url(user: str) -> str:
        return f"redis://{user}:pw-{user.replace('-', '_')}@127.0.0.1:{server.port}/0"

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, argv: list[str], env: dict[str, str],
              **kw: Any) -> subprocess.Popen[str]:
        with open(tmp_path / f"{name}.log", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                                    env=env, stderr=err, text=True, **kw)
        procs.append(proc)
        return proc

    admin = server.client(username="admin", password="pw-admin")
    functions.load(admin)  # what `pipeline functions load` does at deployment
    try:
        sim = start("sim", ["simulate", "--symbols", "BTCUSDT,ETHUSDT", "--api-key", KEY_1,
                            "--api-secret", SECRET_1, "--account", f"b:{KEY_2}:{SECRET_2}"],
                    base, stdout=subprocess.PIPE)
        assert sim.stdout is not None
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", sim.stdout.readline())
        env = {**base, "BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest,
               "PIPELINE_SYMBOLS": "BTCUSDT,ETHUSDT", "PIPELINE_LOG_FORMAT": "json"}
        ports = {"a1": free_port(), "a2": free_port()}
        for account, key, secret in (("a1", KEY_1, SECRET_1), ("a2", KEY_2, SECRET_2)):
            start(f"ingest-user-{account}", ["ingest", "user"], {
                **env, "PIPELINE_ACCOUNT": account, "REDIS_URL": url(f"ingest-user-{account}"),
                "BINANCE_API_KEY": key, "BINANCE_API_SECRET": secret,
                "PIPELINE_METRICS_PORT": str(ports[account])})
        start("project", ["project", "--only", "orders,account", "--block-ms", "100"],
              {**env, "PIPELINE_ACCOUNTS": "a1,a2", "REDIS_URL": url("projector")})
        http = httpx.Client(base_url=rest, timeout=5)
        # each account's stream is up and reconciled (its snapshots folded into its views)
        _wait(lambda: all(admin.exists(f"websocket:acct:{a}:balance:usdt") for a in accounts))

        mine = [_place(http, None, symbol="BTCUSDT", price="50000") for _ in range(2)]
        theirs = _place(http, "b", symbol="ETHUSDT", price="3000")
        filled = http.post("/sim/account/fill", json={"orderId": mine[0]})
        assert filled.status_code == 200, filled.text
        _wait(lambda: admin.xlen("websocket:acct:a1:orders") >= 3
              and admin.xlen("websocket:acct:a2:orders") >= 1)

        # account a1's listener: its own orders, as the exchange has them; a2's refused
        l1 = connect_checked(url("listener-a1"))
        seen: list[OrderEvent] = []
        consumer = OrdersConsumer(l1, group="desk", consumer="c1", handler=seen.append,
                                  start_id="0", block_ms=50, account="a1")
        _wait(lambda: consumer.poll_once() == 0 and len(seen) >= 3)
        assert {e.order_id for e in seen} == set(mine)
        assert [e.status for e in seen if e.order_id == mine[0]] == ["NEW", "FILLED"]
        assert open_orders(l1, account="a1") == http.get("/sim/account/state").json()[
            "openOrders"]
        assert [o["orderId"] for o in open_orders(l1, account="a1")] == [int(mine[1])]
        assert refused(lambda: OrdersConsumer(l1, group="desk", handler=seen.append,
                                              account="a2"))
        assert refused(lambda: open_orders(l1, account="a2"))
        # account a2's listener sees a2's order only
        l2 = connect_checked(url("listener-a2"))
        rows = open_orders(l2, account="a2")
        assert [str(o["orderId"]) for o in rows] == [theirs]
        assert rows == http.get("/sim/account/state", params={"account": "b"}).json()[
            "openOrders"]
        assert admin.exists("websocket:acct:a1:position:btcusdt")  # the fill's position
        # nothing of the unlabelled account was written
        assert not admin.exists("raw:user", "raw:conn:user", "websocket:orders")
        assert not list(admin.scan_iter(match="websocket:open_orders:*"))

        status = run_cli("status", "--json", env={**env, "PIPELINE_ACCOUNTS": "a1,a2,a3",
                                                  "REDIS_URL": url("status")})
        report = json.loads(status.stdout)
        by_account = {a["account"]: a for a in report["accounts"]}
        assert set(by_account) == {"a1", "a2", "a3"}
        assert by_account["a1"]["user_stream"]["connected"]
        assert by_account["a2"]["user_stream"]["connected"]
        assert by_account["a2"]["weight_used_1m"] is not None
        # a3 is expected and has never run: the one problem
        assert status.returncode == 1
        assert [p for p in report["problems"] if "user stream" in p] == [
            "user stream a3: nothing logged in raw:conn:user:a3 (no `ingest user` with "
            "PIPELINE_ACCOUNT=a3 has run)"]
        # each user ingestor's series say whose they are
        scraped = wait_for(ports["a2"], "/metrics",
                           r'^pipeline_reconciliations_total\{account="a2",outcome="complete"\}')
        assert re.search(r'^pipeline_process_info\{account="a2",role="ingest-user",shard=""\} '
                         r'1\.0$', scraped, re.M)
        assert 'account="a1"' not in scraped
        groups = {(s["key"], g["name"]) for s in report["streams"] for g in s["groups"]}
        assert {("raw:user:a1", "orders@a1"), ("raw:user:a2", "account@a2"),
                ("websocket:acct:a1:orders", "desk")} <= groups
        views = {(v["account"], v["family"]) for v in report["views"]}
        assert {("a1", "open_orders"), ("a2", "open_orders"), ("a1", "position")} <= views
        # each account's listenKey, as the exchange hands it to anyone with its API key
        listen_keys = [http.post("/fapi/v1/listenKey", headers={"X-MBX-APIKEY": k}).json()[
            "listenKey"] for k in (KEY_1, KEY_2)]
        l1.close()
        l2.close()
        http.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
            if p.stdout is not None:
                p.stdout.close()
    everything = dump_everything(admin)
    admin.close()
    server.stop()
    # the pipeline's own logs (the simulator, the exchange's side, aside)
    logs = b"".join(p.read_bytes() for p in tmp_path.glob("*.log") if p.name != "sim.log")
    lines = [json.loads(line) for line in (tmp_path / "ingest-user-a2.log").read_text()
             .splitlines() if line.startswith("{")]
    assert lines and {line["account"] for line in lines} == {"a2"}  # each line names it
    for secret in (KEY_1, SECRET_1, KEY_2, SECRET_2, *listen_keys):
        assert secret.encode() not in everything
        assert secret.encode() not in logs
