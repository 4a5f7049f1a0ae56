"""The projector's Redis function library on a real redis-server: versioned, loaded by
`pipeline functions load` or by the projector itself when it may, and never another
version's code."""

from __future__ import annotations

import json
import re
import time

import redis
import trio

from pipeline.localredis import LocalRedis
from projections.shell import functions
from projections.shell import project as runner
from projections.shell.registry import choose
from tests.conftest import run_cli
from tests.projector_support import mark_frame, seed, settings_for, wait_for


def test_functions_load_puts_this_versions_library_on_the_server(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    done = run_cli("functions", "load", env={"REDIS_URL": redis_server.url})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"loaded redis function library {functions.LIBRARY}"
    assert r.fcall_ro(functions.VERSION_FN, 0) == functions.VERSION.encode()
    again = run_cli("functions", "load", env={"REDIS_URL": redis_server.url})
    assert again.returncode == 0  # REPLACE: a deployment may run it every time


def test_functions_load_with_an_unreachable_redis_is_a_bad_setting() -> None:
    done = run_cli("functions", "load", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 2 and "REDIS_URL" in done.stderr


def test_the_library_name_carries_the_version_of_its_code() -> None:
    assert re.fullmatch(r"pipeline_[0-9a-f]{12}", functions.LIBRARY)
    assert functions.LIBRARY.endswith(functions.VERSION)
    assert functions.CODE.startswith(f"#!lua name={functions.LIBRARY}\n")
    for fn in (functions.VIEWS_FN, functions.ORDER_FN, functions.LEASE_ACQUIRE_FN,
               functions.LEASE_RENEW_FN, functions.VERSION_FN):
        assert fn.startswith(functions.LIBRARY + "_") and f"'{fn}'" in functions.CODE


async def test_another_versions_library_on_the_server_is_never_called(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    """An older projector's library (same function names but another version) stays where it
    is for that projector; this one loads and calls its own."""
    old = "pipeline_000000000000"
    r.function_load(f"#!lua name={old}\n" + "".join(
        f"redis.register_function('{old}_{name}', function() return redis.call('SET', "
        "'websocket:mark_price:btcusdt', 'stale code') end)\n"
        for name in ("views", "order", "lease_acquire", "lease_renew", "version")))
    seed(r, [("markPrice", mark_frame("BTCUSDT", int(time.time() * 1000), "64000.10"))])
    settings = settings_for(redis_server.url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price"),
                           runner.RunOptions(block_ms=50))
        await wait_for(lambda: r.exists("websocket:mark_price:btcusdt"))
        nursery.cancel_scope.cancel()
    assert json.loads(r.get("websocket:mark_price:btcusdt"))["mark_price"] == "64000.10"  # type: ignore[arg-type]
    libraries = {lib[1] for lib in r.function_list()}
    assert libraries == {old.encode(), functions.LIBRARY.encode()}


async def test_a_library_flushed_under_a_running_projector_is_loaded_again(
        redis_server: LocalRedis, r: redis.Redis) -> None:
    settings = settings_for(redis_server.url)
    now = int(time.time() * 1000)
    key = "websocket:mark_price:btcusdt"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, choose(settings, "mark_price"),
                           runner.RunOptions(block_ms=50))
        seed(r, [("markPrice", mark_frame("BTCUSDT", now, "1.00"))])
        await wait_for(lambda: r.exists(key))
        r.function_flush()  # as a Redis restarted without persistence would have it
        seed(r, [("markPrice", mark_frame("BTCUSDT", now + 1000, "2.00"))])
        await wait_for(lambda: json.loads(r.get(key) or b"{}").get("mark_price") == "2.00")
        nursery.cancel_scope.cancel()
