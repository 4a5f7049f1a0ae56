"""The event log under Redis faults, against real redis-server processes: out of memory
(`maxmemory` reached under `noeviction`) for long spells, a buffer bounded in bytes, a frozen
server (SIGSTOP), for the log writer and for the projector.

What a user of the log checks afterwards: every frame the ingestor received is either in its
`raw:` key or counted in a `gap` entry there, whose `reason` says why it was lost; nothing is
dropped while the buffer has room; the outage is noticed soon and measured from when it began.

A synthetic feed appends to the `LogWriter` at a steady rate (frames numbered by `seq` on one
connection, so the log can be checked frame by frame); one test runs the whole market
ingestor against the in-process simulator. The writer's thread waits on Redis, so everything
here runs on the real clock, with the figures of issue #11 scaled down to seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import redis
import trio

from pipeline import metrics
from pipeline.config import load_settings
from pipeline.eventlog import ControlEntry, FrameEntry, decode_entry
from pipeline.ingest_market import run_market_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.simulator import SimConfig, Simulator
from pipeline.writer import LogWriter, stall_limit
from projections.core.keys import KEY_CONN_MARKET
from projections.core.market import MarkPriceProjection
from projections.shell.health import ProjectorHealth
from projections.shell.loop import ProjectionLoop, RunOptions
from tests.test_ingest_market import FAST

KEY = "raw:market:aggTrade"
CONN = "mkt-1-feed01"
OOM_REASON = "refused: OOM command not allowed when used memory > 'maxmemory'."
FILLER_BYTES = 32 * 1024 * 1024


@attrs.define
class Feed:
    """Appends numbered frames to a writer at a steady rate, like one busy connection."""

    writer: LogWriter
    size: int = 1000
    sent: int = 0
    refused: int = 0  # appends the buffer turned away

    def frame(self, seq: int) -> bytes:
        head = b'{"stream":"btcusdt@aggTrade","data":{"seq":%d,"pad":"' % seq
        return head + b"x" * max(0, self.size - len(head) - 3) + b'"}}'

    async def run(self, rate: float, seconds: float) -> None:
        start, base = trio.current_time(), self.sent
        tick = 0.01
        while (elapsed := trio.current_time() - start) < seconds:
            while self.sent - base < rate * elapsed:
                self.sent += 1
                if not self.writer.append_frame(KEY, self.frame(self.sent), time.time(), CONN,
                                                self.sent):
                    self.refused += 1
            await trio.sleep(tick)


def log_of(r: redis.Redis, key: str = KEY) -> tuple[list[int], list[ControlEntry]]:
    """The feed's frame seqs in `key`, and its gap entries (a duplicate, which a round trip cut
    short may leave, counted once)."""
    seqs: list[int] = []
    gaps: dict[tuple[float, bytes], ControlEntry] = {}
    for entry_id, fields in r.xrange(key):
        entry = decode_entry(entry_id, fields)
        if isinstance(entry, FrameEntry) and entry.conn == CONN:
            seqs.append(entry.seq)
        elif isinstance(entry, ControlEntry) and entry.ctl == "gap":
            gaps[(entry.recv_ts, orjson.dumps(entry.body, option=orjson.OPT_SORT_KEYS))] = entry
    return seqs, list(gaps.values())


def assert_every_frame_accounted(r: redis.Redis, sent: int) -> tuple[set[int], list[ControlEntry]]:
    seqs, gaps = log_of(r)
    logged = set(seqs)
    assert logged <= set(range(1, sent + 1))
    dropped = sum(g.body["by_conn"].get(CONN, 0) for g in gaps)
    assert len(logged) + dropped == sent, (len(logged), dropped, sent)
    for gap in gaps:
        assert gap.body["first_recv_ts"] <= gap.body["last_recv_ts"]
        assert gap.body["dropped"] == sum(gap.body["by_conn"].values())
    return logged, gaps


@asynccontextmanager
async def writing(writer: LogWriter) -> AsyncIterator[LogWriter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield writer
        with trio.fail_after(20):
            await writer.flush()
        nursery.cancel_scope.cancel()


async def until(check: Callable[[], Any], within: float = 10.0) -> None:
    """Poll until `check()` is true: what it waits for is state in another thread or process."""
    with trio.fail_after(within):
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.01)


# --- out of memory -------------------------------------------------------------------------

@pytest.fixture
def oom_server(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis", args=["--maxmemory-policy", "noeviction"]).start()
    try:
        yield server
    finally:
        server.stop()


def brim(r: redis.Redis, headroom: int) -> None:
    """Fill Redis so that `headroom` more bytes reach `maxmemory`: the feed itself runs it
    out of memory. Deleting `filler` ends the spell."""
    # made by Redis itself: a 32 MiB SET would sit in the client's query buffer, counted in
    # used_memory until a cron frees it, and leave the headroom 32 MiB wider than meant
    r.setrange("filler", FILLER_BYTES - 1, b"x")
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + headroom)


async def oom_spell(writer: LogWriter, r: redis.Redis, seconds: float) -> tuple[float, float]:
    """Wait for the feed to run Redis out of memory, hold it there `seconds`, end it. The
    wall times it began (the writer's own account) and ended."""
    await until(lambda: writer.outage_started() is not None)
    began = writer.outage_started()
    assert began is not None
    await trio.sleep(seconds)
    r.delete("filler")  # DEL is allowed out of memory: room again
    return began, time.time()


async def test_a_long_oom_spell_with_room_in_the_buffer_loses_nothing(
        oom_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #11: refused entries were given up after 8 tries while the buffer had room.
    r = oom_server.client()
    brim(r, 256 * 1024)
    writer = LogWriter(make_client(oom_server.url), backoff=(0.01, 0.05), unhealthy_after=1.0)
    feed = Feed(writer)
    health: list[bool] = []
    with caplog.at_level(logging.WARNING, "pipeline.writer"):
        async with writing(writer), trio.open_nursery() as nursery:
            nursery.start_soon(feed.run, 2000, 5.0)
            await oom_spell(writer, r, 2.5)
            health.append(writer.healthy)  # 2.5 s of nothing written: 503
            await until(lambda: writer.outage_started() is None)
            health.append(writer.healthy)
    logged, gaps = assert_every_frame_accounted(r, feed.sent)
    assert gaps == [] and len(logged) == feed.sent > 9_000
    assert writer.buffer.dropped == 0 and feed.refused == 0
    assert health == [False, True]
    messages = [rec.getMessage() for rec in caplog.records]
    assert "redis refused entries: sending them again" in messages
    back = next(rec for rec in caplog.records if rec.getMessage() == "redis back")
    assert back.outage_s >= 2.5  # type: ignore[attr-defined]
    r.close()


async def test_a_long_oom_spell_past_a_small_buffer_reports_every_loss_with_its_reason(
        oom_server: LocalRedis) -> None:
    # Issue #11: gap entries queued during the outage were refused and given up, leaving
    # thousands of frames in no gap at all, and every loss was labelled `buffer_full`.
    r = oom_server.client()
    brim(r, 256 * 1024)
    writer = LogWriter(make_client(oom_server.url), bound=1000, max_batch=200,
                       backoff=(0.01, 0.05))
    feed = Feed(writer)
    async with writing(writer), trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, 2000, 5.0)
        await oom_spell(writer, r, 2.5)
    logged, gaps = assert_every_frame_accounted(r, feed.sent)
    reasons = {g.body["reason"] for g in gaps}
    assert reasons == {"buffer_full", OOM_REASON}
    by_reason = {reason: sum(g.body["dropped"] for g in gaps if g.body["reason"] == reason)
                 for reason in reasons}
    assert by_reason["buffer_full"] == feed.refused  # turned away at the door, and only then
    assert by_reason[OOM_REASON] >= 200  # held, refused, and given up once the buffer was full
    # ~5,000 frames arrived in the spell: all but what a full buffer holds could be lost, no more
    assert feed.sent - len(logged) <= 2.5 * 2000 + 500 - (1000 - 200)
    assert writer.buffer.drops.unreported == 0


async def test_the_ingestor_accounts_for_every_frame_of_an_oom_spell_past_its_buffer(
        oom_server: LocalRedis) -> None:
    # the market ingestor end to end: simulator, websocket, buffer of 300 frames, OOM
    r = oom_server.client()
    brim(r, 256 * 1024)
    client = make_client(oom_server.url)
    async with trio.open_nursery() as outer:
        ws_url, _ = await outer.start(Simulator(SimConfig(symbols=("BTCUSDT",), rate=600)).run)
        settings = load_settings(env={
            "REDIS_URL": oom_server.url, "BINANCE_WS_URL": ws_url, "PIPELINE_SYMBOLS": "BTCUSDT",
            "PIPELINE_MARKET_STREAMS": "aggTrade", "PIPELINE_BUFFER_FRAMES": "300"})
        writer = LogWriter(client, settings.retention, bound=settings.buffer_frames,
                           backoff=(0.01, 0.05))
        async with trio.open_nursery() as nursery:
            ingest = await nursery.start(partial(run_market_ingest, settings, client,
                                                 ("BTCUSDT",), timing=FAST, writer=writer))
            await oom_spell(writer, r, 2.0)
            await until(lambda: writer.outage_started() is None)
            n = r.xlen(KEY)
            await until(lambda: r.xlen(KEY) > n + 100)  # flowing again
            ingest.stop()
        outer.cancel_scope.cancel()
    closed = [decode_entry(i, f) for i, f in r.xrange(KEY_CONN_MARKET)]
    conn = next(e.conn for e in closed if isinstance(e, ControlEntry) and e.ctl == "opened")
    frames_received = next(e.body["frames"] for e in closed
                           if isinstance(e, ControlEntry) and e.ctl == "closed")
    entries = [decode_entry(i, f) for i, f in r.xrange(KEY)]
    seqs = {e.seq for e in entries if isinstance(e, FrameEntry) and e.conn == conn}
    gaps = [e for e in entries if isinstance(e, ControlEntry) and e.ctl == "gap"]
    dropped = sum(g.body["by_conn"].get(conn, 0) for g in gaps)
    assert dropped > 0 and {g.body["reason"] for g in gaps} <= {"buffer_full", OOM_REASON}
    assert len(seqs) + dropped == frames_received
    client.close()
    r.close()


# --- the byte bound ------------------------------------------------------------------------

@contextmanager
def frozen(server: LocalRedis) -> Iterator[Callable[[], None]]:
    """SIGSTOP the redis-server; the callable (or leaving the block) SIGCONTs it."""
    assert server.proc is not None
    pid = server.proc.pid
    state = {"stopped": True}

    def thaw() -> None:
        if state["stopped"]:
            os.kill(pid, signal.SIGCONT)
            state["stopped"] = False

    os.kill(pid, signal.SIGSTOP)
    try:
        yield thaw
    finally:
        thaw()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_the_buffer_holds_no_more_bytes_than_its_bound_while_redis_is_frozen(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    # Issue #11: 150 frames of 3.9 MB took the ingestor from 44 MB to 618 MB with Redis paused.
    bound = 24 * 1024 * 1024
    writer = LogWriter(make_client(redis_server.url), max_bytes=bound)
    feed = Feed(writer, size=1024 * 1024)
    held: list[int] = []
    async with writing(writer):
        feed_some = partial(feed.run, 200, 0.1)
        await feed_some()  # a few frames go through first
        await until(lambda: writer.buffer.held == 0)
        rss_before = rss_bytes()
        peak, offered = rss_before, feed.sent
        with frozen(redis_server):
            for _ in range(15):  # 300 frames of 1 MiB: 300 MiB offered
                await feed_some()
                held.append(writer.buffer.bytes_held)
                peak = max(peak, rss_bytes())
    offered = feed.sent - offered
    assert offered > 250
    assert max(held) <= bound
    assert feed.refused >= offered - bound // (1024 * 1024)  # 23 frames of 1 MiB + headers fit
    assert peak - rss_before < bound + 64 * 1024 * 1024  # not the ~300 MiB offered
    _, gaps = assert_every_frame_accounted(r, feed.sent)
    assert {g.body["reason"] for g in gaps} == {"buffer_full"}


# --- a frozen Redis ------------------------------------------------------------------------

async def test_a_frozen_redis_is_noticed_within_the_stall_limit_and_timed_from_the_freeze(
        redis_server: LocalRedis, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # Issue #11: a frozen Redis was noticed only at the 10 s socket timeout, and the outage was
    # measured from there.
    writer = LogWriter(make_client(redis_server.url), unhealthy_after=2.0)
    feed = Feed(writer, size=200)
    seen: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, "pipeline.writer"):
        async with writing(writer), trio.open_nursery() as nursery:
            nursery.start_soon(feed.run, 500, 6.0)
            await trio.sleep(0.5)
            with frozen(redis_server) as thaw:
                stopped = time.time()
                await until(lambda: writer.outage_started() is not None)
                seen["noticed"] = time.time() - stopped
                since = writer.outage_started()
                assert since is not None
                seen["since"] = since - stopped
                await until(lambda: not writer.healthy)
                seen["unhealthy"] = time.time() - stopped
                seen["gauge"] = metrics.REDIS_OUTAGE._value.get()
                await trio.sleep(4.0 - (time.time() - stopped))
                thaw()
            await until(lambda: writer.healthy and writer.outage_started() is None)
    # noticed once the round trip in flight passed its limit (1 s for a small batch), plus
    # the 0.1 s the writer task takes between looks; counted from the freeze itself
    assert seen["noticed"] < stall_limit(0) + 0.5
    assert abs(seen["since"]) < 0.1
    assert 1.9 <= seen["unhealthy"] < 2.5  # /healthz: 503 from 2 s after the freeze
    assert seen["gauge"] >= 1.5
    messages = [rec.getMessage() for rec in caplog.records]
    assert "redis not answering: holding frames in the buffer" in messages
    back = next(rec for rec in caplog.records if rec.getMessage() == "redis back")
    assert 3.9 <= back.outage_s < 4.5  # type: ignore[attr-defined]
    logged, gaps = assert_every_frame_accounted(r, feed.sent)
    assert gaps == [] and len(logged) == feed.sent  # the buffer had room: nothing lost
    assert metrics.REDIS_OUTAGE._value.get() == 0.0


async def test_a_freeze_past_the_socket_timeout_and_the_buffer_loses_only_what_it_must(
        redis_server: LocalRedis, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # The round trip times out (here after 1.5 s), the writer reconnects to a server that
    # accepts the connection and answers nothing, and the buffer fills: losses start only once
    # it is full, all in gap entries, and the outage still counts from the freeze.
    client = make_client(redis_server.url, socket_timeout=1.5)
    writer = LogWriter(client, bound=1000, backoff=(0.05, 0.2))
    feed = Feed(writer, size=200)
    with caplog.at_level(logging.WARNING, "pipeline.writer"):
        async with writing(writer), trio.open_nursery() as nursery:
            nursery.start_soon(feed.run, 500, 7.0)
            await trio.sleep(0.5)
            with frozen(redis_server):
                stopped = time.time()
                await trio.sleep(5.0)
            await until(lambda: writer.outage_started() is None)
    _, gaps = assert_every_frame_accounted(r, feed.sent)
    assert {g.body["reason"] for g in gaps} == {"buffer_full"}
    first_loss = min(g.body["first_recv_ts"] for g in gaps)
    # 1,000 frames at 500 a second fill the buffer 2 s into the freeze, and not before
    assert 1.8 <= first_loss - stopped < 2.5
    messages = [rec.getMessage() for rec in caplog.records]
    assert "redis unavailable: holding frames in the buffer and retrying" in messages
    back = next(rec for rec in caplog.records if rec.getMessage() == "redis back")
    assert 4.9 <= back.outage_s < 6.5  # type: ignore[attr-defined]
    client.close()


async def test_the_projector_counts_a_frozen_redis_from_the_call_that_hung(
        redis_server: LocalRedis) -> None:
    # The projector's calls hang until the socket timeout too (here 1.5 s): its /healthz clock
    # must start when the call that never came back was sent, not when it gave up.
    health = ProjectorHealth()
    client = make_client(redis_server.url, socket_timeout=1.5)
    loop = ProjectionLoop(MarkPriceProjection("websocket"), client,
                          RunOptions(consumer="c1", block_ms=500), health)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        await trio.sleep(1.0)  # groups made, blocking reads going round
        with frozen(redis_server):
            stopped = time.monotonic()
            await until(lambda: health.failing())
            since_freeze = time.monotonic() - stopped
            failing_for = health.failing()["mark_price"]
        await until(lambda: not health.failing())
        nursery.cancel_scope.cancel()
    # the hung read was sent at most one BLOCK (0.5 s) before the freeze, and timed out 1.5 s
    # after it was sent
    assert 0.9 <= since_freeze < 2.0
    assert failing_for >= since_freeze - 0.05
    client.close()
