"""A/B of the ingestor at several git revisions, in one run (not a test).

    .venv/bin/python bench/ab_ingest.py HEAD~3 HEAD [. for the working tree] [--rounds 5]

Round by round, the bare trio-websocket loop and then the ingestor of each revision (checked out
into a temporary worktree; `.` is the working tree as it is) read the simulator's full-speed
feed for `--seconds`, pinned as `bench_ingest.py --pin` pins them (`--no-pin`: not pinned).
Prints the median frames/s of each and its ratio to the bare loop. Alternating within one run
is what makes a difference of a few percent visible on a machine whose single rounds move by
up to 10 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_ingest as bench

from pipeline.localredis import LocalRedis


def worktree(rev: str, into: Path) -> Path:
    if rev == ".":
        return bench.ROOT
    path = into / rev.replace("/", "_").replace("~", "-")
    subprocess.run(["git", "-C", str(bench.ROOT), "worktree", "add", "-q", "--detach",
                    str(path), rev], check=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions; `.` is the working tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-pin", action="store_true", help="leave every process unpinned")
    args = parser.parse_args()
    if not args.no_pin:
        bench.FEED_CPU, bench.READER_CPU = 0, 1
    main_root = bench.ROOT
    rates: dict[str, list[float]] = {"bare": [], **{rev: [] for rev in args.revs}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: worktree(rev, Path(tmp)) for rev in args.revs}
        try:
            with LocalRedis(Path(tmp) / "redis") as server:
                assert server.proc is not None
                if bench.FEED_CPU is not None:
                    os.sched_setaffinity(server.proc.pid, {bench.FEED_CPU})
                r = server.client()
                sim = bench.Sim("--rate", "0")
                try:
                    for i in range(args.rounds):
                        rates["bare"].append(bench.run_bare(sim, args.seconds)["rate"])
                        for rev, tree in trees.items():
                            bench.ROOT = tree  # the ingestor subprocess runs from this tree
                            try:
                                out = bench.run_ingest(sim, r, server.url, args.seconds)
                            finally:
                                bench.ROOT = main_root
                            rates[rev].append(out["rate"])
                        print(f"round {i + 1}: " + ", ".join(
                            f"{name} {values[-1]:,.0f}" for name, values in rates.items()),
                            flush=True)
                finally:
                    sim.stop()
                    r.close()
        finally:
            for tree in trees.values():
                if tree != main_root:
                    subprocess.run(["git", "-C", str(main_root), "worktree", "remove",
                                    "--force", str(tree)], check=False)
    bare = statistics.median(rates["bare"])
    print(f"\n{'bare trio-websocket loop':<28}{bare:>10,.0f}")
    for rev in args.revs:
        median = statistics.median(rates[rev])
        print(f"{'ingestor at ' + rev:<28}{median:>10,.0f}   ratio {median / bare:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
