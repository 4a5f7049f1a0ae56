"""Projections: turn the raw event log into views.

Pure core (no trio, no redis): `core` (the output types and coalescing), `market` (mark price,
partial books, klines, trades), `depthbook` (diff-depth sequencer), `orders` and `account`
(user data). The shell: `runner` (consumer groups), `viewstore` (atomic forward-only writes),
`replay`. Readers use `client` (plain redis-py).
"""
