"""The simulator's market side, as a websocket/REST client sees it (real sockets, trio-websocket).

Each test starts its own simulator on free ports inside the test's nursery.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import trio
import trio_websocket

from pipeline.simulator.book import Book, symbol_spec
from pipeline.simulator.market import Market, malformed_frames, parse_stream
from pipeline.simulator.session import ControlProtocol, Pacer
from tests.conftest import run_cli
from tests.simulator_support import Start, connect, sim_starter, until_reply

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def start_sim(nursery: trio.Nursery) -> Start:
    return sim_starter(nursery)


# --- websocket protocol ----------------------------------------------------------------------

async def test_combined_frames_arrive_with_stream_first_and_parse(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0)
    names = ["btcusdt@markPrice@1s", "ethusdt@aggTrade", "solusdt@kline_1m", "!markPrice@arr@1s"]
    async with connect(f"{ws_url}/market/stream?streams={'/'.join(names)}") as ws:
        seen: dict[str, Any] = {}
        while len(seen) < len(names):
            raw = await ws.get_message()
            assert isinstance(raw, str)
            assert raw.startswith('{"stream":"')
            msg = orjson.loads(raw)
            assert list(msg) == ["stream", "data"]
            seen[msg["stream"]] = msg["data"]
    mark = seen["btcusdt@markPrice@1s"]
    # Binance's 2026 order: `ap` since 2026-03-16, `st` since the COIN-M migration (2026-06-30)
    assert list(mark) == ["e", "E", "s", "p", "ap", "P", "i", "r", "T", "st"]
    assert mark["e"] == "markPriceUpdate" and isinstance(mark["p"], str) and float(mark["p"]) > 0
    assert list(seen["ethusdt@aggTrade"]) == [
        "e", "E", "a", "s", "p", "q", "nq", "f", "l", "T", "m", "st"]
    assert set(seen["solusdt@kline_1m"]["k"]) >= set("tTsifLochlvnxqVQB")
    # the USDⓈ-M symbols, then the COIN-M ones the stream has carried since 2026-06-30
    assert {m["s"] for m in seen["!markPrice@arr@1s"]} == {
        "BTCUSDT", "ETHUSDT", "SOLUSDT", "BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP"}


async def test_raw_form_sends_the_bare_payload(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0)
    async with connect(f"{ws_url}/public/ws/btcusdt@bookTicker") as ws:
        msg = orjson.loads(await ws.get_message())
    assert msg["e"] == "bookTicker" and msg["s"] == "BTCUSDT"
    assert list(msg) == ["e", "u", "s", "ps", "b", "B", "a", "A", "T", "E", "st"]


async def test_stream_on_the_wrong_path_stays_silent(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0)
    # markPrice belongs on /market: on /public it is accepted and never sent
    streams = "btcusdt@markPrice@1s/btcusdt@depth5@100ms"
    async with connect(f"{ws_url}/public/stream?streams={streams}") as ws:
        got = {orjson.loads(await ws.get_message())["stream"] for _ in range(200)}
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
        listed = await until_reply(ws, 1)
    assert got == {"btcusdt@depth5@100ms"}
    assert listed["result"] == ["btcusdt@markPrice@1s", "btcusdt@depth5@100ms"]


async def test_an_unknown_path_is_rejected_with_404(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim()
    with pytest.RaisesGroup(trio_websocket.ConnectionRejected, flatten_subgroups=True) as group:
        async with connect(f"{ws_url}/spot/ws/btcusdt@aggTrade"):
            pass
    [rejected] = group.value.exceptions
    assert isinstance(rejected, trio_websocket.ConnectionRejected)
    assert rejected.status_code == 404


async def test_subscribe_is_answered_and_starts_the_stream(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim()
    async with connect(f"{ws_url}/market/ws") as ws:
        await ws.send_message('{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":7}')
        assert orjson.loads(await ws.get_message()) == {"result": None, "id": 7}
        first = orjson.loads(await ws.get_message())
        assert first["e"] == "aggTrade" and first["s"] == "BTCUSDT"
        await ws.send_message('{"method":"UNSUBSCRIBE","params":["btcusdt@aggTrade"],"id":8}')
        assert await until_reply(ws, 8) == {"result": None, "id": 8}
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":9}')
        assert await until_reply(ws, 9) == {"result": [], "id": 9}


async def test_more_than_ten_control_messages_a_second_drops_the_connection(
        start_sim: Start) -> None:
    _, ws_url, _ = await start_sim()
    async with connect(f"{ws_url}/market/ws") as ws:
        for i in range(11):
            await ws.send_message(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}).decode())
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1008


async def test_more_than_1024_streams_on_a_connection_gets_an_error_reply(
        start_sim: Start) -> None:
    _, ws_url, _ = await start_sim()
    names = ["btcusdt@kline_1m", "btcusdt@kline_5m"] + [f"x{i}usdt@aggTrade" for i in range(1023)]
    async with connect(f"{ws_url}/market/ws") as ws:
        await ws.send_message(orjson.dumps({"method": "SUBSCRIBE", "params": names, "id": 3})
                              .decode())
        reply = await until_reply(ws, 3)
    assert reply["error"]["code"] == 2 and "1024" in reply["error"]["msg"]


async def test_lifetime_forces_a_close(start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(lifetime=0.3)
    async with connect(f"{ws_url}/market/stream?streams=btcusdt@aggTrade") as ws:
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1000
    assert sim.stats()["closed_connections"][0]["reason"] == "lifetime"  # type: ignore[index]


async def test_a_client_that_never_answers_pings_is_dropped(start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(ping_interval=0.1, pong_timeout=0.2)
    parts = urlsplit(ws_url)
    assert parts.hostname is not None and parts.port is not None
    received = b""
    # a bare socket: it completes the handshake and then never answers anything
    async with await trio.open_tcp_stream(parts.hostname, parts.port) as stream:
        await stream.send_all(
            b"GET /market/ws HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
            await sim.wait_for_connections(0)
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    # one ping (opcode 9, 4-byte payload), then the socket closed without a close frame
    assert frames[:2] == b"\x89\x04" and len(frames) == 6
    assert sim.closed[-1]["reason"] == "pong timeout"


async def test_drop_closes_the_connection_without_a_close_frame(start_sim: Start) -> None:
    _, ws_url, rest_url = await start_sim(rate=100)
    async with connect(f"{ws_url}/market/stream?streams=btcusdt@aggTrade") as ws:
        await ws.get_message()
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{rest_url}/sim/drop", json={"path": "market"})
        assert resp.json() == {"dropped": 1}
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1006  # abnormal


async def test_silence_switch_stops_data_but_the_connection_stays_up(start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(rate=0)
    async with connect(f"{ws_url}/market/stream?streams=btcusdt@aggTrade") as ws:
        await ws.get_message()
        sim.set_silence(True)
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
        await until_reply(ws, 1)  # frames written before the switch arrive before this reply
        await ws.ping(b"still there?")  # pings are still answered
        with trio.move_on_after(0.3) as quiet:  # at rate=0 a frame would come in microseconds
            await ws.get_message()
        assert quiet.cancelled_caught, "a data frame arrived while silent"
        sim.set_silence(False)
        assert orjson.loads(await ws.get_message())["stream"] == "btcusdt@aggTrade"


async def test_malformed_switch_sends_the_bad_frames(start_sim: Start) -> None:
    sim, ws_url, rest_url = await start_sim(record=10)
    async with connect(f"{ws_url}/market/stream?streams=btcusdt@markPrice") as ws:
        first = await ws.get_message()  # the first markPrice frame; the next is 3 s away
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{rest_url}/sim/malformed", json={"count": 5})
        assert resp.json() == {"connections": 1}
        got = [await ws.get_message() for _ in range(5)]
    text = [g for g in got if isinstance(g, str)]
    assert [g for g in got if isinstance(g, bytes)] == [b"\x00\x01binary\xfe\xff"]
    assert "this is not json {" in text
    assert any(len(t) == 2 * 1024 * 1024 for t in text)
    assert any(t.startswith('{"stream":"btcusdt@noSuchStream"') and "比特币" in t for t in text)
    unparsable = 0
    for t in text:
        try:
            orjson.loads(t)
        except orjson.JSONDecodeError:
            unparsable += 1
    assert unparsable == 2  # not JSON, truncated JSON
    assert sim.stats()["malformed_sent"] == 5
    assert sim.sent is not None
    assert [payload for _, payload in sim.sent] == [
        g if isinstance(g, bytes) else g.encode() for g in [first, *got]]


# --- Binance's 2026 payloads, paths and stream names -------------------------------------------

async def first_of_each(ws: trio_websocket.WebSocketConnection, names: list[str]
                        ) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    while len(seen) < len(names):
        msg = orjson.loads(await ws.get_message())
        seen.setdefault(msg["stream"], msg["data"])
    return seen


async def test_2026_payloads_carry_the_pair_and_the_symbol_type(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0)
    public = ["btcusdt@depth@100ms", "btcusdt@depth5@100ms", "btcusdt@bookTicker"]
    market = ["btcusdt@markPrice@1s", "btcusdt@aggTrade", "btcusdt@kline_1m"]
    async with connect(f"{ws_url}/public/stream?streams={'/'.join(public)}") as pub, \
            connect(f"{ws_url}/market/stream?streams={'/'.join(market)}") as mkt:
        seen = await first_of_each(pub, public) | await first_of_each(mkt, market)
    for name in ("btcusdt@depth@100ms", "btcusdt@depth5@100ms"):
        depth = seen[name]
        assert list(depth) == ["e", "E", "T", "s", "ps", "U", "u", "pu", "b", "a", "st"]
        assert (depth["ps"], depth["st"]) == ("BTCUSDT", 1)
    ticker = seen["btcusdt@bookTicker"]
    assert (ticker["ps"], ticker["st"]) == ("BTCUSDT", 1)
    mark = seen["btcusdt@markPrice@1s"]
    assert mark["ap"] == mark["p"] and mark["st"] == 1  # as every frame Binance has sent
    trade = seen["btcusdt@aggTrade"]
    assert trade["st"] == 1 and 0 <= float(trade["nq"]) <= float(trade["q"])
    assert "st" not in seen["btcusdt@kline_1m"]  # Binance's kline event has none


async def test_all_market_mark_price_carries_coinm_rows_unless_switched_off(
        start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0, symbols=("BTCUSDT",))
    _, plain_url, _ = await start_sim(rate=0, symbols=("BTCUSDT",), coinm_in_arr=False)
    async with connect(f"{ws_url}/market/stream?streams=!markPrice@arr@1s") as ws:
        rows = orjson.loads(await ws.get_message())["data"]
    async with connect(f"{plain_url}/market/ws/!markPrice@arr") as ws:
        plain = orjson.loads(await ws.get_message())
    assert [(r["s"], r["st"]) for r in rows] == [
        ("BTCUSDT", 1), ("BTCUSD_PERP", 2), ("ETHUSD_PERP", 2), ("BNBUSD_PERP", 2)]
    usdm, coinm = float(rows[0]["p"]), float(rows[1]["p"])
    assert abs(coinm / usdm - 1) < 0.05  # priced like its USDT pair
    assert [(r["s"], r["st"]) for r in plain] == [("BTCUSDT", 1)]


async def test_legacy_unrouted_paths_serve_only_the_public_streams(start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(rate=0)
    async with connect(f"{ws_url}/ws/btcusdt@depth@100ms") as raw:
        assert orjson.loads(await raw.get_message())["e"] == "depthUpdate"
    mixed = ["btcusdt@bookTicker", "btcusdt@markPrice@1s", "btcusdt@aggTrade"]
    async with connect(f"{ws_url}/stream?streams={'/'.join(mixed)}") as ws:
        got = {orjson.loads(await ws.get_message())["stream"] for _ in range(200)}
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
        listed = await until_reply(ws, 1)
    assert got == {"btcusdt@bookTicker"}
    assert listed["result"] == mixed  # the /market ones are accepted, and never sent
    async with connect(f"{ws_url}/ws/btcusdt@markPrice@1s") as quiet:
        with trio.move_on_after(0.3) as waited:  # at rate=0 a served frame comes at once
            await quiet.get_message()
    assert waited.cancelled_caught
    assert {c["path"] for c in sim.closed} == {"legacy"}


async def test_user_data_does_not_reach_the_legacy_path(start_sim: Start) -> None:
    sim, ws_url, rest_url = await start_sim(symbols=("BTCUSDT",))
    async with httpx.AsyncClient(base_url=rest_url) as http:
        key = (await http.post("/fapi/v1/listenKey",
                               headers={"X-MBX-APIKEY": "sim-api-key"})).json()["listenKey"]
        async with connect(f"{ws_url}/private/ws?listenKey={key}") as private, \
                connect(f"{ws_url}/ws/{key}") as legacy:
            await sim.account.wait_for_connections(1)
            await http.post("/sim/account/place", json={
                "symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01",
                "price": "59000"})
            assert orjson.loads(await private.get_message())["e"] == "ORDER_TRADE_UPDATE"
            with trio.move_on_after(0.3) as waited:
                await legacy.get_message()
    assert waited.cancelled_caught


async def test_depth_at_250ms_is_acknowledged_and_never_sent(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=0)
    url = f"{ws_url}/public/stream?streams=btcusdt@depth@250ms/ethusdt@depth5@500ms"
    async with connect(url) as ws:
        await ws.send_message(
            '{"method":"SUBSCRIBE","params":["btcusdt@depth20@250ms","solusdt@depth20"],"id":4}')
        reply = await until_reply(ws, 4)
        names = {orjson.loads(await ws.get_message())["stream"] for _ in range(300)}
    assert reply == {"result": None, "id": 4}  # Binance acknowledges any name
    assert names == {"ethusdt@depth5@500ms", "solusdt@depth20"}


def test_depth_speeds_are_100ms_500ms_or_none_for_250ms() -> None:
    speeds = {name: None if spec is None else spec.interval
              for name in ("btcusdt@depth@100ms", "btcusdt@depth20@500ms", "btcusdt@depth10",
                           "btcusdt@depth", "btcusdt@depth20@250ms", "btcusdt@depth@1000ms")
              for spec in [parse_stream(name, ["BTCUSDT"])]}
    assert speeds == {"btcusdt@depth@100ms": 0.1, "btcusdt@depth20@500ms": 0.5,
                      "btcusdt@depth10": 0.25, "btcusdt@depth": 0.25,
                      "btcusdt@depth20@250ms": None, "btcusdt@depth@1000ms": None}


# --- the order book --------------------------------------------------------------------------

class LocalBook:
    """A client following Binance's documented diff-depth rules."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last_update_id = snapshot["lastUpdateId"]
        self.bids = {p: q for p, q in snapshot["bids"]}
        self.asks = {p: q for p, q in snapshot["asks"]}
        self.prev_u: int | None = None

    def apply(self, event: dict[str, Any]) -> bool:
        """False when the event is dropped as older than the snapshot."""
        if event["u"] < self.last_update_id:
            return False
        if self.prev_u is None:
            assert event["U"] <= self.last_update_id <= event["u"]
        else:
            assert event["pu"] == self.prev_u
        self.prev_u = event["u"]
        for side, levels in ((self.bids, event["b"]), (self.asks, event["a"])):
            for price, qty in levels:
                if float(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        return True

    def levels(self) -> tuple[list[list[str]], list[list[str]]]:
        bids = sorted(self.bids.items(), key=lambda kv: -float(kv[0]))
        asks = sorted(self.asks.items(), key=lambda kv: float(kv[0]))
        return [list(kv) for kv in bids], [list(kv) for kv in asks]


async def test_diff_depth_applied_to_a_snapshot_equals_a_later_snapshot(
        start_sim: Start) -> None:
    sim, ws_url, rest_url = await start_sim(rate=2000)
    async with connect(f"{ws_url}/public/stream?streams=btcusdt@depth@100ms") as ws, \
            httpx.AsyncClient() as http:
        buffered = [orjson.loads(await ws.get_message())["data"] for _ in range(5)]
        snap = (await http.get(f"{rest_url}/fapi/v1/depth",
                               params={"symbol": "BTCUSDT", "limit": 1000})).json()
        book = LocalBook(snap)
        applied = sum(book.apply(e) for e in buffered)
        while applied < 100:
            applied += book.apply(orjson.loads(await ws.get_message())["data"])
        sim.set_silence(True)
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
        while True:
            msg = orjson.loads(await ws.get_message())
            if msg.get("id") == 1:
                break
            book.apply(msg["data"])
        later = (await http.get(f"{rest_url}/fapi/v1/depth",
                                params={"symbol": "BTCUSDT", "limit": 1000})).json()
    assert later["lastUpdateId"] == book.prev_u
    assert book.levels() == (later["bids"], later["asks"])


async def test_sequence_break_produces_pu_not_equal_to_the_previous_u(start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(rate=0)
    async with connect(f"{ws_url}/public/stream?streams=btcusdt@depth@100ms") as ws:
        events = [orjson.loads(await ws.get_message())["data"] for _ in range(20)]
        assert all(b["pu"] == a["u"] for a, b in itertools.pairwise(events))
        sim.sequence_break("BTCUSDT")
        prev = events[-1]
        for _ in range(1000):
            event = orjson.loads(await ws.get_message())["data"]
            if event["pu"] != prev["u"]:
                break
            prev = event
        else:
            pytest.fail("no sequence break seen")
    assert event["pu"] > prev["u"] and event["U"] == event["pu"] + 1


async def test_two_connections_on_one_stream_receive_the_same_events(start_sim: Start) -> None:
    _, ws_url, _ = await start_sim(rate=500)
    url = f"{ws_url}/public/stream?streams=btcusdt@depth@100ms"
    async with connect(url) as first:
        seen_first = [await first.get_message() for _ in range(30)]
        async with connect(url) as second:
            seen_second = [await second.get_message() for _ in range(40)]
            seen_first += [await first.get_message() for _ in range(200)]
    start = seen_first.index(seen_second[0])
    assert seen_first[start:start + 40] == seen_second
    chain = [orjson.loads(m)["data"] for m in seen_first]
    assert all(b["pu"] == a["u"] for a, b in itertools.pairwise(chain))


def test_book_diffs_rebuild_the_book_exactly() -> None:
    import random
    book = Book(symbol_spec("ETHUSDT"), random.Random(5))
    client = LocalBook(orjson.loads(book.snapshot_json(1000, 0)))
    cursor = book.reader_cursor()
    for i in range(3000):
        book.step()
        if i % 7 == 0:  # readers merge several steps into one event
            first, last, prev, bids, asks = book.diff_since(cursor)
            client.apply({"U": first, "u": last, "pu": prev, "b": orjson.loads(bids),
                          "a": orjson.loads(asks)})
            cursor = last
    first, last, prev, bids, asks = book.diff_since(cursor)
    client.apply({"U": first, "u": last, "pu": prev, "b": orjson.loads(bids),
                  "a": orjson.loads(asks)})
    snap = orjson.loads(book.snapshot_json(1000, 0))
    assert client.levels() == (snap["bids"], snap["asks"])
    assert float(snap["bids"][0][0]) < float(snap["asks"][0][0])


# --- REST ------------------------------------------------------------------------------------

async def test_rest_market_endpoints_answer_with_weight_header(start_sim: Start) -> None:
    _, _, rest_url = await start_sim(symbols=("BTCUSDT", "ETHUSDT"))
    async with httpx.AsyncClient(base_url=rest_url) as http:
        info = await http.get("/fapi/v1/exchangeInfo")
        depth = await http.get("/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": 5})
        one = await http.get("/fapi/v1/premiumIndex", params={"symbol": "BTCUSDT"})
        every = await http.get("/fapi/v1/premiumIndex")
        clock = await http.get("/fapi/v1/time")
        bad = await http.get("/fapi/v1/depth", params={"symbol": "NOPEUSDT"})
    assert [s["symbol"] for s in info.json()["symbols"]] == ["BTCUSDT", "ETHUSDT"]
    assert {s["status"] for s in info.json()["symbols"]} == {"TRADING"}
    assert len(depth.json()["bids"]) == 5 and list(depth.json()) == [
        "lastUpdateId", "E", "T", "bids", "asks"]
    assert one.json()["symbol"] == "BTCUSDT" and len(every.json()) == 2
    assert clock.json()["serverTime"] > 0
    assert bad.status_code == 400 and bad.json()["code"] == -1121
    # exchangeInfo 1 + depth(5) 2 + premiumIndex 1 + all premiumIndex 10 + time 1
    assert clock.headers["X-MBX-USED-WEIGHT-1M"] == "15"


async def test_weight_past_2400_a_minute_answers_429_with_retry_after(start_sim: Start) -> None:
    sim, _, rest_url = await start_sim()
    async with httpx.AsyncClient(base_url=rest_url) as http:
        await http.get("/fapi/v1/time")
        sim.weight.used = 2390  # as if this minute's calls had been made
        ok = await http.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 5})
        refused = await http.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 1000})
    assert ok.status_code == 200 and ok.headers["X-MBX-USED-WEIGHT-1M"] == "2392"
    assert refused.status_code == 429 and refused.json()["code"] == -1003
    assert 1 <= int(refused.headers["Retry-After"]) <= 61


async def test_control_api_over_http_sets_rate_and_reports_stats(start_sim: Start) -> None:
    _, ws_url, rest_url = await start_sim()
    async with connect(f"{ws_url}/market/stream?streams=btcusdt@aggTrade/btcusdt@kline_1m") as ws, \
            httpx.AsyncClient(base_url=rest_url) as http:
        rate = await http.post("/sim/rate", json={"rate": 0, "burst": 10, "burst_every": 0.5})
        for _ in range(100):
            await ws.get_message()
        stats = (await http.get("/sim/stats")).json()
        breaks = await http.post("/sim/sequence_break", json={"symbol": "btcusdt"})
        unknown = await http.post("/sim/nothing", json={})
    assert rate.json() == {"rate": 0.0, "burst": 10, "burst_every": 0.5}
    assert stats["frames_total"] >= 100
    assert set(stats["frames_by_stream"]) == {"btcusdt@aggTrade", "btcusdt@kline_1m"}
    [conn] = stats["connections"]
    assert conn["path"] == "market" and conn["streams"] == 2 and conn["frames"] >= 100
    assert breaks.json() == {"symbol": "BTCUSDT"}
    assert unknown.status_code == 404


# --- pure parts ------------------------------------------------------------------------------

def test_control_protocol_counts_messages_in_a_sliding_second() -> None:
    msg = '{"method":"LIST_SUBSCRIPTIONS","id":1}'
    patient, hasty = ControlProtocol(), ControlProtocol()
    for i in range(10):
        assert not patient.receive(msg, 100.0 + i * 0.01).close
        assert not hasty.receive(msg, 100.0 + i * 0.01).close
    assert not patient.receive(msg, 101.05).close  # the first six have left the window
    assert hasty.receive(msg, 100.5).close  # eleven within one second


def paced(rate: float | None, burst: int, names: list[str], until: float) -> list[str]:
    """Stream names a pacer hands out from t=0 to `until`, asked every millisecond."""
    import random
    market = Market(["BTCUSDT"], 1)
    pacer = Pacer(random.Random(1), 0.0)
    pacer.configure(rate, burst, 0.1, 0.0)
    pacer.set_streams([market.open_stream(parse_stream(n, ["BTCUSDT"]), True)  # type: ignore[arg-type]
                       for n in names], 0.0)
    out: list[str] = []
    for ms in range(int(until * 1000) + 1):
        out += [s.spec.name for s in pacer.due(ms / 1000)]
    return out


def test_pacer_sends_each_stream_at_binance_speed_by_default() -> None:
    sent = paced(None, 0, ["btcusdt@markPrice@1s", "btcusdt@depth@100ms", "btcusdt@markPrice"],
                 2.95)
    assert sent.count("btcusdt@markPrice@1s") == 3  # at 0, 1, 2 s
    assert sent.count("btcusdt@depth@100ms") == 30
    assert sent.count("btcusdt@markPrice") == 1  # every 3 s


def test_pacer_shares_a_fixed_rate_round_robin_and_adds_bursts() -> None:
    sent = paced(100, 0, ["btcusdt@aggTrade", "btcusdt@kline_1m"], 1.0)
    assert len(sent) == 100 and sent.count("btcusdt@aggTrade") == 50
    bursty = paced(None, 7, ["btcusdt@markPrice"], 0.95)  # bursts at 0.1, 0.2, ... 0.9
    assert len(bursty) == 1 + 9 * 7


def test_malformed_frames_cycle_through_five_kinds() -> None:
    frames = malformed_frames(7, 0)
    assert frames[5] == frames[0] and isinstance(frames[1], bytes)


# --- the command -----------------------------------------------------------------------------

def test_cli_prints_the_ready_line_and_stops_on_sigint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    argv = [sys.executable, "-m", "pipeline", "simulate", "--ws-port", "0", "--rest-port", "0",
            "--symbols", "BTCUSDT,ETHUSDT", "--rate", "5", "--seed", "3"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.fullmatch(
                r"simulator ready ws=(ws://127\.0\.0\.1:\d+) rest=(http://127\.0\.0\.1:\d+)\n",
                line)
            assert m, line
            info = httpx.get(f"{m.group(2)}/fapi/v1/exchangeInfo", timeout=10).json()
            assert [s["symbol"] for s in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_with_a_port_in_use_stops_with_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("simulate", "--ws-port", str(taken.getsockname()[1]), timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("pipeline: bad setting --ws-port")
