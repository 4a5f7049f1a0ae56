"""The ingest buffer, its account of drops and the writer's retry rules (pure): no trio, no
redis, no clock.

The reconnect backoff of a live connection is also checked end to end on Trio's MockClock in
tests/test_ingest_market.py; the writer's retries run in its thread against Redis, where no
MockClock reaches, so their rule is checked here (and its effect against real Redis in
tests/test_redis_faults.py).
"""

from __future__ import annotations

import pytest

from pipeline.backoff import Backoff, BatchRetry, backoff_delay
from pipeline.buffer import DropLedger, DropRecord, FrameBuffer
from pipeline.config import load_settings
from pipeline.errors import SettingsError
from pipeline.eventlog import refused_reason

OOM = "OOM command not allowed when used memory > 'maxmemory'."


def test_buffer_hands_out_entries_in_the_order_they_were_put() -> None:
    buf = FrameBuffer(10)
    for i in range(5):
        assert buf.put("raw:market:depth20", b"%d" % i, ts=100.0 + i)
    assert buf.take(3) == [("raw:market:depth20", b"0"), ("raw:market:depth20", b"1"),
                           ("raw:market:depth20", b"2")]
    assert buf.take(10) == [("raw:market:depth20", b"3"), ("raw:market:depth20", b"4")]
    assert len(buf) == 0


def test_full_buffer_drops_and_counts_per_key_with_time_range_and_connection() -> None:
    buf = FrameBuffer(2)
    assert buf.put("raw:market:aggTrade", b"a", ts=1.0, conn="mkt-1-aa")
    assert buf.put("raw:market:aggTrade", b"b", ts=2.0, conn="mkt-1-aa")
    assert not buf.put("raw:market:aggTrade", b"c", ts=3.0, conn="mkt-1-aa")
    assert not buf.put("raw:market:depth20", b"d", ts=4.0, conn="mkt-2-bb")
    assert not buf.put("raw:market:aggTrade", b"e", ts=5.5, conn="mkt-3-cc")

    drops = buf.drops.take()
    assert set(drops) == {("raw:market:aggTrade", "buffer_full"),
                          ("raw:market:depth20", "buffer_full")}
    agg = drops[("raw:market:aggTrade", "buffer_full")].body("buffer_full")
    assert agg == {"reason": "buffer_full", "dropped": 2, "first_recv_ts": 3.0,
                   "last_recv_ts": 5.5, "by_conn": {"mkt-1-aa": 1, "mkt-3-cc": 1}}
    assert drops[("raw:market:depth20", "buffer_full")].count == 1
    assert buf.drops.take() == {}  # taken out to be written
    assert buf.rejected == 3 and buf.accepted == 2 and buf.drops.recorded == 3


def test_the_byte_bound_drops_what_the_entry_bound_would_still_take() -> None:
    buf = FrameBuffer(1000, max_bytes=100)
    assert buf.put("raw:market:depth20", b"x" * 60, ts=1.0)
    assert not buf.put("raw:market:depth20", b"y" * 50, ts=2.0)  # 110 bytes > 100
    assert buf.put("raw:market:depth20", b"z" * 40, ts=3.0)  # exactly 100: fits
    assert buf.bytes_held == 100 and buf.held == 2 and buf.full()
    assert not buf.put("raw:market:depth20", b"!", ts=4.0)
    assert buf.drops.take()[("raw:market:depth20", "buffer_full")].count == 2


def test_entries_taken_stay_held_until_the_writer_releases_them() -> None:
    # a batch on the wire, or refused and waiting to go again, still takes room: the bounds
    # are what the process holds, not what is queued
    buf = FrameBuffer(3, max_bytes=1000)
    for i in range(3):
        assert buf.put("k", b"%03d" % i, ts=float(i))
    batch = buf.take(10)
    assert len(buf) == 0 and buf.held == 3 and buf.bytes_held == 9
    assert not buf.put("k", b"new", ts=9.0)
    buf.release(2, 6)
    assert buf.held == 1 and buf.bytes_held == 3
    assert buf.put("k", b"new", ts=9.0) and buf.put("k", b"two", ts=9.5)
    assert not buf.put("k", b"three", ts=9.9)
    assert len(batch) == 3


def test_take_stops_at_the_byte_budget_but_always_gives_one_entry() -> None:
    buf = FrameBuffer(100)
    for size in (40, 40, 40, 200, 10):
        buf.put("k", b"x" * size, ts=0.0)
    assert [len(p) for _, p in buf.take(10, max_bytes=100)] == [40, 40]
    assert [len(p) for _, p in buf.take(10, max_bytes=100)] == [40]
    assert [len(p) for _, p in buf.take(10, max_bytes=100)] == [200]  # alone, over budget
    assert [len(p) for _, p in buf.take(10, max_bytes=100)] == [10]
    assert buf.held == 5  # nothing released yet


def test_control_entries_use_a_reserve_above_both_bounds() -> None:
    buf = FrameBuffer(1, max_bytes=80, control_reserve=1)
    assert buf.put("raw:market:markPrice", b"frame", ts=1.0)
    assert not buf.put("raw:market:markPrice", b"frame2", ts=1.1)
    assert buf.put_control("raw:conn:market", b"closed", ts=1.2)
    assert not buf.put_control("raw:conn:market", b"closed2", ts=1.3)
    assert [k for k, _ in buf.take(5)] == ["raw:market:markPrice", "raw:conn:market"]
    big = FrameBuffer(100, max_bytes=80)  # 80 bytes + 1/8: 90 for control entries
    assert not big.put("k", b"x" * 85, ts=0.0)
    assert big.put_control("k", b"x" * 85, ts=0.0)
    assert not big.put_control("k", b"x" * 6, ts=0.0)


def test_buffer_takes_frames_again_once_released() -> None:
    buf = FrameBuffer(1)
    buf.put("k", b"1", ts=0.0)
    assert not buf.put("k", b"2", ts=0.0)
    buf.take(1)
    assert not buf.put("k", b"3", ts=0.0)  # taken is not written
    buf.release(1, 1)
    assert buf.put("k", b"3", ts=0.0)


def test_a_gap_record_redis_did_not_take_is_merged_back_with_later_drops() -> None:
    ledger = DropLedger()
    ledger.add("raw:user", "buffer_full", 10.0, "usr-a")
    ledger.add("raw:user", "buffer_full", 11.0, "usr-a")
    taken = ledger.take()
    assert not ledger
    ledger.add("raw:user", "buffer_full", 12.5, "usr-b")  # while the gap entry was on the wire
    ledger.add("raw:user", refused_reason(OOM), 9.0, "usr-a")
    for (key, reason), rec in taken.items():  # Redis refused that gap entry: put it back
        ledger.merge(key, reason, rec)
    again = ledger.take()
    full = again[("raw:user", "buffer_full")]
    assert full.body("buffer_full") == {"reason": "buffer_full", "dropped": 3,
                                        "first_recv_ts": 10.0, "last_recv_ts": 12.5,
                                        "by_conn": {"usr-a": 2, "usr-b": 1}}
    refused = again[("raw:user", "refused: " + OOM)]
    assert refused.body("refused: " + OOM)["dropped"] == 1
    assert ledger.recorded == 4 and ledger.unreported == 4
    ledger.report(full)
    ledger.abandon(refused)
    assert ledger.unreported == 0


def test_receipt_times_of_several_connections_give_a_range() -> None:
    rec = DropRecord()
    for ts in (5.0, 3.0, 7.0, 4.0):
        rec.add(ts, "c")
    assert (rec.first_ts, rec.last_ts, rec.count) == (3.0, 7.0, 4)
    other = DropRecord()
    other.add(1.0, "d")
    rec.merge(other)
    assert (rec.first_ts, rec.last_ts, rec.count, rec.by_conn) == (1.0, 7.0, 5,
                                                                   {"c": 4, "d": 1})


def test_a_refusal_reason_names_redis_s_error_and_stays_short() -> None:
    assert refused_reason(OOM) == "refused: " + OOM
    assert len(refused_reason("WRONGTYPE " + "x" * 500)) == 200


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    low = [backoff_delay(n, 0.5, 30.0, lambda: 0.0) for n in range(1, 10)]
    high = [backoff_delay(n, 0.5, 30.0, lambda: 1.0) for n in range(1, 10)]
    assert high[:4] == [0.5, 1.0, 2.0, 4.0]
    assert high[-1] == 30.0
    assert low[:2] == [0.25, 0.5]
    assert all(lo == hi / 2 for lo, hi in zip(low, high, strict=True))
    assert backoff_delay(1000, 0.5, 30.0, lambda: 1.0) == 30.0


def retry(max_refusals: int = 8) -> BatchRetry:
    return BatchRetry(Backoff(0.05, 5.0, rand=lambda: 1.0), max_refusals)


def test_writer_retries_a_batch_for_as_long_as_redis_is_unreachable() -> None:
    r = retry()
    waits = [r.unreachable() for _ in range(12)]
    assert waits[:8] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert waits[8:] == [5.0] * 4  # capped, never given up


def test_an_entry_the_whole_server_refuses_is_given_up_only_when_the_buffer_is_full() -> None:
    r = retry(max_refusals=3)
    assert not any(r.give_up(n, server_wide=True, buffer_full=False) for n in range(1, 10_000))
    assert r.give_up(1, server_wide=True, buffer_full=True)


def test_an_entry_its_own_key_refuses_is_given_up_on_the_last_allowed_attempt() -> None:
    r = retry(max_refusals=3)
    assert [r.give_up(n, server_wide=False, buffer_full=False) for n in (1, 2, 3)] == [
        False, False, True]


def test_a_round_trip_that_got_nothing_in_waits_one_that_got_some_in_goes_on() -> None:
    r = retry()
    assert [r.unreachable(), r.refused(progressed=False), r.unreachable()] == pytest.approx(
        [0.05, 0.1, 0.2])  # one backoff over both kinds of failure
    assert r.refused(progressed=True) == 0.0  # other keys got in: no stall
    assert r.refused(progressed=False) == pytest.approx(0.05)  # and the backoff starts again
    r.written()
    assert r.unreachable() == pytest.approx(0.05)


def test_the_byte_bound_setting_takes_units_and_refuses_a_bound_below_the_largest_frame() -> None:
    assert load_settings(env={}).buffer_bytes == 256 * 1024 * 1024
    assert load_settings(env={"PIPELINE_BUFFER_BYTES": "1GiB"}).buffer_bytes == 1 << 30
    assert load_settings(env={"PIPELINE_BUFFER_BYTES": "33554432"}).buffer_bytes == 32 << 20
    assert load_settings(env={"PIPELINE_BUFFER_BYTES": "65536 KiB"}).buffer_bytes == 64 << 20
    for bad in ("lots", "16MiB", "256 MB", "-1GiB", ""):
        with pytest.raises(SettingsError, match="PIPELINE_BUFFER_BYTES"):
            load_settings(env={"PIPELINE_BUFFER_BYTES": bad})
