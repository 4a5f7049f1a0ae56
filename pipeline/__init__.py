"""crypto-data-redis: Binance USD-M futures websockets -> Redis Streams -> views.

Where things are:
- a frame enters in `pipeline.wsconn` (one websocket connection, its reader loop),
- it is logged by `pipeline.writer` (batched XADD to `raw:` streams, format in `pipeline.eventlog`),
- views are written by `projections.runner` (consumer groups) through `projections.viewstore`.
"""
