"""The listenKey is the account's: every process with the same API key holds the same one.

What an operator does, over real sockets and a real Redis: a second `pipeline ingest user`
with a mistyped secret, and a second one that runs and stops, both while the first keeps
streaming (events after them reach the views within seconds); someone else's DELETE of the key
(the first reconnects at once with the account's live key, not 30 minutes later); and
`pipeline status` while the private stream has no working connection.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from pipeline.localredis import LocalRedis
from pipeline.status import collect
from projections.core.keys import KEY_CONN_USER
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.conftest import ROOT, run_cli
from tests.test_ingest_user import (
    API_KEY,
    API_SECRET,
    Running,
    conn_entries,
    place,
    running,
    snapshots_after,
    until,
    xrange,
)


@asynccontextmanager
async def with_orders_projector(run: Running) -> AsyncIterator[None]:
    async with trio.open_nursery() as projector:
        projector.start_soon(functools.partial(
            run_projector, run.settings, choose(run.settings, "orders"),
            RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
        yield
        projector.cancel_scope.cancel()


def cli_env(run: Running, secret: str = API_SECRET) -> dict[str, str]:
    return {"REDIS_URL": run.settings.redis_url, "BINANCE_WS_URL": run.settings.ws_url,
            "BINANCE_REST_URL": run.rest_url, "BINANCE_API_KEY": API_KEY,
            "BINANCE_API_SECRET": secret}


async def order_reaches_the_views(run: Running, price: str) -> None:
    order = place(run.sim, type="LIMIT", price=price)
    with trio.fail_after(5):  # "within seconds"
        await until(lambda: run.r.hexists(f"{run.settings.view_prefix}:open_orders:btcusdt",
                                          str(order["orderId"])))


async def test_a_second_instance_with_a_wrong_secret_leaves_the_running_one_streaming(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run, with_orders_projector(run):
        await snapshots_after(run, 1)
        key = run.ingest.keys.current().value
        second = await trio.to_thread.run_sync(functools.partial(
            run_cli, "ingest", "user", env=cli_env(run, "mistyped-secret")))
        assert second.returncode == 2
        assert "bad setting BINANCE_API_SECRET" in second.stderr
        assert run.sim.account.state()["listenKeyLive"]
        assert run.sim.account.issued_listen_keys == [key]  # never closed, never replaced
        assert run.sim.account.connection_count() == 1
        await order_reaches_the_views(run, "50000")
        assert conn_entries(run.r, "closed") == 0


async def test_a_second_instance_that_stops_leaves_the_running_one_streaming(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    async with running(redis_server) as run, with_orders_projector(run):
        await snapshots_after(run, 1)
        key = run.ingest.keys.current().value
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
        env.update(cli_env(run))
        with (tmp_path / "second.log").open("wb") as err:
            async with trio.open_nursery() as nursery:
                second = await nursery.start(functools.partial(
                    trio.run_process, [sys.executable, "-m", "pipeline", "ingest", "user"],
                    env=env, cwd=ROOT, stderr=err, check=False))
                await until(lambda: run.sim.account.connection_count() == 2, within=20)
                second.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    await second.wait()
        assert second.returncode == 0
        assert run.sim.account.connection_count() == 1  # the first one's, still on
        assert run.sim.account.issued_listen_keys == [key]
        assert run.ingest.keys.current().value == key
        await order_reaches_the_views(run, "50000")


# trio-websocket 0.12 never closes a client's TCP stream when the server closed the websocket
# first (4001 here); the socket is freed when collected, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_key_deleted_by_another_process_is_renewed_at_once_and_reconciled(
        redis_server: LocalRedis) -> None:
    # the default keep-alive: the next PUT is 30 minutes away, so only the close can tell
    async with running(redis_server) as run, with_orders_projector(run):
        await snapshots_after(run, 1)
        reply = await run.sim.accounts.handle_rest("DELETE", "/fapi/v1/listenKey", {},
                                                   {"x-mbx-apikey": API_KEY}, b"")
        assert reply is not None and reply.status == 200
        with trio.fail_after(5):
            await until(lambda: len(run.sim.account.issued_listen_keys) == 2)
            await until(lambda: run.sim.account.connection_count() == 1)
            await snapshots_after(run, 2)  # the reconnect reconciled
        assert run.ingest.keys.current().value == run.sim.account.issued_listen_keys[-1]
        reasons = [f[b"body"] for _, f in xrange(run.r, KEY_CONN_USER) if f[b"ctl"] == b"closed"]
        assert reasons == [b'{"reason":"server_closed: 4001","frames":0}']  # one close, no loop
        await order_reaches_the_views(run, "51000")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_status_is_unhealthy_while_the_user_stream_has_no_working_connection(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run:
        await snapshots_after(run, 1)
        report = await trio.to_thread.run_sync(functools.partial(
            collect, run.r, prefix=run.settings.view_prefix, max_lag=10_000,
            silence_timeout=30.0))
        assert report.user_stream is not None and report.user_stream.connected
        assert not [p for p in report.problems if p.startswith("user stream")]

        # the key closed and no new one to be had: every reconnect is closed again (4001)
        run.sim.accounts.control("rest_fault", {"kind": "5xx", "path": "/fapi/v1/listenKey"})
        await run.sim.accounts.handle_rest("DELETE", "/fapi/v1/listenKey", {},
                                           {"x-mbx-apikey": API_KEY}, b"")
        await until(lambda: conn_entries(run.r, "closed") >= 3)
        report = await trio.to_thread.run_sync(functools.partial(
            collect, run.r, prefix=run.settings.view_prefix, max_lag=10_000,
            silence_timeout=30.0))
        user = [p for p in report.problems if p.startswith("user stream")]
        assert user and ("no working connection" in user[0] or "reconnecting" in user[0])
        assert not report.healthy

        run.sim.accounts.control("clear_rest_faults", {})
        await until(lambda: run.sim.account.connection_count() == 1 and
                    len(run.sim.account.issued_listen_keys) == 2)
        await trio.sleep(0.2)
        report = await trio.to_thread.run_sync(functools.partial(
            collect, run.r, prefix=run.settings.view_prefix, max_lag=10_000,
            silence_timeout=30.0))
        assert report.user_stream is not None and report.user_stream.connected
