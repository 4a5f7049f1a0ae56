"""An order listener that consumes `websocket:orders` instead of polling open orders.

Run it next to `pipeline project` (or next to `pipeline demo`, with the Redis URL the demo
prints):

    python examples/order_listener.py --redis-url redis://localhost:6379/0 --group listener

Against the compose deployment, connect as its `reader` user (README.md, "Reading the views"):

    python examples/order_listener.py \
        --redis-url "redis://listener:$(cat secrets/redis_password_listener)@localhost:6379/0"

It prints one line per event, e.g. `fill BTCUSDT 8 PARTIALLY_FILLED filled=0.005 avg=50000
last=0.005@50000 (stream)`.

On a Redis Cluster add `--cluster` (any one node's URL): it then reads every partition of the
orders stream (docs/contract.md section 5.13).

Each order or algo-order change arrives once per state change, from the user-data stream or,
after an outage, from reconciliation. The handler is acknowledged only after it returns; kill
this process mid-handler and the entry is delivered again (here or to another consumer of the
same group after --claim-idle-ms).
"""

from __future__ import annotations

import argparse
import signal
import sys

import redis
import redis.cluster

from projections.client import OrderEvent, OrdersConsumer


def on_order(event: OrderEvent) -> None:
    if event.kind == "algo":
        print(f"algo {event.symbol} {event.order_id} {event.status} "
              f"triggered order={event.actual_order_id or '-'} ({event.source})")
    elif event.status in ("FILLED", "PARTIALLY_FILLED"):
        last = (f" last={event.last_filled_qty}@{event.last_filled_price}"
                if event.last_filled_qty is not None else "")
        print(f"fill {event.symbol} {event.order_id} {event.status} "
              f"filled={event.filled_qty} avg={event.avg_price}{last} ({event.source})")
    else:
        print(f"order {event.symbol} {event.order_id} {event.status} ({event.source})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--group", default="listener")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--prefix", default="websocket")
    parser.add_argument("--account", default=None,
                        help="the account label (PIPELINE_ACCOUNT of its `ingest user`); "
                             "none: the unlabelled account")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    parser.add_argument("--cluster", action="store_true",
                        help="--redis-url names a node of a Redis Cluster")
    args = parser.parse_args()
    # one line per event as it comes, also when stdout is a pipe or a file
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    client = (redis.cluster.RedisCluster.from_url(args.redis_url) if args.cluster
              else redis.Redis.from_url(args.redis_url))
    consumer = OrdersConsumer(client, group=args.group,  # type: ignore[arg-type]
                              consumer=args.consumer, prefix=args.prefix, handler=on_order,
                              claim_idle_ms=args.claim_idle_ms, account=args.account)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    try:
        consumer.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
