"""`P:leverage:{symbol}` and `P:multi_assets_margin`: from ACCOUNT_CONFIG_UPDATE and from the
REST snapshots reconciliation logs at start and after an outage (`GET /fapi/v1/symbolConfig`,
`GET /fapi/v1/multiAssetsMargin`); read with `AccountReader`, with a freshness limit."""

from __future__ import annotations

import functools
from typing import Any

import orjson
import pytest
import redis
import trio
from user_frames import T0, control, frame_entry

from pipeline.localredis import LocalRedis
from projections.client import AccountReader
from projections.core.account import AccountProjection
from projections.core.outputs import PoisonEntry, ViewWrite
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.test_ingest_user import (
    SLOW_RECONNECT,
    controls,
    running,
    snapshots_after,
    until,
)

RECV = T0 / 1000 + 5


def written(entries: list[Any]) -> dict[str, dict[str, Any]]:
    proj = AccountProjection()
    out: dict[str, ViewWrite] = {}
    for e in entries:
        for w in proj.apply(e):
            if isinstance(w, ViewWrite) and (w.key not in out or w.version > out[w.key].version):
                out[w.key] = w
    assert all(w.expire_at_ms == 0 for k, w in out.items() if "leverage" in k or "multi" in k)
    return {k: orjson.loads(w.value) for k, w in out.items()}


def config_event(t: int, **part: Any) -> Any:
    return frame_entry(orjson.dumps({"e": "ACCOUNT_CONFIG_UPDATE", "E": t, "T": t, **part}),
                       RECV)


def snapshot(kind: str, response: Any, at: int) -> Any:
    return control("snapshot", {"kind": kind, "symbol": None, "fetched_at_ms": at,
                                "response": response}, RECV)


def test_leverage_from_the_event_and_from_the_snapshot_the_newer_wins() -> None:
    rows = [{"symbol": "BTCUSDT", "marginType": "CROSSED", "isAutoAddMargin": False,
             "leverage": 20, "maxNotionalValue": "12000000"},
            {"symbol": "ETHUSDT", "marginType": "CROSSED", "isAutoAddMargin": False,
             "leverage": 50, "maxNotionalValue": "3000000"}]
    views = written([snapshot("symbolConfig", rows, T0),
                     config_event(T0 + 1000, ac={"s": "BTCUSDT", "l": 7}),
                     snapshot("symbolConfig", rows, T0 + 500)])  # older than the event
    assert views["websocket:leverage:btcusdt"] == {
        "timestamp": (T0 + 1000) / 1000, "source": "websocket", "symbol": "BTCUSDT",
        "leverage": 7}
    assert views["websocket:leverage:ethusdt"] == {
        "timestamp": (T0 + 500) / 1000, "source": "reconciliation", "symbol": "ETHUSDT",
        "leverage": 50}


def test_multi_assets_mode_from_the_event_and_from_the_snapshot() -> None:
    views = written([snapshot("multiAssetsMargin", {"multiAssetsMargin": False}, T0),
                     config_event(T0 + 1000, ai={"j": True})])
    assert views["websocket:multi_assets_margin"] == {
        "timestamp": (T0 + 1000) / 1000, "source": "websocket", "multi_assets_margin": True}


@pytest.mark.parametrize("entry", [
    snapshot("symbolConfig", [{"symbol": "BTCUSDT", "leverage": "20"}], T0),
    snapshot("symbolConfig", [{"symbol": "btc:usdt", "leverage": 20}], T0),
    snapshot("symbolConfig", {"symbol": "BTCUSDT"}, T0),
    snapshot("multiAssetsMargin", {"multiAssetsMargin": "true"}, T0),
    snapshot("symbolConfig", [], T0 + 3_600_000),
    config_event(T0, ac={"s": "BTCUSDT", "l": 20.5}),
], ids=["leverage-text", "bad-symbol", "not-a-list", "flag-text", "future", "fraction"])
def test_implausible_settings_are_poison(entry: Any) -> None:
    with pytest.raises(PoisonEntry):
        list(AccountProjection().apply(entry))


def test_the_reader_gives_none_for_a_view_older_than_its_limit(r: redis.Redis) -> None:
    r.set("websocket:leverage:btcusdt", orjson.dumps(
        {"timestamp": 1000.0, "source": "websocket", "symbol": "BTCUSDT", "leverage": 5}))
    r.set("websocket:balance:usdt", orjson.dumps(
        {"timestamp": 1000.0, "source": "websocket", "a": "USDT", "wb": "10", "cw": "10",
         "bc": "0"}))
    reader = AccountReader(r, clock=lambda: 1700.0)
    assert reader.leverage("BTCUSDT") == {"timestamp": 1000.0, "source": "websocket",
                                          "symbol": "BTCUSDT", "leverage": 5}
    assert reader.leverage("BTCUSDT", max_age=60) is None
    assert reader.balance("USDT") is None  # 700 s: past the default 600
    assert reader.balance("USDT", max_age=3600)["wb"] == "10"  # type: ignore[index]
    assert reader.position("ETHUSDT") is None and reader.multi_assets_margin() is None


async def test_leverage_is_seeded_from_rest_at_start_and_follows_the_events(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, timing=SLOW_RECONNECT) as run, \
            trio.open_nursery() as projector:
        projector.start_soon(functools.partial(
            run_projector, run.settings, choose(run.settings, "account"),
            RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
        reader = AccountReader(run.r)
        rest = run.ingest.reconciler.api.rest
        await snapshots_after(run, 1)
        seeded = await until(lambda: reader.leverage("BTCUSDT"))
        assert (seeded["leverage"], seeded["source"]) == (20, "reconciliation")  # the default
        mode = await until(lambda: reader.multi_assets_margin())
        assert (mode["multi_assets_margin"], mode["source"]) == (False, "reconciliation")

        run.sim.account.control("leverage", {"symbol": "BTCUSDT", "leverage": 10})
        run.sim.account.control("multi_assets", {"on": True})
        await until(lambda: reader.leverage("BTCUSDT", max_age=10)["leverage"] == 10)
        await until(lambda: reader.multi_assets_margin()["multi_assets_margin"] is True)
        assert reader.leverage("BTCUSDT")["source"] == "websocket"  # type: ignore[index]

        # a periodic round does not ask again: the events told every change
        await run.ingest.reconciler.run_once("periodic")
        assert rest.calls["/fapi/v1/symbolConfig"] == 1
        assert rest.calls["/fapi/v1/multiAssetsMargin"] == 1
        # a change while the stream is down comes with the snapshot after the reconnect
        assert run.sim.drop("private") == 1
        await until(lambda: run.sim.account.connection_count() == 0)
        run.sim.account.control("leverage", {"symbol": "ETHUSDT", "leverage": 3})
        await until(lambda: reader.leverage("ETHUSDT")["leverage"] == 3, within=15)
        assert reader.leverage("ETHUSDT")["source"] == "reconciliation"  # type: ignore[index]
        assert rest.calls["/fapi/v1/symbolConfig"] == 2
        assert rest.weight_spent["/fapi/v1/multiAssetsMargin"] == 2 * 30
        kinds = [c.body["kind"] for c in controls(run.r, "snapshot")]
        assert kinds.count("symbolConfig") == kinds.count("multiAssetsMargin") == 2
        projector.cancel_scope.cancel()
