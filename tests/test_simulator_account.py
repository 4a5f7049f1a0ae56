"""The simulator's account: signed REST, listenKeys, the private stream, the control API.

`Account` is transport-agnostic, so REST is called directly with queries signed here as a client
would sign them; the private stream is served over a real localhost websocket (trio-websocket).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import orjson
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from pipeline.simulator import Simulator
from pipeline.simulator.account import Account, RestReply
from pipeline.simulator.config import SimConfig
from pipeline.simulator.ledger import (
    AlgoOrder,
    Ledger,
    LedgerError,
    Order,
    PlaceRequest,
    Position,
    apply_trade,
)

KEY, SECRET = "sim-api-key", "sim-api-secret"
HEADERS = {"x-mbx-apikey": KEY}
# `AP` and `cr` only come with TRAILING_STOP_MARKET orders, `M` only with AMENDMENT.
ORDER_FIELDS = (
    "s", "c", "S", "o", "f", "q", "p", "ap", "sp", "x", "X", "i", "l", "z", "L", "n", "N", "T",
    "t", "b", "a", "m", "R", "wt", "ot", "ps", "cp", "pP", "si", "ss", "rp", "V",
    "pm", "gtd", "er",
)


class Clock:
    """The exchange's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def sign(query: dict[str, str], *, secret: str = SECRET, timestamp_ms: int | None = None,
         recv_window: int | None = None) -> dict[str, str]:
    full = dict(query)
    full["timestamp"] = str(timestamp_ms if timestamp_ms is not None else int(time.time() * 1000))
    if recv_window is not None:
        full["recvWindow"] = str(recv_window)
    payload = urlencode(full).encode()
    full["signature"] = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return full


async def get(account: Account, path: str, query: dict[str, str] | None = None,
              **sign_args: Any) -> RestReply:
    reply = await account.handle_rest("GET", path, sign(query or {}, **sign_args), HEADERS, b"")
    assert reply is not None
    return reply


async def ok(account: Account, path: str, query: dict[str, str] | None = None) -> Any:
    reply = await get(account, path, query)
    assert reply.status == 200, reply.body
    return reply.body


async def control(account: Account, name: str, **body: Any) -> Any:
    reply = await account.handle_rest("POST", f"/sim/account/{name}", {}, {},
                                      orjson.dumps(body))
    assert reply is not None
    assert reply.status == 200, reply.body
    return reply.body


async def listen_key(account: Account, method: str = "POST") -> RestReply:
    reply = await account.handle_rest(method, "/fapi/v1/listenKey", {}, HEADERS, b"")
    assert reply is not None
    return reply


def make_account(**config: Any) -> tuple[Account, Clock]:
    clock = Clock()
    return Account(SimConfig(**config), clock=clock), clock


# ---- signed REST ------------------------------------------------------------------------------

async def test_request_with_a_bad_signature_is_refused_with_1022() -> None:
    account, _ = make_account()
    reply = await get(account, "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}, secret="wrong")
    assert (reply.status, reply.body) == (400, {"code": -1022, "msg":
                                                "Signature for this request is not valid."})


async def test_request_with_a_stale_timestamp_is_refused_with_1021() -> None:
    account, clock = make_account()
    stale = int((clock.now - 6) * 1000)
    reply = await get(account, "/fapi/v1/openOrders", {}, timestamp_ms=stale)
    assert reply.status == 400
    assert isinstance(reply.body, dict) and reply.body["code"] == -1021
    # A wider recvWindow accepts the same age, as on Binance.
    assert (await get(account, "/fapi/v1/openOrders", {}, timestamp_ms=stale,
                      recv_window=10_000)).status == 200


async def test_request_from_a_client_clock_ahead_by_more_than_a_second_is_refused() -> None:
    account, clock = make_account()
    ahead = int((clock.now + 2) * 1000)
    reply = await get(account, "/fapi/v3/positionRisk", timestamp_ms=ahead)
    assert isinstance(reply.body, dict) and reply.body["code"] == -1021


async def test_request_with_a_wrong_api_key_is_refused() -> None:
    account, _ = make_account()
    reply = await account.handle_rest("GET", "/fapi/v2/balance", sign({}),
                                      {"X-MBX-APIKEY": "nope"}, b"")
    assert reply is not None and reply.status == 401
    assert isinstance(reply.body, dict) and reply.body["code"] == -2015


async def test_ed25519_signed_request_is_accepted_and_hmac_is_not() -> None:
    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    account, _ = make_account(ed25519_public_key_pem=pem.decode())
    query = {"symbol": "ETHUSDT", "timestamp": str(int(time.time() * 1000))}
    query["signature"] = base64.b64encode(private.sign(urlencode(query).encode())).decode()
    reply = await account.handle_rest("GET", "/fapi/v1/openOrders", query, HEADERS, b"")
    assert reply is not None and (reply.status, reply.body) == (200, [])
    refused = await get(account, "/fapi/v1/openOrders", {"symbol": "ETHUSDT"})
    assert isinstance(refused.body, dict) and refused.body["code"] == -1022


async def test_paths_that_are_not_the_accounts_are_left_to_the_server() -> None:
    account, _ = make_account()
    assert await account.handle_rest("GET", "/fapi/v1/depth", {}, {}, b"") is None


# ---- listenKey ----------------------------------------------------------------------------------

async def test_post_returns_the_live_key_and_put_extends_it() -> None:
    account, clock = make_account(listen_key_ttl=60.0)
    first = await listen_key(account)
    assert first.status == 200 and first.weight == 1
    assert (await listen_key(account)).body == first.body
    clock.now += 50
    assert (await listen_key(account, "PUT")).status == 200
    clock.now += 50  # 100 s after creation, 50 s after the PUT: still alive
    assert (await listen_key(account, "PUT")).status == 200


async def test_put_on_an_expired_key_answers_1125_and_post_makes_a_new_one() -> None:
    account, clock = make_account(listen_key_ttl=60.0)
    first = await listen_key(account)
    clock.now += 61
    reply = await listen_key(account, "PUT")
    assert (reply.status, reply.body) == (400, {"code": -1125,
                                                "msg": "This listenKey does not exist."})
    second = await listen_key(account)
    assert second.body != first.body
    assert len(account.issued_listen_keys) == 2


async def test_listen_key_needs_the_api_key() -> None:
    account, _ = make_account()
    reply = await account.handle_rest("POST", "/fapi/v1/listenKey", {}, {}, b"")
    assert reply is not None and reply.status == 401


# ---- orders and algo orders over REST -----------------------------------------------------------

async def test_limit_order_is_in_open_orders_and_not_in_open_algo_orders() -> None:
    account, _ = make_account()
    placed = await control(account, "place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                           quantity="0.01", price="59000")
    open_orders = await ok(account, "/fapi/v1/openOrders", {"symbol": "BTCUSDT"})
    assert [o["orderId"] for o in open_orders] == [placed["orderId"]]
    assert open_orders[0]["status"] == "NEW" and open_orders[0]["price"] == "59000"
    assert await ok(account, "/fapi/v1/openAlgoOrders", {}) == []
    assert (await get(account, "/fapi/v1/openOrders", {"symbol": "BTCUSDT"})).weight == 1
    assert (await get(account, "/fapi/v1/openOrders", {})).weight == 40


async def test_stop_market_is_in_open_algo_orders_only() -> None:
    account, _ = make_account()
    algo = await control(account, "place", symbol="ETHUSDT", side="SELL", type="STOP_MARKET",
                         quantity="0.5", triggerPrice="2900")
    assert await ok(account, "/fapi/v1/openOrders", {}) == []
    listed = await ok(account, "/fapi/v1/openAlgoOrders", {"symbol": "ETHUSDT"})
    assert [(a["algoId"], a["algoStatus"], a["orderType"], a["triggerPrice"]) for a in listed] \
        == [(algo["algoId"], "NEW", "STOP_MARKET", "2900")]
    assert (await get(account, "/fapi/v1/openAlgoOrders", {})).weight == 40


async def test_triggered_stop_links_ai_to_a_new_market_order_that_fills() -> None:
    account, _ = make_account()
    await control(account, "place", symbol="BTCUSDT", side="BUY", type="MARKET",
                  quantity="0.02")
    algo = await control(account, "place", symbol="BTCUSDT", side="SELL", type="STOP_MARKET",
                         quantity="0.02", triggerPrice="58000", reduceOnly=True)
    triggered = await control(account, "trigger", algoId=algo["algoId"])
    assert triggered["algoStatus"] == "FINISHED" and triggered["actualOrderId"]
    order = await ok(account, "/fapi/v1/order", {"symbol": "BTCUSDT",
                                                 "orderId": triggered["actualOrderId"]})
    assert (order["status"], order["type"], order["origType"], order["executedQty"],
            order["avgPrice"]) == ("FILLED", "MARKET", "STOP_MARKET", "0.02", "58000")
    assert await ok(account, "/fapi/v1/openAlgoOrders", {}) == []
    final = await ok(account, "/fapi/v1/algoOrder", {"algoId": str(algo["algoId"])})
    assert final["actualOrderId"] == triggered["actualOrderId"]
    assert await ok(account, "/fapi/v3/positionRisk", {}) == []  # flat: v3 lists nothing


async def test_fills_change_position_risk_and_balance() -> None:
    account, _ = make_account()
    order = await control(account, "place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                          quantity="0.1", price="60000")
    part = await control(account, "fill", orderId=order["orderId"], quantity="0.04")
    assert (part["status"], part["executedQty"]) == ("PARTIALLY_FILLED", "0.04")
    [pos] = await ok(account, "/fapi/v3/positionRisk", {"symbol": "BTCUSDT"})
    assert (pos["positionSide"], pos["positionAmt"], pos["entryPrice"]) == ("BOTH", "0.04",
                                                                            "60000")
    await control(account, "fill", orderId=order["orderId"], price="60300")
    [pos] = await ok(account, "/fapi/v3/positionRisk", {"symbol": "BTCUSDT"})
    assert (pos["positionAmt"], pos["entryPrice"]) == ("0.1", "60180")
    await control(account, "place", symbol="BTCUSDT", side="SELL", type="MARKET",
                  quantity="0.1")  # closes at the mark, 60300: +12 realised, minus fees
    assert await ok(account, "/fapi/v3/positionRisk", {}) == []
    [usdt] = [b for b in await ok(account, "/fapi/v2/balance") if b["asset"] == "USDT"]
    fees = Decimal("0.0002") * (Decimal("2400") + Decimal("3618")) + Decimal("0.0005") * 6030
    assert Decimal(usdt["balance"]) == Decimal(10000) + 12 - fees


async def test_hedge_mode_keeps_long_and_short_positions_apart() -> None:
    account, _ = make_account(hedge_mode=True)
    await control(account, "place", symbol="SOLUSDT", side="BUY", type="MARKET", quantity="3",
                  positionSide="LONG")
    await control(account, "place", symbol="SOLUSDT", side="SELL", type="MARKET", quantity="1",
                  positionSide="SHORT")
    rows = await ok(account, "/fapi/v3/positionRisk", {"symbol": "SOLUSDT"})
    assert {r["positionSide"]: r["positionAmt"] for r in rows} == {"LONG": "3", "SHORT": "-1"}
    refused = await account.handle_rest(
        "POST", "/sim/account/place", {}, {}, orjson.dumps(
            {"symbol": "SOLUSDT", "side": "BUY", "type": "MARKET", "quantity": "1"}))
    assert refused is not None and refused.status == 400
    assert isinstance(refused.body, dict) and refused.body["code"] == -4061


async def test_canceled_order_leaves_open_orders_and_keeps_its_final_state() -> None:
    account, _ = make_account()
    order = await control(account, "place", symbol="ETHUSDT", side="SELL", type="LIMIT",
                          quantity="1", price="3100", newClientOrderId="my-order-1")
    await control(account, "cancel", orderId=order["orderId"])
    assert await ok(account, "/fapi/v1/openOrders", {}) == []
    final = await ok(account, "/fapi/v1/order", {"origClientOrderId": "my-order-1"})
    assert final["status"] == "CANCELED"
    missing = await get(account, "/fapi/v1/order", {"orderId": "1"})
    assert isinstance(missing.body, dict) and missing.body["code"] == -2013


async def test_order_ids_increase() -> None:
    account, _ = make_account()
    ids = [(await control(account, "place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                          quantity="0.01", price=str(50000 + i)))["orderId"] for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


async def test_state_shows_what_rest_would_return() -> None:
    account, _ = make_account()
    await control(account, "place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                  quantity="0.01", price="59000")
    reply = await account.handle_rest("GET", "/sim/account/state", {}, {}, b"")
    assert reply is not None and isinstance(reply.body, dict)
    assert reply.body["openOrders"] == await ok(account, "/fapi/v1/openOrders", {})
    assert reply.body["balances"][0]["asset"] == "USDT"


def test_script_places_fills_cancels_and_triggers_and_leaves_no_position() -> None:
    account, _ = make_account(script_account=True)
    steps = account.script()
    for _ in range(10):  # two rounds of five steps
        next(steps)
    finished = [a for a in account.ledger.algos.values() if a.status == "FINISHED"]
    statuses = {o.status for o in account.ledger.orders.values()}
    assert len(finished) == 2 and {"FILLED", "CANCELED"} <= statuses
    assert all(p.amount == 0 for p in account.ledger.positions.values())


# ---- the books alone (pure) ---------------------------------------------------------------------

def limit(symbol: str = "BTCUSDT", side: str = "BUY", qty: str = "1",
          price: str = "100") -> PlaceRequest:
    return PlaceRequest(symbol, side, "LIMIT", Decimal(qty), Decimal(price))


def place_order(ledger: Ledger, req: PlaceRequest) -> Order:
    _, order = ledger.place(req, 1)
    assert isinstance(order, Order)
    return order


def place_algo(ledger: Ledger, req: PlaceRequest) -> AlgoOrder:
    _, algo = ledger.place(req, 1)
    assert isinstance(algo, AlgoOrder)
    return algo


def test_amend_pushes_amendment_with_the_new_price_and_keeps_the_status() -> None:
    ledger = Ledger(("BTCUSDT",))
    order = place_order(ledger, limit())
    ledger.fill(order.order_id, Decimal("0.25"), None, 2)
    [event], amended = ledger.amend(order.order_id, Decimal("101"), None, 3)
    assert (event["o"]["x"], event["o"]["X"], event["o"]["p"], event["o"]["z"]) == (
        "AMENDMENT", "PARTIALLY_FILLED", "101", "0.25")
    assert amended.price == Decimal("101")


def test_expired_order_and_canceled_algo_order_push_their_final_status() -> None:
    ledger = Ledger(("BTCUSDT",))
    order = place_order(ledger, limit())
    algo = place_algo(ledger, PlaceRequest("BTCUSDT", "SELL", "TAKE_PROFIT_MARKET", Decimal(1),
                                           trigger_price=Decimal(120)))
    [expired], _ = ledger.end_order(order.order_id, "EXPIRED", 2)
    [canceled], _ = ledger.end_algo(algo.algo_id, "CANCELED", 2)
    assert (expired["o"]["x"], expired["o"]["X"]) == ("EXPIRED", "EXPIRED")
    assert (canceled["e"], canceled["o"]["X"], canceled["o"]["aid"]) == (
        "ALGO_UPDATE", "CANCELED", algo.algo_id)
    with pytest.raises(LedgerError):
        ledger.fill(order.order_id, None, None, 3)


def test_triggered_stop_limit_stays_triggered_until_its_order_fills() -> None:
    ledger = Ledger(("ETHUSDT",))
    algo = place_algo(ledger, PlaceRequest("ETHUSDT", "BUY", "STOP", Decimal(2), Decimal(3010),
                                           trigger_price=Decimal(3000)))
    events, triggered = ledger.trigger(algo.algo_id, None, 2)
    assert [e["o"]["X"] for e in events] == ["TRIGGERING", "TRIGGERED", "NEW"]
    assert triggered.actual_order_id in {o.order_id for o in ledger.open_orders("ETHUSDT")}
    assert [a.algo_id for a in ledger.open_algos()] == [algo.algo_id]
    assert triggered.actual_order_id is not None
    events, _ = ledger.fill(triggered.actual_order_id, None, None, 3)
    assert (events[-1]["e"], events[-1]["o"]["X"], events[-1]["o"]["aq"]) == (
        "ALGO_UPDATE", "FINISHED", "2")
    assert ledger.open_algos() == []


def test_a_trade_through_zero_realises_pnl_and_opens_the_rest_at_the_trade_price() -> None:
    long = Position("BTCUSDT", "BOTH", Decimal(2), Decimal(100))
    flipped, pnl = apply_trade(long, Decimal(-3), Decimal(110), 5)
    assert (pnl, flipped.amount, flipped.entry_price) == (Decimal(20), Decimal(-1), Decimal(110))


# ---- the private stream over a real websocket ---------------------------------------------------

@asynccontextmanager
async def stream_server(account: Account) -> AsyncIterator[int]:
    async def handler(request: WebSocketRequest) -> None:
        query = dict(parse_qsl(urlsplit(request.path).query))
        await account.serve_user_ws(request, query)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield server.port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[WebSocketConnection]:
    opened: list[WebSocketConnection] = []
    try:
        async with open_websocket_url(url) as ws:
            opened.append(ws)
            yield ws
    finally:
        # trio-websocket 0.12's client never closes its TCP socket when the server closes
        # first (it waits for the server's TCP close, then leaves the socket to the GC, which
        # warns); close it here so that warnings-as-errors sees no leak.
        for ws in opened:
            await ws._stream.aclose()


@asynccontextmanager
async def user_stream(account: Account, port: int, key: str,
                      events: str | None = None) -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{port}/private/ws?listenKey={key}"
    if events:
        url += f"&events={events}"
    async with client(url) as ws:
        await account.wait_for_connections(1)
        yield ws


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):  # a guard against hanging, not a speed assertion
        return orjson.loads(await ws.get_message())


async def events_until(ws: WebSocketConnection,
                       last: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    seen = [await next_event(ws)]
    while not last(seen[-1]):
        seen.append(await next_event(ws))
    return seen


async def test_fill_pushes_order_update_account_update_and_trade_lite() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port, user_stream(account, port, key) as ws:
        order = await control(account, "place", symbol="BTCUSDT", side="BUY", type="LIMIT",
                              quantity="0.1", price="60000")
        new = await next_event(ws)
        assert new["e"] == "ORDER_TRADE_UPDATE" and new["o"]["x"] == "NEW"
        assert set(new["o"]) == set(ORDER_FIELDS) and {"E", "T"} <= set(new)
        await control(account, "fill", orderId=order["orderId"], quantity="0.04")
        trade, update, lite = [await next_event(ws) for _ in range(3)]
    assert (trade["o"]["x"], trade["o"]["X"], trade["o"]["l"], trade["o"]["z"],
            trade["o"]["ap"]) == ("TRADE", "PARTIALLY_FILLED", "0.04", "0.04", "60000")
    assert update["e"] == "ACCOUNT_UPDATE" and update["a"]["m"] == "ORDER"
    assert [(p["s"], p["pa"], p["ps"]) for p in update["a"]["P"]] == [("BTCUSDT", "0.04",
                                                                       "BOTH")]
    assert [b["a"] for b in update["a"]["B"]] == ["USDT"]
    assert (lite["e"], lite["i"], lite["l"]) == ("TRADE_LITE", order["orderId"], "0.04")


async def test_trigger_pushes_algo_updates_with_ai_then_the_new_order_filled() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    algo = await control(account, "place", symbol="ETHUSDT", side="BUY", type="STOP_MARKET",
                         quantity="1", triggerPrice="3050")
    async with stream_server(account) as port, user_stream(
            account, port, key, "ORDER_TRADE_UPDATE/ALGO_UPDATE") as ws:
        await control(account, "trigger", algoId=algo["algoId"])
        seen = await events_until(ws, lambda e: e["o"]["X"] == "FINISHED")
    assert [(e["e"], e["o"]["X"]) for e in seen] == [
        ("ALGO_UPDATE", "TRIGGERING"), ("ALGO_UPDATE", "TRIGGERED"),
        ("ORDER_TRADE_UPDATE", "NEW"), ("ORDER_TRADE_UPDATE", "FILLED"),
        ("ALGO_UPDATE", "FINISHED")]
    new_order_id = seen[2]["o"]["i"]
    assert seen[1]["o"]["ai"] == str(new_order_id) == seen[4]["o"]["ai"]
    assert (seen[3]["o"]["o"], seen[3]["o"]["ot"], seen[4]["o"]["aq"]) == (
        "MARKET", "STOP_MARKET", "1")


async def test_only_the_event_types_named_in_events_are_sent() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port, user_stream(account, port, key,
                                                           "ACCOUNT_UPDATE") as ws:
        await control(account, "place", symbol="BTCUSDT", side="BUY", type="MARKET",
                      quantity="0.01")
        await control(account, "unknown_event")
        await control(account, "funding", symbol="BTCUSDT", amount="-0.25")
        first, second = await next_event(ws), await next_event(ws)
    assert [(e["e"], e["a"]["m"]) for e in (first, second)] == [
        ("ACCOUNT_UPDATE", "ORDER"), ("ACCOUNT_UPDATE", "FUNDING_FEE")]


async def test_events_while_disconnected_are_lost_but_rest_shows_the_final_state() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port:
        async with user_stream(account, port, key) as ws:
            order = await control(account, "place", symbol="BTCUSDT", side="SELL",
                                  type="LIMIT", quantity="0.2", price="61000")
            assert (await next_event(ws))["o"]["X"] == "NEW"
        await account.wait_for_connections(0)
        await control(account, "fill", orderId=order["orderId"])
        async with user_stream(account, port, key) as ws:
            await control(account, "unknown_event", e="MARKER")
            assert (await next_event(ws))["e"] == "MARKER"  # nothing of the fill came first
    final = await ok(account, "/fapi/v1/order", {"orderId": str(order["orderId"])})
    assert (final["status"], final["executedQty"]) == ("FILLED", "0.2")
    [pos] = await ok(account, "/fapi/v3/positionRisk", {})
    assert pos["positionAmt"] == "-0.2"


async def test_unknown_listen_key_is_closed_without_echoing_it() -> None:
    account, _ = make_account()
    bogus = "x" * 64
    async with stream_server(account) as port:
        url = f"ws://127.0.0.1:{port}/private/ws?listenKey={bogus}"
        async with client(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await next_event(ws)
    reason = closed.value.reason
    assert reason is not None and reason.code == 4001
    assert bogus not in (reason.reason or "")


async def test_expire_listen_key_announces_it_and_put_then_answers_1125() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port, user_stream(account, port, key) as ws:
        assert await control(account, "expire_listen_key") == {"expired": True}
        expired = await next_event(ws)
    assert expired["e"] == "listenKeyExpired"
    reply = await listen_key(account, "PUT")
    assert isinstance(reply.body, dict) and reply.body["code"] == -1125


async def test_key_that_outlives_its_ttl_is_announced_expired_on_the_stream() -> None:
    account = Account(SimConfig(listen_key_ttl=0.3))
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port, user_stream(account, port, key) as ws:
        assert (await next_event(ws))["e"] == "listenKeyExpired"


async def test_delete_closes_the_stream() -> None:
    account, _ = make_account()
    key = (await listen_key(account)).body["listenKey"]  # type: ignore[index]
    async with stream_server(account) as port, user_stream(account, port, key) as ws:
        assert (await listen_key(account, "DELETE")).status == 200
        with pytest.raises(ConnectionClosed):
            await next_event(ws)


# ---- through the simulator's server: real HTTP and a real websocket ----------------------------

async def test_through_the_simulator_an_order_filled_while_dropped_is_seen_over_signed_rest(
        nursery: trio.Nursery) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)))
    ws_url, rest_url = await nursery.start(sim.run)
    async with httpx.AsyncClient(base_url=rest_url) as http:
        created = await http.post("/fapi/v1/listenKey", headers=HEADERS)
        key = created.json()["listenKey"]
        async with client(f"{ws_url}/private/ws?listenKey={key}&events=ORDER_TRADE_UPDATE") as ws:
            await sim.account.wait_for_connections(1)
            placed = (await http.post("/sim/account/place", json={
                "symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01",
                "price": "59000"})).json()
            assert (await next_event(ws))["o"]["i"] == placed["orderId"]
            assert (await http.post("/sim/drop", json={"path": "private"})).status_code == 200
            await sim.account.wait_for_connections(0)
            await http.post("/sim/account/fill", json={"orderId": placed["orderId"]})
            with pytest.raises(ConnectionClosed):
                await next_event(ws)
        listed = await http.get("/fapi/v1/openOrders", params=sign({}), headers=HEADERS)
        final = await http.get("/fapi/v1/order", headers=HEADERS,
                               params=sign({"orderId": str(placed["orderId"])}))
    assert listed.status_code == 200 and listed.json() == []
    assert int(listed.headers["X-MBX-USED-WEIGHT-1M"]) >= 40
    assert final.json()["status"] == "FILLED"
