"""`pipeline replay`: views rebuilt from the log equal what the live projector wrote."""

from __future__ import annotations

import time

import pytest
import redis

from pipeline.errors import SettingsError
from pipeline.eventlog import frame_entry
from pipeline.localredis import LocalRedis
from projections.shell.replay import merged_entries, parse_from
from tests.conftest import run_cli
from tests.projector_support import (
    STREAMS,
    SYMBOLS,
    mark_frame,
    market_log,
    project_until_drained,
    seed,
    settings_for,
    views,
)


def replay_cli(url: str, *args: str) -> None:
    done = run_cli("replay", *args, env={"REDIS_URL": url, "PIPELINE_MARKET_STREAMS": STREAMS,
                                          "PIPELINE_SYMBOLS": ",".join(SYMBOLS)})
    assert done.returncode == 0, done.stderr
    assert "replayed" in done.stderr


async def test_replay_over_live_views_changes_nothing(redis_server: LocalRedis,
                                                     r: redis.Redis) -> None:
    seed(r, market_log(200))
    await project_until_drained(settings_for(redis_server.url), r)
    live = views(r)
    assert live
    replay_cli(redis_server.url)
    assert views(r) == live


async def test_replay_into_empty_views_reproduces_them(redis_server: LocalRedis,
                                                      r: redis.Redis) -> None:
    seed(r, market_log(200))
    await project_until_drained(settings_for(redis_server.url), r)
    live = views(r)
    r.set("websocket:mark_price:btcusdt", b'{"timestamp": 1e15}')  # a view gone wrong
    replay_cli(redis_server.url, "--reset")
    assert views(r) == live


def test_frames_older_than_the_ttl_replay_to_no_key(redis_server: LocalRedis,
                                                    r: redis.Redis) -> None:
    now = time.time()
    seed(r, [("markPrice", mark_frame("BTCUSDT", int((now - 120) * 1000), "1.0"))],
         recv_ts=now - 120)
    seed(r, [("markPrice", mark_frame("ETHUSDT", int(now * 1000), "2.0"))], recv_ts=now)
    replay_cli(redis_server.url, "--only", "mark_price", "--reset")
    assert r.exists("websocket:mark_price:btcusdt") == 0
    assert r.exists("websocket:mark_price:ethusdt") == 1


def test_replay_from_a_time_leaves_earlier_frames_out(redis_server: LocalRedis,
                                                      r: redis.Redis) -> None:
    now = time.time()
    r.xadd("raw:market:markPrice", frame_entry(mark_frame("BTCUSDT", int(now * 1000), "1.0"),
                                               now, "c", 1), id=f"{int(now * 1000) - 5000}-0")  # type: ignore[arg-type]
    r.xadd("raw:market:markPrice", frame_entry(mark_frame("ETHUSDT", int(now * 1000), "2.0"),
                                               now, "c", 2), id=f"{int(now * 1000)}-0")  # type: ignore[arg-type]
    replay_cli(redis_server.url, "--only", "mark_price", "--from", f"{now - 1:.3f}")
    assert r.exists("websocket:mark_price:btcusdt") == 0
    assert r.exists("websocket:mark_price:ethusdt") == 1


def test_unknown_projection_is_a_bad_setting(redis_server: LocalRedis) -> None:
    done = run_cli("replay", "--only", "nonesuch", env={"REDIS_URL": redis_server.url})
    assert done.returncode == 2
    assert "--only" in done.stderr


@pytest.mark.parametrize(("value", "start"), [
    (None, "-"),
    ("1700000000000-5", "1700000000000-5"),
    ("1700000000", "1700000000000-0"),
    ("1700000000.25", "1700000000250-0"),
    ("2023-11-14T22:13:20Z", "1700000000000-0"),
    ("2023-11-14T22:13:20", "1700000000000-0"),
])
def test_from_takes_an_id_an_iso_time_or_unix_seconds(value: str | None, start: str) -> None:
    assert parse_from(value) == start


@pytest.mark.parametrize("value", ["yesterday", "-5", "-1700000000", "nan", "inf",
                                   "1960-01-01T00:00:00Z", "99999999999999999999-0", "1e30"])
def test_from_that_is_no_time_after_1970_names_itself(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_from(value)
    assert str(err.value).startswith("--from")


def test_negative_from_is_a_bad_setting_not_a_full_replay(redis_server: LocalRedis,
                                                          r: redis.Redis) -> None:
    seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "1.0"))])
    done = run_cli("replay", "--only", "mark_price", "--from", "-5",
                   env={"REDIS_URL": redis_server.url})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pipeline: bad setting --from: '-5' is not a time after 1970 (unix seconds >= 0)"]
    assert r.exists("websocket:mark_price:btcusdt") == 0  # nothing was replayed


def test_from_after_the_newest_entry_says_so_and_resets_nothing(redis_server: LocalRedis,
                                                                r: redis.Redis) -> None:
    now = time.time()
    seed(r, [("markPrice", mark_frame("BTCUSDT", int(now * 1000), "1.0"))], recv_ts=now)
    replay_cli(redis_server.url, "--only", "mark_price")
    view = r.get("websocket:mark_price:btcusdt")
    assert view is not None
    # milliseconds typed where seconds were meant: a time some 50,000 years ahead
    done = run_cli("replay", "--only", "mark_price", "--reset", "--from",
                   str(int(now * 1000)), env={"REDIS_URL": redis_server.url})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("pipeline: bad setting --from: ")
    assert "after the newest entry" in line and "nothing to replay" in line
    assert r.get("websocket:mark_price:btcusdt") == view  # --reset deleted nothing


def test_from_on_an_empty_log_replays_nothing_without_error(redis_server: LocalRedis) -> None:
    done = run_cli("replay", "--only", "mark_price", "--from", "1700000000",
                   env={"REDIS_URL": redis_server.url})
    assert done.returncode == 0, done.stderr
    assert "replayed 0 entries" in done.stderr


def test_entries_of_several_keys_come_back_in_id_order(r: redis.Redis) -> None:
    for i in range(25):
        key = "raw:a" if i % 3 else "raw:b"
        r.xadd(key, {b"n": b"%d" % i}, id=f"{1000 + i}-0")
    ends = {"raw:a": b"1024-0", "raw:b": b"1024-0"}
    r.xadd("raw:a", {b"n": b"late"}, id="2000-0")  # appended after the replay started
    chunks = list(merged_entries(r, ends, "-", chunk=4))
    got = [int(fields[b"n"]) for chunk in chunks for _, _, fields in chunk]
    assert got == list(range(25))


async def test_replay_of_order_events_emits_nothing_twice(redis_server: LocalRedis,
                                                         r: redis.Redis) -> None:
    from tests.user_frames import T0, order_frame

    now = time.time()
    for seq, frame in enumerate([
            order_frame(42, "NEW", "NEW", t=T0),
            order_frame(42, "PARTIALLY_FILLED", "TRADE", t=T0 + 5, z="0.001", last_qty="0.001",
                        last_price="50000.10", trade_id=7),
            order_frame(43, "NEW", "NEW", t=T0 + 6)]):
        r.xadd("raw:user", frame_entry(frame, now, "user", seq))  # type: ignore[arg-type]
    await project_until_drained(settings_for(redis_server.url), r, only="orders")
    assert r.xlen("websocket:orders") == 3
    assert set(r.hkeys("websocket:open_orders:btcusdt")) == {b"42", b"43"}
    before = views(r)

    replay_cli(redis_server.url, "--only", "orders")
    assert r.xlen("websocket:orders") == 3  # the listener sees each event once
    assert views(r) == before
