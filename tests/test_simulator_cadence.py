"""The whole-market cadence mode (issue #16): each stream at its own rate, heavy-tailed trades,
a crash phase, the same events for the same seed.

The rates are checked on the pure market, driven through a minute of market time in
milliseconds of test time; the server's part (its clock task, the outboxes, the HTTP switch)
over real sockets.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import trio
import trio_websocket

from pipeline.simulator import server
from pipeline.simulator.cadence import Crash, Schedule
from pipeline.simulator.listings import market_symbols
from pipeline.simulator.market import Market, Outbox, parse_stream
from tests.conftest import run_cli
from tests.simulator_support import Start, connect, sim_starter
from tests.test_simulator_market import LocalBook

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = market_symbols(("BTCUSDT", "ETHUSDT"), 550)
TAIL = SYMBOLS[499].lower()  # the 500th symbol by trading
NOW_MS = 1_793_615_400_000
WINDOW = 1.5  # seconds of streaming read per phase


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> Start:
    return sim_starter(nursery)


def run_market(names: list[str], seconds: float, seed: int = 1,
               crash: Crash | None = None, chunk: float = math.inf
               ) -> list[tuple[float, str, str]]:
    """(market time, stream, payload) of every frame the market makes for one reader of
    `names` subscribed at time 0, through `seconds` of market time in 10 ms steps; each step
    made `chunk` clocks at a time, the frames taken between chunks (as the server does)."""
    market = Market(SYMBOLS, seed, cadence_mode=True, crash=crash, now_ms=NOW_MS)
    box = Outbox(lambda: None)
    for name in names:
        spec = parse_stream(name, market.streaming())
        assert spec is not None, name
        market.open_stream(spec, False, box, 0.0)
    out = []
    for step in range(1, int(seconds * 100) + 1):
        t = step / 100
        while True:
            market.advance(t, chunk)
            while box.pending:
                state = box.pending.popleft()
                payload = market.take(state)
                if payload is not None:
                    out.append((t, state.spec.name, payload))
            if market.schedule.next_due() > t:
                break
    return out


def per_second(frames: list[tuple[float, str, str]], name: str, seconds: int) -> list[int]:
    counts = Counter(int(t - 0.001) for t, n, _ in frames if n == name)
    return [counts[s] for s in range(seconds)]


def test_same_seed_same_events_in_the_same_order_and_another_seed_differs() -> None:
    names = ["btcusdt@aggTrade", "btcusdt@depth@100ms", "btcusdt@kline_1m",
             "ethusdt@markPrice@1s", "btcusdt@bookTicker", "!markPrice@arr@1s"]
    first, again, other = (run_market(names, 3, seed=s) for s in (3, 3, 4))
    assert first == again
    assert [p for *_, p in first] != [p for *_, p in other]
    assert {n for _, n, _ in first} == set(names)


def test_a_tick_made_in_chunks_gives_the_same_events_in_the_same_order() -> None:
    names = ["btcusdt@aggTrade", "btcusdt@depth@100ms", "ethusdt@kline_1m",
             "btcusdt@bookTicker", "btcusdt@forceOrder", "!markPrice@arr@1s",
             *(f"{s.lower()}@markPrice@1s" for s in SYMBOLS[:120])]
    whole = run_market(names, 3, seed=6)
    assert len({t for t, n, _ in whole if n.endswith("@markPrice@1s")}) == 4  # 0 s to 3 s
    assert run_market(names, 3, seed=6, chunk=7) == whole
    assert run_market(names, 3, seed=6, chunk=1) == whole


def test_the_schedule_fires_in_time_then_added_order_and_a_limit_resumes_in_place() -> None:
    fired: list[str] = []

    def clock(name: str, *gaps: float) -> Callable[[float], float | None]:
        left = list(gaps)

        def fire(due: float) -> float | None:
            fired.append(f"{name}@{due:g}")
            return due + left.pop(0) if left else None
        return fire

    schedule = Schedule()
    schedule.add(1.0, clock("a", 1.0))  # a grid time shared by a, b, c
    schedule.add(0.5, clock("r", 0.5, 0.7))  # a random clock: 0.5, then 1.0 (added after a)
    schedule.add(1.0, clock("b", 0.0))  # answers its own time again: goes last at 1.0
    schedule.add(1.0, clock("c"))
    assert schedule.next_due() == 0.5
    assert schedule.run_until(1.0, limit=3) == 3  # r@0.5, then a and b of 1.0
    assert schedule.next_due() == 1.0
    assert schedule.run_until(1.0) == 3 and schedule.run_until(1.0) == 0
    assert fired == ["r@0.5", "a@1", "b@1", "c@1", "r@1", "b@1"]
    assert schedule.run_until(5.0) == 2 and fired[-2:] == ["r@1.7", "a@2"]
    assert schedule.next_due() == math.inf


def test_each_stream_keeps_its_own_cadence() -> None:
    names = ["btcusdt@markPrice@1s", "btcusdt@markPrice", "btcusdt@kline_1m",
             "btcusdt@depth20@100ms", "btcusdt@depth@500ms", "btcusdt@depth", "tradingSession"]
    frames = run_market(names, 30)
    counts = Counter(n for _, n, _ in frames)
    # aligned on the market clock from time 0, so one more than the periods in 30 s
    assert counts == {"btcusdt@markPrice@1s": 31, "btcusdt@markPrice": 11,
                      "btcusdt@kline_1m": 121, "btcusdt@depth20@100ms": 301,
                      "btcusdt@depth@500ms": 61, "btcusdt@depth": 121,
                      "tradingSession": 3 * 31}  # one message per market
    marks = [orjson.loads(p)["E"] for _, n, p in frames if n == "btcusdt@markPrice@1s"]
    assert all(e % 1000 == 0 for e in marks)  # on the second, as Binance's are


def test_trades_are_heavy_tailed_across_symbols_and_bursty_within_one() -> None:
    frames = run_market(["btcusdt@aggTrade", "ethusdt@aggTrade", f"{TAIL}@aggTrade"], 60)
    counts = Counter(n for _, n, _ in frames)
    btc = counts["btcusdt@aggTrade"]
    assert 70 * 60 < btc < 130 * 60  # BTCUSDT about 100 a second
    assert counts["ethusdt@aggTrade"] < btc
    assert counts[f"{TAIL}@aggTrade"] * 50 < btc  # the tail trades rarely
    windows = Counter(int(t * 10 - 0.01) for t, n, _ in frames if n == "btcusdt@aggTrade")
    assert max(windows.values()) >= 5 * btc / 600  # some 100 ms hold five times the mean
    assert min(windows.get(w, 0) for w in range(600)) <= btc / 600 / 3  # some almost nothing


def test_the_crash_phase_multiplies_trades_and_book_changes() -> None:
    names = ["btcusdt@aggTrade", "btcusdt@depth@100ms"]
    frames = run_market(names, 60, crash=Crash(5.0, 20.0, 20.0))
    trades = per_second(frames, "btcusdt@aggTrade", 60)
    calm, crash, after = sum(trades[:20]), sum(trades[20:40]), sum(trades[40:])
    assert 3 * calm < crash < 8 * calm and 3 * after < crash

    def book_updates(lo: float, hi: float) -> int:  # update ids the diff events covered
        return sum(d["u"] - d["pu"] for t, n, p in frames
                   if n == "btcusdt@depth@100ms" and lo < t <= hi for d in [orjson.loads(p)])
    assert book_updates(20, 40) > 3 * book_updates(0, 20)


def test_a_symbol_read_again_trades_at_its_rate_not_twice_it() -> None:
    market = Market(SYMBOLS, 1, cadence_mode=True, now_ms=NOW_MS)
    box = Outbox(lambda: None)
    spec = parse_stream("btcusdt@aggTrade", market.streaming())
    assert spec is not None
    market.close_stream(market.open_stream(spec, False, box, 0.0))
    state = market.open_stream(spec, False, box, 0.0)  # before the first clock noticed
    market.advance(30.0)
    assert 70 * 30 < len(box.pending) < 130 * 30
    assert all(p is state for p in box.pending)


async def test_cadence_over_sockets_each_stream_at_its_rate_and_the_crash_switch(
        start_sim: Start) -> None:
    _, ws_url, rest_url = await start_sim(cadence=True, market_size=550, seed=2)
    market = ["btcusdt@aggTrade", "btcusdt@markPrice@1s", "btcusdt@kline_1m",
              f"{TAIL}@aggTrade"]
    async with connect(f"{ws_url}/market/stream?streams={'/'.join(market)}") as mkt, \
            connect(f"{ws_url}/public/stream?streams=btcusdt@depth20@100ms") as pub, \
            httpx.AsyncClient(base_url=rest_url) as http:
        info = (await http.get("/fapi/v1/exchangeInfo")).json()
        calm = await event_times(mkt, pub, WINDOW)
        switched = (await http.post("/sim/market/crash", json={"on": True})).json()
        crash = await event_times(mkt, pub, WINDOW)
        stats = (await http.get("/sim/stats")).json()
        stopped = (await http.post("/sim/market/crash", json={"on": False})).json()
    assert len(info["symbols"]) == 550
    assert switched == {"crash": True, "multiplier": 5.0} and stopped["crash"] is False
    assert stats["cadence"] is True and stats["crash"] is True
    # fixed cadences: E steps by the period (a kline's when its candle changed, which
    # BTCUSDT's nearly always has), nothing doubled
    for name, period in (("btcusdt@markPrice@1s", 1000), ("btcusdt@kline_1m", 250),
                         ("btcusdt@depth20@100ms", 100)):
        for times in (calm[name], crash[name]):
            assert len(times) >= WINDOW * 1000 // period - 2
            assert all(b > a and (b - a) % period == 0 for a, b in itertools.pairwise(times))
    trades = [len(t["btcusdt@aggTrade"]) for t in (calm, crash)]
    assert trades[0] > 20 and trades[1] > 2 * trades[0]
    assert len(calm[f"{TAIL}@aggTrade"]) < trades[0] / 10


async def test_a_whole_second_is_made_in_chunks_and_its_first_frames_leave_before_its_last(
        start_sim: Start) -> None:
    sim, ws_url, _ = await start_sim(cadence=True, market_size=550, seed=2)
    schedule = sim.market.schedule
    run_until = schedule.run_until
    calls: list[tuple[int, int, bool]] = []  # (frames written before, clocks fired, tick done)

    def recording(t: float, limit: float = math.inf) -> int:
        before = sim.frames_total
        fired = run_until(t, limit)
        calls.append((before, fired, schedule.next_due() > t))
        return fired

    schedule.run_until = recording  # type: ignore[method-assign]
    names = [f"{s.lower()}@markPrice@1s" for s in SYMBOLS]
    seconds: Counter[int] = Counter()
    async with connect(f"{ws_url}/market/stream?streams={'/'.join(names)}") as ws:
        while len(seconds) < 3:
            msg = orjson.loads(await ws.get_message())
            seconds[msg["data"]["E"]] += 1
    # every mark price of a second carries that second, however it was sent
    assert all(e % 1000 == 0 for e in seconds)
    assert all(n == 550 for e, n in seconds.items() if e not in (min(seconds), max(seconds)))
    # a tick cut into chunks, and frames written between its chunks
    cut = [i for i, (_, fired, done) in enumerate(calls)
           if fired == server.CADENCE_CHUNK and not done]
    assert cut
    assert any(calls[i + 1][0] > calls[i][0] for i in cut if i + 1 < len(calls))


async def test_a_reader_that_stalls_gets_every_frame_whole_once_it_reads_again(
        start_sim: Start) -> None:
    """The market's clock writes a connection's frames itself while the socket takes them;
    what a full socket does not take waits (`LockedStream.backlog`) and goes out first later."""
    sim, ws_url, _ = await start_sim(cadence=True, market_size=550, seed=3)
    traded = [s.lower() for s in SYMBOLS[:30]]
    names = [f"{s}@aggTrade" for s in traded] + [f"{s.lower()}@markPrice@1s" for s in SYMBOLS]
    parts = urlsplit(ws_url)
    assert parts.hostname is not None and parts.port is not None
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills within a second
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    trades: dict[str, list[int]] = {}
    marks: dict[str, list[int]] = {}
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, parts.hostname, f"/market/stream?streams={'/'.join(names)}",
                max_message_size=4 * 1024 * 1024)
            with trio.fail_after(20):  # not reading: the clock's writes stop short
                while True:
                    if any(c.stream.short_writes for c in sim.connections.values()):
                        break
                    await trio.sleep(0.02)
            await trio.sleep(0.5)  # and the sender's wait for the socket, meanwhile
            with trio.move_on_after(2.5):
                while True:
                    msg = orjson.loads(await ws.get_message())  # each frame whole
                    data = msg["data"]
                    if data["e"] == "aggTrade":
                        trades.setdefault(data["s"], []).append(data["a"])
                    else:
                        marks.setdefault(data["s"], []).append(data["E"])
            await ws.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    assert len(marks) == 550 and sum(map(len, trades.values())) > 50
    # nothing lost, nothing twice, in order
    assert all(b == a + 1 for ids in trades.values() for a, b in itertools.pairwise(ids))
    assert all(b == a + 1000 for es in marks.values() for a, b in itertools.pairwise(es))


async def event_times(mkt: Any, pub: Any, seconds: float) -> dict[str, list[int]]:
    """The event times (E) of each stream's frames on both connections for `seconds`."""
    times: dict[str, list[int]] = {}

    async def read(ws: Any) -> None:
        while True:
            msg = orjson.loads(await ws.get_message())
            seen = times.setdefault(msg["stream"], [])
            assert not seen or msg["data"]["E"] >= seen[-1]  # each stream in time order
            seen.append(msg["data"]["E"])

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, mkt)
            nursery.start_soon(read, pub)
    return {name: times.get(name, []) for name in (
        "btcusdt@aggTrade", "btcusdt@markPrice@1s", "btcusdt@kline_1m", f"{TAIL}@aggTrade",
        "btcusdt@depth20@100ms")}


async def test_cadence_diff_depth_follows_binance_sequencing_against_a_snapshot(
        start_sim: Start) -> None:
    sim, ws_url, rest_url = await start_sim(cadence=True, symbols=("BTCUSDT",))
    async with connect(f"{ws_url}/public/stream?streams=btcusdt@depth@100ms") as ws, \
            httpx.AsyncClient(base_url=rest_url) as http:
        buffered = [orjson.loads(await ws.get_message())["data"] for _ in range(3)]
        snap = (await http.get("/fapi/v1/depth",
                               params={"symbol": "BTCUSDT", "limit": 1000})).json()
        book = LocalBook(snap)
        applied = sum(book.apply(e) for e in buffered)
        while applied < 8:
            applied += book.apply(orjson.loads(await ws.get_message())["data"])
        sim.set_silence(True)
        later = (await http.get("/fapi/v1/depth",
                                params={"symbol": "BTCUSDT", "limit": 1000})).json()
    # the snapshot is of now; the events the client applied stop at or before it
    assert later["lastUpdateId"] >= book.prev_u


def test_the_command_lists_the_whole_market_tradfi_and_runs_the_cadence() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    argv = [sys.executable, "-m", "pipeline", "simulate", "--cadence", "--market-size", "20",
            "--tradfi", "TSLAUSDT", "--tradfi-hours", "open", "--no-coinm", "--seed", "3"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            rest_url = proc.stdout.readline().split()[-1].removeprefix("rest=")
            info = httpx.get(f"{rest_url}/fapi/v1/exchangeInfo", timeout=10).json()
            stats = httpx.get(f"{rest_url}/sim/stats", timeout=10).json()
            rate = httpx.post(f"{rest_url}/sim/rate", json={"rate": 5}, timeout=10)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    kinds = {r["symbol"]: r["contractType"] for r in info["symbols"]}
    assert len(kinds) == 21 and kinds["TSLAUSDT"] == "TRADIFI_PERPETUAL"
    assert stats["cadence"] is True and stats["symbols_trading"] == 21
    assert rate.status_code == 400  # the cadence paces every stream itself


def test_cadence_refuses_a_rate_and_the_command_says_which_flag() -> None:
    result = run_cli("simulate", "--cadence", "--rate", "5", timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("pipeline: bad setting --cadence")


def test_market_symbols_are_the_configured_then_well_known_then_generated_names() -> None:
    assert SYMBOLS[:3] == ("BTCUSDT", "ETHUSDT", "SOLUSDT") and len(set(SYMBOLS)) == 550
    assert all(s.endswith("USDT") and s[:-4].isalnum() for s in SYMBOLS)
    assert market_symbols(("FOOUSDT",), 3) == ("FOOUSDT", "BTCUSDT", "ETHUSDT")
    assert list(itertools.islice(SYMBOLS, 550)) == list(market_symbols(("BTCUSDT",
                                                                        "ETHUSDT"), 550))
