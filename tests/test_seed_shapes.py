"""The seed service's readers keep working with everything of issue #13 running: the market
and user ingestors and every projection on the simulator, and the mark price and book views
have exactly the seed's fields, while the new views fill in beside them."""

from __future__ import annotations

import functools
from typing import Any

import orjson
import trio

from pipeline.ingest_market import run_market_ingest
from pipeline.localredis import LocalRedis
from pipeline.redisconn import make_client
from projections.shell.project import RunOptions
from projections.shell.project import run as run_projector
from projections.shell.registry import choose
from tests.test_ingest_user import place, running, snapshots_after, until

SEED_MARK = {"mark_price", "index_price", "funding_rate", "next_funding_time", "timestamp",
             "source"}
SEED_BOOK = {"bids", "asks", "timestamp", "last_update_id", "source"}


def view(run: Any, key: str) -> dict[str, Any] | None:
    raw = run.r.get(f"websocket:{key}")
    return None if raw is None else dict(orjson.loads(raw))


async def test_mark_price_and_book_keep_the_seed_shapes_beside_the_new_views(
        redis_server: LocalRedis) -> None:
    async with running(redis_server, PIPELINE_SYMBOLS="BTCUSDT,ETHUSDT") as run:
        client = make_client(redis_server.url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                run_projector, run.settings, choose(run.settings, None),
                RunOptions(consumer="test", block_ms=50, lease_ttl_ms=2000)))
            ingest = await nursery.start(functools.partial(
                run_market_ingest, run.settings, client, ("BTCUSDT", "ETHUSDT")))
            await snapshots_after(run, 1)  # the stream is up: the fill is an event
            place(run.sim, type="MARKET", quantity="0.010")
            await until(lambda: run.r.llen("websocket:klines:btcusdt:1m") >= 500
                        and run.r.exists("websocket:leverage:btcusdt")
                        and run.r.xlen("websocket:position_events")
                        and view(run, "mark_price:btcusdt")
                        and view(run, "orderbook:btcusdt:20"), within=20)
            mark = view(run, "mark_price:btcusdt")
            book = view(run, "orderbook:btcusdt:20")
            ingest.stop()
            nursery.cancel_scope.cancel()
        client.close()
    assert mark is not None and set(mark) == SEED_MARK and mark["source"] == "websocket"
    assert all(isinstance(mark[f], str) for f in ("mark_price", "index_price", "funding_rate"))
    assert isinstance(mark["next_funding_time"], int) and isinstance(mark["timestamp"], float)
    assert book is not None and set(book) == SEED_BOOK and book["source"] == "websocket"
    assert len(book["bids"]) == 20 and all(isinstance(p, str) for lvl in book["bids"]
                                           for p in lvl)
    assert isinstance(book["last_update_id"], int)
