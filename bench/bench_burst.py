"""One second's mark prices through the projector alone: the projector's own floor for a burst.

    .venv/bin/python bench/bench_burst.py                      # 550 mark prices, 20 seconds
    .venv/bin/python bench/bench_burst.py --klines 180         # with the klines of that instant
    .venv/bin/python bench/bench_burst.py --spread-ms 15       # logged over 15 ms, as ingested

markPrice@1s moves every symbol on the same whole second, so the whole market's mark prices
reach the log as a burst of ~550 entries (with ~180 kline_1m entries of the same instant). In
bench_full_market.py the simulator, two ingestors, Redis and the projector share the two cores
while that burst passes; this bench takes everything but the projector and Redis away:
- a feeder process appends, once a second (half-way through it), `--symbols` markPriceUpdate
  frames (and `--klines` kline_1m frames) whose `E` and `recv_ts` are the instant it starts,
  in one pipeline (`--spread-ms 0`) or in ten chunks over `--spread-ms`, the way the market
  ingestor logs a burst it receives over that time; it notes when the last XADD returned;
- this process runs the projector (`projections.shell.project.run`, all market projections,
  as `pipeline project` does), whose `on_written` callback notes each batch's written_at.

Per second: first and last view written, in ms after `E`, and the last view written after the
burst was all in the log; medians and max over the seconds (the first two are warm-up), and
the projector's CPU (this process) per burst. Compare within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_projector import symbols  # noqa: E402

from pipeline.config import load_settings  # noqa: E402
from pipeline.eventlog import frame_entry  # noqa: E402
from pipeline.localredis import LocalRedis  # noqa: E402
from projections.core.batch import Folded, RawEntry  # noqa: E402
from projections.core.keys import market_key  # noqa: E402
from projections.shell import project as runner  # noqa: E402
from projections.shell.registry import choose  # noqa: E402

STREAMS = "markPrice@1s,kline_1m"
WARMUP = 2  # seconds whose bursts are not counted


def burst(syms: list[str], klines: int, e: int, n: int) -> list[tuple[str, bytes]]:
    """One instant's frames: a mark price per symbol, then `klines` candles."""
    out = []
    px = f"{1000 + n % 97:.2f}"
    for sym in syms:
        data = {"e": "markPriceUpdate", "E": e, "s": sym, "p": px, "i": px, "P": px,
                "r": "0.00010000", "T": e + 3_600_000}
        out.append(("markPrice", orjson.dumps({"stream": f"{sym.lower()}@markPrice@1s",
                                               "data": data})))
    t = e // 60_000 * 60_000
    for sym in syms[:klines]:
        k = {"t": t, "T": t + 59_999, "s": sym, "i": "1m", "f": 1, "L": 2, "o": px, "c": px,
             "h": px, "l": px, "v": "1", "n": 2 + n, "x": False, "q": "1", "V": "1", "Q": "1",
             "B": "0"}
        out.append(("kline_1m", orjson.dumps({"stream": f"{sym.lower()}@kline_1m",
                                              "data": {"e": "kline", "E": e, "s": sym, "k": k}})))
    return out


def feeder(url: str, n_symbols: int, klines: int, rounds: int, spread_ms: float,
           conn: Any) -> None:
    r = redis.Redis.from_url(url)
    syms = symbols(n_symbols)
    added: list[tuple[int, float]] = []  # (E ms, when the burst's last XADD returned)
    seq = 0
    for n in range(rounds):
        time.sleep(1.5 - time.time() % 1.0)  # half-way through the next second
        now = time.time()
        items = burst(syms, klines, int(now * 1000), n)
        chunks = 10 if spread_ms else 1
        size = -(-len(items) // chunks)
        for c in range(chunks):
            pipe = r.pipeline(transaction=False)
            for fam, frame in items[c * size:(c + 1) * size]:
                seq += 1
                pipe.xadd(market_key(fam), frame_entry(frame, now, "burst", seq))  # type: ignore[arg-type]
            pipe.execute()
            if spread_ms and c + 1 < chunks:
                time.sleep(max(0.0, now + spread_ms / 1000 * (c + 1) / (chunks - 1)
                               - time.time()))
        added.append((int(now * 1000), time.time()))
    conn.send(added)
    conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as server:
        settings = load_settings(env={"REDIS_URL": server.url, "PIPELINE_MARKET_STREAMS": STREAMS,
                                      "PIPELINE_SYMBOLS": ",".join(symbols(args.symbols))})
        specs = [s for s in choose(settings, None) if s.name not in ("orders", "account")]
        written: list[tuple[float, bytes]] = []  # (written_at, frame) of every frame entry

        def on_written(entries: list[RawEntry], folded: Folded) -> None:
            at = folded.written_at
            written.extend((at, f[b"frame"]) for _k, _id, f in entries if b"frame" in f)

        home, away = mp.Pipe(duplex=False)
        proc = mp.get_context("spawn").Process(
            target=feeder, args=(server.url, args.symbols, args.klines, args.seconds,
                                 args.spread_ms, away))
        cpu: list[float] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: runner.run(
                    settings, specs, runner.RunOptions(consumer="bench", block_ms=1000),
                    on_written=on_written))
                await trio.sleep(1.0)  # groups created
                proc.start()
                cpu.append(time.process_time())
                await trio.to_thread.run_sync(home.poll, args.seconds + 30)
                await trio.sleep(1.0)  # the last burst written
                cpu.append(time.process_time())
                nursery.cancel_scope.cancel()

        trio.run(main)
        added: list[tuple[int, float]] = home.recv()
        proc.join()
    by_e: dict[int, list[float]] = {}
    for at, frame in written:
        i = frame.find(b'"E":')
        by_e.setdefault(int(frame[i + 4:frame.find(b",", i)]), []).append(at)
    rows = []
    for e_ms, logged_at in added[WARMUP:]:
        ats = by_e.get(e_ms, [])
        if len(ats) != args.symbols + args.klines:
            raise SystemExit(f"burst at {e_ms}: {len(ats)} of {args.symbols + args.klines} "
                             "entries written")
        rows.append((1000 * (min(ats) - e_ms / 1000), 1000 * (max(ats) - e_ms / 1000),
                     1000 * (logged_at - e_ms / 1000), 1000 * (max(ats) - logged_at)))
    cols = ("first_written", "last_written", "all_logged", "last_after_logged")
    return {"symbols": args.symbols, "klines": args.klines, "spread_ms": args.spread_ms,
            "bursts": len(rows),
            **{c: {"p50": statistics.median(v), "max": max(v)}
               for c, v in zip(cols, zip(*rows, strict=True), strict=True)},
            "projector_cpu_ms_per_burst": 1000 * (cpu[1] - cpu[0]) / len(added)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=550)
    ap.add_argument("--klines", type=int, default=0, help="kline_1m frames in each burst")
    ap.add_argument("--seconds", type=int, default=20, help="bursts, one a second")
    ap.add_argument("--spread-ms", type=float, default=0.0,
                    help="log each burst in ten chunks over this time (0: one pipeline)")
    args = ap.parse_args()
    res = run(args)
    print(f"{res['symbols']} mark prices + {res['klines']} klines a second, logged "
          + (f"over {res['spread_ms']:g} ms" if res["spread_ms"] else "in one pipeline")
          + f"; {res['bursts']} bursts; ms after E, p50 (max):")
    for c in ("all_logged", "first_written", "last_written", "last_after_logged"):
        print(f"  {c.replace('_', ' '):20} {res[c]['p50']:7.2f} ({res[c]['max']:.2f})")
    print(f"  projector CPU per burst {res['projector_cpu_ms_per_burst']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
