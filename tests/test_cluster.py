"""Redis Cluster (PIPELINE_REDIS_CLUSTER): the pipeline's commands on a real cluster.

One cluster for the module (`pipeline.localredis.LocalCluster`: three masters with a replica
each, in temporary folders, `redis-cli --cluster create`), emptied between tests. The
processes run as a user starts them (`python -m pipeline ...`) against the simulator; the
tests read what the analyzer and the listener read, through the consumer library on a
`RedisCluster` client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.cluster
import trio
import trio.lowlevel
from redis.crc import key_slot

from pipeline import metrics
from pipeline.clusterwriter import ClusterRouter
from pipeline.config import load_settings
from pipeline.errors import SettingsError
from pipeline.localredis import LocalCluster, LocalRedis, free_port
from pipeline.redisconn import connect_checked
from pipeline.writer import LogWriter
from projections.client import MarketReader, OrderEvent, OrdersConsumer, open_orders
from projections.core import keys as keymod
from projections.core.keys import Keys, market_key
from tests.conftest import ROOT, run_cli
from tests.test_metrics import wait_for as metrics_wait_for

pytestmark = pytest.mark.slow

SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
STREAMS = "markPrice@1s,depth20@100ms,aggTrade,depth@100ms"
KEY, SECRET = "ClusterKey-" + "c1Q" * 16, "ClusterSecret-" + "s9W" * 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def rc(cluster: LocalCluster) -> Iterator[redis.cluster.RedisCluster]:
    """An empty cluster and a client of it (the layout of this process left single-node)."""
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        client.close()
        keymod.set_cluster_layout(False)


class Procs:
    """The pipeline's processes of one test, each logging to a file of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.base = {k: v for k, v in os.environ.items()
                     if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}

    def start(self, name: str, argv: list[str], env: dict[str, str],
              **kw: Any) -> subprocess.Popen[str]:
        with open(self.folder / f"{name}.log", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                                    env={**self.base, **env}, stderr=err, text=True, **kw)
        self.procs[name] = proc
        return proc

    def simulator(self) -> dict[str, str]:
        sim = self.start("sim", ["simulate", "--symbols", SYMBOLS, "--api-key", KEY,
                                 "--api-secret", SECRET], {}, stdout=subprocess.PIPE)
        assert sim.stdout is not None
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", sim.stdout.readline())
        return {"BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest, "PIPELINE_SYMBOLS": SYMBOLS,
                "PIPELINE_MARKET_STREAMS": STREAMS}

    def stop(self, name: str) -> str:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
        return (self.folder / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def wait(condition: Callable[[], object], timeout: float = 30.0) -> Any:
    """Until `condition()` is truthy (state in other processes: nothing to await but polls)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)
    return value


def drained(rc: redis.cluster.RedisCluster) -> bool:
    """Every group on every raw stream has read everything and holds nothing pending."""
    for key in rc.scan_iter(match="raw:market:*", _type="stream"):
        for g in rc.xinfo_groups(key):
            if g["pending"] or g["lag"] != 0:
                return False
    return True


def last_frames(rc: redis.cluster.RedisCluster, family: str) -> dict[str, dict[str, Any]]:
    """Per symbol, the payload of the newest frame of `family` in the log."""
    out: dict[str, dict[str, Any]] = {}
    for _, fields in rc.xrange(cluster_key(family)):
        if b"frame" in fields:
            data = orjson.loads(fields[b"frame"])["data"]
            out[data["s"]] = data
    return out


def cluster_key(family: str) -> str:
    keymod.set_cluster_layout(True)
    try:
        return market_key(family)
    finally:
        keymod.set_cluster_layout(False)


# --- settings and detection -----------------------------------------------------------------


def test_cluster_mode_is_detected_from_the_node_and_a_setting_that_disagrees_is_refused(
        cluster: LocalCluster, tmp_path: Path) -> None:
    assert load_settings(env={"PIPELINE_REDIS_CLUSTER": "1"}).redis_cluster is True
    assert load_settings(env={}).redis_cluster is None
    with pytest.raises(SettingsError, match="PIPELINE_REDIS_CLUSTER"):
        load_settings(env={"PIPELINE_REDIS_CLUSTER": "maybe"})
    try:
        client = connect_checked(cluster.url)  # detected: cluster_enabled:1
        assert isinstance(client, redis.cluster.RedisCluster)
        assert keymod.cluster_layout()
        client.close()
        with pytest.raises(SettingsError, match="PIPELINE_REDIS_CLUSTER"):
            connect_checked(cluster.url, cluster=False)
        with LocalRedis(tmp_path / "one") as one:
            with pytest.raises(SettingsError, match="PIPELINE_REDIS_CLUSTER"):
                connect_checked(one.url, cluster=True)
            plain = connect_checked(one.url)  # one node: today's client and key names
            assert type(plain) is redis.Redis and not keymod.cluster_layout()
            assert Keys().order_state("BTCUSDT") == "websocket:order_state:btcusdt"
            plain.close()
    finally:
        keymod.set_cluster_layout(False)
    done = run_cli("status", env={"REDIS_URL": cluster.url, "PIPELINE_REDIS_CLUSTER": "0"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pipeline: bad setting PIPELINE_REDIS_CLUSTER: is 0 but {cluster.url} says "
        "cluster_enabled:1"]


def test_keys_written_together_share_a_slot_and_the_views_keep_their_names() -> None:
    keymod.set_cluster_layout(True)
    try:
        keys = Keys()
        # a projection's sources: one XREADGROUP
        assert len({key_slot(market_key(f).encode())
                    for f in ("depth5", "depth10", "depth20")}) == 1
        assert key_slot(market_key("depth").encode()) == key_slot(
            keymod.depth_snapshots_key().encode())
        assert market_key("markPrice") == "raw:market:{mark}:markPrice"
        assert market_key("kline_1m") == "raw:market:{candles}:kline_1m"
        for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT"):
            for kind in ("order", "algo"):
                assert len({key_slot(k.encode()) for k in keys.order_keys(symbol, kind)}) == 1
            assert keys.order_keys(symbol, "order")[3] in keys.orders_partitions()
            assert keys.held_orders(keys.open_orders(symbol)) == ("open_orders", symbol)
        assert keys.mark_price("BTCUSDT") == "websocket:mark_price:btcusdt"
        assert Keys(account="a1").orders_partitions()[2] == "websocket:acct:a1:orders:{a1.o2}"
    finally:
        keymod.set_cluster_layout(False)
    assert Keys().order_keys("BTCUSDT", "order")[3] == "websocket:orders"
    assert market_key("markPrice") == "raw:market:markPrice"


# --- the flows end to end ----------------------------------------------------------------------


def test_market_flow_on_a_cluster_ends_with_the_views_the_log_says(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs) -> None:
    env = {**procs.simulator(), "REDIS_URL": cluster.url, "PIPELINE_REDIS_CLUSTER": "1"}
    procs.start("ingest", ["ingest", "market"], env)
    procs.start("project", ["project", "--block-ms", "100"], env)
    reader = MarketReader(rc, fallback=False)  # type: ignore[arg-type]
    wait(lambda: all(reader.order_book(s, 20, max_age=60) for s in SYMBOLS.split(",")))
    time.sleep(1.5)
    log = procs.stop("ingest")
    wait(lambda: drained(rc))
    assert "Traceback" not in log
    # the raw streams spread over the masters, one slot per projection's sources
    masters = {cluster.node_of_slot(key_slot(k)).port
               for k in rc.scan_iter(match="raw:market:*", _type="stream")}
    assert len(masters) == 3
    marks, books = last_frames(rc, "markPrice"), last_frames(rc, "depth20")
    diffs = last_frames(rc, "depth")  # the depth book writes the same key: the newest wins
    for symbol in SYMBOLS.split(","):
        mark = reader.mark_price(symbol, max_age=60)
        assert mark is not None and mark["mark_price"] == marks[symbol]["p"]
        book = reader.order_book(symbol, 20, max_age=60)
        assert book is not None
        assert book["last_update_id"] == max(books[symbol]["u"], diffs[symbol]["u"])
    assert not list(rc.scan_iter(match="dlq:*"))
    assert "Traceback" not in procs.stop("project")


def test_user_flow_on_a_cluster_orders_exactly_once_in_order_per_symbol(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs) -> None:
    sim = procs.simulator()
    env = {**sim, "REDIS_URL": cluster.url, "BINANCE_API_KEY": KEY,
           "BINANCE_API_SECRET": SECRET}  # cluster mode detected
    procs.start("ingest-user", ["ingest", "user"], env)
    procs.start("project", ["project", "--only", "orders,account", "--block-ms", "100"], env)
    http = httpx.Client(base_url=sim["BINANCE_REST_URL"], timeout=5)
    wait(lambda: rc.exists("websocket:balance:usdt"))
    placed: dict[str, list[str]] = {}
    for symbol, price in (("BTCUSDT", "50000"), ("ETHUSDT", "3000"), ("SOLUSDT", "150")):
        for _ in range(2):
            body = {"side": "BUY", "type": "LIMIT", "quantity": "0.010", "symbol": symbol,
                    "price": price}
            reply = http.post("/sim/account/place", json=body)
            assert reply.status_code == 200, reply.text
            placed.setdefault(symbol, []).append(str(reply.json()["orderId"]))
    for symbol in placed:
        assert http.post("/sim/account/fill",
                         json={"orderId": placed[symbol][0]}).status_code == 200
    seen: list[OrderEvent] = []
    consumer = OrdersConsumer(rc, group="desk", consumer="c1",  # type: ignore[arg-type]
                              handler=seen.append, start_id="0", block_ms=50)
    assert len(consumer.streams) == keymod.ORDER_PARTITIONS
    wait(lambda: consumer.poll_once() == 0 and len(seen) >= 9)
    consumer.close()
    for symbol, ids in placed.items():
        mine = [(e.order_id, e.status) for e in seen if e.symbol == symbol]
        # exactly once per transition, in the order the exchange made them
        assert mine == [(ids[0], "NEW"), (ids[1], "NEW"), (ids[0], "FILLED")]
    assert len(seen) == 9
    state = http.get("/sim/account/state").json()["openOrders"]
    assert open_orders(rc) == state  # type: ignore[arg-type]
    assert [o["orderId"] for o in open_orders(rc, "ETHUSDT")] == [  # type: ignore[arg-type]
        int(placed["ETHUSDT"][1])]
    assert rc.xlen("raw:user") > 0
    http.close()
    user_log = procs.stop("ingest-user")
    # every raw:user batch waited for a replica (WAIT 1, the default), none in vain
    assert "no replica acknowledged" not in user_log and "WAIT refused" not in user_log
    for log in (user_log, procs.stop("project")):
        assert "Traceback" not in log


def test_the_order_listener_waits_on_every_partition_at_once(
        rc: redis.cluster.RedisCluster) -> None:
    """An event on the last partition is handled as it comes, not after the waits of the
    partitions before it: with a 20 s wait, a poll that read the partitions one after the
    other would return only after 15 s."""
    seen: list[OrderEvent] = []
    consumer = OrdersConsumer(rc, group="desk", consumer="c1",  # type: ignore[arg-type]
                              handler=seen.append, block_ms=20_000)
    last = consumer.streams[-1]

    def append() -> None:
        time.sleep(0.3)
        rc.xadd(last, {"order_id": "7", "status": "NEW", "symbol": "BTCUSDT", "kind": "order",
                       "source": "stream", "data": "{}"})

    writer = threading.Thread(target=append)
    started = time.monotonic()
    writer.start()
    handled = consumer.poll_once()
    took = time.monotonic() - started
    writer.join()
    assert handled == 1 and [(e.order_id, e.status) for e in seen] == [("7", "NEW")]
    assert took < 10, f"the poll waited {took:.1f} s for partitions that had nothing"
    for stream in consumer.streams[:-1]:  # the reads still out on the others end with these
        rc.xadd(stream, {"order_id": "8", "status": "NEW", "symbol": "ETHUSDT", "data": "{}"})
    consumer.close()
    assert rc.xpending(last, "desk")["pending"] == 0  # handled and acknowledged


def test_status_reports_every_node_and_replay_rebuilds_the_views(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs) -> None:
    env = {**procs.simulator(), "REDIS_URL": cluster.url}
    procs.start("ingest", ["ingest", "market"], env)
    procs.start("project", ["project", "--block-ms", "100", "--only", "mark_price,orderbook"],
                env)
    wait(lambda: rc.get("websocket:orderbook:solusdt:20") and rc.get(
        "websocket:mark_price:solusdt"))
    procs.stop("ingest")
    wait(lambda: drained(rc))
    procs.stop("project")
    before = {k: rc.get(k) for k in rc.scan_iter(match="websocket:*", _type="string")}
    assert len(before) == 6
    done = run_cli("status", "--json", env=env)
    report = json.loads(done.stdout)
    nodes = report["nodes"]
    assert sorted(n["port"] for n in nodes if n["role"] == "master") == sorted(
        n.port for n in cluster.master_nodes())
    assert sum(n["slots"] for n in nodes if n["role"] == "master") == 16384
    assert all(n["replicas"] == 1 for n in nodes if n["role"] == "master")
    assert sum(n["keys"] for n in nodes if n["role"] == "master") == sum(
        m.client().dbsize() for m in cluster.master_nodes())
    streams = {s["key"] for s in report["streams"]}
    assert cluster_key("depth20") in streams
    assert not [p for p in report["problems"] if p.startswith(("redis node", "redis cluster"))]
    # replay: the views deleted and rebuilt from the log, on every node
    done = run_cli("replay", "--only", "mark_price,orderbook", "--reset", env=env)
    assert done.returncode == 0, done.stderr
    after = {k: rc.get(k) for k in rc.scan_iter(match="websocket:*", _type="string")}
    assert after == before


def _xadd(key: str) -> bytes:
    """One `XADD key * f v`, packed as the writer packs its entries."""
    args = [b"XADD", key.encode(), b"*", b"f", b"v"]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_the_writer_follows_ask_while_a_slot_migrates_and_moved_once_it_has(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster) -> None:
    key = "raw:market:{asktest}:x"
    slot = key_slot(key.encode())
    rc.xadd(key, {"f": "v"})
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.master_nodes() if n.port != source.port)
    with source.client() as src, target.client() as dst:
        src_id, dst_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)
        router = ClusterRouter(rc)
        asks = metrics.REDIRECTS.labels("ask")._value.get()
        assert router.write([(key, _xadd(key))]) == []  # ASK: ASKING + the entry, on target
        assert metrics.REDIRECTS.labels("ask")._value.get() == asks + 1
        for c in (dst, src):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert dst.xlen(key) == 2
        assert src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        moved = metrics.REDIRECTS.labels("moved")._value.get()
        assert router.write([(key, _xadd(key)), ("raw:user", _xadd("raw:user"))]) == []
        assert metrics.REDIRECTS.labels("moved")._value.get() == moved + 1
        assert dst.xlen(key) == 3 and rc.xlen("raw:user") == 1
    cluster.wait_ok()


def acl_rules(line: str) -> tuple[str, list[str]]:
    """`user NAME rule rule (selector rules) ...` -> (NAME, the ACL SETUSER arguments)."""
    _, name, rest = line.split(" ", 2)
    rules: list[str] = []
    depth = 0
    for token in rest.split(" "):
        if depth:
            rules[-1] += " " + token
        else:
            rules.append(token)
        depth += token.count("(") - token.count(")")
    return name, rules


def test_each_role_works_on_every_node_with_the_cluster_acl(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs,
        tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for role in ("ingest_market", "ingest_user", "projector", "reader", "listener", "status",
                 "admin"):
        (secrets / f"redis_password_{role}").write_text(f"pw-{role}\n")
    acl = tmp_path / "users.acl"
    subprocess.run(["sh", str(ROOT / "deploy/redis/render-acl.sh"),
                    str(ROOT / "deploy/redis/users.acl.template"), str(acl)],
                   env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets),
                        "PIPELINE_REDIS_CLUSTER": "1"}, check=True, timeout=10)
    for node in cluster.nodes:  # the same users on every node, masters and replicas
        with node.client() as c:
            for line in acl.read_text().splitlines():
                name, rules = acl_rules(line)
                if name != "default":
                    c.execute_command("ACL", "SETUSER", name, "reset", *rules)

    def url(role: str) -> str:
        return cluster.url.replace("redis://", f"redis://{role}:pw-{role.replace('-', '_')}@")

    # what the deployment does once: the admin loads the function library on every master
    rc.function_flush()
    loaded = run_cli("functions", "load", env={"REDIS_URL": url("admin")})
    assert loaded.returncode == 0, loaded.stderr
    for master in cluster.master_nodes():
        with master.client() as c:
            assert len(c.function_list()) == 1

    env = procs.simulator()
    procs.start("ingest", ["ingest", "market"], {**env, "REDIS_URL": url("ingest-market")})
    procs.start("ingest-user", ["ingest", "user"], {
        **env, "REDIS_URL": url("ingest-user"), "BINANCE_API_KEY": KEY,
        "BINANCE_API_SECRET": SECRET, "PIPELINE_LOG_FORMAT": "json"})
    procs.start("project", ["project", "--block-ms", "100", "--only",
                            "mark_price,orderbook,depth_book,orders,account"],
                {**env, "REDIS_URL": url("projector")})
    reader_client = redis.cluster.RedisCluster.from_url(url("reader"))
    listener_client = redis.cluster.RedisCluster.from_url(url("listener"))
    http = httpx.Client(base_url=env["BINANCE_REST_URL"], timeout=5)
    try:
        reader = MarketReader(reader_client, fallback=False)  # type: ignore[arg-type]
        wait(lambda: all(reader.order_book(s, 20, max_age=60) and reader.mark_price(
            s, max_age=60) for s in SYMBOLS.split(",")))
        wait(lambda: rc.exists("websocket:balance:usdt"))
        reply = http.post("/sim/account/place", json={
            "side": "BUY", "type": "LIMIT", "quantity": "0.010", "symbol": "SOLUSDT",
            "price": "150"})
        assert reply.status_code == 200, reply.text
        seen: list[OrderEvent] = []
        consumer = OrdersConsumer(listener_client, group="desk",  # type: ignore[arg-type]
                                  handler=seen.append, start_id="0", block_ms=50)
        wait(lambda: consumer.poll_once() >= 0 and len(seen) >= 1)
        consumer.close()
        assert [(e.symbol, e.status) for e in seen] == [("SOLUSDT", "NEW")]
        assert [o["symbol"] for o in open_orders(listener_client)] == [  # type: ignore[arg-type]
            "SOLUSDT"]
        done = run_cli("status", "--json", env={**env, "REDIS_URL": url("status")})
        report = json.loads(done.stdout)
        assert len([n for n in report["nodes"] if n["role"] == "master"]) == 3, done.stderr
        assert all(n["keys"] is not None for n in report["nodes"])
    finally:
        http.close()
        reader_client.close()
        listener_client.close()
    user_log = procs.stop("ingest-user")
    # every raw:user batch waited for a replica, and WAIT was allowed
    assert "WAIT refused" not in user_log and "no replica acknowledged" not in user_log
    for name in ("ingest", "project"):
        assert "NOPERM" not in procs.stop(name)
    assert "NOPERM" not in user_log


# --- failover and resharding mid-ingest (last: they change the module's cluster) -------------


def seq_holes(rc: redis.cluster.RedisCluster, *keys: str) -> int:
    """Frames missing from `keys`: holes in each connection's `seq` numbers. A connection
    numbers its frames through all its streams, so `keys` must be every key its streams go to
    (the tests' connections carry exactly the families asked for)."""
    by_conn: dict[bytes, list[int]] = {}
    for key in keys:
        for _, fields in rc.xrange(key):
            if b"frame" in fields:
                by_conn.setdefault(fields[b"conn"], []).append(int(fields[b"seq"]))
    return sum(len(set(range(min(s), max(s) + 1))) - len(set(s)) for s in by_conn.values())


def seq_repeats(rc: redis.cluster.RedisCluster, *keys: str) -> int:
    """Frames logged more than once (same connection and seq)."""
    seen = [(f[b"conn"], f[b"seq"]) for k in keys for _, f in rc.xrange(k) if b"frame" in f]
    return len(seen) - len(set(seen))


def test_a_master_killed_mid_ingest_is_replaced_and_ingest_and_projection_carry_on(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs) -> None:
    env = {**procs.simulator(), "REDIS_URL": cluster.url, "PIPELINE_MARKET_STREAMS":
           "markPrice@1s,depth20@100ms", "PIPELINE_LOG_FORMAT": "json"}
    procs.start("ingest", ["ingest", "market"], env)
    procs.start("project", ["project", "--block-ms", "100", "--only", "mark_price,orderbook"],
                env)
    reader = MarketReader(rc, fallback=False)  # type: ignore[arg-type]
    wait(lambda: all(reader.order_book(s, 20, max_age=60) for s in SYMBOLS.split(",")))
    victim = cluster.node_of_slot(key_slot(cluster_key("depth20").encode()))
    before = rc.xlen(cluster_key("depth20"))
    victim.kill()  # SIGKILL: its replica takes over after the node timeout
    wait(lambda: victim.port not in {n.port for n in cluster.master_nodes()}
         and _served_by_a_live_master(cluster, cluster_key("depth20")), timeout=30)
    promoted_at = time.time()
    # ingest carries on by itself: frames appended on the promoted replica
    wait(lambda: _xlen(cluster, cluster_key("depth20")) > before + 30, timeout=30)
    time.sleep(1.0)
    ingest_log = procs.stop("ingest")
    rc2 = redis.cluster.RedisCluster.from_url(cluster.master_nodes()[0].url)
    try:
        wait(lambda: drained(rc2), timeout=30)
        assert procs.procs["project"].poll() is None  # the projector kept running
        reader2 = MarketReader(rc2, fallback=False)  # type: ignore[arg-type]
        books = last_frames(rc2, "depth20")
        marks = last_frames(rc2, "markPrice")
        for symbol in SYMBOLS.split(","):
            book = reader2.order_book(symbol, 20, max_age=60)
            assert book is not None and book["last_update_id"] == books[symbol]["u"]
            mark = reader2.mark_price(symbol, max_age=60)
            assert mark is not None and mark["mark_price"] == marks[symbol]["p"]
        assert not list(rc2.scan_iter(match="dlq:*"))
        # what asynchronous replication lost is what the promoted replica never got: holes in
        # the connection's seq numbers, all from before the kill; nothing written after the
        # promotion is missing
        holes = seq_holes(rc2, cluster_key("depth20"))
        after = [int(f[b"seq"]) for eid, f in rc2.xrange(cluster_key("depth20"))
                 if int(eid.split(b"-")[0]) > (promoted_at + 0.5) * 1000]
        assert len(after) > 10 and after == list(range(after[0], after[0] + len(after)))
        # and the writer found the same loss itself: a `failover` gap entry counts it
        gaps = [orjson.loads(f[b"body"]) for _, f in rc2.xrange(cluster_key("depth20"))
                if f.get(b"ctl") == b"gap"]
        assert sum(g["dropped"] for g in gaps if g["reason"] == "failover") == holes
        lines = [json.loads(x) for x in ingest_log.splitlines() if x.startswith("{")]
        events = [x["event"] for x in lines if x["logger"] == "pipeline.writer"]
        assert events[:1] == ["redis unavailable: holding frames in the buffer and retrying"]
        assert "redis back" in events
        assert "Traceback" not in ingest_log
    finally:
        rc2.close()
    assert "Traceback" not in procs.stop("project")
    # status: the promoted replica is a master with no replica of its own now
    done = run_cli("status", "--json", env={"REDIS_URL": cluster.master_nodes()[0].url})
    problems = json.loads(done.stdout)["problems"]
    promoted = cluster.node_of_slot(key_slot(cluster_key("depth20").encode()))
    assert done.returncode == 1
    assert [p for p in problems if p.startswith("redis node")] == [
        f"redis node 127.0.0.1:{promoted.port}: master of {_slots_of(promoted)} slots with "
        "no replica"]
    victim.start()  # back as a replica of the promoted node: the module's cluster is whole
    cluster.wait_ok()


def test_an_acknowledged_user_event_survives_the_loss_of_its_master(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster) -> None:
    client = connect_checked(cluster.url, name="ingest-user")
    writer = LogWriter(client, user_wait_ms=2000)
    victim = cluster.node_of_slot(key_slot(b"raw:user"))
    waits = metrics.REDIS_WAIT_SECONDS._sum.get()  # type: ignore[attr-defined]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for seq in range(200):
                writer.append_frame("raw:user", b'{"e":"ORDER_TRADE_UPDATE"}', time.time(),
                                    "usr-test", seq)
                if seq % 20 == 19:
                    await writer.flush()  # acknowledged: on the master and a replica
            victim.kill()  # at once: no time for replication to catch up afterwards
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        client.close()
        keymod.set_cluster_layout(False)
    assert metrics.REDIS_WAIT_SECONDS._sum.get() > waits  # type: ignore[attr-defined]
    wait(lambda: victim.port not in {n.port for n in cluster.master_nodes()}
         and _served_by_a_live_master(cluster, "raw:user"), timeout=30)
    with cluster.node_of_slot(key_slot(b"raw:user")).client() as promoted:
        seqs = [int(f[b"seq"]) for _, f in promoted.xrange("raw:user")]
    assert seqs == list(range(200))  # every acknowledged event is on the promoted replica
    victim.start()
    cluster.wait_ok()


def test_entries_a_dead_master_acknowledged_and_its_replica_never_got_are_in_a_gap(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster) -> None:
    key = cluster_key("aggTrade")
    master = cluster.node_of_slot(key_slot(key.encode()))
    (replica,) = cluster.replicas_of(master)
    client = connect_checked(cluster.url, name="ingest-market")
    writer = LogWriter(client, bound=100_000, max_bytes=256 << 20)
    frame = b'{"stream":"btcusdt@aggTrade","data":{"pad":"' + b"x" * 1000 + b'"}}'
    stalled = 48_000  # ~50 MB: more than the sockets between master and replica hold
    assert replica.proc is not None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)

            async def append(seqs: range) -> None:
                for seq in seqs:
                    writer.append_frame(key, frame, time.time(), "mkt-t", seq)
                    if seq % 1000 == 0:
                        await trio.lowlevel.checkpoint()
                await writer.flush()

            await append(range(0, 100))  # on the master and its replica
            await trio.sleep(0.2)
            replica.proc.send_signal(signal.SIGSTOP)  # the replica stops reading the stream
            await append(range(100, 100 + stalled))  # acknowledged, mostly by the master alone
            master.kill()
            replica.proc.send_signal(signal.SIGCONT)  # promoted with what reached its socket
            await append(range(100 + stalled, 150 + stalled))  # held until then, written there
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        client.close()
        keymod.set_cluster_layout(False)
        if replica.proc is not None:
            replica.proc.send_signal(signal.SIGCONT)
    rows = [f for _, f in rc.xrange(key)]
    seqs = [int(f[b"seq"]) for f in rows if b"seq" in f]
    missing = set(range(150 + stalled)) - set(seqs)
    assert missing and missing <= set(range(100, 100 + stalled))  # lost: only stalled ones
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    gaps = [orjson.loads(f[b"body"]) for f in rows if f.get(b"ctl") == b"gap"]
    # the loss is in the log, counted exactly: every acknowledged frame is there or in a gap
    assert [(g["reason"], g["by_conn"]) for g in gaps] == [("failover", {"mkt-t": len(missing)})]
    master.start()  # back, as a replica of the promoted node
    cluster.wait_ok()


def _slots_of(node: LocalRedis) -> int:
    with node.client() as c:
        return sum(int(hi) - int(lo) + 1 for lo, hi, master, *_ in
                   c.execute_command("CLUSTER", "SLOTS") if int(master[1]) == node.port)


def _xlen(cluster: LocalCluster, key: str) -> int:
    try:
        with cluster.node_of_slot(key_slot(key.encode())).client() as c:
            return int(c.xlen(key))
    except (redis.RedisError, RuntimeError):
        return 0


def _served_by_a_live_master(cluster: LocalCluster, key: str) -> bool:
    try:
        cluster.node_of_slot(key_slot(key.encode()))
    except RuntimeError:
        return False
    return True


def test_a_reshard_mid_ingest_loses_nothing_and_leaves_nothing_stuck(
        cluster: LocalCluster, rc: redis.cluster.RedisCluster, procs: Procs) -> None:
    env = {**procs.simulator(), "REDIS_URL": cluster.url,
           "PIPELINE_MARKET_STREAMS": "markPrice@1s,depth20@100ms,depth@100ms"}
    port = free_port()
    procs.start("ingest", ["ingest", "market"], {**env, "PIPELINE_METRICS_PORT": str(port)})
    procs.start("project", ["project", "--block-ms", "100",
                            "--only", "mark_price,orderbook,depth_book"], env)
    reader = MarketReader(rc, fallback=False)  # type: ignore[arg-type]
    wait(lambda: all(reader.order_book(s, 20, max_age=60) for s in SYMBOLS.split(",")))
    # move every slot of the source master up to and past the partial books' slot (and the
    # depth book's, when the same master serves it) to another master, while frames flow
    slot = key_slot(cluster_key("depth20").encode())
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.master_nodes() if n.port != source.port)
    with source.client() as c:
        first = min(int(lo) for lo, hi, master, *_ in c.execute_command("CLUSTER", "SLOTS")
                    if int(master[1]) == source.port)
        src_id = c.execute_command("CLUSTER", "MYID").decode()
    with target.client() as c:
        dst_id = c.execute_command("CLUSTER", "MYID").decode()
    moved = subprocess.run(
        ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
         "--cluster-from", src_id, "--cluster-to", dst_id,
         "--cluster-slots", str(slot - first + 1), "--cluster-yes"],
        capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
    assert cluster.node_of_slot(slot).port == target.port
    written = rc.xlen(cluster_key("depth20"))
    wait(lambda: rc.xlen(cluster_key("depth20")) > written + 15)  # still flowing, on the target
    # the writer was told where the slot went (MOVED once it had moved; ASK while it moved)
    scraped = metrics_wait_for(port, "/metrics",
                               r'^pipeline_redis_redirects_total\{kind="moved"\} [1-9]')
    assert re.search(r'^pipeline_redis_redirects_total\{kind="moved"\} [1-9]', scraped, re.M)
    ingest_log = procs.stop("ingest")
    wait(lambda: drained(rc), timeout=30)  # nothing stuck: every group read all, none pending
    books = last_frames(rc, "depth20")
    diffs = last_frames(rc, "depth")
    for symbol in SYMBOLS.split(","):
        book = reader.order_book(symbol, 20, max_age=60)
        assert book is not None
        assert book["last_update_id"] == max(books[symbol]["u"], diffs[symbol]["u"])
    # nothing lost: every frame of the public connection is in its stream, none twice
    public = (cluster_key("depth20"), cluster_key("depth"))
    assert seq_holes(rc, *public) == 0
    assert seq_repeats(rc, *public) == 0
    assert not list(rc.scan_iter(match="dlq:*"))
    assert "Traceback" not in ingest_log
    assert "Traceback" not in procs.stop("project")
