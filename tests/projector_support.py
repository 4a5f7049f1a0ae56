"""Helpers of the projector and replay tests: realistic Binance frames, seeding the log,
running projectors (in this process or as `pipeline project` subprocesses), waiting for a
group to drain, and reading every view key for comparison."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
import redis
import trio

from pipeline.config import Settings, load_settings
from pipeline.eventlog import frame_entry
from projections.core.keys import market_key
from projections.shell import project as runner
from projections.shell.registry import ProjectionSpec, choose
from tests.conftest import ROOT

STREAMS = "markPrice@1s,depth20@100ms,aggTrade,kline_1m"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def mark_frame(sym: str, event_ms: int, price: str) -> bytes:
    return orjson.dumps({"stream": f"{sym.lower()}@markPrice@1s", "data": {
        "e": "markPriceUpdate", "E": event_ms, "s": sym, "p": price, "i": price,
        "P": price, "r": "0.00010000", "T": (event_ms // 28_800_000 + 1) * 28_800_000}})


def depth20_frame(sym: str, event_ms: int, u: int, mid: float) -> bytes:
    bids = [[f"{mid - i * 0.1:.1f}", f"{1 + i * 0.5:.3f}"] for i in range(1, 21)]
    asks = [[f"{mid + i * 0.1:.1f}", f"{2 + i * 0.25:.3f}"] for i in range(1, 21)]
    return orjson.dumps({"stream": f"{sym.lower()}@depth20@100ms", "data": {
        "e": "depthUpdate", "E": event_ms, "T": event_ms - 2, "s": sym, "U": u - 7, "u": u,
        "pu": u - 8, "b": bids, "a": asks}})


def agg_frame(sym: str, event_ms: int, agg_id: int, price: str) -> bytes:
    return orjson.dumps({"stream": f"{sym.lower()}@aggTrade", "data": {
        "e": "aggTrade", "E": event_ms, "s": sym, "a": agg_id, "p": price, "q": "0.010",
        "f": agg_id * 3, "l": agg_id * 3 + 2, "T": event_ms - 1, "m": agg_id % 2 == 0}})


def kline_frame(sym: str, event_ms: int, price: str) -> bytes:
    start = event_ms // 60_000 * 60_000
    closed = event_ms % 60_000 >= 59_000
    return orjson.dumps({"stream": f"{sym.lower()}@kline_1m", "data": {
        "e": "kline", "E": event_ms, "s": sym, "k": {
            "t": start, "T": start + 59_999, "s": sym, "i": "1m", "f": 100, "L": 200,
            "o": price, "c": price, "h": price, "l": price, "v": "12.5", "n": 100,
            "x": closed, "q": "1000.0", "V": "6.0", "Q": "500.0", "B": "0"}}})


def market_log(n_per_symbol: int, *, start_ms: int | None = None,
               seed: int = 7) -> list[tuple[str, bytes]]:
    """`(family, frame)` of every kind for every symbol, event times 250 ms apart, in order."""
    rnd = random.Random(seed)
    t0 = start_ms if start_ms is not None else int(time.time() * 1000) - n_per_symbol * 250
    out: list[tuple[str, bytes]] = []
    for i in range(n_per_symbol):
        for j, sym in enumerate(SYMBOLS):
            e = t0 + i * 250 + j
            price = f"{(j + 1) * 1000 + rnd.uniform(-50, 50):.2f}"
            out.append(("markPrice", mark_frame(sym, e, price)))
            out.append(("depth20", depth20_frame(sym, e, 1_000_000 + i * 10, float(price))))
            out.append(("aggTrade", agg_frame(sym, e, 5_000 + i, price)))
            out.append(("kline_1m", kline_frame(sym, e, price)))
    return out


def seed(r: redis.Redis, frames: Iterable[tuple[str, bytes]], *,
         recv_ts: float | None = None, conn: str = "c1") -> None:
    pipe = r.pipeline(transaction=False)
    for seq, (family, frame) in enumerate(frames):
        ts = time.time() if recv_ts is None else recv_ts
        pipe.xadd(market_key(family), frame_entry(frame, ts, conn, seq))  # type: ignore[arg-type]
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()


def copy_log(src: redis.Redis, dst: redis.Redis, pattern: str = "raw:*") -> None:
    """The same entries, with the same ids, in another database."""
    for key in src.scan_iter(match=pattern):
        pipe = dst.pipeline(transaction=False)
        rows: Any = src.xrange(key)
        for eid, fields in rows:
            pipe.xadd(key, fields, id=eid)
        pipe.execute()


def xrange(r: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE key - + (typed for the tests)."""
    rows: Any = r.xrange(key)
    return list(rows)


def settings_for(url: str, streams: str = STREAMS, **env: str) -> Settings:
    return load_settings(env={"REDIS_URL": url, "PIPELINE_MARKET_STREAMS": streams,
                              "PIPELINE_SYMBOLS": ",".join(SYMBOLS), **env})


def views(r: redis.Redis, prefix: str = "websocket") -> dict[bytes, Any]:
    """Every view key: its content (string, list, hash or stream), with its expiry instant."""
    read = {b"string": r.get, b"list": lambda k: r.lrange(k, 0, -1),
            b"hash": r.hgetall, b"stream": r.xrange}
    out: dict[bytes, Any] = {}
    for key in sorted(r.scan_iter(match=f"{prefix}:*")):
        out[key] = (read[r.type(key)](key), r.pexpiretime(key))  # type: ignore[index, operator]
    return out


def drained(r: redis.Redis, groups: dict[str, Sequence[str]]) -> bool:
    """Every group has read everything in its keys and holds nothing pending."""
    for group, keys in groups.items():
        for key in keys:
            infos = [g for g in r.xinfo_groups(key) if g["name"] == group.encode()]
            if not infos or infos[0]["pending"] or infos[0]["lag"] != 0:
                return False
    return True


def groups_of(specs: Sequence[ProjectionSpec]) -> dict[str, Sequence[str]]:
    return {s.name: s.factory().sources for s in specs}


async def wait_for(predicate: Any, limit_s: float = 20.0) -> None:
    """Await a condition on Redis (checked every 10 ms); fails the test after `limit_s`."""
    with trio.fail_after(limit_s):
        # the condition lives in another process's data: nothing here could set an Event
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def wait_sync(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


async def project_until_drained(settings: Settings, r: redis.Redis,
                                opts: runner.RunOptions | None = None,
                                only: str | None = None,
                                also: Callable[[], bool] | None = None) -> None:
    """Run the projections until every group has acknowledged everything and `also()` holds
    (e.g. a dead letter, written in a round trip after its entry's acknowledgement)."""
    specs = choose(settings, only)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, settings, specs, opts or runner.RunOptions())
        await wait_for(lambda: drained(r, groups_of(specs)) and (also is None or also()))
        nursery.cancel_scope.cancel()


def start_projector(url: str, *args: str, streams: str = STREAMS) -> subprocess.Popen[bytes]:
    """`pipeline project` as a user starts it, in its own process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
    env.update({"REDIS_URL": url, "PIPELINE_MARKET_STREAMS": streams,
                "PIPELINE_SYMBOLS": ",".join(SYMBOLS)})
    return subprocess.Popen([sys.executable, "-m", "pipeline", "project", *args], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=15)
    return err.decode(errors="replace")
