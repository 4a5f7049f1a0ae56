"""What the simulator costs and how fast it sends (a benchmark, not a test).

    .venv/bin/python bench/bench_simulator.py [--seconds 5] [--only flat|cadence]
    .venv/bin/python bench/bench_simulator.py --only cadence --compare DIR [--rounds 3]
    .venv/bin/python bench/bench_simulator.py --only market --seconds 20 --compare DIR

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
  calm and then in the crash phase (`POST /sim/market/crash`, x5, then x20 unless
  `--multipliers` says otherwise), and the simulator's own lag: each drain notes when each
  chunk of bytes arrived, and afterwards every frame's receipt time - its `E` (the tick it was
  made in) gives p50 / p99 per family (markPrice, kline, aggTrade, depth), as
  bench_full_market.py's observer does.

- market (`--only market`, not part of the default run): the cadence market alone, no
  sockets, no trio, in a process of its own: the same 1,660 streams (depth20@100ms of the
  50 most traded, as bench_full_market.py reads them) driven through `--seconds` of market
  time in 5 ms ticks, each tick's frames taken and framed as the server's sender does. It
  reports the process's CPU time per 1,000 frames, calm and at x5 (the least noisy figure of
  the market's cost), and a SHA-256 of every connection's bytes: two versions that make the
  same events for the same seed print the same digest.

`--compare DIR` runs the cadence (or market) measurement against two versions of the simulator,
alternately (DIR first, then this checkout, `--rounds` times): DIR is another copy of the
project (for instance `git archive <commit> pipeline projections | tar -x -C DIR`), whose
`pipeline simulate` is started with DIR as its working directory. The machine's other load
then falls on both alike; compare the ratios.

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

def start_simulator(*flags: str, root: Path = ROOT) -> tuple[subprocess.Popen[str], str, str]:
    """`pipeline simulate` run from the checkout `root` (`-m` puts the working directory first
    on the module path, so that copy's code runs)."""
    cmd = [sys.executable, "-m", "pipeline", "simulate", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=root, env=env)
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


async def drain(stream: trio.SocketStream, chunks: list[tuple[float, bytes]] | None = None
                ) -> None:
    """Read and drop; with `chunks`, also keep each chunk with its receipt time (parsed later,
    so the reader does next to nothing while the simulator sends)."""
    while data := await stream.receive_some(1 << 20):
        if chunks is not None:
            chunks.append((time.time(), data))


FAMILIES = {b"markPriceUpdate": "markPrice", b"kline": "kline", b"aggTrade": "aggTrade",
            b"depthUpdate": "depth"}


def frame_lags(chunks: list[tuple[float, bytes]], start: float, end: float
               ) -> dict[str, list[float]]:
    """Receipt time - E (ms) of every frame in `chunks` received in [start, end), per family.
    The drained connections are raw (`/ws`), so every payload starts `{"e":"<kind>","E":`."""
    lags: dict[str, list[float]] = {}
    buf = bytearray()
    for when, data in chunks:
        buf += data
        at = 0
        while len(buf) - at >= 2:
            n, head = buf[at + 1] & 0x7F, 2
            if n == 126:
                if len(buf) - at < 4:
                    break
                n, head = int.from_bytes(buf[at + 2:at + 4], "big"), 4
            elif n == 127:
                if len(buf) - at < 10:
                    break
                n, head = int.from_bytes(buf[at + 2:at + 10], "big"), 10
            if len(buf) - at < head + n:
                break
            body = at + head
            if start <= when < end and buf[body:body + 6] == b'{"e":"':
                kind_end = buf.index(b'"', body + 6)
                e_at = buf.index(b'"E":', kind_end) + 4
                e_ms = int(buf[e_at:buf.index(b",", e_at)])
                family = FAMILIES.get(bytes(buf[body + 6:kind_end]), "other")
                lags.setdefault(family, []).append(when * 1000 - e_ms)
            at = body + n
        del buf[:at]
    return lags


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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

def whole_market_plan(depth_symbols: int = TRADED) -> list[tuple[str, list[str]]]:
    """(path, stream names) of each connection, as the ingestor would plan them."""
    symbols = [s.lower() for s in market_symbols(("BTCUSDT", "ETHUSDT", "SOLUSDT"),
                                                 MARKET_SIZE)]
    market = [f"{s}@{k}" for s in symbols for k in ("markPrice@1s", "aggTrade", "kline_1m")]
    half = len(market) // 2
    public = [f"{s}@depth20@100ms" for s in symbols[:depth_symbols]]
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
    w0 = time.time()
    await trio.sleep(seconds)
    frames1, cpu1, t1 = await frames_sent(http), cpu_seconds(pid), time.perf_counter()
    frames, cpu, wall = frames1 - frames0, cpu1 - cpu0, t1 - t0
    return {"frames_per_s": frames / wall, "cpu_share_of_a_core": cpu / wall,
            "cpu_ms_per_1000_frames": 1e6 * cpu / frames if frames else float("nan"),
            "wall_start": w0, "wall_end": w0 + wall}


async def measure_cadence(ws_url: str, rest_url: str, pid: int, seconds: float,
                          multipliers: tuple[float, ...] = (5.0, 20.0)) -> dict[str, object]:
    chunks: list[tuple[float, bytes]] = []
    phases: dict[str, dict[str, object]] = {}
    async with httpx.AsyncClient(base_url=rest_url, timeout=60) as http, \
            trio.open_nursery() as nursery:
        for path, names in whole_market_plan():
            stream = await raw_socket(ws_url, path)
            nursery.start_soon(drain, stream, chunks)
            await subscribe(stream, names)
        await trio.sleep(3.0)  # books built, feeds running
        phases["calm"] = dict(await sample(http, pid, seconds))
        for m in multipliers:
            await http.post("/sim/market/crash", json={"on": True, "multiplier": m})
            await trio.sleep(1.0)
            phases[f"crash x{m:g}"] = dict(await sample(http, pid, seconds))
        nursery.cancel_scope.cancel()
    for phase in phases.values():
        lags = frame_lags(chunks, float(phase.pop("wall_start")),  # type: ignore[arg-type]
                          float(phase.pop("wall_end")))  # type: ignore[arg-type]
        phase["lag_ms"] = {family: {"p50": quantile(v, 0.5), "p99": quantile(v, 0.99),
                                    "frames": len(v)} for family, v in sorted(lags.items())}
    return {"symbols": MARKET_SIZE, "streams": sum(len(n) for _, n in whole_market_plan()),
            **phases}


def run_cadence(root: Path, seconds: float, multipliers: tuple[float, ...]
                ) -> dict[str, object]:
    proc, ws_url, rest_url = start_simulator("--cadence", "--market-size", str(MARKET_SIZE),
                                             "--seed", "1", root=root)
    try:
        return trio.run(measure_cadence, ws_url, rest_url, proc.pid, seconds, multipliers)
    finally:
        proc.terminate()
        proc.wait(10)


# --- the market alone ----------------------------------------------------------------------

MARKET_CHILD = """
import hashlib, json, math, sys, time
from pipeline.simulator.cadence import Crash
from pipeline.simulator.market import Market, Outbox, parse_stream
from pipeline.simulator.session import ws_frame
job = json.load(sys.stdin)
crash = Crash(job["multiplier"], 0.0, 1e9) if job["multiplier"] > 1 else None
market = Market(job["symbols"], 1, cadence_mode=True, crash=crash, now_ms=1_793_615_400_000)
market.tick = 0.005
boxes = []
for names in job["plan"]:
    box = Outbox(lambda: None)
    boxes.append(box)
    for name in names:
        market.open_stream(parse_stream(name, market.streaming()), False, box, 0.0)
digests = [hashlib.sha256() for _ in boxes]
frames = 0
cpu = time.process_time()
for step in range(1, round(job["seconds"] / 0.005) + 1):
    market.advance(step * 0.005)
    for box, digest in zip(boxes, digests):
        parts = []
        while box.pending:
            text = market.take(box.pending.popleft())
            if text is not None:
                parts.append(ws_frame(text.encode()))
        if parts:
            digest.update(b"".join(parts))
            frames += len(parts)
cpu = time.process_time() - cpu
total = hashlib.sha256(b"".join(d.digest() for d in digests)).hexdigest()
print(json.dumps({"frames": frames, "cpu_s": cpu, "sha256": total}))
"""


def run_market_alone(root: Path, seconds: float, multiplier: float) -> dict[str, object]:
    symbols = list(market_symbols(("BTCUSDT", "ETHUSDT", "SOLUSDT"), MARKET_SIZE))
    plan = [names for _, names in whole_market_plan(depth_symbols=50)]
    job = {"symbols": symbols, "plan": plan, "seconds": seconds, "multiplier": multiplier}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    out = subprocess.run([sys.executable, "-c", MARKET_CHILD], input=json.dumps(job),
                         capture_output=True, text=True, cwd=root, env=env, check=True)
    r = json.loads(out.stdout)
    r["cpu_ms_per_1000_frames"] = 1e6 * r["cpu_s"] / r["frames"]
    return dict(r)


def report(results: dict[str, object]) -> None:
    flat = results.get("flat")
    if isinstance(flat, dict):
        print(f"{'flat out: streams':34} {'sent to raw drain/s':>20} "
              f"{'bare trio-websocket/s':>22}")
        for name, r in flat.items():
            print(f"{name:34} {r['raw_drain_sent_per_s']:>20,.0f} "
                  f"{r['bare_trio_websocket_per_s']:>22,.0f}")
    alone = results.get("market_runs")
    if isinstance(alone, list):
        print(f"\nthe market alone (no sockets), {MARKET_SIZE} symbols, 50 depth20@100ms")
        print(f"{'run':10} {'phase':8} {'frames':>8} {'CPU s':>7} {'ms/1k fr':>9}  sha256")
        for r in alone:
            print(f"{r['version']:10} {r['phase']:8} {r['frames']:>8,} {r['cpu_s']:>7.3f} "
                  f"{r['cpu_ms_per_1000_frames']:>9.1f}  {str(r['sha256'])[:16]}")
    runs = results.get("cadence_runs")
    if isinstance(runs, list):
        print(f"\ncadence, {MARKET_SIZE} symbols; lag = receipt - E, ms, p50/p99")
        print(f"{'run':10} {'phase':10} {'frames/s':>9} {'cores':>6} {'ms/1k fr':>9}  "
              f"{'markPrice':>11} {'kline':>11} {'aggTrade':>11} {'depth':>11}")
        for run in runs:
            for phase, r in run.items():
                if not isinstance(r, dict) or "frames_per_s" not in r:
                    continue
                lag = r["lag_ms"]
                cells = " ".join(
                    f"{lag[f]['p50']:>5.1f}/{lag[f]['p99']:<5.1f}" if f in lag else f"{'-':>11}"
                    for f in ("markPrice", "kline", "aggTrade", "depth"))
                print(f"{run['version']:10} {phase:10} {r['frames_per_s']:>9,.0f} "
                      f"{r['cpu_share_of_a_core']:>6.2f} {r['cpu_ms_per_1000_frames']:>9.1f}  "
                      f"{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=("flat", "cadence", "market"), default=None)
    parser.add_argument("--multipliers", default="5,20",
                        help="cadence: the crash phases after the calm one, comma-separated")
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR",
                        help="cadence: alternate the simulator of DIR (another checkout) "
                             "with this one")
    parser.add_argument("--rounds", type=int, default=1, help="cadence runs of each version")
    args = parser.parse_args()
    multipliers = tuple(float(m) for m in args.multipliers.split(",") if m)
    results: dict[str, object] = {}
    if args.only in (None, "flat"):
        proc, ws_url, rest_url = start_simulator("--rate", "0")
        try:
            results["flat"] = trio.run(measure_flat, ws_url, rest_url, args.seconds)
        finally:
            proc.terminate()
    versions = [("this", ROOT)]
    if args.compare is not None:
        versions.insert(0, ("compared", args.compare.resolve()))
    if args.only == "market":
        alone: list[dict[str, object]] = []
        for _ in range(args.rounds):
            for phase, m in (("calm", 1.0), ("crash x5", 5.0)):
                for version, root in versions:
                    alone.append({"version": version, "phase": phase,
                                  **run_market_alone(root, args.seconds, m)})
        results["market_runs"] = alone
    if args.only in (None, "cadence"):
        runs: list[dict[str, object]] = []
        for _ in range(args.rounds):
            for version, root in versions:
                run = run_cadence(root, args.seconds, multipliers)
                runs.append({"version": version, "root": str(root), **run})
        results["cadence_runs"] = runs
    report(results)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "simulator.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
