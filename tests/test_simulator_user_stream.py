"""The simulator's private stream as Binance serves it in 2026, over real HTTP and websockets:
one shared listenKey per API key, DELETE and dead keys closing with 4001, the `events=` filter
for all ten event types, and `/private/stream` with several accounts' keys on one connection."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sim_support import KEY, Exchange, events_until, next_event, running
from trio_websocket import ConnectionClosed, WebSocketConnection

from pipeline.simulator import SimConfig

TEN_TYPES = (
    "ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE", "TRADE_LITE", "MARGIN_CALL",
    "ACCOUNT_CONFIG_UPDATE", "STRATEGY_UPDATE", "GRID_UPDATE",
    "CONDITIONAL_ORDER_TRIGGER_REJECT", "listenKeyExpired",
)
TWO_ACCOUNTS = SimConfig(symbols=("BTCUSDT",), accounts=("desk-b:key-b:secret-b",))


async def closed_code(ws: WebSocketConnection) -> tuple[int | None, str]:
    """The close code and reason the server ended `ws` with, asserting no event came first."""
    with pytest.raises(ConnectionClosed) as closed:
        await next_event(ws)
    reason = closed.value.reason
    return (reason.code, reason.reason or "") if reason else (None, "")


# ---- the shared listenKey -----------------------------------------------------------------------

async def test_every_caller_with_the_api_key_gets_the_live_key_until_it_is_deleted() -> None:
    async with running() as ex, httpx.AsyncClient(base_url=str(ex.http.base_url)) as other:
        first = await ex.new_key()
        again = await other.post("/fapi/v1/listenKey", headers={"X-MBX-APIKEY": KEY})
        assert again.json() == {"listenKey": first}
        assert (await ex.listen_key("DELETE")).status_code == 200
        assert await ex.new_key() != first
    assert len(ex.sim.account.issued_listen_keys) == 2


async def test_delete_closes_every_connection_on_the_key_with_4001_and_no_event() -> None:
    async with running() as ex:
        key = await ex.new_key()
        target = f"/private/ws?listenKey={key}&events=ORDER_TRADE_UPDATE/listenKeyExpired"
        async with ex.user_stream(target) as one, ex.user_stream(target, attached=2) as two:
            assert (await ex.listen_key("DELETE")).status_code == 200
            codes = [await closed_code(one), await closed_code(two)]
    assert [code for code, _ in codes] == [4001, 4001]
    assert all(key not in reason for _, reason in codes)


async def test_put_of_an_unknown_or_closed_key_answers_1125() -> None:
    async with running() as ex:
        key = await ex.new_key()
        assert (await ex.listen_key("PUT", params={"listenKey": key})).status_code == 200
        bogus = await ex.listen_key("PUT", params={"listenKey": "x" * 64})
        await ex.listen_key("DELETE")
        closed = await ex.listen_key("PUT", params={"listenKey": key})
        bare = await ex.listen_key("PUT")
    for reply in (bogus, closed, bare):
        assert (reply.status_code, reply.json()) == (400, {
            "code": -1125, "msg": "This listenKey does not exist."})


@pytest.mark.parametrize("form", ["query", "path"])
async def test_a_connection_on_a_key_that_is_not_live_is_closed_with_4001(form: str) -> None:
    async with running() as ex:
        deleted = await ex.new_key()
        await ex.listen_key("DELETE")
        codes = []
        for key in ("x" * 64, deleted):
            target = f"/private/ws?listenKey={key}" if form == "query" else f"/private/ws/{key}"
            async with ex.user_stream(target, attached=0) as ws:
                codes.append(await closed_code(ws))
    assert [code for code, _ in codes] == [4001, 4001]
    assert all(deleted not in reason for _, reason in codes)


async def test_a_key_whose_hour_ran_out_announces_it_and_the_connection_stays_open() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws/{key}") as ws:
            await ex.control("advance_clock", seconds=3601)
            expired = await next_event(ws)
            still_attached = ex.sim.account.connection_count()
        put = await ex.listen_key("PUT")
    assert (expired["e"], expired["listenKey"]) == ("listenKeyExpired", key)
    assert still_attached == 1
    assert put.json()["code"] == -1125


# ---- events= ------------------------------------------------------------------------------------

async def cause(ex: Exchange, kind: str) -> None:
    """Make the main account push (at least) one event of `kind`."""
    if kind == "ORDER_TRADE_UPDATE":
        await ex.control("place", symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.01",
                         price="50000")
    elif kind == "ALGO_UPDATE":
        await ex.control("place", symbol="BTCUSDT", side="SELL", type="STOP_MARKET",
                         quantity="0.01", triggerPrice="40000")
    elif kind == "ACCOUNT_UPDATE":
        await ex.control("funding", symbol="BTCUSDT", amount="-0.1")
    elif kind == "TRADE_LITE":
        await ex.control("place", symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.01")
    elif kind == "MARGIN_CALL":
        await ex.control("margin_call", symbol="BTCUSDT")
    elif kind == "ACCOUNT_CONFIG_UPDATE":
        await ex.control("leverage", symbol="BTCUSDT", leverage=10)
    elif kind == "STRATEGY_UPDATE":
        await ex.control("strategy_update", symbol="BTCUSDT", status="WORKING")
    elif kind == "GRID_UPDATE":
        await ex.control("grid_update", symbol="BTCUSDT", realized="0.5")
    elif kind == "CONDITIONAL_ORDER_TRIGGER_REJECT":
        algo = await ex.control("place", symbol="BTCUSDT", side="SELL", type="STOP_MARKET",
                                quantity="0.01", triggerPrice="39000")
        await ex.control("trigger_reject", algoId=algo["algoId"], legacy=True)
    elif kind == "listenKeyExpired":
        await ex.control("expire_listen_key")


async def cause_every_type(ex: Exchange) -> None:
    """One of each type (a position first, for MARGIN_CALL), and an unknown type; the key
    stays live."""
    await cause(ex, "TRADE_LITE")
    for kind in TEN_TYPES[:-1]:
        await cause(ex, kind)
    await ex.control("unknown_event", e="SIM_UNKNOWN_EVENT")


@pytest.mark.parametrize("kind", TEN_TYPES)
async def test_events_delivers_only_the_type_it_names(kind: str) -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}") as everything, \
                ex.user_stream(f"/private/ws?listenKey={key}&events={kind}",
                               attached=2) as only:
            await cause_every_type(ex)
            await cause(ex, kind)  # the last event of its kind comes after all the others
            if kind != "listenKeyExpired":
                await ex.control("unknown_event", e="END")
            stop = kind if kind == "listenKeyExpired" else "END"
            seen = await events_until(everything, lambda e: e["e"] == stop)
            expected = [e for e in seen if e["e"] == kind]
            got = [await next_event(only) for _ in expected]
    assert expected and got == expected


async def test_without_events_every_type_is_delivered_even_unknown_ones() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}") as ws:
            await cause_every_type(ex)
            await cause(ex, "listenKeyExpired")
            seen = await events_until(ws, lambda e: e["e"] == "listenKeyExpired")
    assert {e["e"] for e in seen} == {*TEN_TYPES, "SIM_UNKNOWN_EVENT"}


async def test_several_types_in_events_are_separated_by_slashes() -> None:
    async with running() as ex:
        key = await ex.new_key()
        target = f"/private/ws?listenKey={key}&events=TRADE_LITE/ACCOUNT_CONFIG_UPDATE"
        async with ex.user_stream(target) as ws:
            await cause_every_type(ex)
            await ex.control("multi_assets", on=True)
            seen = await events_until(ws, lambda e: "ai" in e)
    # the script trades twice, then sets a leverage, then the Multi-Assets mode
    assert [e["e"] for e in seen] == ["TRADE_LITE", "TRADE_LITE", "ACCOUNT_CONFIG_UPDATE",
                                      "ACCOUNT_CONFIG_UPDATE"]


# ---- /private/stream: several listenKeys, several accounts --------------------------------------

async def test_private_stream_carries_each_keys_own_events_wrapped_with_the_key() -> None:
    async with running(TWO_ACCOUNTS) as ex:
        key_a, key_b = await ex.new_key(), await ex.new_key("key-b")
        target = (f"/private/stream?listenKey={key_a}&events=ORDER_TRADE_UPDATE"
                  f"&listenKey={key_b}&events=ACCOUNT_UPDATE")
        async with ex.user_stream(target) as ws:
            await ex.sim.accounts.named("desk-b").wait_for_connections(1)
            await ex.control("place", symbol="BTCUSDT", side="BUY", type="MARKET",
                             quantity="0.01", account="desk-b")
            await ex.control("place", symbol="BTCUSDT", side="SELL", type="LIMIT",
                             quantity="0.02", price="70000")
            first, second = await next_event(ws), await next_event(ws)
    assert (first["stream"], first["data"]["e"], first["data"]["a"]["m"]) == (
        key_b, "ACCOUNT_UPDATE", "ORDER")
    assert (second["stream"], second["data"]["e"], second["data"]["o"]["S"]) == (
        key_a, "ORDER_TRADE_UPDATE", "SELL")


async def test_private_stream_with_one_dead_key_is_closed_with_4001() -> None:
    async with running(TWO_ACCOUNTS) as ex:
        key_a = await ex.new_key()
        target = f"/private/stream?listenKey={key_a}&listenKey={'y' * 64}"
        async with ex.user_stream(target, attached=0) as ws:
            code, _ = await closed_code(ws)
    assert code == 4001


async def test_each_account_has_its_own_key_books_and_stream() -> None:
    async with running(TWO_ACCOUNTS) as ex:
        key_a, key_b = await ex.new_key(), await ex.new_key("key-b")
        async with ex.user_stream(f"/private/ws?listenKey={key_b}", attached=0) as ws:
            await ex.sim.accounts.named("desk-b").wait_for_connections(1)
            await ex.control("place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                             quantity="0.01", price="50000")  # main's: not on b's stream
            placed = await ex.control("place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                                      quantity="0.03", price="51000", account="desk-b")
            event = await next_event(ws)
        open_b = await ex.ok("/fapi/v1/openOrders", key="key-b", secret="secret-b")
        open_a = await ex.ok("/fapi/v1/openOrders")
        wrong_secret = await ex.signed("/fapi/v1/openOrders", key="key-b")
    assert key_a != key_b
    assert event["o"]["i"] == placed["orderId"]
    assert [o["orderId"] for o in open_b] == [placed["orderId"]]
    assert [o["price"] for o in open_a] == ["50000"]
    assert wrong_secret.json()["code"] == -1022



# ---- 2026 event shapes --------------------------------------------------------------------------

async def test_an_amendment_carries_its_modify_id_in_m_and_other_updates_do_not() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}&events=ORDER_TRADE_UPDATE"
                                  ) as ws:
            order = await cause_order(ex)
            await ex.control("amend", orderId=order["orderId"], price="50100")
            await ex.control("amend", orderId=order["orderId"], quantity="0.02")
            await ex.control("cancel", orderId=order["orderId"])
            new, first, second, canceled = [(await next_event(ws))["o"] for _ in range(4)]
    assert (first["x"], second["x"]) == ("AMENDMENT", "AMENDMENT")
    assert isinstance(first["M"], int) and second["M"] > first["M"]
    assert "M" not in new and "M" not in canceled


async def test_only_trailing_stops_carry_ap_and_cr_and_ia_turns_true_on_activation() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}") as ws:
            stop = await ex.control("place", symbol="BTCUSDT", side="SELL", type="STOP_MARKET",
                                    quantity="0.01", triggerPrice="40000")
            trail = await ex.control("place", symbol="BTCUSDT", side="SELL",
                                     type="TRAILING_STOP_MARKET", quantity="0.01",
                                     callbackRate="1.5", activatePrice="65000")
            await ex.control("activate", algoId=trail["algoId"])
            await ex.control("trigger", algoId=trail["algoId"], price="64000")
            seen = await events_until(ws, lambda e: e["e"] == "ALGO_UPDATE"
                                      and e["o"]["X"] == "FINISHED")
    stop_new, trail_new, trail_active = seen[0]["o"], seen[1]["o"], seen[2]["o"]
    assert (stop_new["ia"], "cr" in stop_new) == (False, False)
    assert (trail_new["X"], trail_new["ia"], trail_new["cr"]) == ("NEW", False, "1.5")
    assert (trail_active["X"], trail_active["ia"]) == ("NEW", True)
    orders = [e["o"] for e in seen if e["e"] == "ORDER_TRADE_UPDATE"]
    assert [(o["o"], o["ot"], o["AP"], o["cr"]) for o in orders] == [
        ("MARKET", "TRAILING_STOP_MARKET", "65000", "1.5")] * 2
    assert stop["algoId"] == stop_new["aid"]


async def test_a_funding_fee_names_the_balance_row_with_a_wb_cw_bc_and_no_position() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}&events=ACCOUNT_UPDATE") as ws:
            await ex.control("place", symbol="BTCUSDT", side="BUY", type="MARKET",
                             quantity="0.01")
            await ex.control("funding", symbol="BTCUSDT", amount="-0.25")
            trade, funding = await next_event(ws), await next_event(ws)
    assert funding["a"]["m"] == "FUNDING_FEE" and funding["a"]["P"] == []
    [row] = funding["a"]["B"]
    assert set(row) == {"a", "wb", "cw", "bc"} == set(trade["a"]["B"][0])
    assert (row["a"], row["bc"]) == ("USDT", "-0.25")


async def test_margin_call_strategy_grid_and_trigger_reject_have_binances_shapes() -> None:
    async with running() as ex:
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}&events=MARGIN_CALL/"
                                  "STRATEGY_UPDATE/GRID_UPDATE/CONDITIONAL_ORDER_TRIGGER_REJECT"
                                  ) as ws:
            await cause_every_type(ex)
            call, strategy, grid, reject = [await next_event(ws) for _ in range(4)]
    assert set(call) == {"e", "E", "cw", "p"}
    assert [(p["s"], p["ps"], p["pa"], p["mt"]) for p in call["p"]] == [
        ("BTCUSDT", "BOTH", "0.02", "CROSSED")]
    assert set(call["p"][0]) == {"s", "ps", "pa", "mt", "iw", "mp", "up", "mm"}
    assert set(strategy["su"]) == {"si", "st", "ss", "s", "ut", "c"}
    assert (strategy["su"]["ss"], strategy["su"]["c"]) == ("WORKING", 8007)
    assert set(grid["gu"]) == {"si", "st", "ss", "s", "r", "up", "uq", "uf", "mp", "ut"}
    assert grid["gu"]["r"] == "0.5"
    assert set(reject["or"]) == {"s", "i", "r"} and reject["or"]["s"] == "BTCUSDT"


async def cause_order(ex: Exchange) -> Any:
    return await ex.control("place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                            quantity="0.01", price="50000")


async def test_the_control_api_addresses_an_account_by_name() -> None:
    async with running(TWO_ACCOUNTS) as ex:
        mine = await cause_order(ex)
        theirs = await ex.control("place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                                  quantity="0.01", price="50000", account="desk-b")
        state_b = (await ex.http.get("/sim/account/state", params={"account": "desk-b"})).json()
        listed = await ex.control("accounts")
        unknown = await ex.http.post("/sim/account/place", json={
            "account": "nobody", "symbol": "BTCUSDT", "side": "BUY", "type": "MARKET",
            "quantity": "1"})
    assert [o["orderId"] for o in state_b["openOrders"]] == [theirs["orderId"]]
    assert theirs["orderId"] != mine["orderId"]  # each account numbers in its own range
    assert [a["account"] for a in listed] == ["main", "desk-b"]
    assert unknown.status_code == 404
