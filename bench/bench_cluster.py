"""Redis Cluster next to one Redis, in one run: ingest frames/s, projector events/s, WAIT cost.

    .venv/bin/python bench/bench_cluster.py                       # default sizes
    .venv/bin/python bench/bench_cluster.py --frames 200000 --events 200000 --rounds 3

Each round starts one redis-server (pipeline.localredis.LocalRedis) and one cluster of three
masters with a replica each (pipeline.localredis.LocalCluster), all on this machine, and
measures, on each:

- ingest: the batch writer (`pipeline.writer.LogWriter`, as both ingestors use it) fed
  `--frames` market frames (mark price, depth20, aggTrade, kline_1m over 20 symbols) by the
  Trio side as fast as it takes them, in chunks of 500 with a checkpoint between; frames/s =
  frames / time until `flush()` returns (every frame acknowledged). On the cluster the writer
  routes each entry to its slot's master, one pipelined round trip per master per batch;
- projector: `--events` frames pre-filled (the same families), one projector (this process,
  `projections.shell.project.run`, every market projection) folds them; events/s = entries /
  time until every group has acknowledged everything;
- WAIT: `--user-events` user frames appended to `raw:user` one at a time, each awaited
  (`flush()`), with `WAIT 1 1000` after each batch (PIPELINE_USER_WAIT_MS, the cluster
  default) and without (0): the time an acknowledged user event costs, and the cost of a
  replica's copy in it.

The rounds alternate the order (one node first, then the cluster first) and the medians are
printed. The machine is shared and has 2 cores while the cluster has 6 redis-server
processes: the ratio cluster / one node says what routing and the extra processes cost here,
not what a cluster of several hosts gives (docs/benchmarks.md says what scales).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis
import trio
import trio.lowlevel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_projector import frames, symbols  # noqa: E402

from pipeline.config import load_settings  # noqa: E402
from pipeline.eventlog import frame_entry  # noqa: E402
from pipeline.localredis import LocalCluster, LocalRedis  # noqa: E402
from pipeline.redisconn import connect_checked  # noqa: E402
from pipeline.writer import LogWriter  # noqa: E402
from projections.core import keys as keymod  # noqa: E402
from projections.core.keys import market_key  # noqa: E402
from projections.shell import project as runner  # noqa: E402
from projections.shell.registry import choose  # noqa: E402

STREAMS = "markPrice@1s,depth20@100ms,aggTrade,kline_1m"
N_SYMBOLS = 20


def use(url: str) -> redis.Redis:
    """A client of `url`, deciding the process's key layout from it (as every command does)."""
    return connect_checked(url, name="bench")


def bench_ingest(url: str, n: int) -> float:
    client = use(url)
    items = [(market_key(fam), frame) for fam, frame in frames(n, symbols(N_SYMBOLS))]
    writer = LogWriter(client, bound=n + 1000)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            t0 = time.perf_counter()
            now = time.time()
            for i in range(0, n, 500):
                for seq, (key, frame) in enumerate(items[i:i + 500], start=i):
                    writer.append_frame(key, frame, now, "bench", seq)
                await trio.lowlevel.checkpoint()
            await writer.flush()
            took = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return n / took

    try:
        return trio.run(main)
    finally:
        client.close()


def fill(client: Any, n: int) -> None:
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for seq, (fam, frame) in enumerate(frames(n, symbols(N_SYMBOLS))):
        pipe.xadd(market_key(fam), frame_entry(frame, now, "bench", seq))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()


def bench_events(url: str, n: int, cluster: bool) -> float:
    client = use(url)
    fill(client, n)
    settings = load_settings(env={"REDIS_URL": url, "PIPELINE_MARKET_STREAMS": STREAMS,
                                  "PIPELINE_SYMBOLS": ",".join(symbols(N_SYMBOLS)),
                                  "PIPELINE_REDIS_CLUSTER": "1" if cluster else "0"})
    specs = [s for s in choose(settings, None)
             if s.name not in ("orders", "account", "account_events")]
    groups = {s.name: list(s.factory().sources) for s in specs}
    opts = runner.RunOptions(consumer="bench")

    def drained() -> bool:
        for group, keys in groups.items():
            for key in keys:
                info = [g for g in client.xinfo_groups(key) if g["name"] == group.encode()]
                if not info or info[0]["pending"] or info[0]["lag"] != 0:
                    return False
        return True

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            nursery.start_soon(runner.run, settings, specs, opts)
            while not drained():  # noqa: ASYNC110 - state in Redis
                await trio.sleep(0.005)
            took = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return n / took

    try:
        return trio.run(main)
    finally:
        client.close()


def bench_user(url: str, n: int, wait_ms: int) -> float:
    """Milliseconds per acknowledged user event, one at a time."""
    client = use(url)
    writer = LogWriter(client, user_wait_ms=wait_ms)
    frame = orjson.dumps({"e": "ORDER_TRADE_UPDATE", "E": 1, "o": {"s": "BTCUSDT", "i": 1}})

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.append_frame("raw:user", frame, time.time(), "bench", 0)
            await writer.flush()  # connected, warm
            t0 = time.perf_counter()
            for seq in range(1, n + 1):
                writer.append_frame("raw:user", frame, time.time(), "bench", seq)
                await writer.flush()
            took = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return took / n * 1000

    try:
        return trio.run(main)
    finally:
        client.close()


def one_round(args: argparse.Namespace, cluster_first: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        order = ("cluster", "node") if cluster_first else ("node", "cluster")
        for kind in order:
            for part, run in parts(args, kind == "cluster").items():
                server: Any = LocalCluster(folder / f"c-{part}") if kind == "cluster" \
                    else LocalRedis(folder / f"n-{part}")
                with server:
                    out[f"{part}_{kind}"] = run(server.url)
                keymod.set_cluster_layout(False)
    return out


def parts(args: argparse.Namespace, cluster: bool) -> dict[str, Callable[[str], float]]:
    out: dict[str, Callable[[str], float]] = {
        "ingest": lambda url: bench_ingest(url, args.frames),
        "events": lambda url: bench_events(url, args.events, cluster),
        "user_ms": lambda url: bench_user(url, args.user_events, 0),
    }
    if cluster:
        out["user_wait_ms"] = lambda url: bench_user(url, args.user_events, 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--user-events", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [one_round(args, cluster_first=i % 2 == 1) for i in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"rounds: {args.rounds}, frames {args.frames}, events {args.events}, "
          f"user events {args.user_events}")
    for part, label in (("ingest", "ingest frames/s   "), ("events", "projector events/s")):
        node, cluster = med[f"{part}_node"], med[f"{part}_cluster"]
        print(f"{label} one node {node:>10,.0f}   cluster {cluster:>10,.0f}   "
              f"cluster/node {cluster / node:.2f}")
    print(f"user event, ms each (appended + acknowledged, one at a time): one node "
          f"{med['user_ms_node']:.3f}, cluster {med['user_ms_cluster']:.3f}, cluster with "
          f"WAIT 1 {med['user_wait_ms_cluster']:.3f} (WAIT adds "
          f"{med['user_wait_ms_cluster'] - med['user_ms_cluster']:.3f} ms)")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v:,.3f}" for k, v in sorted(r.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
