"""Which projections exist for the configured streams: name -> factory and view key patterns.

A market projection exists when at least one of the families it folds is configured
(PIPELINE_MARKET_STREAMS); the user-data projections (`orders`, `account`, `account_events`)
always exist, as they read the one key `raw:user` (idle when no user ingestor runs).
`--only a,b` picks some; an unknown name is a bad setting (exit 2).

Every fold gets the plausibility bounds of the settings (`bounds_from`); the market folds also
get the configured symbols (`PIPELINE_SYMBOLS`; `ALL`: any well-formed symbol), the only ones
that get views. Market ingestors on shards (PIPELINE_SHARD) share the projector's
PIPELINE_SYMBOLS: each takes its part of the same list.

Accounts: the user-data projections run once per account the projector serves
(`Settings.accounts`: PIPELINE_ACCOUNTS, else PIPELINE_ACCOUNT's one; `-` the unlabelled
account), each as `{name}@{label}` (`orders@a1`: its group, lease and dead letters) folding
`raw:user:{label}` into that account's keys. The list is a setting rather than discovered from
the `raw:user:*` streams: the groups, leases and health tasks are known at start, a stray or
mistyped stream starts nothing, and `pipeline status` can name an account that should be
running and is not; adding an account means restarting the projector with the longer list
(its leases are handed over, its groups resume where they were). Every user-data fold takes
`account=` and builds its names with `projections.core.keys.Keys(prefix, account=...)`; the
registry refuses to start a user-data fold that did not take it (it would read and write the
unlabelled account's keys). `--only orders` picks `orders` of every account served,
`--only orders@a1` one.

The market folds also take the kline history's length (`PIPELINE_KLINE_HISTORY`: `P:klines`
keeps at least that many candles); the user-data folds the age the account's event streams
keep (`PIPELINE_EVENTS_MAX_AGE_S`).

The key patterns say which view keys a projection owns, for `pipeline replay --reset`. The
diff-depth book publishes under the same key shape as the partial books
(`P:orderbook:{symbol}:{depth}`), so when both are configured at depth 20 they share keys; both
write with the update id as version, so the newest wins either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from pipeline.config import Settings
from pipeline.errors import SettingsError
from projections.core.account import AccountProjection
from projections.core.accountevents import AccountEventsProjection
from projections.core.depthbook import DiffBookProjection
from projections.core.keys import Keys, projection_base
from projections.core.market import (
    BookTickerProjection,
    KlineProjection,
    MarkPriceProjection,
    PartialBookProjection,
    TradeProjection,
)
from projections.core.orders import OrdersProjection
from projections.core.outputs import Projection
from projections.core.plausible import Bounds

BOOK_DEPTH = 20  # levels of the diff-depth book published to P:orderbook:{symbol}:20


@attrs.frozen
class ProjectionSpec:
    name: str
    factory: Callable[[], Projection]
    exclusive: bool
    key_patterns: tuple[str, ...]
    bounds: Bounds = attrs.Factory(Bounds)


def bounds_from(settings: Settings) -> Bounds:
    """The plausibility bounds of these settings (projections.core.plausible)."""
    return Bounds(max_ahead_ms=int(settings.max_clock_ahead_s * 1000),
                  max_id_rate=settings.max_id_rate,
                  repair_slack_ms=int(settings.repair_slack_s * 1000))


# name -> (fold class, the views it owns: (family, *parts) of a SCAN pattern, or a family of
# one key alone, `(family, ONE_KEY)`)
Owned = tuple[tuple[str, ...], ...]
ONE_KEY = ""
_MARKET: dict[str, tuple[type, Owned]] = {
    "mark_price": (MarkPriceProjection, (("mark_price",),)),
    "orderbook": (PartialBookProjection, ()),  # per configured depth, below
    "kline": (KlineProjection, (("kline",), ("klines",))),
    "last_price": (TradeProjection, (("last_price",),)),
    "book_ticker": (BookTickerProjection, (("book_ticker",),)),
    "depth_book": (DiffBookProjection, (("orderbook", "*", str(BOOK_DEPTH)),)),
}
_USER: dict[str, tuple[type, Owned]] = {
    # P:orders and P:orders:{symbol} are the listener's streams: never deleted by a reset
    "orders": (OrdersProjection, (("order_state",), ("algo_order_state",), ("open_orders",),
                                  ("open_algo_orders",))),
    # P:position_events and P:account_events, like P:orders, are listeners' streams
    "account": (AccountProjection, (("position",), ("balance",), ("leverage",),
                                    ("multi_assets_margin", ONE_KEY))),
    "account_events": (AccountEventsProjection, ()),
}


def available(settings: Settings) -> dict[str, ProjectionSpec]:
    """Every projection that has something to read with these settings, by name."""
    families = [k.family for k in settings.market_streams]
    bounds = bounds_from(settings)
    out: dict[str, ProjectionSpec] = {}
    for name, (cls, owned) in _MARKET.items():
        # market folds take the configured families and symbols; every fold the bounds
        options: dict[str, object] = {"families": families, "book_depth": BOOK_DEPTH,
                                      "symbols": settings.symbols, "bounds": bounds,
                                      "kline_history": settings.kline_history}
        if name == "depth_book" and "depth" not in families:
            continue
        if name == "orderbook":
            owned = tuple(("orderbook", "*", f[len("depth"):]) for f in families
                          if f in ("depth5", "depth10", "depth20"))
        spec = _spec(settings, name, cls, owned, options, Keys(settings.view_prefix))
        if spec is not None:
            out[spec.name] = spec
    for account in settings.accounts:
        keys = Keys(settings.view_prefix, account=account)
        for name, (cls, owned) in _USER.items():
            spec = _spec(settings, name, cls, owned,
                         {"bounds": bounds, "account": account,
                          "events_max_age_s": settings.events_max_age_s}, keys)
            if spec is not None:
                out[spec.name] = spec
    return out


def _spec(settings: Settings, name: str, cls: type, owned: Owned,
          options: dict[str, object], keys: Keys) -> ProjectionSpec | None:
    """The spec of one fold with its options; None when it has nothing to read."""
    prefix = settings.view_prefix

    def factory(cls: type = cls, options: dict[str, object] = options) -> Projection:
        return cls(prefix, **options)

    probe = factory()
    if not probe.sources:
        return None
    if "account" in options and (probe.name != keys.projection(name)
                                 or list(probe.sources) != [keys.raw_user()]):
        raise TypeError(f"the user-data fold {cls.__name__} did not take account="
                        f"{options['account']!r}: it would fold another account's log")
    return ProjectionSpec(probe.name, factory, bool(probe.exclusive),
                          tuple(keys.view(parts[0]) if parts[1:] == (ONE_KEY,)
                                else keys.pattern(*parts) for parts in owned),
                          bounds_from(settings))


def choose(settings: Settings, only: str | Sequence[str] | None) -> list[ProjectionSpec]:
    """The projections named by `--only` (all available ones when None)."""
    specs = available(settings)
    if only is None:
        return list(specs.values())
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only)
             if n.strip()]
    picked: dict[str, ProjectionSpec] = {}
    unknown = []
    for n in names:
        # a name, or a user-data projection's base name for every account served
        matched = [s for s in specs.values() if n in (s.name, projection_base(s.name)[0])]
        if not matched:
            unknown.append(n)
        picked.update((s.name, s) for s in matched)
    if unknown or not names:
        raise SettingsError("--only", f"unknown projection {', '.join(unknown) or '(none)'}; "
                                      f"available: {', '.join(specs)}")
    return list(picked.values())
