"""`pipeline ingest user` when REST misbehaves, as Binance's REST can: 429 with a huge
`Retry-After`, 418, 5xx, no answer, and 200s whose body was cut short, is empty or `{}`. Over
real HTTP and websockets (the simulator's fault switches) with a real Redis."""

from __future__ import annotations

import functools
import socket
from typing import Any

import httpx
import orjson
import pytest
import trio

from pipeline.ingest_user import UserOptions
from pipeline.localredis import LocalRedis
from pipeline.simulator import SimConfig, Simulator
from pipeline.status import collect
from projections.core.keys import KEY_CONN_USER
from tests.conftest import run_cli
from tests.test_ingest_user import (
    API_KEY,
    API_SECRET,
    controls,
    events,
    place,
    running,
    seed_open_views,
    snapshots_after,
    until,
    xrange,
)


def fault(sim: Simulator, **body: Any) -> None:
    sim.accounts.control("rest_fault", body)


def backoff_entries(r: Any) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"body"]) for _, f in xrange(r, KEY_CONN_USER)
            if f[b"ctl"] == b"rest_backoff"]


async def test_a_429_with_a_huge_retry_after_pauses_reconciliation_not_the_keep_alive(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, opts=UserOptions(keepalive_every=0.2)) as run:
        await snapshots_after(run, 1)
        rest = run.ingest.reconciler.api.rest
        fault(run.sim, kind="429", path="/fapi/v1/openOrders", retry_after=100000, count=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run.ingest.reconciler.run_once, "test")
            await until(lambda: backoff_entries(run.r))
            (notice,) = backoff_entries(run.r)
            assert (notice["status"], notice["retry_after"], notice["wait_s"]) == (
                429, "100000", 60.0)  # the weight window, not 27 hours
            algo_calls, extended = rest.calls["/fapi/v1/openAlgoOrders"], run.ingest.keys.extended
            await until(lambda: run.ingest.keys.extended >= extended + 3)  # still every 0.2 s
            assert rest.calls["/fapi/v1/openAlgoOrders"] == algo_calls  # heavy calls wait
            report = await trio.to_thread.run_sync(functools.partial(
                collect, run.r, prefix=run.settings.view_prefix, max_lag=10_000,
                silence_timeout=30.0))
            assert report.user_stream is not None and report.user_stream.backoff is not None
            assert report.user_stream.backoff["until"] <= notice["until"] <= \
                rest.clock() + 60
            nursery.cancel_scope.cancel()
        place(run.sim, type="LIMIT", price="50000")  # the stream is untouched
        await until(lambda: events(run.r, "ORDER_TRADE_UPDATE"))


def start_faults(sim: Simulator) -> None:
    fault(sim, kind="5xx", status=502, path="/fapi/v1/time", count=2)
    fault(sim, kind="429", path="/fapi/v2/balance", retry_after=2, count=1)


class Recording(httpx.AsyncHTTPTransport):
    """The real HTTP transport, noting (trio time, path, status) of every answer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.seen.append((trio.current_time(), request.url.path, response.status_code))
        return response


async def test_start_checks_retry_a_5xx_and_wait_out_a_429_then_stream(
        redis_server: LocalRedis) -> None:
    http = Recording()
    async with running(redis_server, before_start=start_faults, transport=http,
                       opts=UserOptions(start_retry_for=30)) as run:
        start = [(t, p, s) for t, p, s in http.seen if p in ("/fapi/v1/time",
                                                              "/fapi/v2/balance")][:5]
        assert [(p, s) for _, p, s in start] == [
            ("/fapi/v1/time", 502), ("/fapi/v1/time", 502), ("/fapi/v1/time", 200),
            ("/fapi/v2/balance", 429), ("/fapi/v2/balance", 200)]
        assert start[1][0] > start[0][0] and start[2][0] > start[1][0]  # with backoff
        assert start[4][0] - start[3][0] >= 2.0  # the 429's Retry-After waited out
        await snapshots_after(run, 1)
        assert [(b["status"], b["path"]) for b in backoff_entries(run.r)] == [
            (429, "/fapi/v2/balance")]
        assert run.sim.account.connection_count() == 1


def cli_env(rest_url: str, ws_url: str, redis_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url, "BINANCE_REST_URL": rest_url,
            "BINANCE_API_KEY": API_KEY, "BINANCE_API_SECRET": API_SECRET}


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "GET /fapi/v1/time: HTTP 200 with a body that is not JSON"),
    ("empty", "GET /fapi/v1/time: HTTP 200 with an empty body"),
    ("empty_object", "GET /fapi/v1/time: answer holds no serverTime"),
])
async def test_a_time_answer_that_is_not_the_expected_json_is_one_line_never_a_traceback(
        redis_server: LocalRedis, kind: str, words: str) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        fault(sim, kind=kind, path="/fapi/v1/time")
        result = await trio.to_thread.run_sync(functools.partial(
            run_cli, "ingest", "user", "--start-retry-for", "1.5",
            env=cli_env(rest_url, ws_url, redis_server.url)))
        assert not sim.account.state()["listenKeyLive"]  # nothing touched the key
        nursery.cancel_scope.cancel()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot run the user stream" in last and words in last


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rest_url_that_never_answers_exits_2_after_the_retries(
        redis_server: LocalRedis) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("ingest", "user", "--start-retry-for", "1",
                     env=cli_env(url, "ws://127.0.0.1:9", redis_server.url))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "bad setting BINANCE_REST_URL" in last and "retried for 1 s" in last
    assert "start check failed; retrying" in result.stderr  # it did retry
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["truncated", "empty_object"])
async def test_a_cut_open_orders_answer_is_no_snapshot_and_no_reason_for_lookups(
        redis_server: LocalRedis, kind: str) -> None:
    async with running(redis_server) as run:
        await snapshots_after(run, 1)
        order = place(run.sim, type="LIMIT", price="50000")
        algo = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        seed_open_views(run.r, run.settings.view_prefix, order, algo)
        rest = run.ingest.reconciler.api.rest
        lookups = rest.calls["/fapi/v1/order"]
        fault(run.sim, kind=kind, path="/fapi/v1/openOrders", count=1)
        result = await run.ingest.reconciler.run_once("test")
        await run.ingest.writer.flush()
        assert result.failed == ("openOrders",)
        assert rest.calls["/fapi/v1/order"] == lookups  # the order was not taken for gone
        kinds = [c.body["kind"] for c in controls(run.r, "snapshot")]
        assert kinds[-3:] == ["openAlgoOrders", "positionRisk", "balance"]
        assert all(c.body["response"] is not None for c in controls(run.r, "snapshot"))


async def test_a_418_ban_stops_every_call_until_its_end_and_status_names_it(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, opts=UserOptions(keepalive_every=0.2)) as run:
        await snapshots_after(run, 1)
        fault(run.sim, kind="418", path="/fapi/v1/openOrders", retry_after=2, count=1)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run.ingest.reconciler.run_once, "test")
                await until(lambda: backoff_entries(run.r))
                (ban,) = backoff_entries(run.r)
                assert (ban["status"], ban["wait_s"], ban["scope"]) == (418, 2.0, "every call")
                report = await trio.to_thread.run_sync(functools.partial(
                    collect, run.r, prefix=run.settings.view_prefix, max_lag=10_000,
                    silence_timeout=30.0))
                assert [p for p in report.problems if p.startswith("REST: IP banned")]
                extended = run.ingest.keys.extended
                await trio.sleep(1.0)
                assert run.ingest.keys.extended <= extended + 1  # the ban holds it back too
            # the run finished once the ban was over, and the keep-alive goes on
        await until(lambda: run.ingest.keys.extended >= extended + 3)
