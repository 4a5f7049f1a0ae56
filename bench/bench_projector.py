"""Projector benchmarks: events/s per process, frame-to-view latency, replay time.

    .venv/bin/python bench/bench_projector.py                 # all three, default sizes
    .venv/bin/python bench/bench_projector.py --only events --events 300000
    .venv/bin/python bench/bench_projector.py --write-doc     # also bench/results/projector-*.md
                                                              # (figures go to docs/benchmarks.md)
    .venv/bin/python bench/bench_projector.py --only events --store ab --rounds 3
                                                              # FCALL vs EVALSHA, alternating

Each part starts its own redis-server (pipeline.localredis) on a free port.

- events: the raw streams are pre-filled with realistic frames (mark price, depth20, aggTrade,
  kline_1m over `--symbols` symbols, in exchange order); one projector process (this one: the
  same `projections.shell.project.run` as `pipeline project`) folds them all; events/s = entries /
  time until every group has acknowledged everything. Once with coalescing, once without.
- latency: `pipeline simulate` (subprocess) sends `--rate` frames/s in total, `pipeline ingest
  market` (subprocess) logs them, the projector runs here (all projections in this process) or,
  with `--split yes`, one forked process per projection (as `pipeline project --only NAME`
  each); by default both are measured. For every frame entry of a batch, the latency is (time
  right after the batch's write+ack pipeline returned) - (the frame's `E`, the simulator's
  wall-clock send time in ms). Coalesced and superseded frames count too: their view was
  written (with the same or a newer value) at that instant. The callback only keeps the batch;
  frames are parsed for `E` after the run, off the path being measured.
- replay: `--replay-frames` frames pre-filled, then `projections.shell.replay.replay` of every
  projection (XRANGE chunks, same folds, same forward-only writes; one process per projection,
  `--jobs` at once, as `pipeline replay` does by default), timed end to end.
- `--store ab` (events only): the view writes as the projector makes them (`FCALL` of the
  function library) against the same views code sent as a script with `EVALSHA`, the way
  they went before the library (kept only here, `EvalshaViewStore`), in alternating rounds of
  one run; prints the medians and the ratio FCALL / EVALSHA.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
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

from pipeline.config import load_settings  # noqa: E402
from pipeline.eventlog import frame_entry  # noqa: E402
from pipeline.localredis import LocalRedis  # noqa: E402
from projections.core.batch import Folded, RawEntry  # noqa: E402
from projections.core.keys import market_key  # noqa: E402
from projections.shell import loop as shell_loop  # noqa: E402
from projections.shell import project as runner  # noqa: E402
from projections.shell.registry import choose  # noqa: E402
from projections.shell.replay import replay  # noqa: E402
from projections.shell.viewstore import ViewStore  # noqa: E402

STREAMS = "markPrice@1s,depth20@100ms,aggTrade,kline_1m"


def symbols(n: int) -> list[str]:
    base = ["BTC", "ETH", "SOL", "BNB", "XRP", "DOGE", "ADA", "AVAX", "LINK", "DOT"]
    return [f"{base[i % len(base)]}{i // len(base) or ''}USDT" for i in range(n)]


def frames(n: int, syms: list[str]) -> list[tuple[str, bytes]]:
    """`n` frames of the four families, round robin over the symbols, event time ascending."""
    out: list[tuple[str, bytes]] = []
    t0 = int(time.time() * 1000) - n
    for i in range(n):
        sym = syms[i % len(syms)]
        e, s = t0 + i, sym.lower()
        px = f"{1000 + (i % 997) / 10:.2f}"
        kind = (i // len(syms)) % 4
        if kind == 0:
            fam, data = "markPrice", {"e": "markPriceUpdate", "E": e, "s": sym, "p": px,
                                      "i": px, "P": px, "r": "0.00010000", "T": e + 3_600_000}
            name = f"{s}@markPrice@1s"
        elif kind == 1:
            lv = [[f"{1000 - j / 10:.1f}", "1.000"] for j in range(20)]
            fam, data = "depth20", {"e": "depthUpdate", "E": e, "T": e, "s": sym, "U": i,
                                    "u": i + 1, "pu": i - 1, "b": lv, "a": lv}
            name = f"{s}@depth20@100ms"
        elif kind == 2:
            fam, data = "aggTrade", {"e": "aggTrade", "E": e, "s": sym, "a": i, "p": px,
                                     "q": "0.01", "f": i, "l": i, "T": e, "m": True}
            name = f"{s}@aggTrade"
        else:
            k = {"t": e // 60_000 * 60_000, "T": e // 60_000 * 60_000 + 59_999, "s": sym,
                 "i": "1m", "f": 1, "L": 2, "o": px, "c": px, "h": px, "l": px, "v": "1",
                 "n": 2, "x": False, "q": "1", "V": "1", "Q": "1", "B": "0"}
            fam, data, name = "kline_1m", {"e": "kline", "E": e, "s": sym, "k": k}, f"{s}@kline_1m"
        out.append((fam, orjson.dumps({"stream": name, "data": data})))
    return out


def fill(r: redis.Redis, items: list[tuple[str, bytes]]) -> None:
    now = time.time()
    pipe = r.pipeline(transaction=False)
    for seq, (fam, frame) in enumerate(items):
        pipe.xadd(market_key(fam), frame_entry(frame, now, "bench", seq))  # type: ignore[arg-type]
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()


class EvalshaViewStore(ViewStore):
    """The views code of the function library sent as a script (`EVALSHA`, loaded once), as
    the view writes went before the library: the other side of `--store ab`, nowhere else."""

    SCRIPT = (ROOT / "projections/shell/lua/views.lua").read_text() + \
        "\nreturn views_write(KEYS, ARGV)\n"

    def _flush(self, pipe: Any, keys: list[str], args: list[Any], plan: list[int]) -> None:
        if not keys:
            return
        if not self._loaded:
            self._sha = self._client.script_load(self.SCRIPT)
            self._loaded = True
        pipe.evalsha(self._sha, len(keys), *keys, *self._head, *args)
        plan.append(len(keys))
        keys.clear()
        args.clear()


def bench_settings(url: str, streams: str, n_symbols: int) -> Any:
    """The bench's symbols are configured: only configured symbols get views."""
    return load_settings(env={"REDIS_URL": url, "PIPELINE_MARKET_STREAMS": streams,
                              "PIPELINE_SYMBOLS": ",".join(symbols(n_symbols))})


def drained(r: redis.Redis, groups: dict[str, list[str]]) -> bool:
    for group, keys in groups.items():
        for key in keys:
            info = [g for g in r.xinfo_groups(key) if g["name"] == group.encode()]
            if not info or info[0]["pending"] or info[0]["lag"] != 0:
                return False
    return True


# --- events/s ---------------------------------------------------------------------------------

def bench_events(n: int, n_symbols: int, coalescing: bool, batch: int,
                 streams: str = STREAMS, store: str = "fcall") -> float:
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp)) as server:
        r = server.client()
        wanted = {k.family for k in load_settings(
            env={"PIPELINE_MARKET_STREAMS": streams}).market_streams}
        fill(r, [f for f in frames(n * 4 // len(wanted), symbols(n_symbols)) if f[0] in wanted])
        settings = bench_settings(server.url, streams, n_symbols)
        shell_loop.ViewStore = EvalshaViewStore if store == "evalsha" else ViewStore  # type: ignore[misc]
        specs = [s for s in choose(settings, None) if s.name not in ("orders", "account")]
        groups = {s.name: list(s.factory().sources) for s in specs}
        opts = runner.RunOptions(consumer="bench", batch=batch, coalescing=coalescing)

        async def main() -> float:
            async with trio.open_nursery() as nursery:
                t0 = time.perf_counter()
                nursery.start_soon(runner.run, settings, specs, opts)
                while not drained(r, groups):  # noqa: ASYNC110 - state in Redis
                    await trio.sleep(0.005)
                took = time.perf_counter() - t0
                nursery.cancel_scope.cancel()
            return n / took

        try:
            rate = trio.run(main)
        finally:
            shell_loop.ViewStore = ViewStore  # type: ignore[misc]
        r.close()
        return rate


# --- latency ----------------------------------------------------------------------------------

def _start(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=full, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


# per frame entry: (written_at, entry id, frame, recv_ts); tuples of bytes and floats only, which
# the garbage collector stops tracking, so keeping 50,000 of them adds no GC pauses to the run
Sample = tuple[float, bytes, bytes, bytes]


def _project_timed(settings: Any, specs: list[Any], until: float, warmup_end: float,
                   conn: Any = None) -> list[tuple[float, ...]]:
    """Run the projector on `specs` until the wall clock reaches `until`; returns the latency
    samples of the frames written after `warmup_end`. Nothing is parsed in the callback: it
    runs in the projector's own thread, on the latency path it measures."""
    kept: list[Sample] = []

    def on_written(entries: list[RawEntry], folded: Folded) -> None:
        at = folded.written_at
        if at >= warmup_end:
            for _key, eid, fields in entries:
                frame = fields.get(b"frame")
                if frame is not None:
                    kept.append((at, eid, frame, fields[b"recv_ts"]))

    async def main() -> None:
        with trio.move_on_after(until - time.time()):
            await runner.run(settings, specs, runner.RunOptions(consumer="bench", block_ms=1000),
                             on_written=on_written)

    trio.run(main)
    samples = _samples(kept)
    if conn is not None:  # a child process of --split: send the figures home
        conn.send(samples)
        conn.close()
    return samples


def _samples(kept: list[Sample]) -> list[tuple[float, ...]]:
    """Per frame: (written - E, receive leg, log leg, project leg) in ms."""
    out: list[tuple[float, ...]] = []
    for written_at, eid, frame, recv_ts in kept:
        data: Any = orjson.loads(frame).get("data")
        if isinstance(data, dict) and "E" in data:
            done_ms, recv_ms = written_at * 1000, float(recv_ts) * 1000
            id_ms = int(eid.split(b"-")[0])
            out.append((done_ms - data["E"], recv_ms - data["E"], id_ms - recv_ms,
                        done_ms - id_ms))
    return out


def bench_latency(rate: int, seconds: float, warmup: float = 2.0,
                  split: bool = False) -> dict[str, float]:
    """`split`: one projector process per projection (`pipeline project --only NAME` each),
    else all four in this one process."""
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp)) as server:
        # two connections (/market and /public), each at rate/2 frames/s
        sim = _start("simulate", "--rate", str(rate // 2), "--ws-port", "0", "--rest-port", "0",
                     env={})
        ready = sim.stdout.readline().split() if sim.stdout else []
        ws = next(w[3:] for w in ready if w.startswith("ws="))
        rest = next(w[5:] for w in ready if w.startswith("rest="))
        env = {"REDIS_URL": server.url, "BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest,
               "PIPELINE_MARKET_STREAMS": STREAMS}
        ingest = _start("ingest", "market", env=env)
        settings = load_settings(env=env)
        specs = [s for s in choose(settings, None) if s.name not in ("orders", "account")]
        t_start = time.time()
        until, warmup_end = t_start + warmup + seconds, t_start + warmup
        samples: list[tuple[float, ...]] = []
        try:
            if split:
                ctx = mp.get_context("fork")
                pipes, procs = [], []
                for spec in specs:
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_project_timed,
                                       args=(settings, [spec], until, warmup_end, send))
                    proc.start()
                    pipes.append(recv)
                    procs.append(proc)
                for recv, proc in zip(pipes, procs, strict=True):
                    samples += recv.recv()
                    proc.join()
            else:
                samples = _project_timed(settings, specs, until, warmup_end)
        finally:
            for p in (ingest, sim):
                p.terminate()
                p.communicate(timeout=15)
        columns = list(zip(*samples, strict=True))
        q = statistics.quantiles(columns[0], n=100)
        out = {"frames_per_s": len(samples) / seconds, "p50_ms": q[49], "p99_ms": q[98],
               "max_ms": max(columns[0]), "frames": len(samples)}
        for leg, values in zip(("receive", "log", "project"), columns[1:], strict=True):
            lq = statistics.quantiles(values, n=100)
            out[f"{leg}_p50_ms"], out[f"{leg}_p99_ms"] = lq[49], lq[98]
        return out


# --- replay -----------------------------------------------------------------------------------

def bench_replay(n: int, n_symbols: int, jobs: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp)) as server:
        r = server.client()
        fill(r, frames(n, symbols(n_symbols)))
        settings = bench_settings(server.url, STREAMS, n_symbols)
        specs = [s for s in choose(settings, None) if s.name not in ("orders", "account")]
        client = redis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        result = replay(client, specs, jobs=jobs, url=server.url)
        took = time.perf_counter() - t0
        client.close()
        r.close()
        return took, result.entries


DOC_HEAD = """## Projector (bench/bench_projector.py)

Run: `.venv/bin/python bench/bench_projector.py --write-doc` (about 75 s; every part starts
its own redis-server). One projector process means the same `projections.shell.project.run` that
`pipeline project` runs, all market projections in one process.

- events/s: raw streams pre-filled with realistic frames of four families over 50 symbols
  (mark price, 20-level partial depth of ~1 KB, aggTrade, kline_1m), time until every group has
  acknowledged everything. Coalescing off means one view write per event (and no
  pre-coalescing: every frame is parsed).
- latency: `pipeline simulate` -> `pipeline ingest market` -> Redis -> projector, 5,000 frames/s
  in total over two connections; per frame, the time right after its batch's write + ack
  pipeline returned minus the simulator's send time `E` (ms). Measured twice: all four
  projections in one process, and one process per projection (`pipeline project --only NAME`
  four times, as an operator who cares about latency would run it). The three legs split it:
  receive (E -> the ingestor's `recv_ts`), log (-> the XADD id's time), project (-> written).
  `E` and entry ids have millisecond resolution, so each leg carries up to 1 ms of rounding.
- replay: 1,000,000 pre-filled frames, `pipeline replay` of the four market projections.
"""




def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value < target
    off = abs(value - target) / target * 100
    return "met" if ok else f"missed by {off:.0f} %"


def latency_lines(rate: int, seconds: float, split: bool) -> list[str]:
    lat = bench_latency(rate, seconds, split=split)
    how = "one projector process per projection" if split else "all projections in one process"
    lines = [f"frame-to-view latency at {rate:,} frames/s offered, {how} "
             f"({lat['frames_per_s']:,.0f}/s measured, {lat['frames']:,} frames): "
             f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
             f"max {lat['max_ms']:.1f} ms  (target p99 < 10 ms: "
             f"{verdict(lat['p99_ms'], 10, False)})",
             "  of which (p50 / p99): " + ", ".join(
                 f"{leg} {lat[leg + '_p50_ms']:.2f} / {lat[leg + '_p99_ms']:.2f} ms"
                 for leg in ("receive", "log", "project"))
             + "  [receive: E -> ingestor recv_ts; log: recv_ts -> XADD id; project: XADD id"
               " -> view written]"]
    for line in lines:
        print(line, flush=True)
    return lines


def store_ab(args: argparse.Namespace) -> list[str]:
    """FCALL and EVALSHA of the same views code, alternating, coalescing on and off."""
    lines = []
    for coalescing in (True, False):
        rates: dict[str, list[float]] = {"fcall": [], "evalsha": []}
        for _ in range(args.rounds):
            for store in ("evalsha", "fcall"):
                rates[store].append(bench_events(args.events, args.symbols, coalescing,
                                                 args.batch, args.streams, store))
        fcall, evalsha = (statistics.median(rates[k]) for k in ("fcall", "evalsha"))
        lines.append(
            f"events/s, {args.events:,} entries, coalescing {'on' if coalescing else 'off'}, "
            f"{args.rounds} alternating rounds: FCALL {fcall:,.0f} (each: "
            f"{', '.join(f'{x:,.0f}' for x in rates['fcall'])}), EVALSHA {evalsha:,.0f} "
            f"(each: {', '.join(f'{x:,.0f}' for x in rates['evalsha'])}), ratio FCALL/EVALSHA "
            f"{fcall / evalsha:.3f}")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["events", "latency", "replay"], default=None)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--symbols", type=int, default=50)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--streams", default=STREAMS,
                    help="families for the events part (one projection each)")
    ap.add_argument("--rate", type=int, default=5_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--split", choices=["yes", "no"], default=None,
                    help="latency: one projector process per projection (as `pipeline project "
                         "--only NAME` each) or all in one; default: both")
    ap.add_argument("--replay-frames", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="replay processes (as `pipeline replay --jobs`)")
    ap.add_argument("--store", choices=["fcall", "evalsha", "ab"], default="fcall",
                    help="events: view writes by FCALL (as the projector), EVALSHA of the same "
                         "code, or both in alternating rounds (ab)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each side for --store ab")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    lines = [f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"]
    if args.only in (None, "events") and args.store == "ab":
        lines += store_ab(args)
    elif args.only in (None, "events"):
        for coalescing in (True, False):
            rate = bench_events(args.events, args.symbols, coalescing, args.batch, args.streams,
                                args.store)
            lines.append(f"events/s, one process, {args.events:,} entries of {args.streams}, "
                         f"{args.symbols} symbols, batch {args.batch}, coalescing "
                         f"{'on' if coalescing else 'off'}: {rate:,.0f}"
                         + (f"  (target >= 100,000: {verdict(rate, 100_000, True)})"
                            if coalescing else ""))
            print(lines[-1], flush=True)
    if args.only in (None, "latency"):
        for split in ((False, True) if args.split is None else (args.split == "yes",)):
            lines += latency_lines(args.rate, args.seconds, split)
    if args.only in (None, "replay"):
        took, n = bench_replay(args.replay_frames, args.symbols, args.jobs)
        lines.append(f"replay of {n:,} logged frames (4 market projections, {args.jobs} "
                     f"processes): {took:.2f} s ({n / took:,.0f} frames/s)  "
                     f"(target < 15 s: {verdict(took, 15, False)})")
        print(lines[-1], flush=True)
    if args.write_doc:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        doc = out / time.strftime("projector-%Y%m%d-%H%M%S.md", time.gmtime())
        doc.write_text(DOC_HEAD + "\n```\n" + "\n".join(lines) + "\n```\n")
        print(f"written to {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
