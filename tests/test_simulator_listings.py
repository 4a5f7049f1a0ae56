"""Listings that change while the simulator runs, contract types, and TradFi sessions, as a
client sees them over real HTTP and websockets."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from pipeline.simulator import SimConfig, Simulator
from tests.simulator_support import Start, connect, fast_clock, sim_starter, until_reply

NOV_2 = 1_793_615_400.0  # Monday 2026-11-02 09:10 UTC: US equities in PRE_MARKET


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> Start:
    return sim_starter(nursery)


async def start_at(nursery: trio.Nursery, when: float, **config: Any
                   ) -> tuple[Simulator, str, str]:
    sim = Simulator(SimConfig(**config), clock=fast_clock(1.0, start=when))
    ws_url, rest_url = await nursery.start(sim.run)
    return sim, ws_url, rest_url


def rows_by_symbol(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["symbol"]: row for row in info["symbols"]}


async def streams_seen(ws: trio_websocket.WebSocketConnection, frames: int,
                       req_id: int) -> set[str]:
    """Stream names of the next `frames` frames, counted only after everything sent before the
    answer to LIST_SUBSCRIPTIONS `req_id` (frames already in flight are not counted)."""
    await ws.send_message(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": req_id}).decode())
    await until_reply(ws, req_id)
    return {orjson.loads(await ws.get_message())["stream"] for _ in range(frames)}


# --- contract types and statuses ---------------------------------------------------------------

async def test_exchange_info_rows_carry_contract_type_and_status(nursery: trio.Nursery) -> None:
    _, ws_url, rest_url = await start_at(
        nursery, NOV_2, symbols=("BTCUSDT", "BTCUSDT_261225", "BTCUSDT_270326"),
        tradfi=("TSLAUSDT", "XAUUSDT"))
    async with httpx.AsyncClient(base_url=rest_url) as http:
        rows = rows_by_symbol((await http.get("/fapi/v1/exchangeInfo")).json())
    kinds = {s: (r["contractType"], r["status"], r["pair"], r["underlyingType"])
             for s, r in rows.items()}
    assert kinds == {
        "BTCUSDT": ("PERPETUAL", "TRADING", "BTCUSDT", "COIN"),
        "BTCUSDT_261225": ("CURRENT_QUARTER", "TRADING", "BTCUSDT", "COIN"),
        "BTCUSDT_270326": ("NEXT_QUARTER", "TRADING", "BTCUSDT", "COIN"),
        "TSLAUSDT": ("TRADIFI_PERPETUAL", "TRADING", "TSLAUSDT", "EQUITY"),
        "XAUUSDT": ("TRADIFI_PERPETUAL", "TRADING", "XAUUSDT", "COMMODITY"),
    }
    assert rows["BTCUSDT_261225"]["deliveryDate"] == 1_798_185_600_000  # 2026-12-25 08:00 UTC
    async with connect(f"{ws_url}/market/ws/btcusdt_261225@markPrice@1s") as ws:
        quarterly = orjson.loads(await ws.get_message())
    assert (quarterly["s"], quarterly["r"], quarterly["T"]) == ("BTCUSDT_261225", "", 0)


# --- listings changing while running -----------------------------------------------------------

async def test_a_symbol_listed_while_running_trades_and_its_named_streams_start(
        start_sim: Start) -> None:
    _, ws_url, rest_url = await start_sim(rate=0, symbols=("BTCUSDT",))
    url = f"{ws_url}/market/stream?streams=btcusdt@aggTrade/newusdt@aggTrade"
    async with connect(url) as ws, httpx.AsyncClient(base_url=rest_url) as http:
        before = await streams_seen(ws, 100, 1)
        listed = await http.post("/sim/market/list", json={"symbol": "NEWUSDT"})
        row = rows_by_symbol((await http.get("/fapi/v1/exchangeInfo")).json())["NEWUSDT"]
        after = await streams_seen(ws, 300, 2)
        again = await http.post("/sim/market/list", json={"symbol": "NEWUSDT"})
        candles = (await http.get("/fapi/v1/klines", params={
            "symbol": "NEWUSDT", "interval": "1m", "limit": 10})).json()
    assert before == {"btcusdt@aggTrade"}
    assert listed.json() == {"symbol": "NEWUSDT", "contractType": "PERPETUAL",
                             "status": "TRADING"}
    assert (row["status"], row["contractType"]) == ("TRADING", "PERPETUAL")
    assert after == {"btcusdt@aggTrade", "newusdt@aggTrade"}
    assert again.status_code == 400
    assert len(candles) == 1  # no history before its listing
    assert candles[0][0] >= row["onboardDate"] - 60_000


async def test_a_delisted_symbol_is_not_trading_and_its_streams_go_quiet(
        start_sim: Start) -> None:
    _, ws_url, rest_url = await start_sim(rate=0, symbols=("BTCUSDT", "ETHUSDT"))
    names = ["btcusdt@aggTrade", "ethusdt@aggTrade", "ethusdt@markPrice@1s", "!markPrice@arr@1s"]
    async with connect(f"{ws_url}/market/stream?streams={'/'.join(names)}") as ws, \
            httpx.AsyncClient(base_url=rest_url) as http:
        before = await streams_seen(ws, 300, 1)
        delisted = await http.post("/sim/market/delist", json={"symbol": "ETHUSDT"})
        after: set[str] = set()
        symbols: set[str] = set()
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":2}')
        listed = await until_reply(ws, 2)
        for _ in range(300):
            msg = orjson.loads(await ws.get_message())
            after.add(msg["stream"])
            if msg["stream"] == "!markPrice@arr@1s":
                symbols |= {row["s"] for row in msg["data"]}
        row = rows_by_symbol((await http.get("/fapi/v1/exchangeInfo")).json())["ETHUSDT"]
        twice = await http.post("/sim/market/delist", json={"symbol": "ETHUSDT"})
    assert before == set(names)
    assert delisted.json() == {"symbol": "ETHUSDT", "status": "SETTLING"}
    assert row["status"] == "SETTLING"
    assert after == {"btcusdt@aggTrade", "!markPrice@arr@1s"}
    assert "ETHUSDT" not in symbols and "BTCUSDT" in symbols
    assert listed["result"] == names  # still subscribed, as on Binance: only quiet
    assert twice.status_code == 400


# --- TradFi sessions ----------------------------------------------------------------------------

async def test_trading_session_stream_sends_one_message_per_market_each_second(
        nursery: trio.Nursery) -> None:
    _, ws_url, _ = await start_at(nursery, NOV_2, tradfi=("TSLAUSDT",))
    async with connect(f"{ws_url}/market/stream?streams=tradingSession") as ws:
        messages = [orjson.loads(await ws.get_message()) for _ in range(6)]
    events = [m["data"] for m in messages]
    assert {m["stream"] for m in messages} == {"tradingSession"}
    assert [e["e"] for e in events[:3]] == ["EquityUpdate", "CommodityUpdate", "KR_EquityUpdate"]
    assert all(list(e) == ["e", "E", "t", "T", "S"] and e["t"] <= e["E"] < e["T"]
               for e in events)
    assert [e["S"] for e in events[:3]] == ["PRE_MARKET", "NO_TRADING", "NO_TRADING"]
    assert events[3]["E"] - events[0]["E"] >= 900  # the next round, a second later


async def test_all_market_mark_price_sends_tradfi_symbols_in_a_message_of_their_own(
        nursery: trio.Nursery) -> None:
    _, ws_url, _ = await start_at(nursery, NOV_2, symbols=("BTCUSDT",),
                                  tradfi=("TSLAUSDT", "XAUUSDT"))
    async with connect(f"{ws_url}/market/stream?streams=!markPrice@arr@1s") as ws:
        first = orjson.loads(await ws.get_message())
        second = orjson.loads(await ws.get_message())
    assert [r["s"] for r in first["data"]] == ["BTCUSDT", "BTCUSD_PERP", "ETHUSD_PERP",
                                               "BNBUSD_PERP"]
    assert [r["s"] for r in second["data"]] == ["TSLAUSDT", "XAUUSDT"]
    assert first["data"][0]["E"] == second["data"][0]["E"]  # the same tick


async def test_trading_schedule_covers_a_week_either_side_without_gaps(
        nursery: trio.Nursery) -> None:
    sim, _, rest_url = await start_at(nursery, NOV_2)
    async with httpx.AsyncClient(base_url=rest_url) as http:
        sim.weight.used = 0
        resp = await http.get("/fapi/v1/tradingSchedule")
    body = resp.json()
    assert resp.headers["X-MBX-USED-WEIGHT-1M"] == "5"
    assert list(body) == ["updateTime", "marketSchedules"]
    assert set(body["marketSchedules"]) == {"EQUITY", "COMMODITY", "KR_EQUITY"}
    allowed = {"EQUITY": {"PRE_MARKET", "REGULAR", "AFTER_MARKET", "OVERNIGHT", "NO_TRADING"},
               "COMMODITY": {"REGULAR", "NO_TRADING"}, "KR_EQUITY": {"REGULAR", "NO_TRADING"}}
    for market, schedule in body["marketSchedules"].items():
        sessions = schedule["sessions"]
        assert all(list(s) == ["startTime", "endTime", "type"] for s in sessions)
        assert {s["type"] for s in sessions} == allowed[market]
        assert all(a["endTime"] == b["startTime"] for a, b in itertools.pairwise(sessions))
        day = 86_400_000
        assert sessions[0]["startTime"] <= body["updateTime"] - 7 * day
        assert sessions[-1]["endTime"] >= body["updateTime"] + 5 * day


async def tally(ws: trio_websocket.WebSocketConnection, seconds: float
                ) -> tuple[dict[str, int], list[dict[str, Any]], list[str]]:
    """For `seconds`: frames per stream, TSLAUSDT's mark price events, US equity sessions."""
    counts: dict[str, int] = {}
    marks: list[dict[str, Any]] = []
    sessions: list[str] = []
    with trio.move_on_after(seconds):
        while True:
            msg = orjson.loads(await ws.get_message())
            counts[msg["stream"]] = counts.get(msg["stream"], 0) + 1
            if msg["stream"] == "tslausdt@markPrice@1s":
                marks.append(msg["data"])
            elif msg["data"]["e"] == "EquityUpdate":
                sessions.append(msg["data"]["S"])
    return counts, marks, sessions


async def test_a_tradfi_symbol_out_of_session_trades_thinly_and_its_index_stays(
        nursery: trio.Nursery) -> None:
    _, ws_url, rest_url = await start_at(nursery, NOV_2, symbols=("BTCUSDT",),
                                         tradfi=("TSLAUSDT",), tradfi_hours="open")
    streams = "btcusdt@aggTrade/tslausdt@aggTrade/tslausdt@markPrice@1s/tradingSession"
    async with httpx.AsyncClient(base_url=rest_url) as http:
        closed = await http.post("/sim/market/session", json={"symbol": "TSLAUSDT",
                                                              "type": "NO_TRADING"})
        async with connect(f"{ws_url}/market/stream?streams={streams}") as ws:
            counts, marks, sessions = await tally(ws, 2.5)
        schedule = (await http.get("/fapi/v1/tradingSchedule")).json()
        reopened = await http.post("/sim/market/session", json={"market": "EQUITY",
                                                                "type": None})
    assert closed.json()["type"] == "NO_TRADING" and reopened.json()["type"] == "REGULAR"
    assert set(sessions) == {"NO_TRADING"}
    # Binance's TradFi perpetuals trade around the clock, thinly outside the session
    assert 0 < counts["tslausdt@aggTrade"] * 3 < counts["btcusdt@aggTrade"]
    assert len(marks) >= 2 and len({m["i"] for m in marks}) == 1  # an equity's index is fixed
    assert len({m["p"] for m in marks}) > 1  # while its mark price moves
    now = schedule["updateTime"]
    current = next(s for s in schedule["marketSchedules"]["EQUITY"]["sessions"]
                   if s["startTime"] <= now < s["endTime"])
    assert current["type"] == "NO_TRADING"


async def test_quiet_off_hours_send_nothing_until_the_session_opens(
        nursery: trio.Nursery) -> None:
    _, ws_url, rest_url = await start_at(nursery, NOV_2, rate=0, symbols=("BTCUSDT",),
                                         tradfi=("XAUUSDT",), tradfi_hours="closed",
                                         tradfi_off_hours="quiet")
    streams = "btcusdt@aggTrade/xauusdt@aggTrade/xauusdt@kline_1m"
    async with connect(f"{ws_url}/market/stream?streams={streams}") as ws, \
            httpx.AsyncClient(base_url=rest_url) as http:
        closed = await streams_seen(ws, 200, 1)
        await http.post("/sim/market/session", json={"market": "COMMODITY", "type": "REGULAR"})
        opened = await streams_seen(ws, 300, 2)
        bad = await http.post("/sim/market/session", json={"market": "COMMODITY",
                                                           "type": "OVERNIGHT"})
    assert closed == {"btcusdt@aggTrade"}
    assert opened == {"btcusdt@aggTrade", "xauusdt@aggTrade", "xauusdt@kline_1m"}
    assert bad.status_code == 400
