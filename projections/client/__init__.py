"""The consumer library: what the analyzer and the listeners import. Plain redis-py.

It stands on its own: importing it loads neither trio nor any part of the projector (checked
by tests/test_layout.py). `projections.client` keeps the names existing callers import.
"""

from projections.client.account import AccountReader
from projections.client.consumers import (
    AccountEvent,
    AccountEventsConsumer,
    OrderEvent,
    OrdersConsumer,
    PositionEvent,
    PositionEventsConsumer,
    StreamConsumer,
)
from projections.client.views import MarketReader, open_algo_orders, open_orders, parse_view

__all__ = ["AccountEvent", "AccountEventsConsumer", "AccountReader", "MarketReader",
           "OrderEvent", "OrdersConsumer", "PositionEvent", "PositionEventsConsumer",
           "StreamConsumer", "open_algo_orders", "open_orders", "parse_view"]
