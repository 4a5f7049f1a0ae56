"""An order listener that consumes `websocket:orders` instead of polling open orders.

Run it next to `pipeline project` (or inside `pipeline demo`):

    python examples/order_listener.py --redis-url redis://localhost:6379/0 --group listener

Each order or algo-order change arrives once per state change, from the user-data stream or,
after an outage, from reconciliation. The handler is acknowledged only after it returns; kill
this process mid-handler and the entry is delivered again (here or to another consumer of the
same group after --claim-idle-ms).
"""

from __future__ import annotations

import argparse
import signal

import redis

from projections.client import OrderEvent, OrdersConsumer


def on_order(event: OrderEvent) -> None:
    data = event.data
    if event.kind == "algo":
        print(f"algo {event.symbol} {event.order_id} {event.status} "
              f"triggered order={data.get('ai') or '-'} ({event.source})")
    elif event.status in ("FILLED", "PARTIALLY_FILLED"):
        print(f"fill {event.symbol} {event.order_id} {event.status} "
              f"filled={data.get('z')} avg={data.get('ap')} ({event.source})")
    else:
        print(f"order {event.symbol} {event.order_id} {event.status} ({event.source})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--group", default="listener")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--prefix", default="websocket")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    args = parser.parse_args()
    consumer = OrdersConsumer(redis.Redis.from_url(args.redis_url), group=args.group,
                              consumer=args.consumer, prefix=args.prefix, handler=on_order,
                              claim_idle_ms=args.claim_idle_ms)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    try:
        consumer.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
