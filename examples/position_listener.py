"""A risk listener: reacts to a position closed by its stop-loss and to a margin call, from
`websocket:position_events` and `websocket:account_events`, instead of polling positions.

Run it next to `pipeline project` (or next to `pipeline demo`, with the Redis URL the demo
prints):

    python examples/position_listener.py --redis-url redis://localhost:6379/0 --group risk

Against the compose deployment, connect as its `listener` user (README.md, "Reading the
views"):

    python examples/position_listener.py \\
        --redis-url "redis://listener:$(cat secrets/redis_password_listener)@localhost:6379/0"

It prints one line per event, e.g.

    STOP-LOSS BTCUSDT closed 0.01 -> 0 by STOP_MARKET algo 1000003 order 8 pnl -6.1
    MARGIN CALL BTCUSDT LONG amount 0.01 mark 59000 maintenance margin 2.36 wallet 9990.5
    position BTCUSDT opened 0 -> 0.01 order 5 (websocket)
    account ACCOUNT_CONFIG_UPDATE BTCUSDT leverage 10

Both streams are consumed in one consumer group each (the same `--group` name), acknowledged
only after the line is printed: kill this process mid-event and the entry is delivered again
(here or to another consumer of the group after --claim-idle-ms).
"""

from __future__ import annotations

import argparse
import signal
import sys

import redis

from projections.client import (
    AccountEvent,
    AccountEventsConsumer,
    PositionEvent,
    PositionEventsConsumer,
)


def on_position(ev: PositionEvent) -> None:
    move = f"{ev.symbol} {ev.kind} {ev.amount_before} -> {ev.amount_after}"
    if ev.kind == "closed" and ev.by_stop_loss:
        print(f"STOP-LOSS {move} by {ev.algo_type} algo {ev.algo_id} order {ev.order_id} "
              f"pnl {ev.realized_profit}")
    elif ev.kind == "closed" and ev.by_take_profit:
        print(f"TAKE-PROFIT {move} by {ev.algo_type} algo {ev.algo_id} order {ev.order_id} "
              f"pnl {ev.realized_profit}")
    else:
        print(f"position {move} order {ev.order_id or '-'} ({ev.source})")


def on_account(ev: AccountEvent) -> None:
    if ev.type == "MARGIN_CALL":
        wallet = ev.data.get("cw")
        for p in ev.margin_call_positions:
            print(f"MARGIN CALL {p.get('s')} {p.get('ps')} amount {p.get('pa')} mark "
                  f"{p.get('mp')} maintenance margin {p.get('mm')} wallet {wallet}")
    elif ev.leverage is not None:
        print(f"account {ev.type} {ev.symbol} leverage {ev.leverage}")
    else:
        print(f"account {ev.type} {ev.symbol or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--group", default="risk")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--prefix", default="websocket")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    args = parser.parse_args()
    # one line per event as it comes, also when stdout is a pipe or a file
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    r = redis.Redis.from_url(args.redis_url)
    positions = PositionEventsConsumer(r, group=args.group, handler=on_position,
                                       consumer=args.consumer, prefix=args.prefix,
                                       claim_idle_ms=args.claim_idle_ms, block_ms=200)
    account = AccountEventsConsumer(r, group=args.group, handler=on_account,
                                    consumer=args.consumer, prefix=args.prefix,
                                    claim_idle_ms=args.claim_idle_ms, block_ms=200)
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopped:  # two streams, one thread: each poll waits at most 200 ms
            positions.poll_once()
            account.poll_once()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
