"""REST weight of `pipeline ingest user` in steady state, measured on the simulator.

Time is compressed 60 times: reconciliation every 5 s instead of 300 s and listenKey keep-alive
every 30 s instead of 1800 s, so one clock minute of this run makes the calls of one hour in
production. The figure is the simulator's own `X-MBX-USED-WEIGHT-1M` count (it counts by clock
minute, as Binance does) for one whole minute that starts after the ingestor is connected, next
to the ingestor's own count (RestClient's WeightBudget).

    .venv/bin/python bench/bench_user_weight.py          # about 2 minutes

Starts its own redis-server (LocalRedis) and simulator; prints a small table and writes JSON to
bench/results/user_weight.json.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import trio

from pipeline.config import Secret, load_settings
from pipeline.ingest_user import UserOptions, run_user_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from pipeline.signing import make_signer
from pipeline.simulator import SimConfig, Simulator

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT",
           "AVAXUSDT", "LINKUSDT", "DOTUSDT")
COMPRESSION = 60


async def measure(redis_url: str) -> dict[str, object]:
    sim = Simulator(SimConfig(symbols=SYMBOLS))
    client = make_client(redis_url)
    opts = UserOptions(reconcile_every=300 / COMPRESSION, keepalive_every=1800 / COMPRESSION)
    async with trio.open_nursery() as nursery:
        ws_url, rest_url = await nursery.start(sim.run)
        settings = load_settings({"REDIS_URL": redis_url, "BINANCE_WS_URL": ws_url,
                                  "BINANCE_REST_URL": rest_url,
                                  "BINANCE_API_KEY": "sim-api-key",
                                  "BINANCE_API_SECRET": "sim-api-secret"}, env={})
        ingest = await nursery.start(functools.partial(
            run_user_ingest, settings, client, Secret("sim-api-key"),
            make_signer(Secret("sim-api-secret")), opts))
        # skip the rest of the current minute (start-up calls), measure the next one whole
        now = time.time()
        await trio.sleep(60 - now % 60 + 0.05)
        runs_before = ingest.reconciler.runs
        await trio.sleep(59.8)
        exchange = sim.stats()["weight_used_1m"]
        own = ingest.reconciler.api.rest.budget.used
        runs = ingest.reconciler.runs - runs_before
        ingest.stop()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    client.close()
    return {"compression": COMPRESSION, "reconcile_every_s": opts.reconcile_every,
            "keepalive_every_s": opts.keepalive_every, "reconciliations_in_minute": runs,
            "exchange_weight_used_1m": exchange, "client_budget_used_1m": own,
            "per_hour_in_production": exchange}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder, LocalRedis(Path(folder)) as server:
        result = trio.run(measure, server.url)
    print(f"{'measured minute (= one production hour)':42} {'value':>8}")
    for key, value in result.items():
        print(f"{key:42} {value!s:>8}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "user_weight.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
