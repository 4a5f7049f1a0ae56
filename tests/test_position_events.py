"""`P:position_events`: each open, change and close of a position, with its cause.

Pure (the account fold over realistic frames) and end to end (the simulator's account, the
user ingestor, the account projector, a real Redis, the listener's consumer)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import orjson
import pytest
import trio
from user_frames import T0, account_frame, algo_frame, control, frame_entry, order_frame, position

from pipeline.localredis import LocalRedis
from projections.client import PositionEvent, PositionEventsConsumer
from projections.core.account import AccountProjection
from projections.core.outputs import StreamAppend
from projections.core.positionevents import RECONCILE_SLACK_MS, kind_of
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.conftest import run_cli
from tests.test_ingest_user import (
    SLOW_RECONNECT,
    Running,
    place,
    running,
    snapshots_after,
    until,
)

RECV = T0 / 1000 + 5
KEY = "websocket:position_events"


def appended(outputs: Sequence[object]) -> list[dict[str, Any]]:
    """The `data` of each position event among a fold's outputs, in order."""
    out = []
    for o in outputs:
        if isinstance(o, StreamAppend):
            assert o.key == KEY
            out.append(orjson.loads(dict(o.fields)["data"]))
    return out


class Fold:
    """The account fold, fed entry by entry; `events` is everything it appended."""

    def __init__(self) -> None:
        self.proj = AccountProjection()
        self.events: list[dict[str, Any]] = []
        self.appends: list[StreamAppend] = []

    def feed(self, *entries: Any) -> list[dict[str, Any]]:
        new = []
        for e in entries:
            outs = list(self.proj.apply(e))
            self.appends += [o for o in outs if isinstance(o, StreamAppend)]
            new += appended(outs)
        self.events += new
        return new

    def snapshot(self, rows: list[dict[str, Any]], at: int) -> list[dict[str, Any]]:
        return self.feed(control("snapshot", {"kind": "positionRisk", "symbol": None,
                                              "fetched_at_ms": at, "response": rows},
                                 at / 1000 + 0.1))


def fill(order_id: int, t: int, *, qty: str, price: str = "50000", rp: str = "0",
         side: str = "BUY", status: str = "FILLED", ps: str = "BOTH", otype: str = "MARKET",
         ot: str | None = None) -> Any:
    extra = {"ot": ot} if ot else {}
    return frame_entry(order_frame(order_id, status, "TRADE", t=t, z=qty, last_qty=qty,
                                   last_price=price, rp=rp, side=side, ps=ps, otype=otype,
                                   **extra), RECV)


def update(t: int, pa: str, *, ep: str = "50000", ps: str = "BOTH", reason: str = "ORDER",
           symbol: str = "BTCUSDT") -> Any:
    return frame_entry(account_frame(t=t, reason=reason,
                                     positions=[position(symbol, pa, ps=ps, ep=ep)]), RECV)


def risk(pa: str, *, ps: str = "BOTH", symbol: str = "BTCUSDT") -> dict[str, Any]:
    return {"symbol": symbol, "positionSide": ps, "positionAmt": pa, "entryPrice": "50000",
            "breakEvenPrice": "50000", "unRealizedProfit": "0", "isolatedWallet": "0",
            "marginAsset": "USDT"}


def test_kinds_follow_the_amounts_before_and_after() -> None:
    assert [kind_of(b, a) for b, a in [("0", "0.01"), ("0.01", "0.02"), ("0.02", "0.005"),
                                       ("0.005", "0"), ("0.01", "-0.01"), ("-1", "-2"),
                                       ("-2", "-1"), (None, "0"), (None, "1")]] == [
        "opened", "increased", "reduced", "closed", "flipped", "increased", "reduced",
        "closed", "changed"]


def test_open_grow_reduce_close_each_carry_amounts_price_profit_and_order() -> None:
    fold = Fold()
    fold.snapshot([], T0)  # the first reconciliation: no position anywhere
    steps = [(1, "0.010", "0", "BUY", "50000"), (2, "0.015", "0", "BUY", "50100"),
             (3, "0.005", "1.5", "SELL", "50200"), (4, "0", "-0.7", "SELL", "49900")]
    for i, (order_id, pa, rp, side, px) in enumerate(steps, start=1):
        t = T0 + 1000 * i
        fold.feed(fill(order_id, t, qty="0.005", price=px, rp=rp, side=side),
                  update(t, pa, ep="0" if pa == "0" else "50050"))
    assert [(e["kind"], e["amount_before"], e["amount_after"], e["order_id"],
             e["realized_profit"]) for e in fold.events] == [
        ("opened", "0", "0.010", 1, "0"), ("increased", "0.010", "0.015", 2, "0"),
        ("reduced", "0.015", "0.005", 3, "1.5"), ("closed", "0.005", "0", 4, "-0.7")]
    closed = fold.events[-1]
    assert (closed["entry_price_before"], closed["entry_price"]) == ("50050", "0")
    assert closed["source"] == "websocket" and closed["reason"] == "ORDER"
    assert closed["algo_id"] is None and closed["algo_type"] is None
    assert closed["event_time"] == T0 + 4000 and closed["timestamp"] == (T0 + 4000) / 1000


def test_a_close_by_a_triggered_stop_market_names_the_algo_order() -> None:
    fold = Fold()
    fold.snapshot([risk("0.010")], T0)
    t = T0 + 5000
    fold.feed(frame_entry(algo_frame(77, "TRIGGERED", t=t, ai="901"), RECV),
              frame_entry(order_frame(901, "NEW", "NEW", t=t, otype="MARKET", side="SELL",
                                      ot="STOP_MARKET"), RECV),
              fill(901, t, qty="0.010", rp="-3.2", side="SELL", ot="STOP_MARKET"),
              update(t, "0", ep="0"),
              frame_entry(algo_frame(77, "FINISHED", t=t, ai="901"), RECV))
    [closed] = fold.events
    assert (closed["kind"], closed["order_id"], closed["algo_id"], closed["algo_type"]) == (
        "closed", 901, 77, "STOP_MARKET")
    assert closed["realized_profit"] == "-3.2" and closed["order_type"] == "MARKET"
    fields = dict(fold.appends[-1].fields)
    assert fields["algo_type"] == b"STOP_MARKET" and fields["kind"] == b"closed"


def test_the_update_may_come_before_its_fills_and_waits_for_them() -> None:
    fold = Fold()
    fold.snapshot([], T0)
    t = T0 + 1000
    assert fold.feed(update(t, "0.01")) == []  # its fill is not in yet
    [opened] = fold.feed(fill(5, t, qty="0.01", rp="0"))
    assert (opened["kind"], opened["order_id"]) == ("opened", 5)
    # an update whose fill never comes is written without an order at the next later event
    assert fold.feed(update(t + 1000, "0.02")) == []
    [grown] = fold.feed(update(t + 2000, "0.02", reason="ORDER"))  # same amount: no change
    assert (grown["kind"], grown["order_id"], grown["realized_profit"]) == (
        "increased", None, None)


def test_several_fills_of_one_moment_add_their_profit() -> None:
    fold = Fold()
    fold.snapshot([risk("0.02")], T0)
    t = T0 + 1000
    [closed] = fold.feed(fill(8, t, qty="0.01", rp="1.25", side="SELL", status="PARTIALLY_FILLED"),
                         fill(8, t, qty="0.02", rp="0.75", side="SELL"), update(t, "0", ep="0"))
    assert closed["realized_profit"] == "2"


def test_hedge_mode_sides_are_separate_positions_and_a_one_way_flip_is_one_event() -> None:
    fold = Fold()
    fold.snapshot([], T0)
    fold.feed(fill(1, T0 + 1000, qty="1", ps="LONG"), update(T0 + 1000, "1", ps="LONG"),
              fill(2, T0 + 2000, qty="2", side="SELL", ps="SHORT"),
              update(T0 + 2000, "-2", ps="SHORT"))
    assert [(e["position_side"], e["kind"]) for e in fold.events] == [
        ("LONG", "opened"), ("SHORT", "opened")]
    one_way = Fold()
    one_way.snapshot([risk("1")], T0)
    [flip] = one_way.feed(fill(3, T0 + 1000, qty="3", side="SELL"), update(T0 + 1000, "-2"))
    assert (flip["kind"], flip["amount_before"], flip["amount_after"]) == ("flipped", "1", "-2")


def test_a_duplicate_update_and_a_replay_give_the_same_appends_once() -> None:
    frames = [fill(1, T0 + 1000, qty="0.01"), update(T0 + 1000, "0.01"),
              fill(2, T0 + 2000, qty="0.01", side="SELL"), update(T0 + 2000, "0")]
    live = Fold()
    live.snapshot([], T0)
    live.feed(*frames[:2], frames[1], *frames[2:])  # a rotation logged the update twice
    assert [e["kind"] for e in live.events] == ["opened", "closed"]
    replay = Fold()
    replay.snapshot([], T0)
    replay.feed(*frames)
    assert [(a.at_ms, a.event_key) for a in replay.appends] == \
        [(a.at_ms, a.event_key) for a in live.appends]


def test_a_close_seen_only_by_reconciliation_is_reported_as_such_and_flattens_the_view() -> None:
    fold = Fold()
    fold.snapshot([], T0)
    fold.feed(fill(1, T0 + 1000, qty="0.01"), update(T0 + 1000, "0.01"))
    later = T0 + 1000 + RECONCILE_SLACK_MS + 1
    outs = list(fold.proj.apply(control("snapshot", {
        "kind": "positionRisk", "symbol": None, "fetched_at_ms": later, "response": []},
        later / 1000 + 0.1)))
    [closed] = appended(outs)
    assert (closed["kind"], closed["source"], closed["reason"], closed["order_id"]) == (
        "closed", "reconciliation", "reconciliation", None)
    assert closed["amount_before"] == "0.01" and closed["event_time"] == later
    [view] = [o for o in outs if getattr(o, "key", "") == "websocket:position:btcusdt"]
    assert orjson.loads(view.value)["pa"] == "0"  # type: ignore[attr-defined]


def test_a_snapshot_just_after_an_event_cannot_undo_it() -> None:
    """The REST answer may predate an event of the same moment: it is not taken as a change."""
    fold = Fold()
    fold.snapshot([], T0)
    fold.feed(fill(1, T0 + 1000, qty="0.01"), update(T0 + 1000, "0.01"))
    assert fold.snapshot([], T0 + 1500) == []
    assert fold.proj.positions.held["websocket:position:btcusdt"].amount == "0.01"


def test_before_the_first_snapshot_an_unseen_position_has_no_known_before() -> None:
    fold = Fold()
    [first] = fold.feed(update(T0 + 1000, "0.01", reason="FUNDING_FEE"))
    assert (first["kind"], first["amount_before"], first["reason"]) == ("changed", None,
                                                                        "FUNDING_FEE")
    [closed] = fold.feed(update(T0 + 2000, "0", reason="ADL"))
    assert (closed["kind"], closed["amount_before"]) == ("closed", "0.01")


def test_an_implausible_fill_is_poison_and_leaves_the_memory_as_it_was() -> None:
    from projections.core.outputs import PoisonEntry

    fold = Fold()
    fold.snapshot([], T0)
    fold.feed(update(T0 + 1000, "0.01"))  # waiting for its fill
    bad = frame_entry(order_frame(9, "FILLED", "TRADE", t=T0 + 1000, z="x", last_qty="x"),
                      RECV)
    for _ in range(2):  # a redelivery meets the same memory
        with pytest.raises(PoisonEntry):
            fold.proj.apply(bad)
    [opened] = fold.feed(fill(9, T0 + 1000, qty="0.01"))
    assert opened["order_id"] == 9


# --- end to end ------------------------------------------------------------------------------

@asynccontextmanager
async def with_account_projector(run: Running) -> AsyncIterator[None]:
    async with trio.open_nursery() as projector:
        projector.start_soon(functools.partial(
            run_projector, run.settings, choose(run.settings, "orders,account"),
            RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
        yield
        projector.cancel_scope.cancel()


def listener(run: Running) -> tuple[PositionEventsConsumer, list[PositionEvent]]:
    seen: list[PositionEvent] = []
    consumer = PositionEventsConsumer(run.r, group="risk", consumer="r1", handler=seen.append,
                                      block_ms=20, start_id="0",
                                      prefix=run.settings.view_prefix)
    return consumer, seen


async def test_a_position_opened_grown_reduced_and_closed_by_a_stop_market_reaches_the_listener(
        redis_server: LocalRedis) -> None:
    async with running(redis_server) as run, with_account_projector(run):
        consumer, seen = listener(run)
        await snapshots_after(run, 1)

        def told(n: int) -> list[PositionEvent]:
            consumer.poll_once()
            return seen if len(seen) >= n else []

        place(run.sim, type="MARKET", quantity="0.010")
        await until(lambda: told(1))
        place(run.sim, type="MARKET", quantity="0.005")
        await until(lambda: told(2))
        place(run.sim, type="MARKET", side="SELL", quantity="0.005", reduceOnly=True)
        await until(lambda: told(3))
        stop = place(run.sim, type="STOP_MARKET", side="SELL", quantity="0.010",
                     triggerPrice="40000", reduceOnly=True)
        triggered = run.sim.account.control("trigger", {"algoId": stop["algoId"]})
        assert isinstance(triggered, dict)
        await until(lambda: told(4))

    assert [(e.kind, e.amount_before, e.amount_after) for e in seen] == [
        ("opened", "0", "0.01"), ("increased", "0.01", "0.015"),
        ("reduced", "0.015", "0.01"), ("closed", "0.01", "0")]
    closed = seen[-1]
    assert closed.by_stop_loss and closed.algo_type == "STOP_MARKET"
    assert closed.algo_id == stop["algoId"]
    assert closed.order_id == int(triggered["actualOrderId"])
    trades = run.sim.account.ledger.trades
    assert Decimal(closed.realized_profit or "x") == trades[-1].realized
    assert all(e.source == "websocket" and e.symbol == "BTCUSDT" for e in seen)
    assert [e.order_id for e in seen[:3]] == [t.order_id for t in trades[:3]]


async def test_a_close_during_an_outage_is_reported_after_reconnect_and_replay_adds_nothing(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, timing=SLOW_RECONNECT) as run, \
            with_account_projector(run):
        consumer, seen = listener(run)
        await snapshots_after(run, 1)
        place(run.sim, type="MARKET", quantity="0.010")
        stop = place(run.sim, type="STOP_MARKET", side="SELL", quantity="0.010",
                     triggerPrice="40000", reduceOnly=True)
        await until(lambda: consumer.poll_once() >= 0 and seen)
        # the reconciliation judges only what the stream knew long enough before it
        await trio.sleep(RECONCILE_SLACK_MS / 1000 + 0.5)

        assert run.sim.drop("private") == 1
        await until(lambda: run.sim.account.connection_count() == 0)
        run.sim.account.control("trigger", {"algoId": stop["algoId"]})  # the stop closes it
        await until(lambda: run.sim.account.connection_count() == 1)
        await until(lambda: consumer.poll_once() >= 0 and len(seen) >= 2, within=15)
        view = await until(lambda: run.r.get(f"{run.settings.view_prefix}:position:btcusdt"))

    opened, closed = seen
    assert (opened.kind, opened.source) == ("opened", "websocket")
    assert (closed.kind, closed.source, closed.amount_before) == (
        "closed", "reconciliation", "0.01")
    assert closed.order_id is None and closed.data["reason"] == "reconciliation"
    assert orjson.loads(view)["pa"] == "0"  # the view does not keep the closed position

    entries = run.r.xrange(KEY)
    replay = run_cli("replay", "--only", "account", "--reset",
                     env={"REDIS_URL": redis_server.url})
    assert replay.returncode == 0, replay.stderr
    assert run.r.xrange(KEY) == entries  # the same events: none again, none lost


# --- the example listener, as a user runs it ------------------------------------------------

async def test_example_listener_reacts_to_a_stop_loss_close_and_a_margin_call(
        redis_server: LocalRedis) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_order_lifecycle import has_group

    async with running(redis_server) as run:
        prefix = run.settings.view_prefix
        output = bytearray()

        async def collect(stream: trio.abc.ReceiveStream) -> None:
            async for chunk in stream:
                output.extend(chunk)

        def lines() -> list[str]:
            return output.decode().splitlines()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "REDIS_"))}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                run_projector, run.settings, choose(run.settings, "account,account_events"),
                RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
            await snapshots_after(run, 1)
            listener = await trio.lowlevel.open_process(
                [sys.executable, str(ROOT / "examples" / "position_listener.py"),
                 "--redis-url", redis_server.url, "--group", "example", "--prefix", prefix],
                stdout=subprocess.PIPE, env=env, cwd=ROOT)
            assert listener.stdout is not None
            nursery.start_soon(collect, listener.stdout)
            await until(lambda: has_group(run.r, f"{prefix}:position_events", "example")
                        and has_group(run.r, f"{prefix}:account_events", "example"))

            place(run.sim, type="MARKET", quantity="0.010")
            stop = place(run.sim, type="STOP_MARKET", side="SELL", quantity="0.010",
                         triggerPrice="40000", reduceOnly=True)
            run.sim.account.control("margin_call", {"symbol": "BTCUSDT"})
            triggered = run.sim.account.control("trigger", {"algoId": stop["algoId"]})
            assert isinstance(triggered, dict)
            try:
                await until(lambda: any(line.startswith("STOP-LOSS") for line in lines())
                            and any(line.startswith("MARGIN CALL") for line in lines()))
                listener.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await listener.wait() == 0
            finally:
                if listener.returncode is None:
                    listener.kill()
            nursery.cancel_scope.cancel()

    pnl = run.sim.account.ledger.trades[-1].realized
    [stopped] = [m for line in lines() if (m := re.match(
        r"^STOP-LOSS BTCUSDT closed 0\.01 -> 0 by STOP_MARKET algo (\d+) order (\d+) "
        r"pnl (\S+)$", line))]
    assert (int(stopped[1]), stopped[2], Decimal(stopped[3])) == (
        stop["algoId"], str(triggered["actualOrderId"]), pnl)
    assert any(re.match(r"^MARGIN CALL BTCUSDT BOTH amount 0\.01 mark \S+ maintenance margin "
                        r"\S+ wallet \S+$", line) for line in lines()), lines()
    assert "position BTCUSDT opened 0 -> 0.01 order" in output.decode()
    assert "None" not in output.decode(), output.decode()
