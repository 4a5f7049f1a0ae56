"""What reconciliation logs, folded: orders the exchange forgot end NO_LONGER_KNOWN, orders
found by the search of an outage start from nothing. Pure folds into the reference store, and
the same entries through orders.lua on a real redis-server; the reconciler's pure helpers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis
from user_frames import RECV, T0, algo_frame, control, frame_entry, order_frame, rest_order

from pipeline.reconcile import (
    WINDOW_MS,
    HeldOrder,
    closed_unknown,
    parse_held,
    position_symbols,
    windows,
)
from projections.core.keys import Keys
from projections.core.orders import (
    ALGO_TRANSITIONS,
    NO_LONGER_KNOWN,
    ORDER_TRANSITIONS,
    InMemoryOrders,
    OrdersProjection,
)
from projections.core.outputs import PoisonEntry
from projections.shell import functions
from projections.shell.orderstore import perform_order_write

P = "websocket"


def not_found(ident: int, of: str = "order", at: int = T0 + 5 * 86_400_000,
              trades: list[dict[str, Any]] | None = None) -> Any:
    return control("final_state", {"kind": "notFound", "of": of, "symbol": "BTCUSDT",
                                   "id": str(ident), "fetched_at_ms": at, "weight_used_1m": 3,
                                   "response": {"code": -2013}, "trades": trades or []},
                   at / 1000 + 1.0)  # logged a second after the lookup


def trade(trade_id: int, qty: str, price: str) -> dict[str, Any]:
    return {"id": trade_id, "orderId": 7, "qty": qty, "price": price, "symbol": "BTCUSDT",
            "time": T0 + trade_id}


def fold(entries: list, store: InMemoryOrders | None = None) -> InMemoryOrders:
    proj = OrdersProjection(P)
    store = store or InMemoryOrders()
    for entry in entries:
        for out in proj.apply(entry):
            store.perform(out)
    return store


def test_no_longer_known_is_terminal_for_orders_and_algo_orders() -> None:
    for table in (ORDER_TRANSITIONS, ALGO_TRANSITIONS):
        assert table[NO_LONGER_KNOWN] == frozenset()
        assert all(NO_LONGER_KNOWN in nexts for status, nexts in table.items()
                   if nexts)  # reachable from "" and from every open status


def test_an_open_order_the_exchange_forgot_ends_no_longer_known_and_leaves_the_views() -> None:
    store = fold([frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV + 1.0), not_found(7)])
    assert store.open_orders() == []
    last = store.emitted[-1]
    assert (last["order_id"], last["status"], last["source"]) == ("7", NO_LONGER_KNOWN,
                                                                  "reconciliation")
    assert last["data"]["o"]["X"] == NO_LONGER_KNOWN
    assert last["data"]["cum_filled"] == "0"
    # the entry again (redelivery, replay) changes nothing and tells nobody twice
    assert fold([not_found(7)], store).emitted == store.emitted


def test_fills_still_listed_by_user_trades_are_in_the_terminal_entry() -> None:
    store = fold([frame_entry(order_frame(7, "NEW", "NEW", t=T0, q="0.030"), RECV + 1.0),
                  not_found(7, trades=[trade(2, "0.020", "49990"), trade(1, "0.010", "50020")])])
    state = store.emitted[-1]["data"]
    assert (state["cum_filled"], state["avg_price"]) == ("0.03", "50000")
    assert (state["o"]["l"], state["o"]["L"]) == ("0.020", "49990")  # the last fill


def test_a_terminal_order_is_not_turned_no_longer_known() -> None:
    filled = frame_entry(order_frame(7, "FILLED", "TRADE", t=T0, z="0.003", last_qty="0.003",
                                     last_price="50000", ap="50000"), RECV + 1.0)
    store = fold([filled, not_found(7)])
    assert [e["status"] for e in store.emitted] == ["FILLED"]


def test_an_algo_order_the_exchange_forgot_ends_no_longer_known() -> None:
    store = fold([frame_entry(algo_frame(500, "NEW", t=T0), RECV + 1.0),
                  not_found(500, "algoOrder")])
    assert store.open_orders("algo") == []
    assert (store.emitted[-1]["kind"], store.emitted[-1]["status"]) == ("algo", NO_LONGER_KNOWN)


def test_an_order_found_only_by_the_outage_search_is_taken_from_nothing() -> None:
    row = rest_order(42, "FILLED", update_time=T0 + 9, time=T0, executed="0.003",
                     cum_quote="150", avg="50000")
    entry = control("final_state", {"kind": "order", "symbol": "BTCUSDT", "via": "allOrders",
                                    "fetched_at_ms": T0 + 99, "response": row,
                                    "trades": [trade(1, "0.003", "50000")]}, RECV + 9.0)
    store = fold([entry])
    assert [(e["order_id"], e["status"], e["source"]) for e in store.emitted] == [
        ("42", "FILLED", "reconciliation")]
    assert store.emitted[0]["data"]["cum_filled"] == "0.003"


@pytest.mark.parametrize("body", [{"kind": "notFound", "of": "order", "symbol": "BTCUSDT"},
                                  {"kind": "notFound", "of": "order", "symbol": "BTCUSDT",
                                   "id": "x", "fetched_at_ms": 1}])
def test_a_notfound_entry_without_its_id_or_time_is_poison(body: dict[str, Any]) -> None:
    with pytest.raises(PoisonEntry):
        list(OrdersProjection(P).apply(control("final_state", body, RECV + 1.0)))


def test_orders_lua_ends_no_longer_known_where_the_reference_does(r: redis.Redis) -> None:
    entries = [frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV + 1.0),
               frame_entry(algo_frame(500, "NEW", t=T0), RECV + 1.0),
               not_found(7, trades=[trade(1, "0.001", "50000")]), not_found(500, "algoOrder")]
    proj, ref = OrdersProjection(P), InMemoryOrders()
    functions.DEFAULT.ensure(r)  # the library the order writes call (loaded by the projector)
    pipe = r.pipeline(transaction=False)
    for entry in entries + entries:  # twice: the second time is refused by the script too
        for out in proj.apply(entry):
            perform_order_write(pipe, out)
            ref.perform(out)
    pipe.execute()
    assert r.hlen(f"{P}:open_orders:btcusdt") == r.hlen(f"{P}:open_algo_orders:btcusdt") == 0
    stored = orjson.loads(r.hget(f"{P}:order_state:btcusdt", "7") or b"{}")
    assert stored == ref.states[("order", "BTCUSDT", 7)]
    assert [f[b"status"] for _, f in r.xrange(f"{P}:orders")] == [
        b"NEW", b"NEW", NO_LONGER_KNOWN.encode(), NO_LONGER_KNOWN.encode()]


# --- the reconciler's pure parts ----------------------------------------------------------------

def test_windows_cover_an_outage_in_the_seven_day_pieces_binance_accepts() -> None:
    assert windows(0, 100) == [(0, 100)]
    parts = windows(1_000, 1_000 + 2 * WINDOW_MS + 5)
    assert parts == [(1_000, 1_000 + WINDOW_MS), (1_001 + WINDOW_MS, 1_001 + 2 * WINDOW_MS),
                     (1_002 + 2 * WINDOW_MS, 1_005 + 2 * WINDOW_MS)]
    assert all(hi - lo <= WINDOW_MS for lo, hi in parts)


def test_the_outage_search_keeps_closed_orders_the_views_did_not_hold() -> None:
    rows = [rest_order(1, "FILLED", update_time=1, time=1), rest_order(2, "NEW", update_time=1,
                                                                       time=1),
            rest_order(3, "CANCELED", update_time=1, time=1), {"no": "id"}]
    assert [r["orderId"] for r in closed_unknown(rows, known={"3"})] == [1]


def test_held_orders_carry_their_creation_time_from_the_view_row() -> None:
    rows = {b"7": orjson.dumps(rest_order(7, "NEW", update_time=T0 + 5, time=T0)),
            b"8": b"not json"}
    held = parse_held(Keys(P), b"websocket:open_orders:btcusdt", rows)
    assert held == [HeldOrder("order", "BTCUSDT", "7"), HeldOrder("order", "BTCUSDT", "8")]
    assert [h.created_ms for h in held] == [T0, 0]


def test_symbols_with_an_open_position_are_searched_after_an_outage() -> None:
    rows = [{"symbol": "BTCUSDT", "positionAmt": "0.010"}, {"symbol": "ETHUSDT",
                                                             "positionAmt": "0.000"},
            {"symbol": "SOLUSDT", "positionAmt": "-1"}, {"positionAmt": "bad"}]
    assert position_symbols(rows) == {"BTCUSDT", "SOLUSDT"}
    assert position_symbols({"code": -1}) == set()
