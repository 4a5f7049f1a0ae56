"""`pipeline project`: runs the projector consumer groups, one loop per projection.

The process: one nursery; per projection a `ProjectionLoop` (`projections.shell.loop`) on its
own Redis connection, run directly or, for an exclusive projection, only while this process
holds its lease (`projections.shell.lease`), each removing its groups' consumers that dead
processes left (`projections.shell.consumers`); one depth snapshot fetcher
(`projections.shell.snapshots`) shared by the loops; a lag reporter; `/metrics` and `/healthz`
(`projections.shell.health`). SIGTERM and SIGINT cancel the nursery: leases are released.

Every write goes through the Redis function library (`projections.shell.functions`): at start
a task makes sure it is loaded (loading it when this user may; else one log line saying what
to run, and the health failing, until an admin has loaded it). The loops do not wait for it:
each store checks the library before its first write and after Redis lost it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import redis
import trio

from pipeline import metrics
from pipeline.backoff import Backoff
from pipeline.config import Settings
from pipeline.errors import RedisUnavailable, SettingsError
from pipeline.eventlog import retention_family
from pipeline.redisconn import MAX_BLOCK_MS, connect_checked, make_client
from pipeline.rest import RestClient
from pipeline.weight import WeightBudget
from projections.core.keys import depth_snapshots_key
from projections.shell.consumers import REAP_IDLE_S, remove_idle_consumers_every
from projections.shell.functions import FunctionLibrary
from projections.shell.health import ProjectorHealth
from projections.shell.lease import Lease, run_while_holding
from projections.shell.loop import (
    OnWritten,
    ProjectionLoop,
    RunOptions,
    default_consumer,
    in_thread,
)
from projections.shell.registry import ProjectionSpec, bounds_from, choose
from projections.shell.snapshots import Snapshotter

log = logging.getLogger("pipeline.project")

# GIL switch interval while projecting (CPython's default is 5 ms). Every projection is a
# thread that wakes when its XREADGROUP returns; when a burst lands on several keys at once the
# threads queue for the GIL, and a thread back from a socket call could wait the whole interval
# behind one that is folding. 0.5 ms lowered the projector leg's p99 at 5,000 frames/s and did
# not lower events/s (bench/bench_projector.py, docs/benchmarks.md).
GIL_SWITCH_S = 0.0005


__all__ = ["RunOptions", "add_arguments", "main", "run"]


async def run_spec(spec: ProjectionSpec, settings: Settings, opts: RunOptions,
                   health: ProjectorHealth, snapshots: Snapshotter | None,
                   loops: list[ProjectionLoop], on_written: OnWritten | None = None,
                   library: FunctionLibrary | None = None,
                   reap_idle_s: float = REAP_IDLE_S) -> None:
    """Run one projection: directly, or while holding its lease when it is exclusive; with
    it, the removal of its groups' idle consumers (`projections.shell.consumers`)."""
    client = make_client(settings.redis_url, name=f"project:{spec.name}")

    async def work() -> None:
        loop = ProjectionLoop(spec.factory(), client, opts, health, snapshots, on_written,
                              bounds=bounds_from(settings), library=library)
        loops.append(loop)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(remove_idle_consumers_every, client, loop.name,
                                   loop.io.keys, opts.consumer, reap_idle_s)
                await loop.run()
        finally:
            loops.remove(loop)

    try:
        if spec.exclusive:
            lease = Lease(client, spec.name, opts.consumer, opts.lease_ttl_ms, health=health,
                          library=library)
            await run_while_holding(lease, work)
        else:
            await work()
    finally:
        client.close()


async def ensure_library(client: redis.Redis, library: FunctionLibrary) -> None:
    """Until the function library is on the server: check it, load it if allowed, else wait
    (the library logs the one line and fails the health) and try again with backoff."""
    backoff = Backoff(base=0.5, cap=30.0)
    while True:
        try:
            await in_thread(library.ensure, client)
            return
        except RedisUnavailable:
            await trio.sleep(backoff.next_delay())


async def report_metrics(loops: list[ProjectionLoop], every: float = 5.0) -> None:
    while True:
        await trio.sleep(every)
        for loop in list(loops):
            try:
                await in_thread(loop.report_lag)
            except RedisUnavailable:
                pass


async def run(settings: Settings, specs: Sequence[ProjectionSpec], opts: RunOptions,
              rest: RestClient | None = None, on_written: OnWritten | None = None,
              health: ProjectorHealth | None = None,
              reap_idle_s: float = REAP_IDLE_S) -> None:
    """Every projection of `specs` until cancelled. `reap_idle_s`: a consumer of their
    groups idle this long with nothing pending is removed."""
    health = health or ProjectorHealth()
    library = FunctionLibrary(health)
    loops: list[ProjectionLoop] = []
    client = make_client(settings.redis_url, name="project:snapshots")
    own_rest = rest is None
    rest = rest or RestClient(settings.rest_url,
                              budget=WeightBudget.for_limit(settings.rest_weight_limit))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, GIL_SWITCH_S))
    try:
        async with trio.open_nursery() as nursery:
            snapshot_key = depth_snapshots_key()
            ret = settings.retention.get(retention_family(snapshot_key))
            snapshots = Snapshotter(client, nursery, rest, raw_key=snapshot_key,
                                    maxlen=ret.maxlen if ret is not None else None,
                                    health=health)
            nursery.start_soon(ensure_library, client, library)
            for spec in specs:
                nursery.start_soon(run_spec, spec, settings, opts, health, snapshots, loops,
                                   on_written, library, reap_idle_s)
            nursery.start_soon(report_metrics, loops)
    finally:
        sys.setswitchinterval(switch)
        client.close()
        if own_rest:
            with trio.CancelScope(shield=True):
                await rest.aclose()


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=None, help="comma list of projection names")
    parser.add_argument("--consumer", default=None, help="consumer name (default hostname-pid)")
    parser.add_argument("--block-ms", type=int, default=1000,
                        help=f"XREADGROUP BLOCK in ms (at most {MAX_BLOCK_MS})")
    parser.add_argument("--batch", type=int, default=500, help="XREADGROUP COUNT")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000,
                        help="take over entries another consumer left pending this long")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="failed folds of one entry before it goes to dlq:{name}")
    parser.add_argument("--lease-ttl-ms", type=int, default=10_000,
                        help="TTL of the lease of an exclusive projection")
    parser.add_argument("--no-coalesce", action="store_true",
                        help="write every event instead of the newest per view (benchmarks)")


# flag -> (least, most): a value outside is a bad setting, not silently moved into range
FLAG_RANGES: dict[str, tuple[int, int]] = {
    "--block-ms": (1, MAX_BLOCK_MS),  # below the client's socket timeout
    "--batch": (1, 100_000),
    "--claim-idle-ms": (0, 86_400_000),
    "--max-attempts": (1, 1_000),
    "--lease-ttl-ms": (100, 3_600_000),
}


def options_from(args: argparse.Namespace) -> RunOptions:
    for flag, (least, most) in FLAG_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if not least <= value <= most:
            raise SettingsError(flag, f"{value} is not between {least} and {most}")
    return RunOptions(
        consumer=args.consumer or default_consumer(),
        block_ms=args.block_ms,
        batch=args.batch,
        claim_idle_ms=args.claim_idle_ms,
        max_attempts=args.max_attempts,
        lease_ttl_ms=args.lease_ttl_ms,
        coalescing=not args.no_coalesce,
    )


def main(settings: Settings, args: argparse.Namespace) -> int:
    specs = choose(settings, args.only)
    opts = options_from(args)
    health = ProjectorHealth()
    if settings.metrics_port > 0:  # first: a port already taken stops it before it connects
        metrics.serve(settings.metrics_port, health.healthy)
    connect_checked(settings.redis_url, name="project",
                             cluster=settings.redis_cluster).close()
    log.info("projector starting", extra={"consumer": opts.consumer,
                                          "projections": ",".join(s.name for s in specs)})
    trio.run(_main_async, settings, specs, opts, health)
    return 0


async def _main_async(settings: Settings, specs: Sequence[ProjectionSpec],
                      opts: RunOptions, health: ProjectorHealth) -> None:
    # SIGTERM (docker stop) and SIGINT end the process cleanly: leases are released.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop_on_signal)
            await run(settings, specs, opts, health=health)
