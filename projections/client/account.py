"""The account's views with a freshness limit: position, balance, leverage, the Multi-Assets
mode. Plain redis-py, no Trio.

These views have no REST fallback (it would need the account's API key); a view older than
`max_age` seconds (judged by its own `timestamp`: the event time, or the moment a
reconciliation snapshot was answered) reads as None, so a caller never acts on a stale
balance without knowing. Positions and balances are refreshed by reconciliation every 300 s
even when nothing changes, so the default limit (600 s) allows one missed round; leverage and
the Multi-Assets mode change only when the account changes them (no default limit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from pipeline.redisconn import is_cluster
from projections.client.views import parse_view
from projections.core.keys import DEFAULT_PREFIX, Keys

POSITION_MAX_AGE_S = 600.0  # two reconciliation periods


class AccountReader:
    """The account's views, each None when missing or older than `max_age` s (None: any age).

    Example::

        account = AccountReader(r)
        usdt = account.balance("USDT")            # {"a", "wb", "cw", "bc", "timestamp", ...}
        pos = account.position("BTCUSDT")         # hedge mode: side="long" / "short"
        lev = account.leverage("BTCUSDT")         # {"symbol", "leverage", "timestamp", ...}
        if usdt and pos and lev:
            print(usdt["wb"], pos["pa"], lev["leverage"])

    `account="a1"`: that account's views (`P:acct:a1:...`).
    """

    def __init__(self, r: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 account: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.r = r
        self.keys = Keys(prefix, account=account, cluster=is_cluster(r))
        self.clock = clock

    def position(self, symbol: str, side: str | None = None,
                 max_age: float | None = POSITION_MAX_AGE_S) -> dict[str, Any] | None:
        """The position as ACCOUNT_UPDATE `a.P[]` has it (`pa` signed amount, `ep` entry
        price, `up` unrealized profit, ...). Example: `account.position("ETHUSDT")["pa"]`."""
        return self._fresh(self.keys.position(symbol, side), max_age)

    def balance(self, asset: str, max_age: float | None = POSITION_MAX_AGE_S
                ) -> dict[str, Any] | None:
        """The asset's balance (`wb` wallet, `cw` cross wallet, `bc` last change). Example:
        `Decimal(account.balance("USDT")["wb"])`."""
        return self._fresh(self.keys.balance(asset), max_age)

    def leverage(self, symbol: str, max_age: float | None = None) -> dict[str, Any] | None:
        """`{"symbol", "leverage" (an integer), "timestamp", "source"}`. Example:
        `account.leverage("BTCUSDT")["leverage"]`."""
        return self._fresh(self.keys.leverage(symbol), max_age)

    def multi_assets_margin(self, max_age: float | None = None) -> dict[str, Any] | None:
        """`{"multi_assets_margin" (a boolean), "timestamp", "source"}`. Example:
        `account.multi_assets_margin()["multi_assets_margin"]`."""
        return self._fresh(self.keys.multi_assets_margin(), max_age)

    def _fresh(self, key: str, max_age: float | None) -> dict[str, Any] | None:
        view = parse_view(self.r.get(key))
        if view is None or max_age is None:
            return view
        try:
            age = self.clock() - float(view.get("timestamp", 0))
        except (TypeError, ValueError):
            return None
        return view if age <= max_age else None
