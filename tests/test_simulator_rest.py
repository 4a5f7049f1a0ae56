"""The simulator's account REST as Binance answers it in 2026, over real HTTP: orders it no longer
finds, allOrders and userTrades, symbolConfig and multiAssetsMargin, REST faults by switch, and an
IP weight budget shared with other clients. Time moves only by the exchange's clock control."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
from sim_support import Exchange, next_event, running, sign

from pipeline.simulator import SimConfig
from pipeline.simulator.wire import TPSL_FIELDS
from tests.conftest import ROOT, run_cli

DAY = 86_400


async def place(ex: Exchange, **body: Any) -> Any:
    order = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01",
             "price": "50000", **body}
    return await ex.control("place", **order)


async def order_code(ex: Exchange, order_id: int) -> int | None:
    """None when GET /fapi/v1/order finds the order, else Binance's error code."""
    reply = await ex.signed("/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": str(order_id)})
    return None if reply.status_code == 200 else int(reply.json()["code"])


# ---- orders Binance no longer finds -------------------------------------------------------------

async def test_an_unfilled_canceled_or_expired_order_is_gone_after_3_days_any_order_after_90(
        ) -> None:
    async with running() as ex:
        canceled, expired, part, filled = [await place(ex) for _ in range(4)]
        await ex.control("fill", orderId=part["orderId"], quantity="0.004")
        await ex.control("fill", orderId=filled["orderId"])
        await ex.control("cancel", orderId=canceled["orderId"])
        await ex.control("expire", orderId=expired["orderId"])
        await ex.control("cancel", orderId=part["orderId"])
        ids = [o["orderId"] for o in (canceled, expired, part, filled)]
        await ex.control("advance_clock", seconds=3 * DAY)
        at_3_days = [await order_code(ex, i) for i in ids]
        await ex.control("advance_clock", seconds=1)
        after_3_days = [await order_code(ex, i) for i in ids]
        await ex.control("advance_clock", seconds=87 * DAY - 1)
        at_90_days = [await order_code(ex, i) for i in ids]
        await ex.control("advance_clock", seconds=1)
        after_90_days = [await order_code(ex, i) for i in ids]
    assert at_3_days == [None, None, None, None]
    assert after_3_days == [-2013, -2013, None, None]
    assert at_90_days == [-2013, -2013, None, None]
    assert after_90_days == [-2013] * 4


async def test_a_canceled_algo_order_is_gone_after_3_days() -> None:
    async with running() as ex:
        algo = await place(ex, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        await ex.control("cancel", algoId=algo["algoId"])
        found = await ex.signed("/fapi/v1/algoOrder", {"algoId": str(algo["algoId"])})
        await ex.control("advance_clock", seconds=3 * DAY + 1)
        gone = await ex.signed("/fapi/v1/algoOrder", {"algoId": str(algo["algoId"])})
    assert found.json()["algoStatus"] == "CANCELED"
    assert gone.json()["code"] == -2013


async def test_advancing_the_clock_moves_server_time_and_signed_requests_follow_it() -> None:
    async with running() as ex:
        before = (await ex.http.get("/fapi/v1/time")).json()["serverTime"]
        moved = await ex.control("advance_clock", seconds=2 * DAY)
        after = (await ex.http.get("/fapi/v1/time")).json()["serverTime"]
        stale = await ex.http.get("/fapi/v1/openOrders", headers={"X-MBX-APIKEY": "sim-api-key"},
                                  params=sign({}, before))
        fresh = await ex.signed("/fapi/v1/openOrders")
        backwards = await ex.http.post("/sim/account/advance_clock", json={"seconds": -1})
    assert after - before == 2 * DAY * 1000 == moved["serverTime"] - before
    assert stale.json()["code"] == -1021 and fresh.status_code == 200
    assert backwards.status_code == 400


# ---- allOrders ----------------------------------------------------------------------------------

async def test_all_orders_returns_the_last_7_days_most_recent_first_cut_by_limit() -> None:
    async with running() as ex:
        old = [await place(ex) for _ in range(2)]
        await ex.control("advance_clock", seconds=2 * DAY)
        new = [await place(ex, symbol="ETHUSDT", price="3000"), await place(ex)]
        await ex.control("cancel", orderId=old[0]["orderId"])  # canceled unfilled, 2 days old
        everything = await ex.signed("/fapi/v1/allOrders")
        btc = await ex.ok("/fapi/v1/allOrders", {"symbol": "BTCUSDT"})
        recent = await ex.ok("/fapi/v1/allOrders", {"startTime": str(ex.now_ms() - DAY * 1000)})
        newest = await ex.ok("/fapi/v1/allOrders", {"limit": "2"})
        from_id = await ex.ok("/fapi/v1/allOrders", {"orderId": str(old[1]["orderId"]),
                                                     "limit": "2"})
        await ex.control("advance_clock", seconds=6 * DAY)
        week_later = await ex.ok("/fapi/v1/allOrders")
    ids = [o["orderId"] for o in (*old, *new)]
    assert [o["orderId"] for o in everything.json()] == ids
    assert int(everything.headers["X-MBX-USED-WEIGHT-1M"]) == 5
    assert everything.json()[0]["status"] == "CANCELED"
    assert [o["orderId"] for o in btc] == [ids[0], ids[1], ids[3]]
    assert [o["orderId"] for o in recent] == ids[2:]
    assert [o["orderId"] for o in newest] == ids[2:]
    assert [o["orderId"] for o in from_id] == ids[1:3]
    # 8 days after the first two: only the last two are in the default week, and the canceled
    # unfilled one is no longer found at all
    assert [o["orderId"] for o in week_later] == ids[2:]


@pytest.mark.parametrize(("query", "code"), [
    ({"startTime": "0", "endTime": str(8 * DAY * 1000)}, -1127),
    ({"limit": "1001"}, -1130),
    ({"symbol": "NOPEUSDT"}, -1121),
    ({"orderId": "x"}, -1102),
])
async def test_all_orders_refuses_what_binance_refuses(query: dict[str, str], code: int) -> None:
    async with running() as ex:
        reply = await ex.signed("/fapi/v1/allOrders", query)
    assert (reply.status_code, reply.json()["code"]) == (400, code)


# ---- userTrades ---------------------------------------------------------------------------------

async def test_user_trades_are_the_ledgers_fills_in_binances_row_shape() -> None:
    async with running() as ex:
        order = await place(ex, quantity="0.02")
        await ex.control("fill", orderId=order["orderId"], quantity="0.01")
        await ex.control("advance_clock", seconds=DAY)
        await ex.control("fill", orderId=order["orderId"], price="49900")
        await ex.control("mark", symbol="BTCUSDT", price="49900")
        await place(ex, side="SELL", type="MARKET", quantity="0.02")
        reply = await ex.signed("/fapi/v1/userTrades", {"symbol": "BTCUSDT"})
        trades = reply.json()
        from_id = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT",
                                                      "fromId": str(trades[1]["id"])})
        of_order = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT",
                                                       "orderId": str(order["orderId"])})
        today = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT",
                                                    "startTime": str(ex.now_ms() - 3_600_000)})
        last = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT", "limit": "1"})
    assert int(reply.headers["X-MBX-USED-WEIGHT-1M"]) == 5
    assert set(trades[0]) == {"buyer", "commission", "commissionAsset", "id", "maker",
                              "orderId", "price", "qty", "quoteQty", "realizedPnl", "side",
                              "positionSide", "symbol", "time"}
    assert [(t["side"], t["qty"], t["price"], t["maker"]) for t in trades] == [
        ("BUY", "0.01", "50000", True), ("BUY", "0.01", "49900", True),
        ("SELL", "0.02", "49900", False)]
    assert (trades[0]["quoteQty"], trades[0]["commission"], trades[0]["buyer"]) == (
        "500", "0.1", True)
    assert trades[2]["realizedPnl"] == "-1"  # bought 0.02 at 49950 on average, sold at 49900
    assert [t["id"] for t in from_id] == [t["id"] for t in trades[1:]]
    assert [t["id"] for t in of_order] == [t["id"] for t in trades[:2]]
    assert [t["id"] for t in today] == [t["id"] for t in trades[1:]]
    assert [t["id"] for t in last] == [trades[2]["id"]]


@pytest.mark.parametrize(("query", "code"), [
    ({}, -1102),
    ({"symbol": "BTCUSDT", "fromId": "1", "startTime": "1"}, -1128),
    ({"symbol": "BTCUSDT", "startTime": "0", "endTime": str(7 * DAY * 1000 + 1)}, -1127),
])
async def test_user_trades_refuses_what_binance_refuses(query: dict[str, str],
                                                        code: int) -> None:
    async with running() as ex:
        reply = await ex.signed("/fapi/v1/userTrades", query)
    assert reply.json()["code"] == code


async def test_user_trades_older_than_3_months_are_not_returned() -> None:
    async with running() as ex:
        order = await place(ex)
        await ex.control("fill", orderId=order["orderId"])
        await ex.control("advance_clock", seconds=89 * DAY)
        kept = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT", "fromId": "1"})
        await ex.control("advance_clock", seconds=DAY + 1)
        gone = await ex.ok("/fapi/v1/userTrades", {"symbol": "BTCUSDT", "fromId": "1"})
    assert len(kept) == 1 and gone == []


# ---- symbolConfig, multiAssetsMargin, leverage --------------------------------------------------

async def test_a_leverage_change_shows_in_symbol_config_and_account_config_update() -> None:
    async with running() as ex:
        before = await ex.signed("/fapi/v1/symbolConfig")
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}&events=ACCOUNT_CONFIG_UPDATE"
                                  ) as ws:
            changed = await ex.control("leverage", symbol="ETHUSDT", leverage=7)
            event = await next_event(ws)
        eth = await ex.ok("/fapi/v1/symbolConfig", {"symbol": "ETHUSDT"})
        refused = await ex.http.post("/sim/account/leverage",
                                     json={"symbol": "ETHUSDT", "leverage": 126})
    assert int(before.headers["X-MBX-USED-WEIGHT-1M"]) == 5
    assert [(c["symbol"], c["leverage"], c["marginType"], c["isAutoAddMargin"])
            for c in before.json()] == [("BTCUSDT", 20, "CROSSED", False),
                                        ("ETHUSDT", 20, "CROSSED", False)]
    assert set(before.json()[0]) == {"symbol", "marginType", "isAutoAddMargin", "leverage",
                                     "maxNotionalValue"}
    assert eth == [changed] and changed["leverage"] == 7
    assert (event["e"], event["ac"]) == ("ACCOUNT_CONFIG_UPDATE", {"s": "ETHUSDT", "l": 7})
    assert {"E", "T"} <= set(event)
    assert refused.json()["code"] == -4028


async def test_multi_assets_mode_shows_over_rest_and_as_ai() -> None:
    async with running() as ex:
        before = await ex.signed("/fapi/v1/multiAssetsMargin")
        key = await ex.new_key()
        async with ex.user_stream(f"/private/ws?listenKey={key}") as ws:
            await ex.control("multi_assets", on=True)
            event = await next_event(ws)
        after = await ex.ok("/fapi/v1/multiAssetsMargin")
    assert before.json() == {"multiAssetsMargin": False}
    assert int(before.headers["X-MBX-USED-WEIGHT-1M"]) == 30
    assert event["ai"] == {"j": True} and after == {"multiAssetsMargin": True}


async def test_leverage_sets_the_margin_position_risk_reports() -> None:
    async with running() as ex:
        await place(ex, type="MARKET", quantity="0.1")
        await ex.control("mark", symbol="BTCUSDT", price="60000")
        [at_20] = await ex.ok("/fapi/v3/positionRisk", {"symbol": "BTCUSDT"})
        await ex.control("leverage", symbol="BTCUSDT", leverage=5)
        [at_5] = await ex.ok("/fapi/v3/positionRisk", {"symbol": "BTCUSDT"})
    assert (at_20["positionInitialMargin"], at_5["positionInitialMargin"]) == ("300", "1200")


# ---- REST faults --------------------------------------------------------------------------------

async def test_429_with_a_chosen_retry_after_for_n_calls_on_one_path() -> None:
    async with running() as ex:
        await ex.control("rest_fault", kind="429", path="/fapi/v1/openOrders", count=2,
                         retry_after=100000)
        hit = [await ex.signed("/fapi/v1/openOrders") for _ in range(2)]
        other = await ex.signed("/fapi/v2/balance")
        after = await ex.signed("/fapi/v1/openOrders")
    assert [(r.status_code, r.json()["code"], r.headers["Retry-After"]) for r in hit] == [
        (429, -1003, "100000")] * 2
    assert other.status_code == 200 and after.status_code == 200


async def test_418_on_every_path_until_cleared() -> None:
    async with running() as ex:
        await ex.control("rest_fault", kind="418", retry_after=120)
        banned = [await ex.http.get("/fapi/v1/time"), await ex.signed("/fapi/v1/openOrders"),
                  await ex.listen_key()]
        controls_still_work = await ex.control("clear_rest_faults")
        after = await ex.http.get("/fapi/v1/time")
    assert [(r.status_code, r.headers["Retry-After"]) for r in banned] == [(418, "120")] * 3
    assert controls_still_work == {"cleared": 1} and after.status_code == 200


@pytest.mark.parametrize(("kind", "body"), [
    ("truncated", None), ("empty", b""), ("empty_object", b"{}")])
async def test_a_200_with_a_spoiled_body(kind: str, body: bytes | None) -> None:
    async with running() as ex:
        whole = (await ex.signed("/fapi/v2/balance")).content
        await ex.control("rest_fault", kind=kind, path="/fapi/v2/balance", count=1)
        spoiled = await ex.signed("/fapi/v2/balance")
    assert spoiled.status_code == 200
    assert spoiled.content == (whole[:len(whole) // 2] if body is None else body)


async def test_a_5xx_by_switch() -> None:
    async with running() as ex:
        await ex.control("rest_fault", kind="5xx", status=502, count=1)
        failed = await ex.http.get("/fapi/v1/exchangeInfo")
        fine = await ex.http.get("/fapi/v1/exchangeInfo")
    assert (failed.status_code, failed.json()["code"]) == (502, -1001)
    assert fine.status_code == 200


async def test_a_hang_gives_no_answer_for_its_seconds() -> None:
    async with running() as ex:
        await ex.control("rest_fault", kind="hang", path="/fapi/v1/time", seconds=30, count=1)
        with pytest.raises(httpx.ReadTimeout):
            await ex.http.get("/fapi/v1/time", timeout=0.3)
        answered = await ex.http.get("/fapi/v1/time")
    assert answered.status_code == 200


async def test_a_bad_fault_is_refused() -> None:
    async with running() as ex:
        replies = [await ex.http.post("/sim/account/rest_fault", json=body) for body in (
            {"kind": "404"}, {"kind": "5xx", "status": 404}, {"kind": "429", "count": 0})]
    assert [r.status_code for r in replies] == [400, 400, 400]


# ---- the IP's weight, shared with other clients -------------------------------------------------

async def test_weight_spent_by_another_client_brings_the_ip_to_its_limit() -> None:
    async with running() as ex:
        spent = await ex.control("spend_weight", weight=2395)
        cheap = await ex.http.get("/fapi/v1/time")  # weight 1: 2396
        heavy = await ex.http.get("/fapi/v1/premiumIndex")  # weight 10: refused
        account = await ex.signed("/fapi/v1/openOrders")  # runs, counted after: 2436
        refused = await ex.signed("/fapi/v1/openOrders", {"symbol": "BTCUSDT"})
    assert spent == {"weight_used_1m": 2395}
    assert (cheap.status_code, cheap.headers["X-MBX-USED-WEIGHT-1M"]) == (200, "2396")
    assert (heavy.status_code, heavy.json()["code"]) == (429, -1003)
    assert int(heavy.headers["Retry-After"]) > 0
    assert (account.status_code, account.headers["X-MBX-USED-WEIGHT-1M"]) == (200, "2436")
    assert refused.status_code == 429


# ---- 2026 shapes over REST ----------------------------------------------------------------------

async def test_algo_rows_in_the_2026_06_09_shape_have_no_tp_sl_fields() -> None:
    async with running(SimConfig(symbols=("BTCUSDT",))) as ex:
        algo = await place(ex, type="TAKE_PROFIT", side="SELL", triggerPrice="70000",
                           price="70100")
        one = await ex.ok("/fapi/v1/algoOrder", {"algoId": str(algo["algoId"])})
        listed = await ex.ok("/fapi/v1/openAlgoOrders")
    for row in (algo, one, *listed):
        assert not set(TPSL_FIELDS) & set(row)
        assert (row["actualType"], row["actualQty"]) == ("", "0")  # not triggered yet
    assert (one["triggerPrice"], one["price"]) == ("70000", "70100")


async def test_legacy_algo_rows_keep_the_tp_sl_fields_of_before_2026_06_09() -> None:
    async with running(SimConfig(symbols=("BTCUSDT",), legacy_algo_rows=True)) as ex:
        algo = await place(ex, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        one = await ex.ok("/fapi/v1/algoOrder", {"algoId": str(algo["algoId"])})
    assert set(TPSL_FIELDS) <= set(one) and not {"actualType", "actualQty"} & set(one)


async def test_a_rejected_trigger_leaves_a_rejected_algo_order_with_its_reason() -> None:
    async with running() as ex:
        key = await ex.new_key()
        algo = await place(ex, type="STOP_MARKET", side="SELL", triggerPrice="40000")
        async with ex.user_stream(f"/private/ws?listenKey={key}") as ws:
            rejected = await ex.control("trigger_reject", algoId=algo["algoId"],
                                        reason="Margin is insufficient.")
            seen = [await next_event(ws) for _ in range(2)]
        still_open = await ex.ok("/fapi/v1/openAlgoOrders")
    assert [(e["e"], e["o"]["X"], e["o"]["rm"]) for e in seen] == [
        ("ALGO_UPDATE", "TRIGGERING", ""), ("ALGO_UPDATE", "REJECTED", "Margin is insufficient.")]
    assert rejected["algoStatus"] == "REJECTED" and still_open == []


# ---- the command ---------------------------------------------------------------------------------

def test_cli_serves_more_accounts_and_the_legacy_algo_rows_on_request() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    argv = [sys.executable, "-m", "pipeline", "simulate", "--ws-port", "0", "--rest-port", "0",
            "--symbols", "BTCUSDT", "--account", "desk-b:key-b:secret-b",
            "--legacy-algo-rows"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            m = re.search(r"rest=(http://\S+)", proc.stdout.readline())
            assert m
            rest = m.group(1)
            httpx.post(f"{rest}/sim/account/place", timeout=10, json={
                "account": "desk-b", "symbol": "BTCUSDT", "side": "SELL", "type": "STOP_MARKET",
                "quantity": "1", "triggerPrice": "1"}).raise_for_status()
            now = httpx.get(f"{rest}/fapi/v1/time", timeout=10).json()["serverTime"]
            rows = httpx.get(f"{rest}/fapi/v1/openAlgoOrders", timeout=10,
                             headers={"X-MBX-APIKEY": "key-b"},
                             params=sign({}, now, "secret-b")).json()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [r["triggerPrice"] for r in rows] == ["1"]
    assert set(TPSL_FIELDS) <= set(rows[0])


def test_cli_with_a_malformed_account_stops_with_one_line_and_exit_2() -> None:
    result = run_cli("simulate", "--account", "no-secret-here", timeout=30)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline: bad setting --account")
    assert "no-secret-here" not in last

