"""The diff-depth book reads two streams: `raw:market:depth`, which only the market ingestor
writes, and `raw:depth_snapshots`, which only the projector writes (its REST snapshots and
its gap entries). A live batch holds the entries of each key one after the other, a replay
merges them by id, a restarted projector re-reads them in yet other cuts: whatever the
interleaving, every published book is the exchange's book, and a replay of the log ends with
the book the live projector ended with.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import redis
import trio

from pipeline.eventlog import ControlEntry, FrameEntry
from pipeline.localredis import LocalRedis
from projections.core.depthbook import DiffBookProjection, State, state_of
from projections.core.outputs import LogGap, NeedSnapshot, ViewWrite
from projections.shell import project as runner
from projections.shell.registry import choose
from tests.conftest import run_cli
from tests.projector_support import settings_for, wait_for, xrange
from tests.test_depthbook import SYM, Exchange, as_decimal

Timed = tuple[int, Any]  # (entry id as a clock tick, the entry)
Order = Callable[[random.Random, list[Timed], list[Timed]], list[Timed]]


def key_by_key(rng: random.Random, depth: list[Timed], snaps: list[Timed]) -> list[Timed]:
    return depth + snaps  # what one XREADGROUP over both keys returns


def snapshots_first(rng: random.Random, depth: list[Timed], snaps: list[Timed]) -> list[Timed]:
    return snaps + depth


def by_id(rng: random.Random, depth: list[Timed], snaps: list[Timed]) -> list[Timed]:
    return sorted(depth + snaps, key=lambda e: e[0])


def shuffled(rng: random.Random, depth: list[Timed], snaps: list[Timed]) -> list[Timed]:
    """Any merge that keeps each stream's own order."""
    out, d, s = [], list(depth), list(snaps)
    while d or s:
        out.append((d if d and (not s or rng.random() < 0.5) else s).pop(0))
    return out


ORDERS: dict[str, Order] = {"key_by_key": key_by_key, "snapshots_first": snapshots_first,
                            "by_id": by_id, "shuffled": shuffled}


def run_live(seed: int, order: Order) -> tuple[DiffBookProjection, Exchange, list[ViewWrite],
                                               list[Timed], bool]:
    """The exchange sends one event per step (some lost, some logged twice); the projector
    reads batches of a few entries of each stream (none at all on some steps, so they pile
    up), folds them in `order`, and each NeedSnapshot lands in the snapshot stream a few steps
    later, sometimes already stale. A quiet tail lets every request be answered."""
    rng = random.Random(seed)
    ex = Exchange(rng)
    fold = DiffBookProjection("w", book_depth=1000, buffer_limit=rng.choice((4, 50)))
    depth: list[Timed] = []
    snaps: list[Timed] = []
    read_d = read_s = clock = 0
    due: list[tuple[int, int]] = []  # (step the snapshot is appended at, staleness)
    published: list[ViewWrite] = []
    recent: list[FrameEntry] = []
    n = rng.randrange(20, 120)
    last_delivered = False
    for step in range(n + 60):
        if step < n:
            ev = ex.next_event()
            last_delivered = rng.random() >= 0.04
            if last_delivered:
                clock += 1
                depth.append((clock, ev))
                if rng.random() < 0.08 and recent:
                    clock += 1
                    depth.append((clock, rng.choice(recent)))
            recent = [*recent[-5:], ev]
        for _, stale in [d for d in due if d[0] == step]:
            us = sorted(ex.history)
            clock += 1
            snaps.append((clock, ex.snapshot_at(us[max(0, len(us) - 1 - stale)])))
        due = [d for d in due if d[0] != step]
        if step < n and rng.random() < 0.3:
            continue  # the projector is busy: entries pile up in both streams
        batch_d = depth[read_d:read_d + rng.randrange(1, 8)]
        batch_s = snaps[read_s:read_s + rng.randrange(1, 3)]
        read_d, read_s = read_d + len(batch_d), read_s + len(batch_s)
        for _, entry in order(rng, batch_d, batch_s):
            for out in fold.apply(entry):
                if isinstance(out, ViewWrite):
                    published.append(out)
                elif isinstance(out, NeedSnapshot):
                    stale = rng.choice((0, 0, 1, 3)) if step < n else 0
                    due.append((step + rng.randrange(1, 6), stale))
                elif isinstance(out, LogGap):
                    assert out.raw_key == "raw:depth_snapshots"
                    clock += 1
                    snaps.append((clock, ControlEntry(b"0-0", "gap", out.body, 0.0, "")))
    return fold, ex, published, depth + snaps, last_delivered


def assert_exchange_books(ex: Exchange, published: list[ViewWrite]) -> None:
    for w in published:
        view = json.loads(w.value)
        assert view["last_update_id"] == w.version
        bids, asks = ex.book_at(int(w.version))
        assert as_decimal(view["bids"]) == bids
        assert as_decimal(view["asks"]) == asks


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", range(60))
def test_every_book_is_the_exchanges_whatever_the_interleaving_of_the_two_streams(
    seed: int, order: str,
) -> None:
    fold, ex, published, _, last_delivered = run_live(seed, ORDERS[order])
    assert_exchange_books(ex, published)
    assert state_of(fold, SYM) is State.LIVE
    if last_delivered:
        assert published[-1].version == ex.u


@pytest.mark.parametrize("order", ["key_by_key", "shuffled"])
@pytest.mark.parametrize("seed", range(60))
def test_a_replay_merged_by_id_ends_with_the_live_book(seed: int, order: str) -> None:
    live, ex, published, log, _ = run_live(seed, ORDERS[order])
    again = DiffBookProjection("w", book_depth=1000, buffer_limit=live.buffer_limit)
    replayed = [o for _, e in sorted(log, key=lambda e: e[0]) for o in again.apply(e)
                if isinstance(o, ViewWrite)]  # replay ignores NeedSnapshot and LogGap
    assert_exchange_books(ex, replayed)
    assert state_of(again, SYM) is State.LIVE
    end, replay_end = json.loads(published[-1].value), json.loads(replayed[-1].value)
    assert replay_end["last_update_id"] == end["last_update_id"]
    # the same levels (this exchange writes a price two ways: "903.4", "903.40")
    assert as_decimal(replay_end["bids"]) == as_decimal(end["bids"])
    assert as_decimal(replay_end["asks"]) == as_decimal(end["asks"])


# --- end to end: simulator -> ingestor -> both streams -> projector, then replay ----------

async def test_live_book_and_its_replay_agree_and_the_ingestors_stream_holds_only_frames(
    redis_server: LocalRedis, r: redis.Redis,
) -> None:
    from pipeline.ingest_market import run_market_ingest
    from pipeline.redisconn import make_client
    from pipeline.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=50))
    keys = ["websocket:orderbook:btcusdt:20", "websocket:orderbook:ethusdt:20"]
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = settings_for(redis_server.url, streams="depth@100ms", BINANCE_WS_URL=ws_url,
                                BINANCE_REST_URL=rest_url, PIPELINE_SYMBOLS="BTCUSDT,ETHUSDT")
        nursery.start_soon(runner.run, settings, choose(settings, "depth_book"),
                           runner.RunOptions(block_ms=50, batch=7))
        client = make_client(settings.redis_url)
        async with trio.open_nursery() as ingesting:
            ingest = await ingesting.start(functools.partial(
                run_market_ingest, settings, client, ["BTCUSDT", "ETHUSDT"]))
            await wait_for(lambda: r.exists(*keys) == 2)
            sim.sequence_break("BTCUSDT")
            await wait_for(lambda: any(f.get(b"ctl") == b"gap"
                                       for _, f in xrange(r, "raw:depth_snapshots")))
            await wait_for(lambda: sum(f.get(b"ctl") == b"snapshot"
                                       for _, f in xrange(r, "raw:depth_snapshots")) >= 3)
            sim.set_silence(True)
            books = {k: sim.market.symbol(s).book for k, s in zip(keys, ("BTCUSDT", "ETHUSDT"),
                                                                   strict=True)}
            await wait_for(lambda: all(json.loads(r.get(k) or b"{}").get("last_update_id")
                                       == b.update_id for k, b in books.items()))
            ingest.stop()
        client.close()
        nursery.cancel_scope.cancel()
    assert all(b"frame" in f for _, f in xrange(r, "raw:market:depth"))
    live = {k: json.loads(r.get(k) or b"{}") for k in keys}

    env = {"REDIS_URL": redis_server.url, "PIPELINE_MARKET_STREAMS": "depth@100ms",
           "PIPELINE_SYMBOLS": "BTCUSDT,ETHUSDT"}
    done = run_cli("replay", "--only", "depth_book", "--reset", env=env)
    assert done.returncode == 0, done.stderr
    total = r.xlen("raw:market:depth") + r.xlen("raw:depth_snapshots")
    assert f"replayed {total} entries" in done.stderr
    for k in keys:
        again = json.loads(r.get(k) or b"{}")
        assert [again[f] for f in ("last_update_id", "bids", "asks")] == \
            [live[k][f] for f in ("last_update_id", "bids", "asks")]
