"""Benchmark of `pipeline ingest market` (not a test): throughput, bursts, peak memory.

    .venv/bin/python bench/bench_ingest.py [--seconds 5] [--rounds 2] [--pin] [--skip-bursts]
                                           [--pauses]

Starts its own redis-server (LocalRedis) and simulator (`pipeline simulate`, a subprocess), then:
1. throughput: the simulator sends one stream (btcusdt@aggTrade) flat out (rate 0). In turn,
   a bare trio-websocket receive loop (`await ws.get_message()`, a subprocess of this file,
   `--bare`), the same bare loop taking the messages where trio-websocket's reader makes them,
   as the ingestor does (`--bare --deliver`: `pipeline.wsconn._Deliver`, and nothing else per
   frame), and the ingestor (`pipeline ingest market`, a subprocess) read that feed for
   `--seconds`; the ingestor's rate is what Redis took (XINFO STREAM entries-added, so
   trimming does not matter). Ratios: to the bare loop (issue #16's figure) and to the bare
   loop taking messages (the ingestor's own work per frame: route, pack, buffer, write);
2. bursts: a fresh simulator sends 50 frames/s plus 500 (then 2,000) extra frames every 100 ms;
   after `--seconds` it goes silent, the ingestor drains, and the frames logged are compared with
   the frames the simulator sent (GET /sim/stats) and checked for gap entries;
3. the ingestor's peak resident memory (VmHWM from /proc) in every run, and its CPU per frame
   split by thread (/proc/<pid>/task: the main thread runs trio, the websocket readers, routing
   and packing; the others are the log writer and trio's workers), with the main thread's
   context switches; `--prelude CODE` runs Python in the ingestor's process before it starts,
   for ablations (e.g. `import gc; gc.disable()`, or an `append_frame` that keeps one frame in
   1,000);
4. with `--pauses`, in each throughput round also the ingestor with the writer's pause after a
   batch forced to 0, 1 and 10 ms: what `pipeline.writer.pause_after` chooses between;
5. with `--faults`, issue #11's fault runs scaled down: Redis out of memory (`maxmemory`
   reached, `noeviction`) for `--oom-seconds` at 2,000 frames/s, with the default buffer and
   with `PIPELINE_BUFFER_FRAMES=5000` (frames sent, logged, reported in gap entries by reason,
   and unaccounted for: neither); and Redis frozen (SIGSTOP) while the simulator sends 150
   frames of 2 MiB, with `PIPELINE_BUFFER_BYTES=64MiB` (the ingestor's peak memory, and the
   same account once Redis runs again).

Prints a table and writes JSON to bench/results/ingest-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.localredis import LocalRedis  # noqa: E402

KEY = "raw:market:aggTrade"
KEY_OTHER = "raw:market:other"
KEY_MARK = "raw:market:markPrice"
# `--pauses`: the writer's pause after every batch, forced (seconds)
PAUSES = {"0 (back to back)": 0.0, "1 ms": 0.001, "10 ms": 0.010}
STREAM = "btcusdt@aggTrade"
PRELUDE = ""  # `--prelude`: Python run in the ingestor's process before it starts (ablations)


# --- the bare loop (runs in its own process) --------------------------------------------------

def bare_main(url: str, seconds: float, warmup: float, deliver: bool = False) -> None:
    """`deliver`: take the messages where trio-websocket's reader makes them, as the ingestor
    does (`pipeline.wsconn._Deliver` in place of its send channel), and do nothing else."""
    import trio
    import trio_websocket

    from pipeline.wsconn import MAX_MESSAGE_SIZE, MESSAGE_QUEUE_SIZE, RECEIVE_BUFFER, _Deliver

    async def run() -> dict[str, float]:
        async with trio_websocket.open_websocket_url(
                url, message_queue_size=MESSAGE_QUEUE_SIZE, max_message_size=MAX_MESSAGE_SIZE,
                receive_buffer_size=RECEIVE_BUFFER) as ws:
            await ws.get_message()
            if deliver:
                taken = [0]

                def take(_msg: str | bytes) -> None:
                    taken[0] += 1
                ws._send_channel = _Deliver(take, ws._send_channel)  # type: ignore[assignment]
                await trio.sleep(warmup)
                n0, start, cpu = taken[0], time.perf_counter(), time.process_time()
                await trio.sleep(seconds)
                n = taken[0] - n0
            else:
                end_warmup = time.perf_counter() + warmup
                while time.perf_counter() < end_warmup:
                    await ws.get_message()
                n, start, cpu = 0, time.perf_counter(), time.process_time()
                end = start + seconds
                while True:
                    await ws.get_message()
                    n += 1
                    if n % 256 == 0 and time.perf_counter() >= end:
                        break
            took = time.perf_counter() - start
            return {"frames": n, "seconds": took, "rate": n / took,
                    "per_cpu_second": n / (time.process_time() - cpu)}

    print(json.dumps(trio.run(run)), flush=True)


# --- the reader's own work per frame, in a tight loop ----------------------------------------

MICRO_FRAME = (b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1764603000123,'
               b'"a":123456789,"s":"BTCUSDT","p":"91234.50","q":"0.012","nq":"0.012","f":370000001,'
               b'"l":370000002,"T":1764603000122,"m":true}}').decode()


def micro(n: int = 100_000) -> dict[str, float]:
    """µs a frame of what `_read` does besides trio-websocket, best of 5, in one thread: the
    clock and the encode; + routing (`cached_router`); + `LogWriter.append_frame` (packing
    the XADD and keeping it in the buffer; nothing is sent)."""
    from pipeline.ingest_market import cached_router
    from pipeline.writer import LogWriter

    writer = LogWriter(redis.Redis(port=1))  # never connects: nothing is sent
    route, append, buf = cached_router(), writer.append_frame, writer.buffer

    def run(level: int) -> float:
        key = "raw:market:aggTrade"
        t = time.perf_counter()
        for i in range(n):
            ts = time.time()
            data = MICRO_FRAME.encode()
            if level >= 1:
                key = route(data)
            if level >= 2:
                append(key, data, ts, "mkt-1-abcdef", i)
        took = time.perf_counter() - t
        items = buf.take(n)
        buf.release(len(items), sum(len(p) for _k, p in items))
        return took / n * 1e6

    names = ("clock + encode", "+ route", "+ append_frame")
    return {name: min(run(level) for _ in range(5)) for level, name in enumerate(names)}


# --- helpers ------------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}


def pinned(cpu: int | None) -> Any:
    """preexec_fn that pins the child to one CPU (None: leave it to the scheduler)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


# CPUs for the feed side (simulator, redis-server) and the reader side (bare loop, ingestor):
# on a 2-core machine the simulator at full speed needs a core of its own, and without pinning
# the measured "ingest rate" is mostly how much CPU the ingestor left to the simulator.
FEED_CPU: int | None = None
READER_CPU: int | None = None


class Sim:
    """`pipeline simulate` as a subprocess."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "simulate", "--symbols", "BTCUSDT", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env(),
            cwd=ROOT, preexec_fn=pinned(FEED_CPU))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:2] == ["simulator", "ready"], line
        self.ws_url = line[2].split("=", 1)[1]
        self.rest_url = line[3].split("=", 1)[1]
        self.http = httpx.Client(base_url=self.rest_url, timeout=10)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get("/sim/stats").json()
        return stats

    def post(self, name: str, body: dict[str, Any]) -> None:
        self.http.post(f"/sim/{name}", json=body).raise_for_status()

    def stop(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


class Ingestor:
    """`pipeline ingest market` as a subprocess. `pause`: the writer's pause after every batch
    forced to this many seconds (`pipeline.writer.pause_after` replaced in that process only),
    to measure what the pause rule buys."""

    def __init__(self, redis_url: str, ws_url: str, pause: float | None = None,
                 settings: dict[str, str] | None = None) -> None:
        env = {**clean_env(), "REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url,
               "PIPELINE_SYMBOLS": "BTCUSDT", "PIPELINE_MARKET_STREAMS": "aggTrade",
               **(settings or {})}
        cmd = [sys.executable, "-m", "pipeline", "ingest", "market"]
        if PRELUDE:
            cmd = [sys.executable, "-c", PRELUDE + "\nimport pipeline.cli as c; "
                   "raise SystemExit(c.main(['ingest', 'market']))"]
        if pause is not None:
            cmd = [sys.executable, "-c", "import pipeline.writer as w, pipeline.cli as c; "
                   f"w.pause_after = lambda *a: {pause!r}; "
                   "raise SystemExit(c.main(['ingest', 'market']))"]
        self.proc = subprocess.Popen(cmd,
                                     env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=pinned(READER_CPU))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds of each thread (tid -> utime + stime); the main thread's tid is the pid
        (it runs trio and the websocket readers; the others: the log writer, trio's workers)."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def main_switches(self) -> tuple[int, int]:
        """(voluntary, involuntary) context switches of the main thread so far."""
        vals = {}
        for line in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/status").read_text(
                ).splitlines():
            if line.endswith("ctxt_switches:") or "ctxt_switches" in line:
                name, n = line.split(":")
                vals[name.strip()] = int(n)
        return vals.get("voluntary_ctxt_switches", 0), vals.get("nonvoluntary_ctxt_switches", 0)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"ingestor exited {self.proc.returncode}: {err[-2000:]}")
        return err


def entries_added(r: redis.Redis, key: str = KEY) -> int:
    try:
        return int(r.xinfo_stream(key)["entries-added"])
    except redis.ResponseError:  # no such key yet
        return 0


def wait_for(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not happen in time")
        time.sleep(0.05)


def wait_until_still(r: redis.Redis, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """Entries-added once it stopped growing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = entries_added(r), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = entries_added(r)
        if now != last:
            last, since = now, time.monotonic()
        if time.monotonic() > deadline:
            break
    return last


def log_account(r: redis.Redis, key: str) -> dict[str, Any]:
    """Distinct frames (`conn`, `seq`) in `key` and what its gap entries report, by reason."""
    seen: set[tuple[bytes, bytes]] = set()
    by_reason: dict[str, int] = {}
    start = "-"
    while True:
        batch = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     r.xrange(key, min=start, count=10_000))
        if not batch:
            return {"logged": len(seen), "in_gaps": sum(by_reason.values()),
                    "gaps_by_reason": by_reason}
        for _, fields in batch:
            if b"frame" in fields:
                seen.add((fields[b"conn"], fields[b"seq"]))
            elif fields.get(b"ctl") == b"gap":
                body = json.loads(fields[b"body"])
                by_reason[body["reason"]] = by_reason.get(body["reason"], 0) + body["dropped"]
        start = "(" + batch[-1][0].decode()


def count_frames(r: redis.Redis, key: str = KEY) -> tuple[int, int]:
    """(frame entries, gap entries) in `key`."""
    frames = gaps = 0
    start = "-"
    while True:
        batch = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     r.xrange(key, min=start, count=10_000))
        if not batch:
            return frames, gaps
        for _, fields in batch:
            if b"frame" in fields:
                frames += 1
            elif fields.get(b"ctl") == b"gap":
                gaps += 1
        start = "(" + batch[-1][0].decode()


# --- the runs -------------------------------------------------------------------------------------

def run_bare(sim: Sim, seconds: float, deliver: bool = False) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--bare", f"{sim.ws_url}/market/stream?streams={STREAM}",
         "--seconds", str(seconds), *(["--deliver"] if deliver else [])],
        capture_output=True, text=True, check=True, cwd=ROOT, preexec_fn=pinned(READER_CPU))
    result: dict[str, float] = json.loads(out.stdout)
    return result


def run_ingest(sim: Sim, r: redis.Redis, url: str, seconds: float,
               pause: float | None = None) -> dict[str, float]:
    r.flushall()
    ing = Ingestor(url, sim.ws_url, pause)
    try:
        wait_for(lambda: entries_added(r) > 0)
        time.sleep(1.0)  # warm-up, as in the bare loop
        n0, t0, s0 = entries_added(r), time.perf_counter(), sim.stats()["frames_total"]
        c0, th0, sw0 = ing.cpu_seconds(), ing.thread_cpu(), ing.main_switches()
        time.sleep(seconds)
        n1, t1, s1 = entries_added(r), time.perf_counter(), sim.stats()["frames_total"]
        c1, th1, sw1 = ing.cpu_seconds(), ing.thread_cpu(), ing.main_switches()
        peak = ing.peak_rss_mb()
    finally:
        ing.stop()
    main_tid = ing.proc.pid
    main_cpu = th1.get(main_tid, 0.0) - th0.get(main_tid, 0.0)
    other_cpu = sum(v - th0.get(t, 0.0) for t, v in th1.items() if t != main_tid)
    n = max(n1 - n0, 1)
    return {"frames": n1 - n0, "seconds": t1 - t0, "rate": (n1 - n0) / (t1 - t0),
            "per_cpu_second": (n1 - n0) / max(c1 - c0, 1e-9),
            "us_per_frame_main_thread": 1e6 * main_cpu / n,
            "us_per_frame_other_threads": 1e6 * other_cpu / n,
            "main_thread_switches_per_s": [(sw1[0] - sw0[0]) / (t1 - t0),
                                           (sw1[1] - sw0[1]) / (t1 - t0)],
            "sim_sent_rate": (s1 - s0) / (t1 - t0), "peak_rss_mb": peak}


def run_burst(r: redis.Redis, url: str, burst: int, seconds: float) -> dict[str, Any]:
    r.flushall()
    sim = Sim("--rate", "50", "--burst", str(burst), "--burst-every", "0.1")
    try:
        ing = Ingestor(url, sim.ws_url)
        try:
            wait_for(lambda: entries_added(r) > 0)
            time.sleep(seconds)
            sim.post("silence", {"on": True})
            wait_until_still(r)
            peak = ing.peak_rss_mb()
        finally:
            ing.stop()
        sent = int(sim.stats()["frames_by_stream"].get(STREAM, 0))
    finally:
        sim.stop()
    logged, gaps = count_frames(r)
    return {"burst": burst, "every_s": 0.1, "sent": sent, "logged": logged,
            "lost": sent - logged, "gap_entries": gaps, "peak_rss_mb": peak}


def run_oom(folder: Path, seconds: float, buffer_frames: int | None) -> dict[str, Any]:
    """Redis out of memory for `seconds` under a steady 2,000 frames/s: what was lost, and
    whether each loss is in a gap entry."""
    with LocalRedis(folder, args=["--maxmemory-policy", "noeviction"]) as server:
        r = server.client()
        sim = Sim("--rate", "2000")
        try:
            env = {} if buffer_frames is None else {"PIPELINE_BUFFER_FRAMES": str(buffer_frames)}
            ing = Ingestor(server.url, sim.ws_url, settings=env)
            try:
                wait_for(lambda: entries_added(r) > 0)
                r.setrange("filler", 64 * 1024 * 1024 - 1, b"x")  # room to give back later
                r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 256 * 1024)
                wait_for(lambda: int(r.info("stats")["total_error_replies"]) > 0)
                time.sleep(seconds)
                r.delete("filler")
                time.sleep(2.0)
                sim.post("silence", {"on": True})
                wait_until_still(r)
                peak = ing.peak_rss_mb()
            finally:
                ing.stop()
            sent = int(sim.stats()["frames_by_stream"].get(STREAM, 0))
        finally:
            sim.stop()
        account = log_account(r, KEY)
        r.close()
    return {"oom_s": seconds, "buffer_frames": buffer_frames or 200_000, "sent": sent,
            **account, "unaccounted": sent - account["logged"] - account["in_gaps"],
            "peak_rss_mb": peak}


def run_frozen_big_frames(folder: Path) -> dict[str, Any]:
    """Redis frozen while 150 frames of 2 MiB arrive (the simulator's malformed set, every
    fifth oversized), the buffer bounded at 64 MiB: peak memory, and the account after."""
    with LocalRedis(folder) as server:
        assert server.proc is not None
        r = server.client()
        sim = Sim("--rate", "20")
        try:
            ing = Ingestor(server.url, sim.ws_url, settings={"PIPELINE_BUFFER_BYTES": "64MiB"})
            try:
                wait_for(lambda: entries_added(r) > 0)
                time.sleep(1.0)
                before = ing.peak_rss_mb()
                os.kill(server.proc.pid, signal.SIGSTOP)
                try:
                    sim.post("malformed", {"count": 750})
                    time.sleep(5.0)
                    peak = ing.peak_rss_mb()
                finally:
                    os.kill(server.proc.pid, signal.SIGCONT)
                time.sleep(3.0)
                sim.post("silence", {"on": True})
                wait_until_still(r)
            finally:
                ing.stop()
            sent = int(sim.stats()["malformed_sent"])
        finally:
            sim.stop()
        # the set's truncated frame still names its stream: it goes to that stream's key
        parts = [log_account(r, key) for key in (KEY_OTHER, KEY_MARK)]
        account = {"logged": sum(p["logged"] for p in parts),
                   "in_gaps": sum(p["in_gaps"] for p in parts),
                   "gaps_by_reason": {reason: sum(p["gaps_by_reason"].get(reason, 0)
                                                  for p in parts)
                                      for p in parts for reason in p["gaps_by_reason"]}}
        r.close()
    return {"frames": sent, "of_2_mib": sent // 5, "offered_mb": sent // 5 * 2,
            "rss_before_mb": before, "peak_rss_mb": peak, **account,
            "unaccounted": sent - account["logged"] - account["in_gaps"]}


def run_faults(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"oom": [run_oom(Path(tmp) / "oom", seconds, None),
                        run_oom(Path(tmp) / "oom-small", seconds, 5000)],
                "frozen": run_frozen_big_frames(Path(tmp) / "frozen")}


def print_faults(faults: dict[str, Any]) -> None:
    print(f"\n{'Redis out of memory':<28}{'sent':>8}{'logged':>8}{'in gaps':>9}"
          f"{'unaccounted':>13}   gaps by reason")
    for run in faults["oom"]:
        name = f"{run['oom_s']:g} s, buffer {run['buffer_frames']:,}"
        print(f"{name:<28}{run['sent']:>8}{run['logged']:>8}{run['in_gaps']:>9}"
              f"{run['unaccounted']:>13}   {run['gaps_by_reason']}")
    f = faults["frozen"]
    print(f"\nRedis frozen, {f['of_2_mib']} frames of 2 MiB ({f['offered_mb']} MB) offered, "
          f"PIPELINE_BUFFER_BYTES=64MiB: ingestor peak RSS {f['rss_before_mb']:.0f} -> "
          f"{f['peak_rss_mb']:.0f} MB; {f['frames']} frames, {f['logged']} logged, "
          f"{f['in_gaps']} in gaps {f['gaps_by_reason']}, {f['unaccounted']} unaccounted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", action="store_true",
                        help="simulator and redis on CPU 0, bare loop and ingestor on CPU 1")
    parser.add_argument("--skip-bursts", action="store_true",
                        help="throughput only (for quick comparisons while tuning)")
    parser.add_argument("--pauses", action="store_true",
                        help="also the ingestor with the writer's pause forced to 0, 1 and 10 ms")
    parser.add_argument("--faults", action="store_true",
                        help="also Redis out of memory and frozen (issue #11's runs, scaled)")
    parser.add_argument("--faults-only", action="store_true", help="only those")
    parser.add_argument("--oom-seconds", type=float, default=10.0)
    parser.add_argument("--prelude", default="",
                        help="Python code the ingestor's process runs before it starts, for "
                             "ablations, e.g. 'import gc; gc.disable()'")
    parser.add_argument("--micro", action="store_true",
                        help="only the reader's own work per frame in a tight loop (no I/O)")
    parser.add_argument("--bare", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--deliver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_main(args.bare, args.seconds, args.warmup, args.deliver)
        return 0
    if args.micro:
        for name, us in micro().items():
            print(f"{name:<20}{us:>8.3f} µs a frame")
        return 0
    global FEED_CPU, READER_CPU, PRELUDE
    PRELUDE = args.prelude
    if args.pin:
        FEED_CPU, READER_CPU = 0, 1
    if args.faults_only:
        faults = run_faults(args.oom_seconds)
        print_faults(faults)
        write_result({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "command": "bench/bench_ingest.py " + " ".join(sys.argv[1:]),
                      "faults": faults}, "faults")
        return 0

    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp)) as server:
        if FEED_CPU is not None and server.proc is not None:
            os.sched_setaffinity(server.proc.pid, {FEED_CPU})
        r = server.client()
        sim = Sim("--rate", "0")
        bare, taken, ingest = [], [], []
        pauses: dict[str, list[dict[str, float]]] = {p: [] for p in PAUSES} if args.pauses else {}
        try:
            for _ in range(args.rounds):
                bare.append(run_bare(sim, args.seconds))
                taken.append(run_bare(sim, args.seconds, deliver=True))
                ingest.append(run_ingest(sim, r, server.url, args.seconds))
                for name in pauses:
                    pauses[name].append(run_ingest(sim, r, server.url, args.seconds,
                                                   PAUSES[name]))
        finally:
            sim.stop()
        bursts = [] if args.skip_bursts else [run_burst(r, server.url, b, args.seconds)
                                              for b in (500, 2000)]
        r.close()

    bare_rate = statistics.median(b["rate"] for b in bare)
    ingest_rate = statistics.median(i["rate"] for i in ingest)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "bench/bench_ingest.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(), "pinned": args.pin, "bare": bare, "bare_deliver": taken,
        "ingest": ingest,
        "bursts": bursts,
        "pauses": {name: statistics.median(run["rate"] for run in runs) / bare_rate
                   for name, runs in pauses.items()},
        "bare_rate": bare_rate, "ingest_rate": ingest_rate, "ratio": ingest_rate / bare_rate,
        "cpu_ratio": statistics.median(i["per_cpu_second"] for i in ingest)
        / statistics.median(b["per_cpu_second"] for b in bare),
        "deliver_ratio": ingest_rate / statistics.median(b["rate"] for b in taken),
        "deliver_cpu_ratio": statistics.median(i["per_cpu_second"] for i in ingest)
        / statistics.median(b["per_cpu_second"] for b in taken),
        "peak_rss_mb": max([i["peak_rss_mb"] for i in ingest] + [b["peak_rss_mb"]
                                                                   for b in bursts]),
    }
    print_table(result)
    if args.faults:
        result["faults"] = run_faults(args.oom_seconds)
        print_faults(result["faults"])
    write_result(result, "ingest")
    return 0


def write_result(result: dict[str, Any], name: str) -> None:
    out = ROOT / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


def print_table(res: dict[str, Any]) -> None:
    print(f"{'run':<34}{'frames/s':>12}{'per CPU-s':>12}")
    takes = res.get("bare_deliver") or [None] * len(res["bare"])
    for i, (b, d, g) in enumerate(zip(res["bare"], takes, res["ingest"], strict=True), 1):
        print(f"{f'bare trio-websocket loop, round {i}':<34}{b['rate']:>12,.0f}"
              f"{b['per_cpu_second']:>12,.0f}")
        if d is not None:
            print(f"{f'bare loop, messages taken, round {i}':<34}{d['rate']:>12,.0f}"
                  f"{d['per_cpu_second']:>12,.0f}")
        print(f"{f'ingestor persisted, round {i}':<34}{g['rate']:>12,.0f}"
              f"{g['per_cpu_second']:>12,.0f}   (simulator sent {g['sim_sent_rate']:,.0f}/s)")
    print(f"{'ratio (medians)':<34}{res['ratio']:>12.2f}{res['cpu_ratio']:>12.2f}"
          "   target >= 0.90 (issue #16)")
    if "deliver_ratio" in res:
        print(f"{'ratio to messages taken':<34}{res['deliver_ratio']:>12.2f}"
              f"{res['deliver_cpu_ratio']:>12.2f}   (the ingestor's own work per frame)")
    bare_us = 1e6 / statistics.median(b["per_cpu_second"] for b in res["bare"])
    main_us = statistics.median(g["us_per_frame_main_thread"] for g in res["ingest"])
    other_us = statistics.median(g["us_per_frame_other_threads"] for g in res["ingest"])
    print(f"CPU per frame (medians): bare loop {bare_us:.2f} µs; ingestor {main_us + other_us:.2f}"
          f" µs = main thread (trio, websocket, routing, packing) {main_us:.2f} + other threads"
          f" (log writer, trio workers) {other_us:.2f}; main thread context switches/s "
          "(voluntary, involuntary): "
          + ", ".join(f"{g['main_thread_switches_per_s'][0]:,.0f} / "
                      f"{g['main_thread_switches_per_s'][1]:,.0f}" for g in res["ingest"]))
    for name, ratio in res["pauses"].items():
        print(f"{'writer pause ' + name:<34}{ratio:>12.2f}   (ratio of the medians)")
    print()
    print(f"{'burst every 100 ms':<20}{'sent':>10}{'logged':>10}{'lost':>8}{'gaps':>6}")
    for b in res["bursts"]:
        print(f"{b['burst']:<20}{b['sent']:>10}{b['logged']:>10}{b['lost']:>8}"
              f"{b['gap_entries']:>6}")
    print(f"\ningestor peak RSS: {res['peak_rss_mb']:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
