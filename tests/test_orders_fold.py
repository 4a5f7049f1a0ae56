"""The order lifecycle fold, pure: raw:user entries -> writes -> the reference store."""

from __future__ import annotations

import orjson
import pytest
from user_frames import (
    RECV,
    T0,
    algo_frame,
    control,
    frame_entry,
    order_frame,
    rest_algo,
    rest_order,
)

from projections.core.batch import fold_batch
from projections.core.orders import (
    ALGO_TRANSITIONS,
    ORDER_TRANSITIONS,
    InMemoryOrders,
    OrdersProjection,
    order_rest_row,
)
from projections.core.orderwrites import OrderWrite
from projections.core.outputs import PoisonEntry, Unrecognized


def fold(entries: list, store: InMemoryOrders | None = None) -> InMemoryOrders:
    proj = OrdersProjection("websocket")
    store = store or InMemoryOrders()
    for entry in entries:
        for out in proj.apply(entry):
            store.perform(out)
    return store


def lifecycle() -> list:
    return [
        frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV + 1.0),
        frame_entry(order_frame(7, "PARTIALLY_FILLED", "TRADE", t=T0 + 10, z="0.001",
                                last_qty="0.001", last_price="50000.10", rp="0", ap="50000.10",
                                trade_id=1), RECV + 1.1),
        frame_entry(order_frame(7, "FILLED", "TRADE", t=T0 + 20, z="0.003", last_qty="0.002",
                                last_price="50000.20", rp="-0.5", ap="50000.16667",
                                trade_id=2), RECV + 1.2),
    ]


def test_order_lifecycle_new_partially_filled_filled_is_emitted_in_order():
    store = fold(lifecycle())
    assert [e["status"] for e in store.emitted] == ["NEW", "PARTIALLY_FILLED", "FILLED"]
    assert {e["source"] for e in store.emitted} == {"stream"}
    state = store.states[("order", "BTCUSDT", 7)]
    assert state["cum_filled"] == "0.003"
    assert state["cum_quote"] == "150.0005"  # 0.001 x 50000.10 + 0.002 x 50000.20
    assert state["avg_price"] == "50000.16667"
    assert state["realized_profit"] == "-0.5"
    assert state["created_time"] == T0 and state["update_time"] == T0 + 20
    assert state["o"]["X"] == "FILLED" and state["o"]["c"] == "client-7"


def test_open_order_is_listed_while_partially_filled_and_removed_when_filled():
    entries = lifecycle()
    store = fold(entries[:2])
    [row] = store.open_orders()
    assert row["status"] == "PARTIALLY_FILLED" and row["executedQty"] == "0.001"
    assert row["cumQuote"] == "50.0001" and row["time"] == T0
    store = fold(entries[2:], store)
    assert store.open_orders() == []


@pytest.mark.parametrize("status", ["CANCELED", "EXPIRED", "EXPIRED_IN_MATCH"])
def test_canceled_or_expired_order_leaves_open_orders_and_is_reported(status):
    store = fold([frame_entry(order_frame(8, "NEW", "NEW", t=T0), RECV + 1.0),
                  frame_entry(order_frame(8, status, status if status != "EXPIRED_IN_MATCH"
                                          else "EXPIRED", t=T0 + 5), RECV + 1.1)])
    assert [e["status"] for e in store.emitted] == ["NEW", status]
    assert store.open_orders() == []


def test_amendment_keeps_the_order_new_with_the_new_price():
    store = fold([frame_entry(order_frame(9, "NEW", "NEW", t=T0), RECV + 1.0),
                  frame_entry(order_frame(9, "NEW", "AMENDMENT", t=T0 + 5, p="49000.00"),
                              RECV + 1.1)])
    [row] = store.open_orders()
    assert row["price"] == "49000.00" and row["time"] == T0 and row["updateTime"] == T0 + 5
    assert len(store.emitted) == 2


def test_duplicate_events_are_no_ops_that_emit_nothing():
    entries = lifecycle()
    store = fold(entries + entries)
    assert len(store.emitted) == 3
    assert store.states[("order", "BTCUSDT", 7)]["cum_quote"] == "150.0005"


def test_out_of_order_events_never_move_an_order_backwards():
    entries = lifecycle()
    store = fold([entries[2], entries[0], entries[1]])
    assert [e["status"] for e in store.emitted] == ["FILLED"]
    assert store.open_orders() == []


def test_a_terminal_order_never_reopens_even_with_a_later_time():
    late_new = frame_entry(order_frame(7, "NEW", "NEW", t=T0 + 99), RECV + 2.0)
    store = fold([*lifecycle(), late_new])
    assert store.states[("order", "BTCUSDT", 7)]["status"] == "FILLED"
    assert len(store.emitted) == 3


def test_transition_table_has_no_way_out_of_terminal_statuses():
    for table, terminal in ((ORDER_TRANSITIONS, ("FILLED", "CANCELED", "EXPIRED")),
                            (ALGO_TRANSITIONS, ("FINISHED", "CANCELED", "REJECTED"))):
        assert all(table[s] == frozenset() for s in terminal)


def test_stop_market_algo_order_triggers_and_its_market_order_fills():
    entries = [
        frame_entry(algo_frame(500, "NEW", t=T0), RECV + 1.0),
        frame_entry(algo_frame(500, "TRIGGERING", t=T0 + 100), RECV + 1.1),
        frame_entry(algo_frame(500, "TRIGGERED", t=T0 + 101, ai="9001", tt=T0 + 100), RECV + 1.2),
        frame_entry(order_frame(9001, "NEW", "NEW", t=T0 + 102, otype="MARKET", side="SELL",
                                p="0"), RECV + 1.3),
        frame_entry(order_frame(9001, "FILLED", "TRADE", t=T0 + 103, otype="MARKET",
                                side="SELL", p="0", z="0.003", last_qty="0.003",
                                last_price="47990.00", ap="47990.00", rp="-30.3"), RECV + 1.4),
        frame_entry(algo_frame(500, "FINISHED", t=T0 + 104, ai="9001", tt=T0 + 100), RECV + 1.5),
    ]
    store = fold(entries[:1])
    [algo_row] = store.open_orders("algo")
    assert algo_row["algoStatus"] == "NEW" and algo_row["createTime"] == T0
    assert store.open_orders("order") == []  # conditional orders are not in openOrders
    store = fold(entries[1:], store)
    assert [(e["kind"], e["status"]) for e in store.emitted] == [
        ("algo", "NEW"), ("algo", "TRIGGERING"), ("algo", "TRIGGERED"), ("order", "NEW"),
        ("order", "FILLED"), ("algo", "FINISHED")]
    algo = store.states[("algo", "BTCUSDT", 500)]
    assert algo["actual_order_id"] == "9001" and algo["status"] == "FINISHED"
    assert store.states[("order", "BTCUSDT", 9001)]["realized_profit"] == "-30.3"
    assert store.open_orders("algo") == [] and store.open_orders("order") == []


def test_unknown_event_types_are_ignored_and_reported_for_counting():
    proj = OrdersProjection()
    assert list(proj.apply(frame_entry(b'{"e":"SOMETHING_NEW","E":1,"x":[1]}', RECV + 1.0))) == [
        Unrecognized("SOMETHING_NEW")]
    assert list(proj.apply(frame_entry(b'{"e":"TRADE_LITE","E":1,"T":1,"s":"BTCUSDT"}',
                                       1.0))) == []
    assert list(proj.apply(frame_entry(b'{"result":null,"id":1}', RECV + 1.0))) == [
        Unrecognized("(no e field)")]


def test_the_batch_fold_collects_unknown_event_types_for_the_metric():
    folded = fold_batch(OrdersProjection(), [
        ("raw:user", b"1-0", {b"frame": b'{"e":"BRAND_NEW_EVENT"}', b"recv_ts": b"1.0",
                              b"conn": b"u1", b"seq": b"1"})])
    assert folded.unrecognized == ["BRAND_NEW_EVENT"] and not folded.failures
    assert folded.acks == {"raw:user": [b"1-0"]}


def test_unknown_fields_are_ignored_and_kept_in_the_state():
    frame = order_frame(11, "NEW", "NEW", t=T0, newField={"nested": True})
    store = fold([frame_entry(frame, RECV + 1.0)])
    assert store.states[("order", "BTCUSDT", 11)]["o"]["newField"] == {"nested": True}


@pytest.mark.parametrize("frame", [b"not json", b'{"e":"ORDER_TRADE_UPDATE","E":1,"T":1}',
                                   b'{"e":"ALGO_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT"}}'])
def test_bytes_that_are_not_json_or_miss_required_fields_are_poison(frame):
    with pytest.raises(PoisonEntry):
        list(OrdersProjection().apply(frame_entry(frame, RECV + 1.0)))


def test_open_orders_row_has_the_rest_shape_of_the_same_order():
    store = fold([frame_entry(order_frame(12, "NEW", "NEW", t=T0), RECV + 1.0)])
    [row] = store.open_orders()
    assert row == rest_order(12, "NEW", update_time=T0, time=T0)


def test_snapshot_updates_orders_whose_rest_update_time_is_newer():
    store = fold([frame_entry(order_frame(13, "NEW", "NEW", t=T0), RECV + 1.0)])
    snap = control("snapshot", {"kind": "openOrders", "symbol": None, "fetched_at_ms": T0 + 60,
                                "response": [
                                    rest_order(13, "PARTIALLY_FILLED", update_time=T0 + 50,
                                               time=T0, executed="0.001",
                                               cum_quote="50.0001", avg="50000.10"),
                                    rest_order(14, "NEW", update_time=T0 + 40, time=T0 + 40)]},
                   RECV + 2.0)
    store = fold([snap, snap], store)
    assert [(e["order_id"], e["status"], e["source"]) for e in store.emitted[1:]] == [
        ("13", "PARTIALLY_FILLED", "reconciliation"), ("14", "NEW", "reconciliation")]
    rows = {r["orderId"]: r for r in store.open_orders()}
    assert rows[13]["cumQuote"] == "50.0001" and rows[13]["time"] == T0


def test_snapshot_older_than_the_stream_changes_nothing():
    store = fold(lifecycle()[:2])
    snap = control("snapshot", {"kind": "openOrders", "symbol": "BTCUSDT",
                                "fetched_at_ms": T0 + 5,
                                "response": [rest_order(7, "NEW", update_time=T0, time=T0)]},
                   RECV + 2.0)
    store = fold([snap], store)
    assert len(store.emitted) == 2
    assert store.open_orders()[0]["status"] == "PARTIALLY_FILLED"


def test_order_missing_from_a_full_snapshot_stays_open_until_its_final_state_arrives():
    store = fold(lifecycle()[:2])
    snap = control("snapshot", {"kind": "openOrders", "symbol": None, "fetched_at_ms": T0 + 90,
                                "response": []}, RECV + 2.0)
    store = fold([snap], store)
    assert len(store.open_orders()) == 1  # not guessed closed
    final = control("final_state", {"kind": "order", "symbol": "BTCUSDT",
                                    "fetched_at_ms": T0 + 91,
                                    "response": rest_order(7, "FILLED", update_time=T0 + 30,
                                                           time=T0, executed="0.003",
                                                           cum_quote="150.0005",
                                                           avg="50000.16667")}, RECV + 2.1)
    store = fold([final, final], store)
    assert store.open_orders() == []
    last = store.emitted[-1]
    assert (last["status"], last["source"], len(store.emitted)) == ("FILLED", "reconciliation", 3)
    assert last["data"]["cum_quote"] == "150.0005" and last["data"]["o"]["z"] == "0.003"


def test_algo_snapshot_and_final_state_reconcile_algo_orders():
    snap = control("snapshot", {"kind": "openAlgoOrders", "symbol": None,
                                "fetched_at_ms": T0 + 10,
                                "response": [rest_algo(600, "NEW", update_time=T0,
                                                       create_time=T0)]}, RECV + 1.0)
    store = fold([snap])
    assert store.open_orders("algo") == [rest_algo(600, "NEW", update_time=T0, create_time=T0)]
    final = control("final_state", {"kind": "algoOrder", "symbol": "BTCUSDT",
                                    "fetched_at_ms": T0 + 99,
                                    "response": rest_algo(600, "FINISHED", update_time=T0 + 50,
                                                          create_time=T0, ai="777")}, RECV + 2.0)
    store = fold([final], store)
    assert store.open_orders("algo") == []
    assert store.states[("algo", "BTCUSDT", 600)]["actual_order_id"] == "777"


def test_other_control_entries_and_account_events_give_no_order_writes():
    proj = OrdersProjection()
    assert list(proj.apply(control("opened", {"path": "private"}, RECV + 1.0))) == []
    assert list(proj.apply(control("snapshot", {"kind": "positionRisk", "response": []},
                                   1.0))) == []
    account = b'{"e":"ACCOUNT_UPDATE","E":1,"T":1,"a":{}}'
    assert list(proj.apply(frame_entry(account, RECV + 1.0))) == []


def test_trailing_stop_rows_carry_activate_price_and_price_rate_only_for_trailing():
    assert "activatePrice" not in order_rest_row({"o": "LIMIT", "AP": "1", "cr": "0.1"})
    row = order_rest_row({"o": "TRAILING_STOP_MARKET", "AP": "9020", "cr": "0.3"})
    assert row["activatePrice"] == "9020" and row["priceRate"] == "0.3"


def test_writes_carry_the_projection_prefix_and_stream_limits():
    proj = OrdersProjection("pfx", symbol_maxlen=50, orders_max_age_s=60)
    [w] = proj.apply(lifecycle()[0])
    assert isinstance(w, OrderWrite)
    assert (w.prefix, w.symbol_maxlen, w.orders_max_age_s) == ("pfx", 50, 60)


def test_final_state_of_an_order_never_seen_is_reported_as_it_ended():
    """A stop triggered while the stream was down: its market order is known only by REST."""
    final = control("final_state", {"kind": "order", "symbol": "BTCUSDT",
                                    "fetched_at_ms": T0 + 99,
                                    "response": rest_order(9100, "FILLED", update_time=T0 + 50,
                                                           time=T0 + 50, executed="0.003",
                                                           cum_quote="143.97", avg="47990",
                                                           otype="MARKET", side="SELL")},
                    RECV + 2.0)
    store = fold([final])
    [event] = store.emitted
    assert (event["order_id"], event["status"], event["source"]) == (
        "9100", "FILLED", "reconciliation")
    assert event["data"]["cum_quote"] == "143.97" and event["data"]["o"]["ap"] == "47990"
    assert store.open_orders() == []


# --- events and REST rows that could hold an order for ever (projections.core.plausible) ----

IN_2100 = 4_102_444_800_000


@pytest.mark.parametrize(("frame", "reason"), [
    (orjson.dumps({**(new := orjson.loads(order_frame(7, "NEW", "NEW", t=T0))),
                   "o": {**new["o"], "T": IN_2100}}), "o.T"),
    (orjson.dumps({**orjson.loads(order_frame(7, "NEW", "NEW", t=T0)), "E": IN_2100}), "E"),
    (order_frame(2**53, "NEW", "NEW", t=T0), "o.i"),
    (order_frame(7, "NEW", "NEW", t=T0, symbol="*"), "o.s"),
    (order_frame(7, "NEW", "NEW", t=T0, p=None), "p"),
    (order_frame(7, "NEW", "NEW", t=T0, z=1.5), "z"),
    (orjson.dumps({**orjson.loads(algo_frame(500, "TRIGGERED", t=T0)), "T": IN_2100}), "T"),
    (algo_frame(500, "NEW", t=T0, tp={"x": 1}), "tp"),
])
def test_an_order_event_that_could_freeze_or_fake_the_order_is_poison(frame: bytes,
                                                                     reason: str) -> None:
    with pytest.raises(PoisonEntry, match=f": {reason} "):
        list(OrdersProjection().apply(frame_entry(frame, RECV + 1.0)))


@pytest.mark.parametrize(("ctl", "kind", "row", "reason"), [
    ("final_state", "order", rest_order(7, "FILLED", update_time=IN_2100, time=T0),
     "updateTime"),
    ("snapshot", "openOrders", [rest_order(7, "NEW", update_time=T0, time=T0, p="1e3")],
     "price"),
    ("snapshot", "openOrders", [rest_order(7, "NEW", update_time=T0, time=T0,
                                           symbol="BTC USDT")], "symbol"),
    ("final_state", "algoOrder", rest_algo(500, "FINISHED", update_time=IN_2100,
                                           create_time=T0), "updateTime"),
])
def test_a_rest_row_that_could_freeze_or_fake_the_order_is_poison(ctl: str, kind: str,
                                                                  row: object,
                                                                  reason: str) -> None:
    entry = control(ctl, {"kind": kind, "symbol": None, "fetched_at_ms": T0 + 1,
                          "response": row}, RECV + 1.0)
    with pytest.raises(PoisonEntry, match=f": {reason} "):
        list(OrdersProjection().apply(entry))


def test_the_clock_bound_is_a_setting() -> None:
    from projections.core.plausible import Bounds

    soon = order_frame(7, "NEW", "NEW", t=T0 + 5_000)  # 4 s after its receipt
    assert list(OrdersProjection().apply(frame_entry(soon, RECV + 1.0)))
    with pytest.raises(PoisonEntry):
        list(OrdersProjection(bounds=Bounds(max_ahead_ms=1_000)).apply(
            frame_entry(soon, RECV + 1.0)))
