"""Positions and balances, pure: ACCOUNT_UPDATE and REST snapshots -> ViewWrites."""

from __future__ import annotations

import orjson
import pytest
from user_frames import T0, account_frame, control, frame_entry, order_frame, position

from projections.core.account import AccountProjection
from projections.core.outputs import PoisonEntry, StreamAppend, ViewWrite, coalesce


def views(outputs) -> dict[str, dict]:
    """Key -> stored JSON after performing the writes forward-only, as the store does (the
    position events the fold also appends are tests/test_position_events.py's)."""
    held: dict[str, ViewWrite] = {}
    for out in outputs:
        assert isinstance(out, ViewWrite | StreamAppend)
        if isinstance(out, StreamAppend):
            continue
        if out.key not in held or out.version > held[out.key].version:
            held[out.key] = out
    return {k: orjson.loads(w.value) for k, w in held.items()}


def run(entries, proj: AccountProjection | None = None) -> list:
    proj = proj or AccountProjection("websocket")
    return [out for e in entries for out in proj.apply(e)]


RECV = T0 / 1000 + 0.05


def risk_row(symbol="BTCUSDT", amt="0.003", side="BOTH", update=T0) -> dict:
    """A row of GET /fapi/v3/positionRisk."""
    return {"symbol": symbol, "positionSide": side, "positionAmt": amt, "entryPrice": "50000.1",
            "breakEvenPrice": "50020.0", "markPrice": "50100.0", "unRealizedProfit": "0.3",
            "liquidationPrice": "0", "isolatedMargin": "0", "notional": "150.3",
            "marginAsset": "USDT", "isolatedWallet": "0", "initialMargin": "7.5",
            "maintMargin": "0.6", "positionInitialMargin": "7.5", "openOrderInitialMargin": "0",
            "adl": 1, "bidNotional": "0", "askNotional": "0", "updateTime": update}


def test_one_way_position_is_written_as_sent_with_timestamp_and_expiry():
    frame = account_frame(t=T0, positions=[position(cr="12.5")])
    [w] = run([frame_entry(frame, RECV)])
    assert w.key == "websocket:position:btcusdt" and w.version_field == "timestamp"
    assert w.expire_at_ms == int(RECV * 1000) + 300_000
    value = orjson.loads(w.value)
    assert value == {**position(cr="12.5"), "timestamp": (T0 + 2) / 1000, "source": "websocket"}


def test_hedge_mode_positions_go_to_long_and_short_keys():
    frame = account_frame(t=T0, positions=[position(pa="0.01", ps="LONG"),
                                           position(pa="-0.02", ps="SHORT")])
    got = views(run([frame_entry(frame, RECV)]))
    assert got["websocket:position:btcusdt:long"]["pa"] == "0.01"
    assert got["websocket:position:btcusdt:short"]["pa"] == "-0.02"
    assert "websocket:position:btcusdt" not in got


def test_account_update_touching_one_of_two_positions_leaves_the_other():
    seed = account_frame(t=T0, positions=[position("BTCUSDT", "0.003"),
                                          position("ETHUSDT", "1.5")])
    change = account_frame(t=T0 + 1000, positions=[position("ETHUSDT", "0.5")])
    got = views(run([frame_entry(seed, RECV), frame_entry(change, RECV + 1)]))
    assert got["websocket:position:btcusdt"]["pa"] == "0.003"
    assert got["websocket:position:ethusdt"]["pa"] == "0.5"


def test_balances_from_account_update_and_snapshot():
    frame = account_frame(t=T0, balances=[{"a": "USDT", "wb": "1000.5", "cw": "990.1",
                                           "bc": "0"}])
    snap = control("snapshot", {"kind": "balance", "symbol": None, "fetched_at_ms": T0 + 500,
                                "response": [{"accountAlias": "x", "asset": "USDT",
                                              "balance": "1001.0", "crossWalletBalance": "991",
                                              "crossUnPnl": "0", "availableBalance": "900",
                                              "maxWithdrawAmount": "900",
                                              "marginAvailable": True, "updateTime": T0}]},
                   RECV + 1)
    got = views(run([frame_entry(frame, RECV), snap]))
    assert got["websocket:balance:usdt"] == {"a": "USDT", "wb": "1001.0", "cw": "991",
                                             "bc": "0", "timestamp": (T0 + 500) / 1000,
                                             "source": "reconciliation"}


def test_position_risk_snapshot_seeds_positions_in_account_update_names():
    proj = AccountProjection()
    run([frame_entry(account_frame(t=T0 - 5000, positions=[position(cr="7.0")]), RECV)], proj)
    snap = control("snapshot", {"kind": "positionRisk", "symbol": None, "fetched_at_ms": T0,
                                "response": [risk_row(), risk_row("SOLUSDT", "10")]}, RECV)
    got = views(run([snap], proj))
    assert got["websocket:position:btcusdt"] == {
        "s": "BTCUSDT", "pa": "0.003", "ep": "50000.1", "bep": "50020.0", "cr": "7.0",
        "up": "0.3", "mt": "cross", "iw": "0", "ps": "BOTH", "ma": "USDT",
        "timestamp": T0 / 1000, "source": "reconciliation"}
    assert got["websocket:position:solusdt"]["cr"] is None  # never seen in an event


def test_snapshot_after_an_event_wins_and_an_older_one_does_not():
    event = frame_entry(account_frame(t=T0, positions=[position(pa="0.003")]), RECV)
    older = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0 - 100,
                                 "response": [risk_row(amt="0.001")]}, RECV + 1)
    newer = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0 + 100,
                                 "response": [risk_row(amt="0.009")]}, RECV + 1)
    assert views(run([event, older]))["websocket:position:btcusdt"]["pa"] == "0.003"
    assert views(run([event, newer]))["websocket:position:btcusdt"]["pa"] == "0.009"


def test_each_snapshot_refreshes_the_ttl_of_an_unchanged_position():
    first = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0,
                                 "response": [risk_row()]}, RECV)
    second = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0 + 300_000,
                                  "response": [risk_row()]}, RECV + 300)
    outs = run([first, second])
    assert outs[1].version > outs[0].version
    assert outs[1].expire_at_ms == int((RECV + 300) * 1000) + 300_000


def test_isolated_margin_type_is_derived_from_the_isolated_wallet():
    row = {**risk_row(), "isolatedWallet": "12.5"}
    snap = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0, "response": [row]},
                   RECV)
    assert views(run([snap]))["websocket:position:btcusdt"]["mt"] == "isolated"


def test_order_events_unknown_events_and_other_snapshots_write_no_account_view():
    entries = [frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV),
               frame_entry(b'{"e":"NEW_THING","E":1}', RECV),
               control("snapshot", {"kind": "openOrders", "response": []}, RECV),
               control("final_state", {"kind": "order", "response": {}}, RECV)]
    assert run(entries) == []


@pytest.mark.parametrize("entry", [
    frame_entry(b"{broken", RECV),
    frame_entry(b'{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{"P":[{"pa":"1"}]}}', RECV),
    control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0,
                         "response": [{"positionAmt": "1"}]}, RECV),
])
def test_malformed_account_entries_are_poison(entry):
    with pytest.raises(PoisonEntry):
        run([entry])


def test_coalescing_keeps_the_newest_position_write_of_a_batch():
    entries = [frame_entry(account_frame(t=T0 + i, positions=[position(pa=str(i))]), RECV)
               for i in range(5)]
    [w] = [out for out in coalesce(run(entries)) if isinstance(out, ViewWrite)]
    assert orjson.loads(w.value)["pa"] == "4"


@pytest.mark.parametrize("side, amount", [("BOTH", "0.012"), ("LONG", "0.5"), ("SHORT", "-2")])
def test_position_risk_row_maps_to_what_account_update_says_of_the_same_position(side, amount):
    """The simulator renders one position both ways; the mapping must agree field by field."""
    from decimal import Decimal

    from pipeline.simulator import wire
    from pipeline.simulator.ledger import Position

    pos = Position("ETHUSDT", side, Decimal(amount), Decimal("3001.5"), Decimal("4.25"), T0)
    mark = Decimal("3010")
    event_side = wire.position_entry(pos, mark)
    proj = AccountProjection()
    run([frame_entry(account_frame(t=T0, positions=[event_side]), RECV)], proj)
    snap = control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0 + 10, "response": [
        wire.position_risk(pos, mark, Decimal("10000"), (Decimal(0), Decimal(0)))]}, RECV)
    [w] = [out for out in run([snap], proj) if isinstance(out, ViewWrite)]
    from_rest = orjson.loads(w.value)
    assert {k: v for k, v in from_rest.items() if k not in ("timestamp", "source", "ma")} == \
        event_side


# --- entries that could freeze or fake a position or balance (projections.core.plausible) ---

IN_2100 = 4_102_444_800_000


@pytest.mark.parametrize(("entry", "reason"), [
    (frame_entry(account_frame(t=IN_2100, positions=[position()]), RECV), "E"),
    (frame_entry(account_frame(t=T0, positions=[position(ps="BOTH:x")]), RECV), "side"),
    (frame_entry(account_frame(t=T0, positions=[position("*")]), RECV), "P.s"),
    (frame_entry(account_frame(t=T0, positions=[{**position(), "pa": 0.003}]), RECV), "pa"),
    (frame_entry(account_frame(t=T0, balances=[{"a": "US DT", "wb": "1", "cw": "1",
                                                "bc": "0"}]), RECV), "B.a"),
    (frame_entry(account_frame(t=T0, balances=[{"a": "USDT", "wb": None, "cw": "1",
                                                "bc": "0"}]), RECV), "wb"),
    (control("snapshot", {"kind": "positionRisk", "fetched_at_ms": IN_2100,
                          "response": [risk_row()]}, RECV), "fetched_at_ms"),
    (control("snapshot", {"kind": "positionRisk", "fetched_at_ms": T0,
                          "response": [risk_row(side="HEDGE")]}, RECV), "side"),
    (control("snapshot", {"kind": "balance", "fetched_at_ms": T0, "response": [
        {"asset": "USDT", "balance": {"v": 1}, "crossWalletBalance": "1"}]}, RECV), "balance"),
])
def test_an_account_entry_that_could_freeze_or_fake_a_view_is_poison(entry, reason):
    with pytest.raises(PoisonEntry, match=reason):
        run([entry])


def test_the_version_is_the_first_field_of_a_position_whatever_binance_adds():
    """The store reads `timestamp` with a pattern: a nested one must never come first."""
    nested = {**position(), "zz": {"timestamp": 4_102_444_800}}
    [w] = run([frame_entry(account_frame(t=T0, positions=[nested]), RECV)])
    assert w.value.startswith(b'{"timestamp":%s,' % str((T0 + 2) / 1000).encode())
