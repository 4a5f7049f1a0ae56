"""The ingest buffer and the retry rules (pure): no trio, no redis, no clock.

The reconnect backoff of a live connection is also checked end to end on Trio's MockClock in
tests/test_ingest_market.py; the writer's retries run in its thread against Redis, where no
MockClock reaches, so their rule is checked here.
"""

from __future__ import annotations

import pytest

from pipeline.backoff import Backoff, BatchRetry, backoff_delay
from pipeline.buffer import FrameBuffer


def test_buffer_hands_out_entries_in_the_order_they_were_put() -> None:
    buf = FrameBuffer(10)
    for i in range(5):
        assert buf.put("raw:market:depth20", i, ts=100.0 + i)
    assert buf.take(3) == [("raw:market:depth20", 0), ("raw:market:depth20", 1),
                           ("raw:market:depth20", 2)]
    assert buf.take(10) == [("raw:market:depth20", 3), ("raw:market:depth20", 4)]
    assert len(buf) == 0


def test_full_buffer_drops_and_counts_per_key_with_time_range_and_connection() -> None:
    buf = FrameBuffer(2)
    assert buf.put("raw:market:aggTrade", "a", ts=1.0, conn="mkt-1-aa")
    assert buf.put("raw:market:aggTrade", "b", ts=2.0, conn="mkt-1-aa")
    assert not buf.put("raw:market:aggTrade", "c", ts=3.0, conn="mkt-1-aa")
    assert not buf.put("raw:market:depth20", "d", ts=4.0, conn="mkt-2-bb")
    assert not buf.put("raw:market:aggTrade", "e", ts=5.5, conn="mkt-3-cc")

    drops = buf.take_drops()
    assert set(drops) == {"raw:market:aggTrade", "raw:market:depth20"}
    agg = drops["raw:market:aggTrade"].body()
    assert agg == {"reason": "buffer_full", "dropped": 2, "first_recv_ts": 3.0,
                   "last_recv_ts": 5.5, "by_conn": {"mkt-1-aa": 1, "mkt-3-cc": 1}}
    assert drops["raw:market:depth20"].count == 1
    assert buf.take_drops() == {}  # reported once
    assert buf.dropped == 3 and buf.accepted == 2


def test_control_entries_use_a_reserve_above_the_frame_bound() -> None:
    buf = FrameBuffer(1, control_reserve=1)
    assert buf.put("raw:market:markPrice", "frame", ts=1.0)
    assert not buf.put("raw:market:markPrice", "frame2", ts=1.1)
    assert buf.put_control("raw:conn", "closed", ts=1.2)
    assert not buf.put_control("raw:conn", "closed2", ts=1.3)
    assert [k for k, _ in buf.take(5)] == ["raw:market:markPrice", "raw:conn"]


def test_buffer_takes_frames_again_once_drained() -> None:
    buf = FrameBuffer(1)
    buf.put("k", 1, ts=0.0)
    assert not buf.put("k", 2, ts=0.0)
    buf.take(1)
    assert buf.put("k", 3, ts=0.0)


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    low = [backoff_delay(n, 0.5, 30.0, lambda: 0.0) for n in range(1, 10)]
    high = [backoff_delay(n, 0.5, 30.0, lambda: 1.0) for n in range(1, 10)]
    assert high[:4] == [0.5, 1.0, 2.0, 4.0]
    assert high[-1] == 30.0
    assert low[:2] == [0.25, 0.5]
    assert all(lo == hi / 2 for lo, hi in zip(low, high, strict=True))
    assert backoff_delay(1000, 0.5, 30.0, lambda: 1.0) == 30.0


def test_writer_retries_a_batch_for_as_long_as_redis_is_unreachable() -> None:
    retry = BatchRetry(Backoff(0.05, 5.0, rand=lambda: 1.0), max_refusals=8)
    waits = [retry.unreachable() for _ in range(12)]
    assert waits[:8] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert waits[8:] == [5.0] * 4  # capped, never given up


def test_entries_redis_keeps_refusing_are_given_up_on_the_last_allowed_attempt() -> None:
    retry = BatchRetry(Backoff(0.05, 5.0, rand=lambda: 1.0), max_refusals=3)
    assert retry.refused() == pytest.approx(0.05)
    assert retry.refused() == pytest.approx(0.1)
    assert retry.refused() is None  # sent 3 times, refused 3 times: dropped and reported


def test_refusals_and_outages_of_one_batch_share_one_backoff() -> None:
    retry = BatchRetry(Backoff(0.05, 5.0, rand=lambda: 1.0), max_refusals=8)
    assert [retry.unreachable(), retry.refused(), retry.unreachable()] == pytest.approx(
        [0.05, 0.1, 0.2])
