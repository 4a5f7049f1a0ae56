"""How fast the simulator sends with rate=0, over one connection (a benchmark, not a test).

    .venv/bin/python bench/bench_simulator.py [--seconds 5]

Starts `pipeline simulate --rate 0` as its own process, then for each stream set measures
(1) what the simulator sends to a raw socket that only drains bytes (no websocket parsing: the
simulator's own ceiling, counted by /sim/stats) and (2) what a bare trio-websocket
`get_message()` loop receives (the reference an ingestor is compared with). Prints a table and
writes JSON to bench/results/simulator.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
STREAM_SETS = {
    "markPrice@1s+aggTrade+kline_1m": "/market/stream?streams="
                                      "btcusdt@markPrice@1s/btcusdt@aggTrade/btcusdt@kline_1m",
    "depth20@100ms": "/public/stream?streams=btcusdt@depth20@100ms",
}
HANDSHAKE = ("GET {path} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def raw_drain(ws_url: str, rest_url: str, path: str, seconds: float) -> float:
    parts = urlsplit(ws_url)
    assert parts.hostname and parts.port
    async with await trio.open_tcp_stream(parts.hostname, parts.port) as stream, \
            httpx.AsyncClient(base_url=rest_url) as http:
        await stream.send_all(HANDSHAKE.format(path=path).encode())
        await stream.receive_some(1 << 20)
        before = (await http.get("/sim/stats")).json()["frames_total"]
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await stream.receive_some(1 << 20)
        elapsed = time.perf_counter() - start
        after = (await http.get("/sim/stats")).json()["frames_total"]
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


async def measure(ws_url: str, rest_url: str, seconds: float) -> dict[str, dict[str, float]]:
    out = {}
    for name, path in STREAM_SETS.items():
        out[name] = {"raw_drain_sent_per_s": await raw_drain(ws_url, rest_url, path, seconds),
                     "bare_trio_websocket_per_s": await bare_loop(ws_url, path, seconds)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "pipeline", "simulate", "--rate", "0"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            ws_url, rest_url = line[2][3:], line[3][5:]
            results = trio.run(measure, ws_url, rest_url, args.seconds)
        finally:
            proc.terminate()
    print(f"{'streams':34} {'sent to raw drain/s':>20} {'bare trio-websocket/s':>22}")
    for name, r in results.items():
        print(f"{name:34} {r['raw_drain_sent_per_s']:>20,.0f} "
              f"{r['bare_trio_websocket_per_s']:>22,.0f}")
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "simulator.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
