"""Which projections exist for the configured streams: name -> factory and view key patterns.

A market projection exists when at least one of the families it folds is configured
(PIPELINE_MARKET_STREAMS); the user-data projections (`orders`, `account`) always exist, as
they read the one key `raw:user` (idle when no user ingestor runs). `--only a,b` picks some;
an unknown name is a bad setting (exit 2).

The key patterns say which view keys a projection owns, for `pipeline replay --reset`. The
diff-depth book publishes under the same key shape as the partial books
(`P:orderbook:{symbol}:{depth}`), so when both are configured at depth 20 they share keys; both
write with the update id as version, so the newest wins either way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import attrs

from pipeline.config import Settings
from pipeline.errors import SettingsError
from projections.core import Projection

BOOK_DEPTH = 20  # levels of the diff-depth book published to P:orderbook:{symbol}:20


@attrs.frozen
class ProjectionSpec:
    name: str
    factory: Callable[[], Projection]
    exclusive: bool
    key_patterns: tuple[str, ...]


# name -> (module, class, view key patterns with {P} for the prefix)
_MARKET: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mark_price": ("projections.market", "MarkPriceProjection", ("{P}:mark_price:*",)),
    "orderbook": ("projections.market", "PartialBookProjection", ()),  # per depth, below
    "kline": ("projections.market", "KlineProjection", ("{P}:kline:*", "{P}:klines:*")),
    "last_price": ("projections.market", "TradeProjection", ("{P}:last_price:*",)),
    "book_ticker": ("projections.market", "BookTickerProjection", ("{P}:book_ticker:*",)),
    "depth_book": ("projections.depthbook", "DiffBookProjection",
                   (f"{{P}}:orderbook:*:{BOOK_DEPTH}",)),
}
_USER: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # P:orders and P:orders:{symbol} are the listener's streams: never deleted by a reset
    "orders": ("projections.orders", "OrdersProjection",
               ("{P}:order_state:*", "{P}:algo_order_state:*", "{P}:open_orders:*",
                "{P}:open_algo_orders:*")),
    "account": ("projections.account", "AccountProjection",
                ("{P}:position:*", "{P}:balance:*")),
}


def _load(module: str, cls: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None  # not built in this version


def available(settings: Settings) -> dict[str, ProjectionSpec]:
    """Every projection that has something to read with these settings, by name."""
    families = [k.family for k in settings.market_streams]
    prefix = settings.view_prefix
    out: dict[str, ProjectionSpec] = {}
    for name, (module, clsname, patterns) in {**_MARKET, **_USER}.items():
        cls = _load(module, clsname)
        if cls is None:
            continue
        # market folds take the configured families; the user folds only the prefix
        options: dict[str, object] = (
            {"families": families, "book_depth": BOOK_DEPTH} if name in _MARKET else {})

        def factory(cls: type = cls, options: dict[str, object] = options) -> Projection:
            return cls(prefix, **options)

        probe = factory()
        if not probe.sources or (name == "depth_book" and "depth" not in families):
            continue
        if name == "orderbook":
            patterns = tuple(f"{{P}}:orderbook:*:{f[len('depth'):]}" for f in families
                             if f in ("depth5", "depth10", "depth20"))
        out[name] = ProjectionSpec(name, factory, bool(probe.exclusive),
                                   tuple(p.replace("{P}", prefix) for p in patterns))
    return out


def choose(settings: Settings, only: str | Sequence[str] | None) -> list[ProjectionSpec]:
    """The projections named by `--only` (all available ones when None)."""
    specs = available(settings)
    if only is None:
        return list(specs.values())
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only)
             if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown or not names:
        raise SettingsError("--only", f"unknown projection {', '.join(unknown) or '(none)'}; "
                                      f"available: {', '.join(specs)}")
    return [specs[n] for n in dict.fromkeys(names)]
