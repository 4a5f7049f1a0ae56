"""`pipeline project`: consumer groups turn the raw log into views (real redis-server)."""

from __future__ import annotations

import functools
import json
import random
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import orjson
import redis
import trio

from pipeline import metrics
from pipeline.eventlog import ControlEntry, FrameEntry, frame_entry
from pipeline.localredis import LocalRedis
from projections.core.keys import lease_key
from projections.core.outputs import Output, PoisonEntry, ViewWrite
from projections.shell import project as runner
from projections.shell.health import ProjectorHealth
from projections.shell.registry import ProjectionSpec, choose
from tests.conftest import run_cli
from tests.projector_support import (
    SYMBOLS,
    copy_log,
    drained,
    groups_of,
    mark_frame,
    market_log,
    project_until_drained,
    seed,
    settings_for,
    start_projector,
    stop,
    views,
    wait_for,
    wait_sync,
    xrange,
)


def last_of(frames: Iterable[tuple[str, bytes]], family: str) -> dict[str, dict[str, Any]]:
    """The newest payload per symbol of one family, as the log holds them."""
    out: dict[str, dict[str, Any]] = {}
    for fam, frame in frames:
        if fam == family:
            data = orjson.loads(frame)["data"]
            out[data["s"].lower()] = data
    return out


async def test_views_match_the_last_frames(redis_server: LocalRedis, r: redis.Redis) -> None:
    frames = market_log(50)
    seed(r, frames)
    projected = metrics.EVENTS_PROJECTED.labels("mark_price")._value.get()
    await project_until_drained(settings_for(redis_server.url), r)
    assert metrics.EVENTS_PROJECTED.labels("mark_price")._value.get() - projected == 150

    for sym, data in last_of(frames, "markPrice").items():
        view = json.loads(r.get(f"websocket:mark_price:{sym}"))  # type: ignore[arg-type]
        assert view["mark_price"] == data["p"]
        assert view["timestamp"] == data["E"] / 1000
        assert view["source"] == "websocket"
    for sym, data in last_of(frames, "depth20").items():
        view = json.loads(r.get(f"websocket:orderbook:{sym}:20"))  # type: ignore[arg-type]
        assert (view["bids"], view["asks"], view["last_update_id"]) == (data["b"], data["a"],
                                                                        data["u"])
    for sym, data in last_of(frames, "aggTrade").items():
        view = json.loads(r.get(f"websocket:last_price:{sym}"))  # type: ignore[arg-type]
        assert view["price"] == data["p"]
    for sym, data in last_of(frames, "kline_1m").items():
        view = json.loads(r.get(f"websocket:kline:{sym}:1m"))  # type: ignore[arg-type]
        assert view["close"] == data["k"]["c"]


async def test_seed_reader_accepts_the_websocket_price(redis_server: LocalRedis,
                                                       r: redis.Redis) -> None:
    seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "64123.40"))])
    await project_until_drained(settings_for(redis_server.url), r, only="mark_price")

    # the seed service's reader, unchanged
    data = json.loads(r.get("websocket:mark_price:btcusdt"))  # type: ignore[arg-type]
    assert time.time() - data["timestamp"] < 5
    assert data["mark_price"] == "64123.40"
    assert r.pttl("websocket:mark_price:btcusdt") > 50_000


async def test_poison_entry_reaches_the_dead_letter_stream_and_the_projector_goes_on(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    bad = b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUpdate","E":'
    seed(r, [("markPrice", mark_frame("BTCUSDT", now - 10, "1.00")), ("markPrice", bad),
             ("markPrice", mark_frame("BTCUSDT", now, "2.00"))])
    before = metrics.DEAD_LETTERS.labels("mark_price")._value.get()
    await project_until_drained(settings_for(redis_server.url), r,
                                runner.RunOptions(max_attempts=3), only="mark_price")

    [(_, dead)] = xrange(r, "dlq:mark_price")
    assert dead[b"frame"] == bad
    assert dead[b"source_key"] == b"raw:market:markPrice"
    assert b"PoisonEntry" in dead[b"error"]
    bad_id = xrange(r, "raw:market:markPrice")[1][0]
    assert dead[b"entry_id"] == bad_id
    assert metrics.DEAD_LETTERS.labels("mark_price")._value.get() == before + 1
    assert json.loads(r.get("websocket:mark_price:btcusdt"))["mark_price"] == "2.00"  # type: ignore[arg-type]
    assert r.xpending("raw:market:markPrice", "mark_price")["pending"] == 0


async def test_restarted_consumer_first_finishes_its_own_pending_entries(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    seed(r, [("markPrice", mark_frame("BTCUSDT", now, "3.00"))])
    settings = settings_for(redis_server.url)
    r.xgroup_create("raw:market:markPrice", "mark_price", id="0")
    r.xgroup_create("raw:market:markPrice_arr", "mark_price", id="0", mkstream=True)
    # delivered to "p1", which died before writing the view and acknowledging
    r.xreadgroup("mark_price", "p1", {"raw:market:markPrice": ">"})
    await project_until_drained(settings, r, runner.RunOptions(consumer="p1"),
                                only="mark_price")
    assert json.loads(r.get("websocket:mark_price:btcusdt"))["mark_price"] == "3.00"  # type: ignore[arg-type]


async def test_entries_left_pending_by_a_dead_consumer_are_taken_over(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    seed(r, [("markPrice", mark_frame("ETHUSDT", now, "4.00"))])
    r.xgroup_create("raw:market:markPrice", "mark_price", id="0")
    r.xreadgroup("mark_price", "dead", {"raw:market:markPrice": ">"})
    await project_until_drained(settings_for(redis_server.url), r,
                                runner.RunOptions(consumer="alive", claim_idle_ms=50,
                                                  block_ms=20),
                                only="mark_price")
    assert json.loads(r.get("websocket:mark_price:ethusdt"))["mark_price"] == "4.00"  # type: ignore[arg-type]


# --- exclusive projections: one process holds the lease ------------------------------------
# Real time, short TTLs: Redis expires a lease on its own clock, which a MockClock cannot move,
# and the projector makes its Redis calls in worker threads, during which autojump would move
# the clock on under it. The lease's own timing is tested on a MockClock in tests/test_lease.py.

@attrs.define
class CountingProjection:
    """An exclusive fold with state in memory: the view holds how many entries it folded."""

    name: str = "counter"
    sources: Sequence[str] = ("raw:test:counter",)
    exclusive: bool = True
    seen: int = 0

    def apply(self, entry: FrameEntry | ControlEntry) -> list[Output]:
        if isinstance(entry, FrameEntry) and entry.frame == b"poison":
            raise PoisonEntry("poison")
        self.seen += 1
        value = orjson.dumps({"seen": self.seen, "id": entry.id.decode()})
        return [ViewWrite("websocket:counter", value, self.seen, "seen", 0)]


def counter_spec() -> ProjectionSpec:
    return ProjectionSpec("counter", CountingProjection, True, ("websocket:counter",))


async def test_standby_takes_over_an_exclusive_projection_when_the_lease_expires(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    for i in range(5):
        r.xadd("raw:test:counter", frame_entry(b"x%d" % i, time.time(), "c", i))  # type: ignore[arg-type]
    r.xgroup_create("raw:test:counter", "counter", id="0")
    r.xreadgroup("counter", "old-holder", {"raw:test:counter": ">"}, count=2)  # died mid-batch
    r.set(lease_key("counter"), b"old-holder", px=300)
    opts = runner.RunOptions(consumer="standby", lease_ttl_ms=300)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings_for(redis_server.url), [counter_spec()], opts)
        await wait_for(lambda: drained(r, {"counter": ["raw:test:counter"]}))
        assert r.get(lease_key("counter")) == b"standby"
        nursery.cancel_scope.cancel()
    assert r.exists(lease_key("counter")) == 0  # released on a clean stop
    # everything, including what the old holder left pending, was folded by the new holder
    assert r.xpending("raw:test:counter", "counter")["pending"] == 0


async def test_second_process_does_not_run_an_exclusive_projection_while_the_first_does(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    a = runner.RunOptions(consumer="a", lease_ttl_ms=600)
    b = runner.RunOptions(consumer="b", lease_ttl_ms=600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, [counter_spec()], a)
        await wait_for(lambda: r.get(lease_key("counter")) == b"a")
        nursery.start_soon(runner.run, settings, [counter_spec()], b)
        for i in range(20):
            r.xadd("raw:test:counter", frame_entry(b"x%d" % i, time.time(), "c", i))  # type: ignore[arg-type]
        await wait_for(lambda: drained(r, {"counter": ["raw:test:counter"]}))
        consumers = {c["name"]: c["pending"] for c in
                     r.xinfo_consumers("raw:test:counter", "counter")}
        assert set(consumers) == {b"a"}  # b never read the group: it waits as a standby
        assert json.loads(r.get("websocket:counter"))["seen"] == 20  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_holder_that_loses_its_lease_stops_and_takes_over_again_later(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    opts = runner.RunOptions(consumer="a", lease_ttl_ms=300)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, [counter_spec()], opts)
        await wait_for(lambda: r.get(lease_key("counter")) == b"a")
        r.set(lease_key("counter"), b"intruder", px=600)  # e.g. after a long pause of "a"
        r.xadd("raw:test:counter", frame_entry(b"x", time.time(), "c", 1))  # type: ignore[arg-type]
        # "a" notices at its next renewal, stops, waits out the intruder's lease, takes over
        await wait_for(lambda: r.get(lease_key("counter")) == b"a"
                       and drained(r, {"counter": ["raw:test:counter"]}))
        nursery.cancel_scope.cancel()
    assert json.loads(r.get("websocket:counter"))["seen"] >= 1  # type: ignore[arg-type]


def test_unreachable_redis_is_a_bad_setting() -> None:
    done = run_cli("project", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr


# --- processes: SIGKILL at random instants, and two side by side --------------------------

def entries_read(r: redis.Redis, key: str, group: str) -> int:
    infos = [g for g in r.xinfo_groups(key) if g["name"] == group.encode()]
    return int(infos[0]["entries-read"] or 0) if infos else 0


def test_projector_killed_at_random_instants_ends_with_the_same_views(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    reference = redis.Redis(host="127.0.0.1", port=redis_server.port, db=1)
    seed(r, market_log(400))  # 4,800 entries
    copy_log(r, reference)
    rnd = random.Random(11)
    url0 = redis_server.url
    total = r.xlen("raw:market:depth20")
    for round_ in range(4):
        proc = start_projector(url0, "--batch", "20", "--consumer", f"p{round_}",
                               "--claim-idle-ms", "100")
        done = entries_read(r, "raw:market:depth20", "orderbook")
        # a random point ahead; once an earlier round read everything, the kill comes at once
        at = min(total, done + rnd.randrange(1, max(2, (total - done) // 2)))
        try:
            # kill once the depth group has progressed to that point (or the process is done)
            wait_sync(lambda at=at, proc=proc: entries_read(r, "raw:market:depth20", "orderbook")
                      >= at or proc.poll() is not None, timeout=30)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
    specs = choose(settings_for(url0), None)
    final = start_projector(url0, "--consumer", "final", "--claim-idle-ms", "100")
    uninterrupted = start_projector(redis_server.url[:-1] + "1", "--consumer", "ref")
    try:
        wait_sync(lambda: drained(r, groups_of(specs)) and drained(reference, groups_of(specs)),
                  timeout=40)
    finally:
        stop(final)
        stop(uninterrupted)
    assert views(r) == views(reference)
    assert len(views(r)) == 3 * 4 + 3  # mark, book, last price, kline per symbol + closed lists


def consumers_of(r: redis.Redis, key: str, group: str) -> set[bytes]:
    try:
        return {c["name"] for c in r.xinfo_consumers(key, group)}
    except redis.ResponseError:  # no such key or group yet
        return set()


def test_two_projector_processes_on_one_group_end_with_correct_views(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    frames = market_log(300)
    settings = settings_for(redis_server.url)
    specs = choose(settings, None)
    procs = [start_projector(redis_server.url, "--consumer", name, "--batch", "10")
             for name in ("one", "two")]
    try:
        # both are reading every group before the frames arrive
        wait_sync(lambda: all(consumers_of(r, k, s.name) == {b"one", b"two"}
                              for s in specs if not s.exclusive for k in s.factory().sources),
                  timeout=20)
        seed(r, frames[: len(frames) // 2])
        seed(r, frames[len(frames) // 2:])
        wait_sync(lambda: drained(r, groups_of(specs)), timeout=30)
    finally:
        errors = [stop(p) for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    for sym, data in last_of(frames, "markPrice").items():
        view = json.loads(r.get(f"websocket:mark_price:{sym}"))  # type: ignore[arg-type]
        assert view["mark_price"] == data["p"]
    for sym, data in last_of(frames, "depth20").items():
        view = json.loads(r.get(f"websocket:orderbook:{sym}:20"))  # type: ignore[arg-type]
        assert view["last_update_id"] == data["u"]
    assert set(SYMBOLS) == {s.upper() for s in last_of(frames, "aggTrade")}


# --- end to end: simulator -> ingestor -> log -> projector ---------------------------------

def control_entries(r: redis.Redis, key: str, ctl: bytes) -> list[bytes]:
    return [eid for eid, f in xrange(r, key) if f.get(b"ctl") == ctl]


async def test_diff_depth_book_survives_a_sequence_break_and_equals_a_fresh_snapshot(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    from pipeline.ingest_market import run_market_ingest
    from pipeline.redisconn import make_client
    from pipeline.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(symbols=("BTCUSDT",), rate=50))
    key = "websocket:orderbook:btcusdt:20"
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = settings_for(redis_server.url, streams="depth@100ms", BINANCE_WS_URL=ws_url,
                                BINANCE_REST_URL=rest_url, PIPELINE_SYMBOLS="BTCUSDT")
        nursery.start_soon(runner.run, settings, choose(settings, "depth_book"),
                           runner.RunOptions(block_ms=50))
        ingest_client = make_client(settings.redis_url)
        async with trio.open_nursery() as ingesting:
            ingest = await ingesting.start(functools.partial(
                run_market_ingest, settings, ingest_client, ["BTCUSDT"]))
            await wait_for(lambda: r.exists(key))  # first snapshot fetched, logged, applied
            assert len(control_entries(r, "raw:depth_snapshots", b"snapshot")) == 1

            sim.sequence_break("BTCUSDT")
            # the projector logs the gap, takes a new snapshot, logs it, and resumes
            await wait_for(lambda: len(control_entries(r, "raw:depth_snapshots", b"snapshot")) == 2)
            [gap] = control_entries(r, "raw:depth_snapshots", b"gap")
            assert gap < control_entries(r, "raw:depth_snapshots", b"snapshot")[1]

            sim.set_silence(True)  # the book stands still: the view must catch up with it
            book = sim.market.symbol("BTCUSDT").book
            await wait_for(lambda: json.loads(r.get(key) or b"{}").get("last_update_id")
                           == book.update_id)
            ingest.stop()  # the ingestor flushes and returns
        ingest_client.close()
        nursery.cancel_scope.cancel()
    view = json.loads(r.get(key))  # type: ignore[arg-type]
    fresh = json.loads(sim.market.depth_snapshot("BTCUSDT", 20, int(time.time() * 1000)))
    assert (view["bids"], view["asks"]) == (fresh["bids"], fresh["asks"])


async def test_seed_reader_returns_the_price_the_simulator_sent(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    from pipeline.ingest_market import run_market_ingest
    from pipeline.redisconn import make_client
    from pipeline.simulator import SimConfig, Simulator

    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(Simulator(SimConfig(rate=30)).run)
        settings = settings_for(redis_server.url, streams="markPrice@1s", BINANCE_WS_URL=ws_url,
                                BINANCE_REST_URL=rest_url)
        specs = choose(settings, "mark_price")
        nursery.start_soon(runner.run, settings, specs, runner.RunOptions(block_ms=50))
        ingest_client = make_client(settings.redis_url)
        async with trio.open_nursery() as ingesting:
            ingest = await ingesting.start(functools.partial(
                run_market_ingest, settings, ingest_client, SYMBOLS))
            await wait_for(lambda: r.xlen("raw:market:markPrice") >= 20)
            ingest.stop()
        ingest_client.close()
        await wait_for(lambda: drained(r, groups_of(specs)))
        nursery.cancel_scope.cancel()
    sent = last_of([("markPrice", f[b"frame"]) for _, f in xrange(r, "raw:market:markPrice")
                    if b"frame" in f], "markPrice")
    # the seed service's reader, unchanged
    data = json.loads(r.get("websocket:mark_price:btcusdt"))  # type: ignore[arg-type]
    assert time.time() - data["timestamp"] < 5
    assert data["mark_price"] == sent["btcusdt"]["p"]


async def test_projector_rides_out_a_redis_restart_that_lost_its_groups(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    now = int(time.time() * 1000)
    key = "websocket:mark_price:btcusdt"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price"),
                           runner.RunOptions(block_ms=50))
        seed(r, [("markPrice", mark_frame("BTCUSDT", now, "1.00"))])
        await wait_for(lambda: r.exists(key))
        redis_server.kill()  # no persistence: the log, the groups and the views are gone
        redis_server.start()
        seed(r, [("markPrice", mark_frame("BTCUSDT", now + 1000, "2.00"))])
        await wait_for(lambda: r.exists(key))
        nursery.cancel_scope.cancel()
    assert json.loads(r.get(key))["mark_price"] == "2.00"  # type: ignore[arg-type]


async def test_view_writes_refused_for_lack_of_memory_are_written_once_redis_can(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "5.00"))])
    r.xgroup_create("raw:market:markPrice", "mark_price", id="0")
    r.config_set("maxmemory", 1)  # every write that needs memory is refused with OOM
    settings = settings_for(redis_server.url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price"),
                           runner.RunOptions(block_ms=50))
        await wait_for(lambda: entries_read(r, "raw:market:markPrice", "mark_price") == 1)
        assert r.exists("websocket:mark_price:btcusdt") == 0
        r.config_set("maxmemory", 0)
        await wait_for(lambda: r.exists("websocket:mark_price:btcusdt"))
        nursery.cancel_scope.cancel()


def test_projector_health_fails_only_after_a_lasting_outage() -> None:
    now = [100.0]
    health = ProjectorHealth(unhealthy_after_s=30.0, clock=lambda: now[0])
    assert health.healthy()
    health.failed("mark_price")
    now[0] += 29.0
    assert health.healthy()  # a short outage is not a page
    health.failed("mark_price")  # still the same outage: counted from its start
    now[0] += 1.0
    assert not health.healthy()  # /healthz answers 503 from here on
    health.recovered("mark_price")
    assert health.healthy()


async def test_only_the_entry_whose_write_the_store_refused_is_dead_lettered(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    """An id no stream can reach passes the fold (it is in range) and is refused by the store.
    With pre-coalescing its write stands for the frames it superseded in its batch; those
    are acknowledged, and only the frame that produced the refused write goes to the dead
    letters, at once (it was acknowledged with its write; a redelivery would meet the same
    refusal)."""
    from tests.projector_support import depth20_frame

    now = int(time.time() * 1000)
    settings = settings_for(redis_server.url)
    seed(r, [("depth20", depth20_frame("BTCUSDT", now - 3000, 1_000, 64000.0))])
    await project_until_drained(settings, r, only="orderbook")
    before = metrics.DEAD_LETTERS.labels("orderbook")._value.get()
    superseded = depth20_frame("BTCUSDT", now - 2000, 1_010, 64000.5)
    jump = depth20_frame("BTCUSDT", now - 1900, 1_020 + 2**52, 64001.0)
    seed(r, [("depth20", superseded), ("depth20", jump)])
    # the entry is acknowledged with its refused write; its dead letter is the next round trip
    await project_until_drained(settings, r, only="orderbook",
                                also=lambda: r.xlen("dlq:orderbook") >= 1)

    [(_, dead)] = xrange(r, "dlq:orderbook")
    assert dead[b"frame"] == jump and b"PIPELINE_MAX_ID_RATE" in dead[b"error"]
    assert metrics.DEAD_LETTERS.labels("orderbook")._value.get() == before + 1
    book = "websocket:orderbook:btcusdt:20"
    # the jump never became the book's version; the superseded frame is written when a read
    # happened to give it a batch of its own (batching is the reads' business, not the test's)
    assert json.loads(r.get(book))["last_update_id"] in (1_000, 1_010)  # type: ignore[arg-type]
    seed(r, [("depth20", depth20_frame("BTCUSDT", now - 1000, 1_030, 64002.0))])
    await project_until_drained(settings, r, only="orderbook")
    assert json.loads(r.get(book))["last_update_id"] == 1_030  # type: ignore[arg-type]
