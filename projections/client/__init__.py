"""The consumer library: what the analyzer and the order listener import. Plain redis-py.

It stands on its own: importing it loads neither trio nor any part of the projector (checked
by tests/test_layout.py). `projections.client` keeps the names existing callers import.
"""

from projections.client.views import (
    MarketReader,
    OrderEvent,
    OrdersConsumer,
    open_algo_orders,
    open_orders,
    parse_view,
)

__all__ = ["MarketReader", "OrderEvent", "OrdersConsumer", "open_algo_orders", "open_orders",
           "parse_view"]
