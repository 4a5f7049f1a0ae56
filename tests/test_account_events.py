"""`P:account_events`: one entry per MARGIN_CALL, ACCOUNT_CONFIG_UPDATE,
CONDITIONAL_ORDER_TRIGGER_REJECT, STRATEGY_UPDATE and GRID_UPDATE, exactly once under
duplicates, redelivery and replay.

The fold alone, the store's append function on a real Redis, and the whole path: the
simulator's account, the user ingestor, the projector, the listener's consumer."""

from __future__ import annotations

import functools
import time
from typing import Any

import orjson
import pytest
import redis
import trio
from user_frames import T0, frame_entry

from pipeline.eventlog import frame_entry as raw_frame_entry
from pipeline.localredis import LocalRedis
from projections.client import AccountEvent, AccountEventsConsumer
from projections.core.accountevents import ACCOUNT_EVENT_TYPES, AccountEventsProjection
from projections.core.keys import KEY_USER
from projections.core.outputs import PoisonEntry, StreamAppend
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from projections.shell.viewstore import ViewStore, write_results
from tests.conftest import run_cli
from tests.test_ingest_user import events, place, running, snapshots_after, until

RECV = T0 / 1000 + 5
KEY = "websocket:account_events"

EXAMPLES: dict[str, dict[str, Any]] = {
    "MARGIN_CALL": {"e": "MARGIN_CALL", "E": T0, "cw": "3.16", "p": [
        {"s": "ETHUSDT", "ps": "LONG", "pa": "1.327", "mt": "CROSSED", "iw": "0",
         "mp": "187.17", "up": "-1.166", "mm": "1.614"}]},
    "ACCOUNT_CONFIG_UPDATE": {"e": "ACCOUNT_CONFIG_UPDATE", "E": T0, "T": T0,
                              "ac": {"s": "BTCUSDT", "l": 25}},
    "CONDITIONAL_ORDER_TRIGGER_REJECT": {"e": "CONDITIONAL_ORDER_TRIGGER_REJECT", "E": T0,
                                         "T": T0, "or": {"s": "ETHUSDT", "i": 155618472834,
                                                         "r": "Due to the order could not be "
                                                              "filled immediately"}},
    "STRATEGY_UPDATE": {"e": "STRATEGY_UPDATE", "T": T0, "E": T0, "su": {
        "si": 176054594, "st": "GRID", "ss": "NEW", "s": "BTCUSDT", "ut": T0, "c": 8007}},
    "GRID_UPDATE": {"e": "GRID_UPDATE", "T": T0, "E": T0, "gu": {
        "si": 176057039, "st": "GRID", "ss": "WORKING", "s": "BTCUSDT", "r": "-0.00300716",
        "up": "16720", "uq": "0.001", "uf": "0.00300716", "mp": "0", "ut": T0}},
}


def fold(payload: dict[str, Any]) -> list[Any]:
    return list(AccountEventsProjection().apply(frame_entry(orjson.dumps(payload), RECV)))


@pytest.mark.parametrize("event_type", ACCOUNT_EVENT_TYPES)
def test_each_event_type_is_one_append_with_type_symbol_and_the_json_as_sent(
        event_type: str) -> None:
    payload = EXAMPLES[event_type]
    [out] = fold(payload)
    assert isinstance(out, StreamAppend) and out.key == KEY and out.at_ms == T0
    fields = dict(out.fields)
    assert fields["type"] == event_type.encode()
    assert fields["data"] == orjson.dumps(payload)  # the frame's own bytes
    symbol = {"MARGIN_CALL": "ETHUSDT", "CONDITIONAL_ORDER_TRIGGER_REJECT": "ETHUSDT"}.get(
        event_type, "BTCUSDT")
    assert fields["symbol"] == symbol.encode()
    assert out.event_key.startswith(f"{event_type}:{T0}:")
    assert out.max_age_ms == 7 * 86_400_000


def test_copies_of_an_event_share_its_key_and_other_events_do_not() -> None:
    payload = EXAMPLES["ACCOUNT_CONFIG_UPDATE"]
    [a] = fold(payload)
    [b] = fold(dict(reversed(payload.items())))  # the same event, serialised otherwise
    [c] = fold({**payload, "ac": {"s": "BTCUSDT", "l": 30}})
    assert a.event_key == b.event_key != c.event_key


def test_a_margin_call_on_several_symbols_names_none_and_multi_assets_names_none() -> None:
    two = {**EXAMPLES["MARGIN_CALL"], "p": [*EXAMPLES["MARGIN_CALL"]["p"],
                                            {**EXAMPLES["MARGIN_CALL"]["p"][0], "s": "BTCUSDT"}]}
    [out] = fold(two)
    assert "symbol" not in dict(out.fields)
    [mode] = fold({"e": "ACCOUNT_CONFIG_UPDATE", "E": T0, "T": T0, "ai": {"j": True}})
    assert "symbol" not in dict(mode.fields)


def test_other_event_types_append_nothing() -> None:
    assert fold({"e": "ACCOUNT_UPDATE", "E": T0, "T": T0, "a": {"m": "ORDER"}}) == []
    assert fold({"e": "SOMETHING_NEW", "E": T0}) == []


@pytest.mark.parametrize("payload", [
    {**EXAMPLES["MARGIN_CALL"], "E": T0 + 3_600_000},  # an hour after its receipt
    {**EXAMPLES["MARGIN_CALL"], "E": "soon"},
    {**EXAMPLES["MARGIN_CALL"], "p": [{"s": "BTC*", "pa": "1"}]},
    {**EXAMPLES["MARGIN_CALL"], "cw": 3.16},
    {**EXAMPLES["ACCOUNT_CONFIG_UPDATE"], "ac": {"s": "BTCUSDT", "l": "25"}},
    {**EXAMPLES["ACCOUNT_CONFIG_UPDATE"], "ac": {"s": "BTCUSDT", "l": 0}},
    {"e": "ACCOUNT_CONFIG_UPDATE", "E": T0, "T": T0, "ai": {"j": "yes"}},
    {**EXAMPLES["GRID_UPDATE"], "gu": {**EXAMPLES["GRID_UPDATE"]["gu"], "r": "a lot"}},
    {**EXAMPLES["STRATEGY_UPDATE"], "su": "NEW"},
    {**EXAMPLES["CONDITIONAL_ORDER_TRIGGER_REJECT"], "or": {"s": "ETHUSDT", "i": -1}},
], ids=["future", "time-text", "bad-symbol", "number-not-text", "leverage-text",
        "leverage-zero", "flag-text", "grid-amount", "not-an-object", "negative-id"])
def test_implausible_account_events_are_poison(payload: dict[str, Any]) -> None:
    with pytest.raises(PoisonEntry):
        fold(payload)


# --- the store's append function, on a real Redis --------------------------------------------

def append(r: redis.Redis, *writes: StreamAppend) -> list[Any]:
    store = ViewStore(r)
    with r.pipeline(transaction=False) as pipe:
        plan = store.queue_all(pipe, writes)
        return write_results(plan, pipe.execute(raise_on_error=False))


def event(at_ms: int, key: str, max_age_ms: int = 86_400_000) -> StreamAppend:
    return StreamAppend(KEY, at_ms, key, (("type", b"T"),), max_age_ms)


def test_the_store_appends_each_event_key_once_whatever_the_order(r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    assert append(r, event(now - 5000, "a"), event(now - 5000, "b"), event(now - 4000, "c"),
                  event(now - 5000, "a"), event(now - 4000, "c")) == [1, 1, 1, 0, 0]
    # an event older than the last entry is not lost: it goes after it, and is found again
    assert append(r, event(now - 9000, "late"), event(now - 9000, "late")) == [1, 0]
    ids = [eid for eid, _ in r.xrange(KEY)]
    assert ids == [f"{now - 5000}-0".encode(), f"{now - 5000}-1".encode(),
                   f"{now - 4000}-0".encode(), f"{now - 4000}-1".encode()]
    assert [f[b"event_key"] for _, f in r.xrange(KEY)] == [b"a", b"b", b"c", b"late"]


def test_the_store_trims_by_age_and_refuses_what_is_older_than_that(r: redis.Redis) -> None:
    now = int(time.time() * 1000)
    day = 86_400_000
    r.xadd(KEY, {"event_key": "ancient"}, id=f"{now - 3 * day}-0")
    assert append(r, event(now - 2 * day, "too-old", day), event(now, "new", day)) == [-1, 1]
    assert [f[b"event_key"] for _, f in r.xrange(KEY)] == [b"new"]  # MINID ~ now - a day


# --- the whole path ----------------------------------------------------------------------------

async def test_each_event_type_reaches_the_listener_once_also_after_duplicates_and_replay(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run, trio.open_nursery() as projector:
        projector.start_soon(functools.partial(
            run_projector, run.settings, choose(run.settings, "account_events"),
            RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
        seen: list[AccountEvent] = []
        consumer = AccountEventsConsumer(run.r, group="risk", consumer="r1",
                                         handler=seen.append, block_ms=20, start_id="0")
        await snapshots_after(run, 1)
        account = run.sim.account
        place(run.sim, type="MARKET", quantity="0.010")  # a position to call margin on
        algo = place(run.sim, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        account.control("trigger_reject", {"algoId": algo["algoId"], "legacy": True})
        account.control("margin_call", {"symbol": "BTCUSDT"})
        account.control("leverage", {"symbol": "BTCUSDT", "leverage": 10})
        account.control("multi_assets", {"on": True})
        account.control("strategy_update", {"symbol": "BTCUSDT"})
        account.control("grid_update", {"symbol": "BTCUSDT"})
        await until(lambda: consumer.poll_once() >= 0 and len(seen) >= 6)

        # a rotation logs the frames of both connections: every account event twice
        for f in [e for e in events(run.r, "GRID_UPDATE")]:
            run.r.xadd(KEY_USER, raw_frame_entry(orjson.dumps(f), time.time(), "usr-dup", 1))
        await until(lambda: run.r.xinfo_groups(KEY_USER)[0]["lag"] == 0)
        await trio.sleep(0.2)
        projector.cancel_scope.cancel()

    kinds = [e.type for e in seen]
    assert sorted(kinds) == sorted([*ACCOUNT_EVENT_TYPES, "ACCOUNT_CONFIG_UPDATE"]), kinds
    sent = {(d["e"], d.get("E")) for t in ACCOUNT_EVENT_TYPES for d in events(run.r, t)}
    assert {(e.type, e.event_time) for e in seen} == sent
    by_type = {e.type: e for e in seen if e.type != "ACCOUNT_CONFIG_UPDATE"}
    assert [p["s"] for p in by_type["MARGIN_CALL"].margin_call_positions] == ["BTCUSDT"]
    assert by_type["CONDITIONAL_ORDER_TRIGGER_REJECT"].symbol == "BTCUSDT"
    configs = [e for e in seen if e.type == "ACCOUNT_CONFIG_UPDATE"]
    assert {(e.symbol, e.leverage, e.multi_assets_margin) for e in configs} == {
        ("BTCUSDT", 10, None), (None, None, True)}

    entries = run.r.xrange(KEY)
    assert len(entries) == 6
    replay = run_cli("replay", "--only", "account_events", env={"REDIS_URL": redis_server.url})
    assert replay.returncode == 0, replay.stderr
    assert run.r.xrange(KEY) == entries
