"""Consumers left in the groups by projector processes that are gone are removed; consumers
that still hold entries, and live ones, are not. Real redis-server, the projector in this
process (projections/shell/consumers.py)."""

from __future__ import annotations

import time

import redis
import trio

from pipeline.eventlog import frame_entry
from pipeline.localredis import LocalRedis
from projections.core.keys import KEY_USER, lease_key, market_key
from projections.shell import project as runner
from projections.shell.consumers import remove_idle_consumers
from projections.shell.registry import choose
from tests.projector_support import mark_frame, seed, settings_for, wait_for

MARK = market_key("markPrice")


def consumers(r: redis.Redis, key: str, group: str) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(key, group)}


def left_by_dead_processes(r: redis.Redis, key: str, group: str) -> None:
    """host-101 read and acknowledged everything; host-102 died holding one entry."""
    r.xgroup_create(key, group, id="0", mkstream=True)
    r.xadd(key, frame_entry(b"{}", time.time(), "c", 1))  # type: ignore[arg-type]
    r.xadd(key, frame_entry(b"{}", time.time(), "c", 2))  # type: ignore[arg-type]
    (_, got), = r.xreadgroup(group, "host-101", {key: ">"}, count=1)  # type: ignore[misc]
    r.xack(key, group, got[0][0])
    r.xreadgroup(group, "host-102", {key: ">"}, count=1)


def test_only_idle_consumers_that_hold_nothing_are_removed(r: redis.Redis) -> None:
    left_by_dead_processes(r, MARK, "mark_price")
    assert remove_idle_consumers(r, "mark_price", [MARK], "me", idle_s=60) == []  # not idle yet
    time.sleep(0.3)
    r.xadd(MARK, frame_entry(b"{}", time.time(), "c", 3))  # type: ignore[arg-type]
    r.xreadgroup("mark_price", "live", {MARK: ">"}, count=1)  # a live one: idle ~0
    removed = remove_idle_consumers(r, "mark_price", [MARK, "raw:market:none"], "me",
                                    idle_s=0.2)
    assert removed == [f"{MARK}/host-101"]
    assert consumers(r, MARK, "mark_price") == {"host-102": 1, "live": 1}


async def test_a_projector_removes_the_consumers_dead_processes_left(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    left_by_dead_processes(r, MARK, "mark_price")
    left_by_dead_processes(r, KEY_USER, "orders")  # an exclusive projection's group
    await trio.sleep(0.3)
    settings = settings_for(redis_server.url)
    opts = runner.RunOptions(consumer="p1", block_ms=100, claim_idle_ms=200)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price,orders"), opts,
                           None, None, None, 0.2)
        await wait_for(lambda: r.get(lease_key("orders")) == b"p1")
        seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "1.00"))])
        await wait_for(lambda: r.exists("websocket:mark_price:btcusdt"))
        # host-101 goes at start; host-102's entry is claimed first (stateless: after
        # --claim-idle-ms; exclusive: at takeover, which may come after the first round of
        # removals: the lease is taken before the takeover runs), then it goes at the next
        # round (REAP_EVERY_S later, past this test)
        await wait_for(lambda: "host-101" not in consumers(r, MARK, "mark_price")
                       and "host-101" not in consumers(r, KEY_USER, "orders")
                       and "p1" in consumers(r, KEY_USER, "orders"))
        assert set(consumers(r, MARK, "mark_price")) <= {"host-102", "p1"}
        nursery.cancel_scope.cancel()
