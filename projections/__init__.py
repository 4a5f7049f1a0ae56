"""Projections: turn the raw event log into views. Three rooms, one per role:

- `projections.core`: the pure core. Parsing frames, folding an entry into view writes, the
  diff-depth sequencer, the order and account folds, folding a batch, every key name
  (`core.keys`). Imports neither trio, redis, httpx nor prometheus_client (a test walks the
  folder and checks it).
- `projections.shell`: the Redis shell around it. Consumer groups and the loop
  (`shell.loop`: read → fold → write + ack), the `pipeline project` command, the atomic view
  and order stores with their Lua, leases, the registry of projections, replay, depth
  snapshots.
- `projections.client`: the consumer library other teams import (plain redis-py, no Trio,
  nothing of the projector).
"""
