"""crypto-data-redis: Binance USD-M futures websockets -> Redis Streams -> views.

Where things are:
- a frame enters in `pipeline.wsconn` (one websocket connection, its reader loop),
- it is logged by `pipeline.writer` (batched XADD to `raw:` streams, format in `pipeline.eventlog`),
- views are folded by `projections.core` (pure) and written by `projections.shell.loop`
  (consumer groups) through `projections.shell.viewstore`.
"""
