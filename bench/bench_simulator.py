"""What the simulator costs and how fast it sends (a benchmark, not a test).

    .venv/bin/python bench/bench_simulator.py [--seconds 5] [--only flat|cadence]

Two measurements, each against `pipeline simulate` in its own process:

- flat: `--rate 0`, one connection per stream set. It reports (1) what the simulator sends to a
  raw socket that only drains bytes (no websocket parsing: the simulator's own ceiling, counted
  by /sim/stats) and (2) what a bare trio-websocket `get_message()` loop receives (the reference
  an ingestor is compared with).
- cadence: `--cadence --market-size 550`, the whole market as issue #16 describes it:
  markPrice@1s, aggTrade and kline_1m for all 550 symbols on two /market connections, and
  depth20@100ms for the 10 most traded on /public, subscribed with SUBSCRIBE messages as the
  ingestor does. Raw sockets drain the bytes, so the client costs next to nothing. It reports
  the frames the simulator sent per second and its own CPU time (from /proc) per 1,000 frames,
  calm and then in the crash phase (`POST /sim/market/crash`).

Prints a table and writes JSON to bench/results/simulator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.simulator.listings import market_symbols  # noqa: E402

STREAM_SETS = {
    "markPrice@1s+aggTrade+kline_1m": "/market/stream?streams="
                                      "btcusdt@markPrice@1s/btcusdt@aggTrade/btcusdt@kline_1m",
    "depth20@100ms": "/public/stream?streams=btcusdt@depth20@100ms",
}
HANDSHAKE = ("GET {path} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MARKET_SIZE = 550
TRADED = 10  # symbols whose depth20@100ms a team reads
SUBSCRIBE_BATCH = 200  # names per SUBSCRIBE, one message every 0.2 s (Binance allows 10/s)


# --- processes and sockets --------------------------------------------------------------------

def start_simulator(*flags: str) -> tuple[subprocess.Popen[str], str, str]:
    cmd = [sys.executable, "-m", "pipeline", "simulate", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, line[2][3:], line[3][5:]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_text_frame(text: str) -> bytes:
    """A masked client-to-server text frame (RFC 6455 section 5.3)."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_socket(ws_url: str, path: str) -> trio.SocketStream:
    parts = urlsplit(ws_url)
    assert parts.hostname and parts.port
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    await stream.send_all(HANDSHAKE.format(path=path).encode())
    await stream.receive_some(1 << 16)
    return stream


async def drain(stream: trio.SocketStream) -> None:
    while await stream.receive_some(1 << 20):
        pass


async def frames_sent(http: httpx.AsyncClient) -> int:
    return int((await http.get("/sim/stats")).json()["frames_total"])


# --- flat out ---------------------------------------------------------------------------------

async def raw_drain(ws_url: str, rest_url: str, path: str, seconds: float) -> float:
    async with await raw_socket(ws_url, path) as stream, \
            httpx.AsyncClient(base_url=rest_url) as http:
        before = await frames_sent(http)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await stream.receive_some(1 << 20)
        elapsed = time.perf_counter() - start
        after = await frames_sent(http)
    return (after - before) / elapsed


async def bare_loop(ws_url: str, path: str, seconds: float) -> float:
    async with trio_websocket.open_websocket_url(ws_url + path,
                                                 max_message_size=4 << 20) as ws:
        for _ in range(1000):  # warm up
            await ws.get_message()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            await ws.get_message()
            count += 1
        return count / (time.perf_counter() - start)


async def measure_flat(ws_url: str, rest_url: str, seconds: float) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, path in STREAM_SETS.items():
        out[name] = {"raw_drain_sent_per_s": await raw_drain(ws_url, rest_url, path, seconds),
                     "bare_trio_websocket_per_s": await bare_loop(ws_url, path, seconds)}
    return out


# --- the whole market -------------------------------------------------------------------------

def whole_market_plan() -> list[tuple[str, list[str]]]:
    """(path, stream names) of each connection, as the ingestor would plan them."""
    symbols = [s.lower() for s in market_symbols(("BTCUSDT", "ETHUSDT", "SOLUSDT"),
                                                 MARKET_SIZE)]
    market = [f"{s}@{k}" for s in symbols for k in ("markPrice@1s", "aggTrade", "kline_1m")]
    half = len(market) // 2
    public = [f"{s}@depth20@100ms" for s in symbols[:TRADED]]
    return [("/market/ws", market[:half]), ("/market/ws", market[half:]),
            ("/public/ws", public)]


async def subscribe(stream: trio.SocketStream, names: list[str]) -> None:
    for i in range(0, len(names), SUBSCRIBE_BATCH):
        params = names[i:i + SUBSCRIBE_BATCH]
        msg = orjson.dumps({"method": "SUBSCRIBE", "params": params, "id": i}).decode()
        await stream.send_all(client_text_frame(msg))
        await trio.sleep(0.2)


async def sample(http: httpx.AsyncClient, pid: int, seconds: float) -> dict[str, float]:
    frames0, cpu0, t0 = await frames_sent(http), cpu_seconds(pid), time.perf_counter()
    await trio.sleep(seconds)
    frames1, cpu1, t1 = await frames_sent(http), cpu_seconds(pid), time.perf_counter()
    frames, cpu, wall = frames1 - frames0, cpu1 - cpu0, t1 - t0
    return {"frames_per_s": frames / wall, "cpu_share_of_a_core": cpu / wall,
            "cpu_ms_per_1000_frames": 1e6 * cpu / frames if frames else float("nan")}


async def measure_cadence(ws_url: str, rest_url: str, pid: int, seconds: float
                          ) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=rest_url) as http, trio.open_nursery() as nursery:
        for path, names in whole_market_plan():
            stream = await raw_socket(ws_url, path)
            nursery.start_soon(drain, stream)
            await subscribe(stream, names)
        await trio.sleep(3.0)  # books built, feeds running
        calm = await sample(http, pid, seconds)
        await http.post("/sim/market/crash", json={"on": True})
        await trio.sleep(1.0)
        crash = await sample(http, pid, seconds)
        nursery.cancel_scope.cancel()
    return {"symbols": MARKET_SIZE, "streams": sum(len(n) for _, n in whole_market_plan()),
            "calm": calm, "crash": crash}


def report(results: dict[str, object]) -> None:
    flat = results.get("flat")
    if isinstance(flat, dict):
        print(f"{'flat out: streams':34} {'sent to raw drain/s':>20} "
              f"{'bare trio-websocket/s':>22}")
        for name, r in flat.items():
            print(f"{name:34} {r['raw_drain_sent_per_s']:>20,.0f} "
                  f"{r['bare_trio_websocket_per_s']:>22,.0f}")
    cadence = results.get("cadence")
    if isinstance(cadence, dict):
        print(f"\ncadence, {cadence['symbols']} symbols, {cadence['streams']} streams")
        print(f"{'phase':8} {'frames/s':>10} {'CPU (cores)':>12} {'CPU ms/1000 frames':>20}")
        for phase in ("calm", "crash"):
            r = cadence[phase]
            print(f"{phase:8} {r['frames_per_s']:>10,.0f} {r['cpu_share_of_a_core']:>12.2f} "
                  f"{r['cpu_ms_per_1000_frames']:>20.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=("flat", "cadence"), default=None)
    args = parser.parse_args()
    results: dict[str, object] = {}
    if args.only in (None, "flat"):
        proc, ws_url, rest_url = start_simulator("--rate", "0")
        try:
            results["flat"] = trio.run(measure_flat, ws_url, rest_url, args.seconds)
        finally:
            proc.terminate()
    if args.only in (None, "cadence"):
        proc, ws_url, rest_url = start_simulator("--cadence", "--market-size",
                                                 str(MARKET_SIZE), "--seed", "1")
        try:
            results["cadence"] = trio.run(measure_cadence, ws_url, rest_url, proc.pid,
                                          args.seconds)
        finally:
            proc.terminate()
    report(results)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "simulator.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
