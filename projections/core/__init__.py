"""The pure core: no trio, no redis, no httpx, no prometheus_client (tests/test_layout.py).

`outputs` (what a projection is and the writes it asks for), `batch` (folding a batch),
`frames` + `market` (stateless market folds), `depthbook` (diff-depth sequencer),
`userevents` + `orders` + `orderwrites` (the order lifecycle), `account` (positions, balances).
"""
