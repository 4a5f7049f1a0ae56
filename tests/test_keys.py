"""Every key name comes from `projections.core.keys`: the shapes other services read."""

from __future__ import annotations

from projections.core.keys import Keys, dlq_key, family_of_key, lease_key, market_key


def test_view_keys_keep_the_seed_services_names() -> None:
    k = Keys("websocket")
    assert k.mark_price("BTCUSDT") == "websocket:mark_price:btcusdt"
    assert k.orderbook("BTCUSDT", 20) == "websocket:orderbook:btcusdt:20"
    assert k.position("BTCUSDT") == "websocket:position:btcusdt"
    assert k.position("BTCUSDT", "long") == "websocket:position:btcusdt:long"
    assert k.balance("USDT") == "websocket:balance:usdt"
    assert k.open_orders("ETHUSDT") == "websocket:open_orders:ethusdt"
    assert k.open_orders("ETHUSDT", "algo") == "websocket:open_algo_orders:ethusdt"
    assert k.orders_stream() == "websocket:orders"
    assert k.orders_stream("SOLUSDT") == "websocket:orders:solusdt"
    assert k.kline("BTCUSDT", "1m") == "websocket:kline:btcusdt:1m"
    assert k.klines("BTCUSDT", "1M") == "websocket:klines:btcusdt:1M"  # interval keeps its case


def test_raw_and_projector_keys() -> None:
    assert market_key("depth20") == "raw:market:depth20"
    assert family_of_key("raw:market:kline_1m") == "kline_1m"
    assert family_of_key("raw:user") is None
    assert dlq_key("orders") == "dlq:orders" and lease_key("orders") == "lease:orders"


def test_patterns_and_parsing_round_trip() -> None:
    k = Keys("desk.a")
    assert k.pattern() == "desk.a:*"
    assert k.pattern("open_orders") == "desk.a:open_orders:*"
    assert k.pattern("orderbook", "*", "20") == "desk.a:orderbook:*:20"
    assert k.family_of("desk.a:orderbook:btcusdt:20") == "orderbook"
    assert k.family_of("websocket:orderbook:btcusdt:20") is None
    assert k.held_orders("desk.a:open_algo_orders:btcusdt") == ("open_algo_orders", "BTCUSDT")
    assert k.held_orders("desk.a:open_orders:btcusdt:extra") is None
    assert k.held_orders("desk.a:order_state:btcusdt") is None
    assert k.order_keys("BTCUSDT", "algo") == [
        "desk.a:algo_order_state:btcusdt", "desk.a:open_algo_orders:btcusdt",
        "desk.a:orders:btcusdt", "desk.a:orders"]
