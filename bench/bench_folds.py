"""Events per second of each market fold: pure Python, one process, no Redis.

    .venv/bin/python bench/bench_folds.py [--events 200000] [--batch 500] [--write FILE]

Each fold gets pre-built log entries shaped like what Binance sends (realistic field sets and
sizes, 50 symbols, prices as strings) and folds them all; "with coalesce" also runs
`projections.core.coalesce` over each batch of `--batch` entries, as the projector does
before writing. Time is this process's CPU time (`time.process_time`), so that other work
on a shared machine does not count against the folds. The issue's target for a whole
projector process (Redis round trips included) is >= 100,000 events/s with coalescing, so
each fold should be far above it.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.depthbook import DiffBookProjection
from projections.core.market import (
    BookTickerProjection,
    KlineProjection,
    MarkPriceProjection,
    PartialBookProjection,
    TradeProjection,
)
from projections.core.outputs import Output, coalesce

SYMBOLS = [f"SYM{i}USDT" for i in range(50)]
T0 = 1_764_000_000_000


def _entry(i: int, stream: str, data: Any) -> FrameEntry:
    raw = orjson.dumps({"stream": stream, "data": data})
    return FrameEntry(b"%d-0" % i, raw, T0 / 1000 + i / 1000, "conn-1", i)


def _px(rng: random.Random, base: float = 95_000.0) -> str:
    return f"{base + rng.randrange(-5000, 5000) / 10:.2f}"


def mark_price_entries(n: int, rng: random.Random) -> Iterator[FrameEntry]:
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        yield _entry(i, f"{s.lower()}@markPrice@1s", {
            "e": "markPriceUpdate", "E": T0 + i, "s": s, "p": _px(rng) + "000000",
            "i": _px(rng) + "345678", "P": _px(rng) + "000000", "r": "0.00010000",
            "T": T0 + 28_800_000})


def partial_depth_entries(n: int, rng: random.Random) -> Iterator[FrameEntry]:
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        yield _entry(i, f"{s.lower()}@depth20@100ms", {
            "e": "depthUpdate", "E": T0 + i, "T": T0 + i, "s": s, "U": 10 * i, "u": 10 * i + 9,
            "pu": 10 * i - 1, "b": [[_px(rng), "1.234"] for _ in range(20)],
            "a": [[_px(rng), "0.567"] for _ in range(20)]})


def kline_entries(n: int, rng: random.Random) -> Iterator[FrameEntry]:
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        t = (T0 + i) // 60_000 * 60_000  # the candle open at the event time
        yield _entry(i, f"{s.lower()}@kline_1m", {"e": "kline", "E": T0 + i, "s": s, "k": {
            "t": t, "T": t + 59_999, "s": s, "i": "1m", "f": i, "L": i + 9, "o": _px(rng),
            "c": _px(rng), "h": _px(rng), "l": _px(rng), "v": "123.456", "n": 10,
            "x": i % 240 == 239, "q": "11734567.89", "V": "60.1", "Q": "5712345.6", "B": "0"}})


def agg_trade_entries(n: int, rng: random.Random) -> Iterator[FrameEntry]:
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        yield _entry(i, f"{s.lower()}@aggTrade", {
            "e": "aggTrade", "E": T0 + i, "s": s, "a": i, "p": _px(rng), "q": "0.015",
            "f": 3 * i, "l": 3 * i + 2, "T": T0 + i, "m": rng.random() < 0.5})


def book_ticker_entries(n: int, rng: random.Random) -> Iterator[FrameEntry]:
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        yield _entry(i, f"{s.lower()}@bookTicker", {
            "e": "bookTicker", "u": i, "E": T0 + i, "T": T0 + i, "s": s, "b": _px(rng),
            "B": "31.21", "a": _px(rng), "A": "40.66"})


def diff_depth_entries(n: int, rng: random.Random) -> Iterator[FrameEntry | ControlEntry]:
    """A 1000-level snapshot per symbol, then diff events of ~10 changed levels each (the
    typical size of a 100 ms BTCUSDT diff), a quarter of them removals."""
    last_u = dict.fromkeys(SYMBOLS, 1_000)
    for s in SYMBOLS:
        yield ControlEntry(b"0-1", "snapshot", {"symbol": s, "response": {
            "lastUpdateId": 1_000, "E": T0, "T": T0,
            "bids": [[f"{95_000 - k / 10:.1f}", "1.0"] for k in range(1000)],
            "asks": [[f"{95_000.1 + k / 10:.1f}", "1.0"] for k in range(1000)]}}, T0 / 1000, "")

    def changes() -> list[list[str]]:
        return [[f"{95_000 + rng.randrange(-1000, 1000) / 10:.1f}",
                 "0" if rng.random() < 0.25 else "2.5"] for _ in range(5)]

    for i in range(n - len(SYMBOLS)):
        s = SYMBOLS[i % len(SYMBOLS)]
        first = last_u[s] + 1
        u = first + rng.randrange(0, 20)
        ev = {"e": "depthUpdate", "E": T0 + i, "T": T0 + i, "s": s, "U": first, "u": u,
              "pu": last_u[s], "b": changes(), "a": changes()}
        last_u[s] = u
        yield _entry(i, f"{s.lower()}@depth@100ms", ev)


# the symbols are configured, as PIPELINE_SYMBOLS would have them (only those get views)
FOLDS: list[tuple[str, Callable[[], Any], Callable[[int, random.Random], Iterator[Any]]]] = [
    ("mark_price", lambda: MarkPriceProjection("websocket", symbols=SYMBOLS),
     mark_price_entries),
    ("orderbook (depth20)", lambda: PartialBookProjection("websocket", symbols=SYMBOLS),
     partial_depth_entries),
    ("kline", lambda: KlineProjection("websocket", symbols=SYMBOLS), kline_entries),
    ("last_price", lambda: TradeProjection("websocket", symbols=SYMBOLS), agg_trade_entries),
    ("book_ticker", lambda: BookTickerProjection("websocket", symbols=SYMBOLS),
     book_ticker_entries),
    ("depth_book (diff, top 20)", lambda: DiffBookProjection("websocket", symbols=SYMBOLS),
     diff_depth_entries),
]


def run(make: Callable[[], Any], entries: list[Any], batch: int, merge: bool) -> tuple[float,
                                                                                     int]:
    fold = make()
    apply = fold.apply
    writes = 0
    start = time.process_time()
    for lo in range(0, len(entries), batch):
        outs: list[Output] = []
        for entry in entries[lo:lo + batch]:
            outs.extend(apply(entry))
        if merge:
            outs = coalesce(outs)
        writes += len(outs)
    return len(entries) / (time.process_time() - start), writes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    ap.add_argument("--write", type=Path, help="also write the table as markdown to FILE")
    args = ap.parse_args()
    rows = []
    # Grow the heap once first: otherwise whichever fold runs first is measured ~40% slower
    # (its entries are scattered among the temporaries of a growing heap); a long-running
    # projector's heap is warm.
    del_me = list(agg_trade_entries(args.events, random.Random(2)))
    del del_me
    for name, make, build in FOLDS:
        entries = list(build(args.events, random.Random(1)))
        plain = max(run(make, entries, args.batch, False) for _ in range(args.repeat))
        merged = max(run(make, entries, args.batch, True) for _ in range(args.repeat))
        size = sum(len(e.frame) for e in entries if isinstance(e, FrameEntry)) / len(entries)
        rows.append((name, size, plain[0], merged[0], merged[1] / len(entries)))
        print(f"{name:28} {size:6.0f} B/frame  {plain[0]:>10,.0f} ev/s  "
              f"{merged[0]:>10,.0f} ev/s coalesced  ({merged[1] / len(entries):.3f} writes/ev)",
              flush=True)
    if args.write:
        args.write.write_text(_markdown(rows, args))
    return 0


def _markdown(rows: list[tuple[str, float, float, float, float]], args: Any) -> str:
    lines = [
        "## Folds: events per second, pure (bench/bench_folds.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_folds.py --events {args.events} "
        f"--batch {args.batch} --write {args.write}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, one process, "
        f"CPU time, best of {args.repeat}; {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "| fold | frame size | events/s | events/s with coalesce | outputs per event after "
        "coalesce |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, size, plain, merged, per in rows:
        lines.append(f"| {name} | {size:.0f} B | {plain:,.0f} | {merged:,.0f} | {per:.3f} |")
    lines += [
        "",
        "Coalescing costs a little time in the fold and saves Redis work: with 50 symbols and "
        f"batches of {args.batch}, one write per symbol and view is left of each batch. The "
        "issue's target (>= 100,000 events/s per projector process with coalescing) includes "
        "the Redis round trips; see the projector bench for the whole process.",
        "",
        "Each stateless fold costs about 3 to 7 µs an event here: one `orjson.loads`, a few "
        "field reads, one `orjson.dumps`, one `ViewWrite`. The diff-depth book costs more "
        "(~10 levels parsed to float keys, two sorted sides of ~1,400 levels updated, the top "
        "20 serialized after every event), and it is bounded by the exchange rather than by "
        "the log: `@depth@100ms` sends at most 10 events a second per symbol, ~4,000 a second "
        "for the whole market, a fraction of what one process folds.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
