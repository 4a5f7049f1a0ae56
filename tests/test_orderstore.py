"""The atomic order writes on a real redis-server: orders.lua against the pure reference."""

from __future__ import annotations

import threading

import orjson
import pytest
import redis
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

from projections.core.orders import InMemoryOrders, OrdersProjection
from projections.core.orderwrites import AlgoOrderWrite, OrderWrite
from projections.shell import functions
from projections.shell.orderstore import perform_order_write

P = "websocket"


@pytest.fixture(autouse=True)
def library(r: redis.Redis) -> None:
    """The function library the order writes call (the projector loads it at start)."""
    functions.DEFAULT.ensure(r)


def story() -> list:
    """An account's afternoon: a limit order partially filled then filled, one canceled, a
    stop-market algo order that triggers and whose market order fills, then a reconciliation
    that finds one more order and the final state of another."""
    return [
        frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV + 1.0),
        frame_entry(order_frame(8, "NEW", "NEW", t=T0 + 1, symbol="ETHUSDT", p="3000.00"),
                    RECV + 1.0),
        frame_entry(algo_frame(500, "NEW", t=T0 + 2), RECV + 1.0),
        frame_entry(order_frame(7, "PARTIALLY_FILLED", "TRADE", t=T0 + 10, z="0.001",
                                last_qty="0.001", last_price="50000.10", ap="50000.10",
                                rp="0.01"), RECV + 1.1),
        frame_entry(order_frame(8, "CANCELED", "CANCELED", t=T0 + 11, symbol="ETHUSDT",
                                p="3000.00"), RECV + 1.1),
        frame_entry(algo_frame(500, "TRIGGERING", t=T0 + 20), RECV + 1.2),
        frame_entry(algo_frame(500, "TRIGGERED", t=T0 + 21, ai="9001"), RECV + 1.2),
        frame_entry(order_frame(9001, "NEW", "NEW", t=T0 + 22, otype="MARKET", side="SELL",
                                p="0"), RECV + 1.2),
        frame_entry(order_frame(9001, "FILLED", "TRADE", t=T0 + 23, otype="MARKET",
                                side="SELL", p="0", z="0.003", last_qty="0.003",
                                last_price="47990.00", ap="47990.00", rp="-30.3"), RECV + 1.2),
        frame_entry(algo_frame(500, "FINISHED", t=T0 + 24, ai="9001"), RECV + 1.2),
        frame_entry(order_frame(7, "FILLED", "TRADE", t=T0 + 30, z="0.003", last_qty="0.002",
                                last_price="50000.20", ap="50000.16667", rp="-0.5"), RECV + 1.3),
        control("snapshot", {"kind": "openOrders", "symbol": None, "fetched_at_ms": T0 + 40,
                             "response": [rest_order(10, "NEW", update_time=T0 + 35,
                                                     time=T0 + 35)]}, RECV + 2.0),
        control("snapshot", {"kind": "openAlgoOrders", "symbol": None, "fetched_at_ms": T0 + 40,
                             "response": [rest_algo(501, "NEW", update_time=T0 + 36,
                                                    create_time=T0 + 36)]}, RECV + 2.0),
        control("final_state", {"kind": "order", "symbol": "BTCUSDT", "fetched_at_ms": T0 + 41,
                                "response": rest_order(10, "CANCELED", update_time=T0 + 38,
                                                       time=T0 + 35)}, RECV + 2.1),
    ]


def perform(r: redis.Redis, entries: list) -> None:
    proj = OrdersProjection(P)
    pipe = r.pipeline(transaction=False)
    for entry in entries:
        for out in proj.apply(entry):
            perform_order_write(pipe, out)
    pipe.execute()


def reference(entries: list) -> InMemoryOrders:
    """The pure Python reference of orders.lua, fed the same entries."""
    ref = InMemoryOrders()
    proj = OrdersProjection(P)
    for entry in entries:
        for out in proj.apply(entry):
            ref.perform(out)
    return ref


def hash_json(r: redis.Redis, key: str) -> dict[str, dict]:
    return {k.decode(): orjson.loads(v) for k, v in r.hgetall(key).items()}


def stream_fields(r: redis.Redis, key: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items() if k != b"data"}
            for _, fields in r.xrange(key)]


def test_lua_store_ends_where_the_pure_reference_ends(r):
    entries = story()
    perform(r, entries)
    ref = reference(entries)
    for (kind, symbol, ident), state in ref.states.items():
        table = "order_state" if kind == "order" else "algo_order_state"
        assert hash_json(r, f"{P}:{table}:{symbol.lower()}")[str(ident)] == state
    assert stream_fields(r, f"{P}:orders") == [
        {k: e[k] for k in ("order_id", "status", "kind", "source", "symbol")}
        for e in ref.emitted]
    assert [orjson.loads(f[b"data"]) for _, f in r.xrange(f"{P}:orders")] == [
        e["data"] for e in ref.emitted]
    assert list(hash_json(r, f"{P}:open_orders:btcusdt").values()) == ref.open_orders("order")
    assert list(hash_json(r, f"{P}:open_algo_orders:btcusdt").values()) == \
        ref.open_orders("algo")


def test_applying_everything_twice_or_reversed_emits_nothing_more(r):
    entries = story()
    perform(r, entries)
    length = r.xlen(f"{P}:orders")
    views = {k: hash_json(r, f"{P}:{k}:btcusdt") for k in
             ("order_state", "open_orders", "algo_order_state", "open_algo_orders")}
    perform(r, entries)
    perform(r, list(reversed(entries)))
    assert r.xlen(f"{P}:orders") == length == 14
    assert r.xlen(f"{P}:orders:btcusdt") + r.xlen(f"{P}:orders:ethusdt") == length
    assert {k: hash_json(r, f"{P}:{k}:btcusdt") for k in views} == views


def test_listener_sees_each_order_event_once_with_status_kind_and_source(r):
    perform(r, story())
    seen = [(e["order_id"], e["status"], e["kind"], e["source"])
            for e in stream_fields(r, f"{P}:orders:btcusdt")]
    assert seen[:3] == [("7", "NEW", "order", "stream"), ("500", "NEW", "algo", "stream"),
                        ("7", "PARTIALLY_FILLED", "order", "stream")]
    assert ("9001", "FILLED", "order", "stream") in seen
    assert seen[-3:] == [("10", "NEW", "order", "reconciliation"),
                         ("501", "NEW", "algo", "reconciliation"),
                         ("10", "CANCELED", "order", "reconciliation")]
    assert stream_fields(r, f"{P}:orders:ethusdt") == [
        {"order_id": "8", "status": s, "kind": "order", "source": "stream", "symbol": "ETHUSDT"}
        for s in ("NEW", "CANCELED")]


def test_open_orders_row_equals_the_rest_shape_of_the_same_order(r):
    perform(r, story()[:1] + story()[3:4])
    row = hash_json(r, f"{P}:open_orders:btcusdt")["7"]
    assert row == rest_order(7, "PARTIALLY_FILLED", update_time=T0 + 10, time=T0,
                             executed="0.001", cum_quote="50.0001", avg="50000.10")


def test_open_algo_orders_row_equals_the_rest_shape(r):
    perform(r, story()[2:3])
    assert hash_json(r, f"{P}:open_algo_orders:btcusdt") == {
        "500": rest_algo(500, "NEW", update_time=T0 + 2, create_time=T0 + 2)}


def test_filled_order_leaves_open_orders_and_reports_its_sums(r):
    perform(r, story())
    assert set(hash_json(r, f"{P}:open_orders:btcusdt")) == set()
    assert set(hash_json(r, f"{P}:open_algo_orders:btcusdt")) == {"501"}
    state = hash_json(r, f"{P}:order_state:btcusdt")["7"]
    assert (state["status"], state["cum_quote"], state["realized_profit"]) == (
        "FILLED", "150.0005", "-0.49")


def test_concurrent_writers_of_the_same_events_emit_each_transition_once(redis_server):
    entries = story()
    errors: list[BaseException] = []

    def worker() -> None:
        client = redis_server.client()
        try:
            for _ in range(3):
                perform(client, entries)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client = redis_server.client()
    assert client.xlen(f"{P}:orders") == 14
    client.close()


def test_per_symbol_stream_is_capped_and_all_orders_stream_trimmed_by_age(r):
    pipe = r.pipeline(transaction=False)
    for i in range(600):
        write = OrderWrite(prefix=P, symbol="SOLUSDT", order_id=i, status="NEW",
                           version=(T0, 0, "0"), allowed_from=("", "NEW"),
                           fields={"i": i}, rest={"orderId": i}, symbol_maxlen=100,
                           orders_max_age_s=0)
        perform_order_write(pipe, write)
    pipe.execute()
    assert 100 <= r.xlen(f"{P}:orders:solusdt") < 600
    assert r.xlen(f"{P}:orders") < 600  # MINID ~ now: whole old nodes dropped
    assert r.hlen(f"{P}:open_orders:solusdt") == 600


def test_refused_write_changes_nothing_at_all(r):
    perform(r, story()[:1])
    before = {k: r.dump(k) for k in r.keys("*")}
    late = AlgoOrderWrite(prefix=P, symbol="BTCUSDT", algo_id=500, status="NEW",
                          version=(T0 + 2, 0, "0"), allowed_from=("", "NEW"),
                          fields={}, rest=None)
    perform(r, story()[:1])  # the same NEW again
    pipe = r.pipeline(transaction=False)
    perform_order_write(pipe, late)
    perform_order_write(pipe, late)
    assert pipe.execute() == [1, 0]
    after = {k: r.dump(k) for k in r.keys("*") if not k.startswith(b"websocket:algo")
             and not k.startswith(b"websocket:open_algo")}
    assert {k for k in after if k in before} == set(before)
    assert r.xlen(f"{P}:orders") == 2


def test_performers_are_registered_in_the_view_store(r):
    from projections.shell import viewstore

    assert viewstore.PERFORMERS[OrderWrite] is perform_order_write
    store = viewstore.ViewStore(r)
    pipe = r.pipeline(transaction=False)
    for out in OrdersProjection(P).apply(story()[0]):
        store.queue(pipe, out)
    assert pipe.execute() == [1]
    assert r.hlen(f"{P}:open_orders:btcusdt") == 1


def test_open_orders_views_equal_the_simulators_rest_answers_at_every_step(r):
    """The simulator's books give both the stream events and the REST answers for the same
    moment; after folding the events, the views must equal the REST answers."""
    from decimal import Decimal

    from pipeline.simulator import wire
    from pipeline.simulator.ledger import Ledger, PlaceRequest

    ledger = Ledger(symbols=("BTCUSDT", "ETHUSDT"))
    now = [T0]

    def step(events: list) -> None:
        now[0] += 7
        perform(r, [frame_entry(orjson.dumps(e), now[0] / 1000) for e in events])
        rest = sorted((wire.rest_order(o) for o in ledger.open_orders("BTCUSDT")),
                      key=lambda row: row["orderId"])
        algos = sorted((wire.rest_algo_order(a, ledger.linked_order(a))
                        for a in ledger.open_algos("BTCUSDT")), key=lambda row: row["algoId"])
        assert sorted(hash_json(r, f"{P}:open_orders:btcusdt").values(),
                      key=lambda row: row["orderId"]) == rest
        assert sorted(hash_json(r, f"{P}:open_algo_orders:btcusdt").values(),
                      key=lambda row: row["algoId"]) == algos

    def place(**body: object) -> int:
        events, placed = ledger.place(PlaceRequest.from_json(body), now[0] + 1)
        step(events)
        return placed.order_id if hasattr(placed, "order_id") else placed.algo_id

    limit = place(symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010",
                  price="59000.5")
    other = place(symbol="BTCUSDT", side="SELL", type="LIMIT", quantity="0.5", price="61000")
    stop = place(symbol="BTCUSDT", side="SELL", type="STOP_MARKET", quantity="0.004",
                 triggerPrice="58000")
    step(ledger.fill(limit, Decimal("0.003"), Decimal("59000.1"), now[0] + 1)[0])
    step(ledger.amend(other, Decimal("60500"), None, now[0] + 1)[0])
    step(ledger.fill(limit, Decimal("0.004"), Decimal("58999.9"), now[0] + 1)[0])
    step(ledger.trigger(stop, Decimal("58000"), now[0] + 1)[0])
    step(ledger.fill(limit, None, None, now[0] + 1)[0])
    step(ledger.end_order(other, "CANCELED", now[0] + 1)[0])
    assert hash_json(r, f"{P}:open_orders:btcusdt") == {}
    state = hash_json(r, f"{P}:order_state:btcusdt")[str(limit)]
    assert state["cum_quote"] == wire.rest_order(ledger.orders[limit])["cumQuote"]


def test_reversed_delivery_into_empty_views_converges_to_the_same_open_orders(r):
    perform(r, list(reversed(story())))
    assert hash_json(r, f"{P}:open_orders:btcusdt") == {}
    assert set(hash_json(r, f"{P}:open_algo_orders:btcusdt")) == {"501"}
    states = hash_json(r, f"{P}:order_state:btcusdt")
    assert {k: s["status"] for k, s in states.items()} == {
        "7": "FILLED", "9001": "FILLED", "10": "CANCELED"}
    assert hash_json(r, f"{P}:algo_order_state:btcusdt")["500"]["status"] == "FINISHED"


def test_fill_sums_are_exact_decimals_like_the_reference_for_many_random_fills(r):
    """orders.lua adds decimal strings digit by digit; Python's Decimal is the judge."""
    import random

    rng = random.Random(20261124)
    entries, z = [], 0
    for n in range(1, 150):
        z_new = z + rng.randint(1, 999)
        qty, px = f"{(z_new - z) / 1000:.3f}", f"{rng.randint(1, 99_999_999) / 100:.2f}"
        rp = f"{rng.choice(['-', ''])}{rng.randint(0, 10**9) / 10**rng.randint(0, 8)}"
        entries.append(frame_entry(order_frame(
            77, "PARTIALLY_FILLED", "TRADE", t=T0 + n, z=f"{z_new / 1000:.3f}", last_qty=qty,
            last_price=px, rp=rp), RECV + 1.0))
        z = z_new
    perform(r, entries)
    ref = reference(entries)
    stored = hash_json(r, f"{P}:order_state:btcusdt")["77"]
    expected = ref.states[("order", "BTCUSDT", 77)]
    assert (stored["cum_quote"], stored["realized_profit"]) == (
        expected["cum_quote"], expected["realized_profit"])
    assert len(ref.emitted) == 149


def test_a_stored_state_from_2100_is_repaired_by_the_real_events_as_the_reference_says(r):
    """Written before the fold checked times (`T` in 2100): the Lua store and the reference
    both let the real transitions through, the FILLED one closes the order."""
    import time

    from projections.core.orders import apply_write

    future = 4_102_444_800_000
    real = [frame_entry(order_frame(7, "NEW", "NEW", t=T0), RECV + 1.0)]
    poisoned = OrdersProjection(P).apply(
        frame_entry(order_frame(7, "PARTIALLY_FILLED", "TRADE", t=future, z="0.001",
                                last_qty="0.001", last_price="50000"), future / 1000))
    [write] = list(poisoned)
    pipe = r.pipeline(transaction=False)
    perform_order_write(pipe, write)  # as the old store took it
    pipe.execute()
    filled = [frame_entry(order_frame(7, "FILLED", "TRADE", t=T0 + 30, z="0.003",
                                      last_qty="0.003", last_price="50000.20"), RECV + 1.3)]
    perform(r, real + filled)
    state = hash_json(r, f"{P}:order_state:btcusdt")["7"]
    assert state["status"] == "FILLED" and r.hlen(f"{P}:open_orders:btcusdt") == 0

    held = {**state, "status": "PARTIALLY_FILLED", "version": [future, 1, "0.001"]}
    [fill] = list(OrdersProjection(P).apply(filled[0]))
    now = int(time.time() * 1000)
    after = apply_write(held, fill, now_ms=now)
    assert after is not None and after[0]["status"] == "FILLED" and after[1] is None
    assert apply_write(held, fill) is None  # without the clock: obeyed, as before
