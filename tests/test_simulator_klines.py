"""`GET /fapi/v1/klines` against the kline stream, as a client sees both (real HTTP and sockets).

A client takes REST history and then the stream: the open times must follow on with no hole,
and a candle the stream closed (`"x":true`) must be the one REST returns for that open time.
The simulator's clock runs 120 times faster here, so a 1m candle lasts half a second.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import orjson
import pytest
import trio

from pipeline.simulator import SimConfig, Simulator
from tests.simulator_support import Start, connect, fast_clock, sim_starter

MINUTE = 60_000
FIELDS = ("o", "h", "l", "c", "v", "n", "q", "V", "Q")  # kline k{} fields, REST row 1..10


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> Start:
    return sim_starter(nursery)


def row_as_kline(row: list[Any]) -> dict[str, Any]:
    return {"t": row[0], "o": row[1], "h": row[2], "l": row[3], "c": row[4], "v": row[5],
            "T": row[6], "q": row[7], "n": row[8], "V": row[9], "Q": row[10]}


async def klines(http: httpx.AsyncClient, **params: Any) -> httpx.Response:
    return await http.get("/fapi/v1/klines", params={"symbol": "BTCUSDT", "interval": "1m",
                                                     **params})


async def test_klines_rows_have_binance_shape_and_contiguous_open_times(
        start_sim: Start) -> None:
    sim, _, rest_url = await start_sim(symbols=("BTCUSDT",))
    async with httpx.AsyncClient(base_url=rest_url) as http:
        rows = (await klines(http)).json()
        now_ms = int(sim.clock() * 1000)
    assert len(rows) == 500  # the default limit
    assert all([type(x) for x in r] == [int, str, str, str, str, str, int, str, int, str, str,
                                        str] for r in rows)
    opens = [r[0] for r in rows]
    assert all(b - a == MINUTE for a, b in itertools.pairwise(opens))
    assert opens[-1] == now_ms - now_ms % MINUTE  # the last row is the candle open now
    assert all(r[6] == r[0] + MINUTE - 1 for r in rows)
    assert all(float(r[2]) >= max(float(r[1]), float(r[4])) and
               float(r[3]) <= min(float(r[1]), float(r[4])) for r in rows)
    assert all(b[1] == a[4] for a, b in itertools.pairwise(rows))  # open = last close


async def test_klines_weight_follows_the_limit_and_bad_requests_get_binance_errors(
        start_sim: Start) -> None:
    sim, _, rest_url = await start_sim(symbols=("BTCUSDT",))
    weights = {}
    async with httpx.AsyncClient(base_url=rest_url) as http:
        for limit in (1, 99, 100, 499, 500, 1000, 1001, 1500):
            sim.weight.used = 0
            resp = await klines(http, limit=limit)
            assert len(resp.json()) == limit
            weights[limit] = int(resp.headers["X-MBX-USED-WEIGHT-1M"])
        errors = [(await klines(http, **params)).json()["code"] for params in (
            {"limit": 1501}, {"interval": "1s"}, {"symbol": "NOPEUSDT"},
            {"startTime": 2_000_000_000_000, "endTime": 1_000_000_000_000})]
        missing = await http.get("/fapi/v1/klines", params={"symbol": "BTCUSDT"})
    # Binance's documented weights: [1,100) 1, [100,500) 2, [500,1000] 5, over 1000 10
    assert weights == {1: 1, 99: 1, 100: 2, 499: 2, 500: 5, 1000: 5, 1001: 10, 1500: 10}
    assert errors == [-1130, -1120, -1121, -1023]
    assert missing.status_code == 400 and missing.json()["code"] == -1102


async def test_klines_start_and_end_times_select_open_times(start_sim: Start) -> None:
    _, _, rest_url = await start_sim(symbols=("BTCUSDT",))
    async with httpx.AsyncClient(base_url=rest_url) as http:
        latest = (await klines(http, limit=10)).json()
        t0, t9 = latest[0][0], latest[-1][0]
        ranged = (await klines(http, startTime=t0 + 1, endTime=t9 - 1)).json()
        ending = (await klines(http, endTime=t9 - 1, limit=3)).json()
        starting = (await klines(http, startTime=t0, limit=2)).json()
        future = (await klines(http, startTime=t9 + 10 * MINUTE)).json()
    assert [r[0] for r in ranged] == [r[0] for r in latest[1:-1]]
    assert [r[0] for r in ending] == [r[0] for r in latest[-4:-1]]
    assert starting == latest[:2]
    assert future == []


async def test_history_before_the_simulator_started_is_the_same_every_time(
        nursery: trio.Nursery) -> None:
    clock = fast_clock(1.0, start=1_793_615_400.0)  # 2026-11-02 09:10 UTC: mid-hour
    answers = []
    for _ in range(2):
        sim = Simulator(SimConfig(symbols=("BTCUSDT",), seed=9), clock=clock)
        _, rest_url = await nursery.start(sim.run)
        async with httpx.AsyncClient(base_url=rest_url) as http:
            week_ago = int(clock() * 1000) - 7 * 86_400_000
            answers.append((await klines(http, interval="1h", endTime=week_ago,
                                         limit=200)).json())
    assert answers[0] == answers[1] and len(answers[0]) == 200


async def test_rest_history_then_the_stream_has_no_hole_and_one_version_of_each_candle(
        nursery: trio.Nursery) -> None:
    sim = Simulator(SimConfig(symbols=("BTCUSDT",)), clock=fast_clock(120))
    ws_url, rest_url = await nursery.start(sim.run)
    streams = "btcusdt@kline_1m/btcusdt@aggTrade"  # trades make the candles move
    async with httpx.AsyncClient(base_url=rest_url) as http:
        history = [row_as_kline(r) for r in (await klines(http, limit=5)).json()]
        seen: list[dict[str, Any]] = []
        async with connect(f"{ws_url}/market/stream?streams={streams}") as ws:
            while sum(k["x"] for k in seen) < 3:
                msg = orjson.loads(await ws.get_message())
                if msg["stream"] == "btcusdt@kline_1m":
                    seen.append(msg["data"]["k"])
        after = {r[0]: row_as_kline(r) for r in (await klines(http, limit=10)).json()}
    # the stream starts at REST's last candle, the one still open, or the next one
    assert seen[0]["t"] in (history[-1]["t"], history[-1]["t"] + MINUTE)
    opens = sorted({k["t"] for k in seen})
    assert all(b - a == MINUTE for a, b in itertools.pairwise(opens))
    closes = [k for k in seen if k["x"]]
    assert len({k["t"] for k in closes}) == len(closes)  # each candle closes once
    for k in closes:  # what the stream closed is what REST answers for that open time
        assert {f: k[f] for f in FIELDS} == {f: after[k["t"]][f] for f in FIELDS}
    # a candle the stream showed after it closed is a later one
    assert all(k["t"] > c["t"] for c in closes for k in seen[seen.index(c) + 1:])
