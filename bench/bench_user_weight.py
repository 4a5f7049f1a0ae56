"""REST weight of `pipeline ingest user`, measured on the simulator: steady state, start and one
outage.

Steady state: time is compressed 60 times (reconciliation every 5 s instead of 300 s, listenKey
keep-alive every 30 s instead of 1800 s), so one clock minute of this run makes the calls of one
hour in production. The figure is the simulator's own `X-MBX-USED-WEIGHT-1M` count (it counts by
clock minute, as Binance does) for one whole minute that starts after the ingestor is connected,
next to the ingestor's own count per endpoint (RestClient.weight_spent).

Start and outage: a second ingestor (periodic reconciliation out of the way) on the same
account. Its start (checks, key, the first reconciliation with the search of the
`--outage-lookback` window) is counted; then the private stream is dropped, two orders are
placed and filled and one held order is canceled while it is down, and the reconnect (new key,
reconciliation, final state of the vanished order, the outage's allOrders/userTrades search for
every symbol of PIPELINE_SYMBOLS) is counted, per endpoint.

    .venv/bin/python bench/bench_user_weight.py          # about 2 minutes

Starts its own redis-server (LocalRedis) and simulator; prints a small table and writes JSON to
bench/results/user_weight.json.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from pipeline.config import Secret, Settings, load_settings
from pipeline.ingest_user import UserIngest, UserOptions, run_user_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.signing import make_signer
from pipeline.simulator import SimConfig, Simulator
from pipeline.wsconn import Timing

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT",
           "AVAXUSDT", "LINKUSDT", "DOTUSDT")
COMPRESSION = 60
KEY, SECRET = "sim-api-key", "sim-api-secret"


def spent(ingest: UserIngest) -> Counter[str]:
    return Counter(ingest.reconciler.api.rest.weight_spent)


def since(before: Counter[str], ingest: UserIngest) -> dict[str, int]:
    after = spent(ingest)
    return {path: after[path] - before[path] for path in sorted(after)
            if after[path] - before[path]}


async def steady_state(sim: Simulator, settings: Settings, redis_url: str) -> dict[str, Any]:
    client = make_client(redis_url)
    opts = UserOptions(reconcile_every=300 / COMPRESSION, keepalive_every=1800 / COMPRESSION)
    async with trio.open_nursery() as nursery:
        ingest = await nursery.start(functools.partial(
            run_user_ingest, settings, client, Secret(KEY), make_signer(Secret(SECRET)), opts))
        # skip the rest of the current minute (start-up calls), measure the next one whole
        await trio.sleep(60 - time.time() % 60 + 0.05)
        runs_before, before = ingest.reconciler.runs, spent(ingest)
        await trio.sleep(59.8)
        exchange = sim.stats()["weight_used_1m"]
        by_path = since(before, ingest)
        runs = ingest.reconciler.runs - runs_before
        ingest.stop()
    client.close()
    return {"compression": COMPRESSION, "reconcile_every_s": opts.reconcile_every,
            "keepalive_every_s": opts.keepalive_every, "reconciliations_in_minute": runs,
            "exchange_weight_used_1m": exchange, "client_weight_1m": sum(by_path.values()),
            "client_weight_by_path": by_path, "per_hour_in_production": exchange}


async def until(check: Any, within: float = 30.0) -> None:
    with trio.fail_after(within):
        while not check():  # noqa: ASYNC110 - the state is the ingestor's, no event reports it
            await trio.sleep(0.02)


def place(sim: Simulator, symbol: str, price: str) -> int:
    order = sim.account.control("place", {"symbol": symbol, "side": "BUY", "type": "LIMIT",
                                          "quantity": "0.010", "price": price})
    assert isinstance(order, dict)
    return int(order["orderId"])


async def start_and_outage(sim: Simulator, settings: Settings, redis_url: str
                           ) -> dict[str, Any]:
    client = make_client(redis_url)
    opts = UserOptions(reconcile_every=3600.0)
    async with trio.open_nursery() as nursery:
        ingest = await nursery.start(functools.partial(
            run_user_ingest, settings, client, Secret(KEY), make_signer(Secret(SECRET)), opts,
            timing=Timing(backoff_base=1.0, backoff_cap=1.0)))
        reconciler = ingest.reconciler
        await until(lambda: reconciler.runs >= 1 and reconciler.outage_since_ms is None)
        start = since(Counter(), ingest)
        held = place(sim, "BTCUSDT", "40000")  # open before the outage: in the views
        with client.pipeline() as pipe:  # as the orders projection holds it
            pipe.hset(f"{settings.view_prefix}:open_orders:btcusdt", str(held),
                      json.dumps({"orderId": held, "symbol": "BTCUSDT", "time": 0}))
            pipe.execute()
        before, runs = spent(ingest), reconciler.runs
        assert sim.drop("private") == 1
        await until(lambda: sim.account.connection_count() == 0)
        sim.account.control("cancel", {"orderId": held})
        for symbol, price in (("BTCUSDT", "50000"), ("ETHUSDT", "3000")):
            sim.account.control("fill", {"orderId": place(sim, symbol, price)})
        await until(lambda: reconciler.runs > runs and reconciler.outage_since_ms is None)
        outage = since(before, ingest)
        ingest.stop()
    client.close()
    return {"start_weight": sum(start.values()), "start_by_path": start,
            "outage_weight": sum(outage.values()), "outage_by_path": outage,
            "symbols_searched": len(SYMBOLS)}


async def measure(redis_url: str) -> dict[str, Any]:
    sim = Simulator(SimConfig(symbols=SYMBOLS))
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = load_settings({"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url,
                                  "BINANCE_REST_URL": rest_url, "BINANCE_API_KEY": KEY,
                                  "BINANCE_API_SECRET": SECRET,
                                  "PIPELINE_SYMBOLS": ",".join(SYMBOLS)}, env={})
        steady = await steady_state(sim, settings, redis_url)
        events = await start_and_outage(sim, settings, redis_url)
        nursery.cancel_scope.cancel()
    return {**steady, **events}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder, LocalRedis(Path(folder)) as server:
        result = trio.run(measure, server.url)
    print(f"{'measured':44} value")
    for key, value in result.items():
        print(f"{key:44} {value}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "user_weight.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
