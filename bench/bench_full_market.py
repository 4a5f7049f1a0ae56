"""The whole market on one host (issue #16), measured with real processes.

    .venv/bin/python bench/bench_full_market.py              # 60 s steady, 30 s crash, headroom
    .venv/bin/python bench/bench_full_market.py --quick      # ~1 minute, for a smoke test
    .venv/bin/python bench/bench_full_market.py --steady-s 20 --crash-s 10 --no-headroom
    .venv/bin/python bench/bench_full_market.py --all-families --mark-arr ...  # every family
    .venv/bin/python bench/bench_full_market.py --split   # a projector per projection, to compare
    .venv/bin/python bench/bench_full_market.py --markdown bench/results/full_market.json

Variants: `--mark-arr` (`!markPrice@arr@1s` instead of 550 markPrice@1s streams), `--shards N`
(N market ingestors, `PIPELINE_SHARD` i/N), `--all-families` (the top symbols' ingestor also
takes depth5, depth10, diff depth, bookTicker, forceOrder, kline_1h: bytes per entry of every
family).

What runs, each its own process on this machine:
- redis-server (`pipeline.localredis.LocalRedis`, a temporary folder);
- `pipeline simulate --cadence --market-size 550`: every stream at its own rate (markPrice@1s
  once a second, kline_1m every 250 ms when the candle changed, aggTrade in heavy-tailed
  clusters, depth20@100ms when the book changed), crash phases switched over HTTP
  (`POST /sim/market/crash`);
- `pipeline ingest market` with `PIPELINE_SYMBOLS=ALL` and `markPrice@1s,kline_1m,aggTrade`
  (every TRADING symbol the simulator lists), and a second `pipeline ingest market` for
  `depth20@100ms` of the 50 most traded symbols (the simulator's listing order is its trade
  rank); `PIPELINE_KLINE_HISTORY=0`, so the start's REST history does not mix into the phases;
- ONE projector process for all four market projections: this script started again with
  `--projector-child`, which runs `projections.shell.project.run` exactly as `pipeline project`
  does, with an `on_written` callback that records, per frame entry, only (time the view
  write + ack round trip returned, the entry id, key) as doubles into a file, flushed every
  0.5 s (so the samples do not grow its RSS); the frame's `E`, `recv_ts`, connection and seq
  are joined from the log after the run, so parsing them costs the measured path nothing.

Phases, back to back after a warm-up: `steady` (no crash), `crash` (trades, book changes and
book tickers x5), then, unless `--no-headroom`, `headroom` steps with the crash multiplier
raised (x10, x20, x40, ...; no further once the simulator used more than 0.9 of a core: it is
saturated and cannot make more). Headroom: the last multiplier with no frame lost, and the last
whose frame->view p99 stayed within 10 ms, each with the first that failed and its busiest
process.

Per phase it reports:
- frames/s the simulator wrote (`GET /sim/stats` frames_total), the entries the log got
  (`XINFO STREAM` entries-added over every `raw:market:*` key) and the frame entries the
  projector folded (callback), over the same instants (they differ by what was in flight at
  the two ends of the phase);
- loss: per ingestor connection the `seq` numbers of the phase's entries must have no hole
  (`seq` numbers a connection's frames from 1), no `gap` entry may appear, no connection may
  close, and per symbol the aggTrade ids `a` (consecutive at the exchange) may have no hole:
  that also catches frames the exchange dropped for a slow reader. After the last phase the
  simulator is silenced, everything drains, and the totals must agree exactly: frames sent =
  frame entries in the log = frame entries folded (+ those of `raw:market:other` and
  `raw:market:forceOrder`, which no projection reads);
- mark-price view age over all symbols: every 0.25-0.75 s (random, so the reads fall anywhere
  in the second) all `mark_price` views are read (MGET) and now - timestamp (the event time)
  taken; p50/p99 over all reads of the phase. These reads are few (~2 a second, each of 550
  views that all moved at the same instant), so their p99 is nearly the max of one or two
  reads near a second's turn and swings between runs; the figure the target is judged on is
  therefore also computed exactly (`view_ages`): from the projector's writes of every
  mark-price entry (written_at, E), each view's age at EVERY instant of the phase, p50/p99
  weighted by time, and the share of time a view is older than 1 s;
- one second's mark prices (`mark_bursts`): per second, when the first and the last of the
  entries sharing an `E` were received, logged and written (medians over the seconds);
- frame->view latency p50/p99 (bench_projector.py's method: the instant right after the batch's
  write + ack returned minus the frame's `E`; coalesced frames count, their view was written
  with the same or a newer value), with the receive / log / project legs, by family, and from
  the ingestor's `recv_ts` (the pipeline after receipt);
- the simulator's own lag: an observer thread (a raw socket, no websocket library, on
  markPrice@1s and aggTrade of 12 symbols) notes receipt time - `E`: in cadence mode `E` is
  the tick an event was made in, and how late the simulator sends it is not the pipeline's;
- CPU ms per 1,000 frames per process (utime + stime from /proc/<pid>/stat) and RSS (VmRSS,
  and VmHWM at the end);
- at the end of the steady phase and at the end: Redis `used_memory`, and per raw key
  `MEMORY USAGE key SAMPLES 0` / `XLEN` = bytes per retained entry.

Writes JSON to bench/results/full_market.json and prints a report.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.localredis import LocalRedis  # noqa: E402
from pipeline.simulator.config import SimConfig  # noqa: E402
from pipeline.simulator.listings import market_symbols  # noqa: E402
from projections.core.keys import Keys, market_key  # noqa: E402

MARKET_SIZE = 550
TOP = 50
MARKET_STREAMS = "markPrice@1s,kline_1m,aggTrade"
BOOK_STREAMS = "depth20@100ms"
# --all-families: every other family too, on the top symbols' second ingestor (bytes per entry)
EVERY_BOOK_STREAM = ("depth5@100ms,depth10@100ms,depth20@100ms,depth@100ms,bookTicker,"
                     "forceOrder,kline_1h")
FAMILIES = ("markPrice", "kline_1m", "aggTrade", "depth20", "other", "markPrice_arr",
            "depth5", "depth10", "depth", "bookTicker", "forceOrder", "kline_1h")
RAW_KEYS = [market_key(f) for f in FAMILIES]
UNPROJECTED = (market_key("other"), market_key("forceOrder"))  # logged, folded by nobody
CONN_KEY = "raw:conn:market"
COLS = 8  # written_at, E, recv_ts, id_ms, key index, conn index, seq, id seq (after the join)
RECORDED = 4  # written_at, id_ms, id_seq, key index: what the projector child records
P99_LIMIT_MS = 10.0
SIM_SATURATED = 0.9  # cores: the simulator is saturated and cannot make more; stop raising


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "BINANCE_"))}
    env.update(extra)
    return env


# --- the projector child ----------------------------------------------------------------------

def market_specs(settings: Any, only: str | None = None) -> list[Any]:
    """The projections `pipeline project` runs for these settings, less the user side's
    (orders, account: no user stream here); `only`: that one alone."""
    from projections.shell.registry import choose
    return [s for s in choose(settings, None) if s.name not in ("orders", "account")
            and only in (None, s.name)]


def whole_records(data: bytes) -> bytes:
    """A projector child's file up to its last whole record (a child stopped mid-write)."""
    return data[:len(data) // (8 * RECORDED) * 8 * RECORDED]


def projector_child(out: str, only: str | None = None) -> int:
    """`pipeline project` (all market projections, one process; `only`: that one, as
    `pipeline project --only NAME`) with a recording callback."""
    import trio

    from pipeline.config import load_settings
    from projections.core.batch import Folded, RawEntry
    from projections.shell import project as runner

    settings = load_settings(env=dict(os.environ))
    specs = market_specs(settings, only)
    key_index = {k.encode(): i for i, k in enumerate(RAW_KEYS)}
    key_index.update({k: i for i, k in enumerate(RAW_KEYS)})  # type: ignore[dict-item]
    buf = array.array("d")
    sink = open(out, "wb")  # noqa: SIM115 - closed at exit
    last = [time.time()]
    lock = threading.Lock()  # each projection calls back from its own worker thread

    def on_written(entries: list[RawEntry], folded: Folded) -> None:
        # as little as possible here: this runs in the projector, on the path it measures;
        # the frame's E, recv_ts, connection and seq are joined from the log after the run
        at = folded.written_at
        row: list[float] = []
        for key, eid, fields in entries:
            if b"frame" in fields:
                ms, _, sq = eid.partition(b"-")
                row += (at, float(ms), float(sq), key_index.get(key, -1))
        with lock:
            buf.extend(row)
            if at - last[0] > 0.5:
                buf.tofile(sink)
                sink.flush()
                del buf[:]
                last[0] = at

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def stop() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return
                nursery.start_soon(stop)
                await runner.run(settings, specs, runner.RunOptions(consumer="bench"),
                                 on_written=on_written)

    print("projector ready", flush=True)
    trio.run(main)
    buf.tofile(sink)
    sink.close()
    return 0


# --- processes ----------------------------------------------------------------------------------

def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, kb = line.split()[:2]
            vals[name] = int(kb) / 1024
    return vals.get("VmRSS:", 0.0), vals.get("VmHWM:", 0.0)


# --- the observer: when frames leave the simulator -------------------------------------------

OBSERVED = 12  # symbols spread over the listing whose markPrice@1s and aggTrade it reads


class Observer:
    """A bare reader on its own thread: a raw socket (no websocket library) subscribed to the
    markPrice@1s and aggTrade of `OBSERVED` symbols spread over the listing, recording for each
    frame (receipt time - E). It shows how late the simulator itself sends a frame after its
    `E` (making a tick's events, a whole second's 550 mark prices at once, takes it time), the
    part of the receive leg that is not the pipeline's."""

    def __init__(self, ws_url: str, symbols: tuple[str, ...]) -> None:
        step = max(1, len(symbols) // OBSERVED)
        picked = [s.lower() for s in symbols[::step][:OBSERVED]]
        self.names = [f"{s}@{k}" for s in picked for k in ("markPrice@1s", "aggTrade")]
        self.ws_url = ws_url
        self.rows: list[tuple[float, str, float]] = []  # (received, kind, received - E in ms)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        import trio

        from bench.bench_simulator import raw_socket, subscribe

        async def main() -> None:
            stream = await raw_socket(self.ws_url, "/market/ws")
            await subscribe(stream, self.names)
            buf = bytearray()
            while not self.stop.is_set():
                with trio.move_on_after(0.5):
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    now = time.time()
                    buf += data
                    self._frames(buf, now)
            await stream.aclose()

        trio.run(main)

    def _frames(self, buf: bytearray, now: float) -> None:
        """Cut whole server frames (unmasked, RFC 6455 5.2) off `buf` and record them."""
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at:at + n])
            del buf[:at + n]
            i = payload.find(b'"E":')
            if i >= 0:
                e = float(payload[i + 4:payload.find(b",", i)])
                kind = "markPrice" if b"markPrice" in payload[:60] else "aggTrade"
                self.rows.append((now, kind, now * 1000 - e))


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, server: LocalRedis) -> None:
        self.args, self.tmp, self.server = args, tmp, server
        self.r: Any = server.client()
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.pids: dict[str, int] = {}
        self.samples_path = tmp / "samples.bin"
        self.keys = Keys()

    # processes
    def launch(self) -> None:
        py = sys.executable
        sim = start([py, "-m", "pipeline", "simulate", "--cadence", "--market-size",
                     str(MARKET_SIZE), "--seed", "1", "--ws-port", "0", "--rest-port", "0"],
                    clean_env(), self.tmp / "sim.log")
        self.procs["simulator"] = sim
        assert sim.stdout is not None
        ready = sim.stdout.readline().split()
        self.ws = next(w[3:] for w in ready if w.startswith("ws="))
        self.rest = next(w[5:] for w in ready if w.startswith("rest="))
        self.http = httpx.Client(base_url=self.rest, timeout=120)  # a saturated simulator is slow
        base = {"REDIS_URL": self.server.url, "BINANCE_WS_URL": self.ws,
                "BINANCE_REST_URL": self.rest, "PIPELINE_KLINE_HISTORY": "0"}
        self.symbols = market_symbols(SimConfig().symbols, MARKET_SIZE)
        streams = self.market_streams()
        shards = self.args.shards
        for i in range(1, shards + 1):
            name = "ingest_market" if shards == 1 else f"ingest_market_{i}"
            shard = {} if shards == 1 else {"PIPELINE_SHARD": f"{i}/{shards}"}
            self.procs[name] = start(
                [py, "-m", "pipeline", "ingest", "market"],
                clean_env(**base, **shard, PIPELINE_SYMBOLS="ALL",
                          PIPELINE_MARKET_STREAMS=streams),
                self.tmp / f"{name}.log")
        self.procs["ingest_depth"] = start(
            [py, "-m", "pipeline", "ingest", "market"],
            clean_env(**base, PIPELINE_SYMBOLS=",".join(self.symbols[:TOP]),
                      PIPELINE_MARKET_STREAMS=self.book_streams()),
            self.tmp / "ingest_depth.log")
        proj_env = clean_env(**base, PIPELINE_SYMBOLS="ALL",
                             PIPELINE_MARKET_STREAMS=f"{streams},{self.book_streams()}")
        for name in self.projector_names(proj_env):
            label = "projector" if name is None else f"projector_{name}"
            argv = [py, str(Path(__file__).resolve()), "--projector-child",
                    str(self.samples_file(name))] + ([] if name is None else ["--only", name])
            proj = start(argv, proj_env, self.tmp / f"{label}.log")
            self.procs[label] = proj
            assert proj.stdout is not None
            proj.stdout.readline()
        self.pids = {name: p.pid for name, p in self.procs.items()}
        self.pids["redis"] = int(self.r.info("server")["process_id"])
        self.pids["bench"] = os.getpid()
        self.observer = Observer(self.ws, self.symbols)
        self.observer.start()

    def projector_names(self, env: dict[str, str]) -> list[str | None]:
        """[None]: one projector for all; `--split`: one process per projection's name."""
        if not self.args.split:
            return [None]
        from pipeline.config import load_settings
        return [s.name for s in market_specs(load_settings(env=env))]

    def samples_file(self, name: str | None) -> Path:
        return self.samples_path if name is None else self.tmp / f"samples-{name}.bin"

    def merge_samples(self) -> None:
        """`--split`: every projector's records into `samples_path` (each file holds whole
        records; the analysis sorts nothing by file)."""
        if self.args.split:
            with open(self.samples_path, "wb") as out:
                for label in self.procs:
                    if label.startswith("projector_"):
                        path = self.samples_file(label[len("projector_"):])
                        out.write(whole_records(path.read_bytes()))

    def book_streams(self) -> str:
        return EVERY_BOOK_STREAM if self.args.all_families else BOOK_STREAMS

    def market_streams(self) -> str:
        if self.args.mark_arr:
            return MARKET_STREAMS.replace("markPrice@1s", "!markPrice@arr@1s")
        return MARKET_STREAMS

    def stop(self) -> None:
        if hasattr(self, "observer"):
            self.observer.close()
        for name in [*(n for n in self.procs if n.startswith("projector")),
                     *(n for n in self.procs if n.startswith("ingest")), "simulator"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"{name} exited ({p.returncode}):\n{tail}")

    # counters
    def sent(self) -> int:
        """Frames the simulator wrote to the pipeline's connections (not the observer's)."""
        stats = self.http.get("/sim/stats").json()
        observer = sum(int(c["frames"]) for c in stats["connections"]
                       if c["streams"] == len(self.observer.names))
        return int(stats["frames_total"]) - observer

    def added(self) -> dict[str, int]:
        out = {}
        for key in RAW_KEYS:
            try:
                out[key] = int(self.r.xinfo_stream(key)["entries-added"])
            except redis.ResponseError:
                out[key] = 0
        return out

    def counters(self) -> dict[str, Any]:
        return {"t": time.time(), "sent": self.sent(), "added": self.added(),
                "cpu": {n: cpu_s(p) for n, p in self.pids.items()}}

    def crash(self, on: bool, multiplier: float = 5.0) -> None:
        self.http.post("/sim/market/crash", json={"on": on, "multiplier": multiplier}
                       ).raise_for_status()

    def mark_ages(self, now: float) -> list[float]:
        names = [self.keys.mark_price(s) for s in self.symbols]
        ages = []
        for raw in self.r.mget(names):
            if raw is not None:
                ages.append(now - orjson.loads(raw)["timestamp"])
        return ages

    def conn_events(self, t0_ms: int, t1_ms: int) -> Counter[str]:
        """Connection entries (opened, closed, gap, ...) logged between the two times."""
        out: Counter[str] = Counter()
        for _id, f in self.r.xrange(CONN_KEY, min=f"{t0_ms}-0", max=f"{t1_ms}-0"):
            out[f.get(b"ctl", b"?").decode()] += 1
        return out

    def run_phase(self, name: str, seconds: float) -> dict[str, Any]:
        c0 = self.counters()
        ages: list[float] = []
        end = c0["t"] + seconds
        while (now := time.time()) < end:
            self.alive()
            ages += self.mark_ages(now)
            # a random offset in the second: mark prices move on whole seconds
            time.sleep(min(random.uniform(0.25, 0.75), max(0.0, end - time.time())))
        c1 = self.counters()
        mem = {n: mem_mb(p) for n, p in self.pids.items()}
        events = self.conn_events(int(c0["t"] * 1000), int(c1["t"] * 1000))
        return {"name": name, "t0": c0["t"], "t1": c1["t"], "c0": c0, "c1": c1,
                "mark_ages": ages, "mem": mem, "load": os.getloadavg()[0],
                "conn_events": events}

    def memory(self) -> dict[str, Any]:
        info = self.r.info("memory")
        per: dict[str, Any] = {}
        for key in [*RAW_KEYS, CONN_KEY, "raw:depth_snapshots"]:
            n = self.r.xlen(key)
            if n:
                usage = int(self.r.memory_usage(key, samples=0) or 0)
                per[key] = {"entries": n, "bytes": usage, "bytes_per_entry": usage / n}
        return {"used_memory": int(info["used_memory"]),
                "used_memory_dataset": int(self.r.info("memory").get("used_memory_dataset", 0)),
                "keys": per}

    def drain(self, timeout: float = 180.0) -> int:
        """Silence the simulator; wait until the log stops growing and every group is done.
        (Silenced, the simulator drops what it made and had not sent yet: trade ids received
        after `silenced_at` may have holes that are no loss.)"""
        self.silenced_at = time.time()
        self.http.post("/sim/silence", json={"on": True}).raise_for_status()
        deadline = time.time() + timeout
        last, stable = -1, 0
        while time.time() < deadline:
            total = sum(self.added().values())
            busy = False
            for key in RAW_KEYS:
                if key not in UNPROJECTED and self.r.exists(key):
                    for g in self.r.xinfo_groups(key):
                        busy |= bool(g["pending"]) or bool(g.get("lag"))
            stable = stable + 1 if total == last and not busy else 0
            if stable >= 4:
                return self.sent()
            last = total
            time.sleep(0.25)
        return self.sent()


# --- analysis ---------------------------------------------------------------------------------

def load_samples(path: Path, log: dict[str, Any]) -> list[tuple[float, ...]]:
    """The projector child's records joined with the log (`scan_log`'s `frames`): one
    (written_at, E, recv_ts, id_ms, key index, conn index, seq, id seq) per folded frame entry; the
    connection names (`scan_log`'s `conns`, by index) go to `<samples>.conns`."""
    frames = log["frames"]
    arr = array.array("d")
    arr.frombytes(whole_records(path.read_bytes()))
    out: list[tuple[float, ...]] = []
    missing = 0
    for i in range(0, len(arr), RECORDED):
        at, ms, sq, k = arr[i:i + RECORDED]
        got = frames.get((int(k), int(ms), int(sq)))
        if got is None:
            missing += 1  # trimmed from the log before the scan: counted, not timed
            continue
        e, recv, ci, seq = got
        out.append((at, e, recv, ms, k, ci, seq, sq))
    path.with_suffix(".conns").write_text("\n".join(log["conns"]) + "\n")
    if missing:
        print(f"WARNING: {missing} folded entries were no longer in the log: not timed",
              flush=True)
    return out


def quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=100)
    return q[49], q[98], max(values)


def seq_holes(rows: list[tuple[str, int]]) -> int:
    """Missing numbers per connection between the first and last seq seen."""
    by_conn: dict[str, set[int]] = defaultdict(set)
    for conn, seq in rows:
        by_conn[conn].add(seq)
    return sum(max(s) - min(s) + 1 - len(s) for s in by_conn.values())


def window_rows(samples: list[tuple[float, ...]], conn_names: list[str],
                other: list[tuple[float, str, int]], t0: float, t1: float
                ) -> list[tuple[str, int]]:
    """(connection, seq) of every frame entry received in [t0, t1), projected or not."""
    rows = [(conn_names[int(s[5])], int(s[6])) for s in samples if t0 <= s[2] < t1]
    return rows + [(c, q) for recv, c, q in other if t0 <= recv < t1]


def analyse(b: Bench, phases: list[dict[str, Any]], samples: list[tuple[float, ...]],
            log: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    conn_names = (b.samples_path.with_suffix(".conns")).read_text().split()
    writes = mark_writes(samples, log["marks"])
    for ph in phases:
        t0, t1 = ph["t0"], ph["t1"]
        c0, c1 = ph["c0"], ph["c1"]
        wall = t1 - t0
        sent = c1["sent"] - c0["sent"]
        logged = sum(c1["added"].values()) - sum(c0["added"].values())
        lat: list[float] = []
        after_recv: list[float] = []
        legs: tuple[list[float], list[float], list[float]] = ([], [], [])
        folded = 0
        by_family: dict[str, list[float]] = defaultdict(list)
        by_family_recv: dict[str, list[float]] = defaultdict(list)
        for w, e, recv, id_ms, k, _c, _s, _q in samples:
            if t0 <= w < t1:
                folded += 1
                fam = FAMILIES[int(k)]
                by_family_recv[fam].append(w * 1000 - recv * 1000)
                after_recv.append(w * 1000 - recv * 1000)
                if e > 0:
                    by_family[fam].append(w * 1000 - e)
                    lat.append(w * 1000 - e)
                    legs[0].append(recv * 1000 - e)
                    legs[1].append(id_ms - recv * 1000)
                    legs[2].append(w * 1000 - id_ms)
        holes_trades = 0
        for ids in log["trades"].values():
            in_phase = sorted(a for a, when in ids if t0 <= when < t1)
            if in_phase:
                holes_trades += in_phase[-1] - in_phase[0] + 1 - len(set(in_phase))
        observed: dict[str, list[float]] = defaultdict(list)
        for when, kind, lag in b.observer.rows:
            if t0 <= when < t1:
                observed[kind].append(lag)
        p50, p99, mx = quantiles(lat)
        a50, a99, amax = quantiles(ph["mark_ages"])
        cpu = {n: (c1["cpu"][n] - c0["cpu"][n]) for n in c0["cpu"]}
        out.append({
            "phase": ph["name"], "multiplier": ph.get("multiplier", 1.0),
            "seconds": wall, "load_avg": ph["load"],
            "sent_per_s": sent / wall, "sent": sent, "logged": logged, "folded": folded,
            "logged_per_s_by_key": {k: (c1["added"][k] - c0["added"][k]) / wall
                                    for k in c0["added"] if c1["added"][k] > c0["added"][k]},
            "seq_holes": seq_holes(window_rows(samples, conn_names, log["other"], t0, t1)),
            "trade_id_holes": holes_trades,
            "conn_events": dict(ph["conn_events"]),
            "latency_ms": {"p50": p50, "p99": p99, "max": mx, "frames": len(lat),
                           "from_recv_p50": quantiles(after_recv)[0],
                           "from_recv_p99": quantiles(after_recv)[1],
                           **{f"{leg}_{q}": v for leg, vals in
                              zip(("receive", "log", "project"), legs, strict=True)
                              for q, v in zip(("p50", "p99"), quantiles(vals)[:2],
                                              strict=True)}},
            "latency_by_family_ms": {
                fam: {"E_p50": quantiles(v)[0], "E_p99": quantiles(v)[1],
                      "recv_p50": quantiles(by_family_recv[fam])[0],
                      "recv_p99": quantiles(by_family_recv[fam])[1], "frames": len(v)}
                for fam, v in sorted(by_family.items())},
            "sim_send_lag_ms": {kind: {"p50": quantiles(v)[0], "p99": quantiles(v)[1],
                                       "frames": len(v)} for kind, v in observed.items()},
            "mark_age_s": {"p50": a50, "p99": a99, "max": amax, "reads": len(ph["mark_ages"])},
            "mark_age_exact_s": view_ages(writes, t0, t1),
            "mark_burst_ms": mark_bursts(samples, log["marks"], t0, t1),
            "cpu_ms_per_1000_frames": {n: 1e6 * v / sent if sent else float("nan")
                                       for n, v in cpu.items()},
            "cpu_cores": {n: v / wall for n, v in cpu.items()},
            "rss_mb": {n: m[0] for n, m in ph["mem"].items()},
            "hwm_mb": {n: m[1] for n, m in ph["mem"].items()},
        })
    return out


def totals(sent: int, samples: list[tuple[float, ...]], log: dict[str, Any],
           conn_names: list[str], until: float) -> dict[str, Any]:
    kinds = log["kinds"]
    rows = [(conn_names[int(s[5])], int(s[6])) for s in samples]
    rows += [(c, q) for _r, c, q in log["other"]]
    return {"sent": sent, "logged_frames": sum(k["frame"] for k in kinds.values()),
            "folded_frames": len(samples), "other_frames": len(log["other"]),
            "control_entries": {key: {k: v for k, v in c.items() if k != "frame"}
                                for key, c in kinds.items()},
            "gap_entries": sum(c["ctl:gap"] for c in kinds.values()),
            "seq_holes": seq_holes(rows),
            "trade_id_holes": holes(log["trades"], until),
            "trade_id_holes_after_silence_included": holes(log["trades"], None)}


def holes(trades: dict[str, list[tuple[int, float]]], until: float | None) -> int:
    """Missing aggregate trade ids per symbol among those received before `until`."""
    total = 0
    for rows in trades.values():
        ids = {a for a, when in rows if until is None or when < until}
        if ids:
            total += max(ids) - min(ids) + 1 - len(ids)
    return total


def scan_log(r: Any) -> dict[str, Any]:
    """One pass over every raw key: frame and control entries per key, the (recv_ts, conn, seq)
    of the frames no projection reads (`raw:market:other`, `raw:market:forceOrder`), and per
    symbol the (aggregate trade id, recv_ts) of every logged aggTrade frame."""
    kinds: dict[str, Counter[str]] = {}
    other: list[tuple[float, str, int]] = []
    # projected frames by (key index, id ms, id seq): (E, recv_ts, conn index, seq)
    frames: dict[tuple[int, int, int], tuple[float, float, int, int]] = {}
    conns: dict[bytes, int] = {}
    trades: dict[str, list[tuple[int, float]]] = defaultdict(list)
    # mark-price frames by (key index, id ms, id seq): the symbol ("*": an `!markPrice@arr`
    # frame, every symbol at once)
    marks: dict[tuple[int, int, int], str] = {}
    mark_keys = {RAW_KEYS.index(market_key("markPrice")): False,
                 RAW_KEYS.index(market_key("markPrice_arr")): True}
    for ki, key in enumerate(RAW_KEYS):
        count: Counter[str] = Counter()
        last = "-"
        while True:
            chunk = r.xrange(key, min=last, count=20_000)
            if last != "-":
                chunk = chunk[1:]
            if not chunk:
                break
            for _id, f in chunk:
                frame = f.get(b"frame")
                if frame is None:
                    count["ctl:" + f.get(b"ctl", b"?").decode()] += 1
                    continue
                count["frame"] += 1
                ms, _, sq = _id.partition(b"-")
                i = frame.find(b'"E":')
                e = float(frame[i + 4:frame.find(b",", i)]) if i >= 0 else -1.0
                conn = f.get(b"conn", b"")
                ci = conns.get(conn)
                if ci is None:
                    ci = conns[conn] = len(conns)
                frames[(ki, int(ms), int(sq))] = (e, float(f[b"recv_ts"]), ci,
                                                  int(f.get(b"seq", b"0")))
                if ki in mark_keys:
                    if mark_keys[ki]:
                        marks[(ki, int(ms), int(sq))] = "*"
                    else:
                        j = frame.find(b'"s":"')
                        marks[(ki, int(ms), int(sq))] = frame[j + 5:frame.find(b'"', j + 5)
                                                              ].decode()
                if key in UNPROJECTED:
                    other.append((float(f[b"recv_ts"]), f[b"conn"].decode(), int(f[b"seq"])))
                elif key == market_key("aggTrade"):
                    d = orjson.loads(frame)["data"]
                    trades[d["s"]].append((d["a"], float(f[b"recv_ts"])))
            last = chunk[-1][0].decode()
        kinds[key] = count
    return {"kinds": kinds, "other": other, "trades": trades, "frames": frames,
            "conns": [c.decode() for c in conns], "marks": marks}


def mark_writes(samples: list[tuple[float, ...]], marks: dict[tuple[int, int, int], str]
                ) -> dict[str, list[tuple[float, float]]]:
    """Per symbol the (written_at s, E s) of every mark-price frame entry the projector wrote
    (a sample is `load_samples`' row; `marks` is `scan_log`'s)."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for w, e, _recv, id_ms, k, _c, _s, id_sq in samples:
        symbol = marks.get((int(k), int(id_ms), int(id_sq)))
        if symbol is not None and e > 0:
            out[symbol].append((w, e / 1000.0))
    return out


def mark_bursts(samples: list[tuple[float, ...]], marks: dict[tuple[int, int, int], str],
                t0: float, t1: float) -> dict[str, float]:
    """markPrice@1s moves every symbol on the same whole second: per second (the entries that
    share an `E`), when its first and last mark price reached the ingestor, the log and the
    view, in ms after that `E`; the medians over the phase's seconds of at least 100 symbols."""
    by_e: dict[float, list[tuple[float, float, float]]] = defaultdict(list)
    for w, e, recv, id_ms, k, _c, _s, id_sq in samples:
        if e > 0 and t0 <= w < t1 and (int(k), int(id_ms), int(id_sq)) in marks:
            by_e[e].append((recv * 1000 - e, id_ms - e, w * 1000 - e))
    legs: dict[str, list[float]] = defaultdict(list)
    for rows in by_e.values():
        if len(rows) >= 100:
            for i, leg in enumerate(("received", "logged", "written")):
                legs[f"{leg}_first"].append(min(r[i] for r in rows))
                legs[f"{leg}_last"].append(max(r[i] for r in rows))
            legs["symbols"].append(float(len(rows)))
    return {k: statistics.median(v) for k, v in legs.items()}


def view_ages(writes: dict[str, list[tuple[float, float]]], t0: float, t1: float
              ) -> dict[str, float]:
    """The mark-price views' age (now - the event time of the value a view holds) over every
    instant of [t0, t1) and every symbol, exactly, from the projector's writes: per symbol
    the view holds, from each write on, the newest `E` written so far (views.lua refuses an
    older one), so its age rises with slope 1 between two writes that change it. Returns the
    time-weighted p50 and p99 (the age a view read at a random instant exceeds with
    probability 0.5 and 0.01), the max, and the share of time a view is older than 1 s (=
    the mean latency of its updates when they come once a second)."""
    segments: list[tuple[float, float]] = []  # (age at start, age at end), seconds
    for rows in writes.values():
        rows = sorted(rows)
        held = None
        for i, (w, e) in enumerate(rows):
            held = e if held is None else max(held, e)
            start = max(w, t0)
            end = min(rows[i + 1][0] if i + 1 < len(rows) else t1, t1)
            if end > start:
                segments.append((start - held, end - held))
    total = sum(hi - lo for lo, hi in segments)
    if not total:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"),
                "over_1s": float("nan")}

    def above(x: float) -> float:
        return sum(hi - max(lo, x) for lo, hi in segments if hi > x) / total

    def quantile(tail: float) -> float:
        lo, hi = min(s[0] for s in segments), max(s[1] for s in segments)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if above(mid) > tail else (lo, mid)
        return hi

    return {"p50": quantile(0.5), "p99": quantile(0.01),
            "max": max(s[1] for s in segments), "over_1s": above(1.0)}


def busiest(ph: dict[str, Any]) -> str:
    name, cores = max(ph["cpu_cores"].items(), key=lambda kv: kv[1])
    return f"{name} {cores:.2f} cores"


def headroom(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The multipliers reached in order (steady x1, crash x5, the steps): the last one with no
    frame lost, and the last whose frame->view p99 stayed within 10 ms, each with the first
    one that was not and the busiest process there."""
    out: dict[str, Any] = {}
    for what, bad in (
            ("lossless", lambda p: p["seq_holes"] or p["trade_id_holes"]),
            ("p99_within_10ms", lambda p: p["latency_ms"]["p99"] > P99_LIMIT_MS)):
        last, first_bad = None, None
        for p in phases:
            if bad(p):
                first_bad = p
                break
            last = p["multiplier"]
        out[what] = {"last_good": last,
                     "first_bad": None if first_bad is None else {
                         "multiplier": first_bad["multiplier"],
                         "frames_per_s": first_bad["sent_per_s"],
                         "p99_ms": first_bad["latency_ms"]["p99"],
                         "seq_holes": first_bad["seq_holes"],
                         "trade_id_holes": first_bad["trade_id_holes"],
                         "busiest": busiest(first_bad)}}
    return out


def report(results: dict[str, Any]) -> None:
    print(f"\nwhole market, {results['symbols']} symbols ({results['streams']}, "
          f"{results['shards']} ingestor(s)) + top {TOP} "
          f"{results['book_streams']}; load average {results['load_before']:.2f} before, "
          f"{results['load_after']:.2f} after")
    names = results["processes"]
    for ph in results["phases"]:
        lat, age, exact = ph["latency_ms"], ph["mark_age_s"], ph["mark_age_exact_s"]
        print(f"\n[{ph['phase']} x{ph['multiplier']:g}] {ph['seconds']:.0f} s, load "
              f"{ph['load_avg']:.2f}: {ph['sent_per_s']:,.0f} frames/s; sent {ph['sent']:,}, "
              f"logged {ph['logged']:,}, folded {ph['folded']:,}; lost: seq holes "
              f"{ph['seq_holes']}, aggTrade id holes {ph['trade_id_holes']}; "
              f"connection entries {ph['conn_events']}")
        print(f"  frame->view p50 {lat['p50']:.2f} / p99 {lat['p99']:.2f} / max "
              f"{lat['max']:.1f} ms over {lat['frames']:,} frames (from the ingestor's "
              f"recv_ts: p50 {lat['from_recv_p50']:.2f} / p99 {lat['from_recv_p99']:.2f}); "
              f"legs p50/p99: receive "
              f"{lat['receive_p50']:.2f}/{lat['receive_p99']:.2f}, log {lat['log_p50']:.2f}/"
              f"{lat['log_p99']:.2f}, project {lat['project_p50']:.2f}/"
              f"{lat['project_p99']:.2f}")
        print("  logged/s by key: " + ", ".join(
            f"{k.rsplit(':', 1)[1]} {v:,.0f}" for k, v in ph["logged_per_s_by_key"].items()))
        print("  by family, E->view p50/p99 (recv_ts->view p50/p99) ms: " + ", ".join(
            f"{fam} {v['E_p50']:.2f}/{v['E_p99']:.2f} ({v['recv_p50']:.2f}/"
            f"{v['recv_p99']:.2f})" for fam, v in ph["latency_by_family_ms"].items()))
        print("  the simulator's own lag (E -> a bare raw-socket reader) p50/p99 ms: " + ", ".join(
            f"{k} {v['p50']:.2f}/{v['p99']:.2f}" for k, v in ph["sim_send_lag_ms"].items()))
        print(f"  mark-price view age p50 {age['p50']:.3f} / p99 {age['p99']:.3f} / max "
              f"{age['max']:.3f} s over {age['reads']:,} reads; over every instant, from "
              f"the writes: p50 {exact['p50']:.3f} / p99 {exact['p99']:.3f} / max "
              f"{exact['max']:.3f} s, older than 1 s {100 * exact['over_1s']:.2f} % of the time")
        burst = ph.get("mark_burst_ms") or {}
        if burst:
            print(f"  one second's {burst['symbols']:.0f} mark prices, ms after their E (median "
                  "over the seconds), first / last: " + ", ".join(
                      f"{leg} {burst[leg + '_first']:.1f} / {burst[leg + '_last']:.1f}"
                      for leg in ("received", "logged", "written")))
        print("  " + "  ".join(
            f"{n}: {ph['cpu_ms_per_1000_frames'][n]:.1f} ms/1k ({ph['cpu_cores'][n]:.2f} "
            f"cores, {ph['rss_mb'][n]:.0f} MB)" for n in names))
    for when, mem in results["memory"].items():
        label = {"steady": "the steady phase", "end": "the run"}.get(when, when)
        print(f"\nRedis at the end of {label}: used_memory {mem['used_memory'] / 2**20:.1f} MiB")
        for key, m in mem["keys"].items():
            print(f"  {key:24} {m['entries']:>9,} entries {m['bytes'] / 2**20:8.1f} MiB "
                  f"{m['bytes_per_entry']:7.0f} B/entry")
    t = results["totals"]
    print(f"\ntotals after silence and drain: sent {t['sent']:,}, frames in the log "
          f"{t['logged_frames']:,}, folded {t['folded_frames']:,} + {t['other_frames']:,} in "
          f"raw:market:other/forceOrder = {t['folded_frames'] + t['other_frames']:,}; gap entries "
          f"{t['gap_entries']}, seq holes {t['seq_holes']}, aggTrade id holes "
          f"{t['trade_id_holes']} before the silence; control entries {t['control_entries']}")
    for what, h in (results.get("headroom") or {}).items():
        bad = h["first_bad"]
        good = "none" if h["last_good"] is None else f"x{h['last_good']:g}"
        print(f"headroom, {what}: last good multiplier {good}; "
              + ("no step failed" if bad is None else
                 f"first failing x{bad['multiplier']:g} ({bad['frames_per_s']:,.0f} frames/s, "
                 f"p99 {bad['p99_ms']:.1f} ms, seq holes {bad['seq_holes']}, aggTrade id holes "
                 f"{bad['trade_id_holes']}, busiest: {bad['busiest']})"))


def markdown(results: dict[str, Any]) -> str:
    """The figures as markdown tables (for docs/benchmarks.md)."""
    names = results["processes"]
    lines = ["| phase | frames/s | sent / logged / folded | lost | frame->view p50 / p99 ms "
             "| from recv_ts p50 / p99 | legs p99: receive / log / project | simulator lag p99 "
             "(markPrice, aggTrade) | mark-price age p50 / p99 s (MGET reads) | mark-price "
             "age p50 / p99 s, every instant; % of time > 1 s | load |",
             "|---|---:|---|---|---|---|---|---|---|---|---|"]
    for ph in results["phases"]:
        lat, lag = ph["latency_ms"], ph["sim_send_lag_ms"]
        exact = ph.get("mark_age_exact_s") or dict.fromkeys(("p50", "p99", "over_1s"),
                                                            float("nan"))
        lost = ph["seq_holes"] + ph["trade_id_holes"]
        lines.append(
            f"| {ph['phase']} x{ph['multiplier']:g} | {ph['sent_per_s']:,.0f} | "
            f"{ph['sent']:,} / {ph['logged']:,} / {ph['folded']:,} | **{lost:,}** | "
            f"{lat['p50']:.1f} / **{lat['p99']:.1f}** | {lat['from_recv_p50']:.1f} / "
            f"{lat['from_recv_p99']:.1f} | {lat['receive_p99']:.1f} / {lat['log_p99']:.1f} / "
            f"{lat['project_p99']:.1f} | "
            f"{lag.get('markPrice', {}).get('p99', float('nan')):.1f}, "
            f"{lag.get('aggTrade', {}).get('p99', float('nan')):.1f} | "
            f"{ph['mark_age_s']['p50']:.3f} / {ph['mark_age_s']['p99']:.3f} | "
            f"{exact['p50']:.3f} / **{exact['p99']:.3f}**; {100 * exact['over_1s']:.2f} % | "
            f"{ph['load_avg']:.2f} |")
    lines += ["", "| phase | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for ph in results["phases"]:
        lines.append(f"| {ph['phase']} x{ph['multiplier']:g}: CPU ms per 1,000 frames "
                     f"(cores) | " + " | ".join(
                         f"{ph['cpu_ms_per_1000_frames'][n]:.1f} ({ph['cpu_cores'][n]:.2f})"
                         for n in names) + " |")
    last = results["phases"][-1]
    lines.append("| RSS at the end (peak) MB | " + " | ".join(
        f"{last['rss_mb'][n]:.0f} ({last['hwm_mb'][n]:.0f})" for n in names) + " |")
    lines += ["", "| phase | E->view p50 / p99 ms by family (from recv_ts p50 / p99) |",
              "|---|---|"]
    for ph in results["phases"]:
        lines.append(f"| {ph['phase']} x{ph['multiplier']:g} | " + "; ".join(
            f"{fam} {v['E_p50']:.1f} / {v['E_p99']:.1f} ({v['recv_p50']:.1f} / "
            f"{v['recv_p99']:.1f})" for fam, v in ph["latency_by_family_ms"].items()) + " |")
    for when, mem in results["memory"].items():
        label = {"steady": "the steady phase", "end": "the run"}.get(when, when)
        lines += ["", f"Redis at the end of {label}: used_memory "
                      f"{mem['used_memory'] / 2**20:.1f} MiB", "",
                  "| key | entries | MiB | bytes per entry |", "|---|---:|---:|---:|"]
        for key, m in mem["keys"].items():
            lines.append(f"| `{key}` | {m['entries']:,} | {m['bytes'] / 2**20:.1f} | "
                         f"{m['bytes_per_entry']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--projector-child", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--only", help=argparse.SUPPRESS)  # with --projector-child
    ap.add_argument("--split", action="store_true",
                    help="one projector process per projection (as `pipeline project --only "
                         "NAME` each) instead of ONE for all: what the issue's target excludes, "
                         "for comparison")
    ap.add_argument("--markdown", metavar="JSON", help="print the tables of a results file and "
                                                       "exit (bench/results/full_market.json)")
    ap.add_argument("--steady-s", type=float, default=60.0)
    ap.add_argument("--crash-s", type=float, default=30.0)
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per headroom step")
    ap.add_argument("--steps", default="10,20,40,80", help="headroom multipliers, in order")
    ap.add_argument("--no-headroom", action="store_true")
    ap.add_argument("--shards", type=int, default=1,
                    help="market ingestors for the ALL streams (PIPELINE_SHARD i/n each)")
    ap.add_argument("--all-families", action="store_true",
                    help="the top symbols' ingestor also takes depth5, depth10, diff depth, "
                         "bookTicker, forceOrder and kline_1h (bytes per entry of every family)")
    ap.add_argument("--mark-arr", action="store_true",
                    help="!markPrice@arr@1s (one frame a second) instead of markPrice@1s")
    ap.add_argument("--quick", action="store_true",
                    help="10 s steady, 8 s crash, headroom x10 and x20 of 6 s")
    args = ap.parse_args()
    if args.projector_child:
        return projector_child(args.projector_child, args.only)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.quick:
        args.steady_s, args.crash_s, args.warmup_s, args.step_s = 10.0, 8.0, 6.0, 6.0
        args.steps = "10,20"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_s, LocalRedis(Path(tmp_s) / "redis") as server:
        tmp = Path(tmp_s)
        b = Bench(args, tmp, server)
        try:
            b.launch()
            time.sleep(args.warmup_s)
            b.alive()
            phases = [b.run_phase("steady", args.steady_s)]
            memory = {"steady": b.memory()}
            b.crash(True, 5.0)
            phases.append(b.run_phase("crash", args.crash_s))
            phases[-1]["multiplier"] = 5.0
            steps = [] if args.no_headroom else [float(x) for x in args.steps.split(",") if x]
            for m in steps:
                b.crash(True, m)
                phases.append(b.run_phase("headroom", args.step_s))
                phases[-1]["multiplier"] = m
                c0, c1 = phases[-1]["c0"], phases[-1]["c1"]
                sim_cores = (c1["cpu"]["simulator"] - c0["cpu"]["simulator"]) / (
                    c1["t"] - c0["t"])
                if sim_cores > SIM_SATURATED:
                    print(f"x{m:g}: the simulator used {sim_cores:.2f} cores: no further step",
                          flush=True)
                    break
            b.crash(False)
            memory["end"] = b.memory()
            sent = b.drain()
            b.stop()
            b.merge_samples()
            log = scan_log(b.r)
            samples = load_samples(b.samples_path, log)
            conn_names = (b.samples_path.with_suffix(".conns")).read_text().split()
            results: dict[str, Any] = {
                "symbols": len(b.symbols), "load_before": load_before,
                "processes": list(b.pids), "streams": b.market_streams(),
                "book_streams": b.book_streams(),
                "shards": args.shards,
                "load_after": os.getloadavg()[0],
                "phases": analyse(b, phases, samples, log),
                "memory": memory, "totals": totals(sent, samples, log, conn_names, b.silenced_at)}
        finally:
            b.stop()
    results["headroom"] = None if args.no_headroom else headroom(results["phases"])
    report(results)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_market.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
