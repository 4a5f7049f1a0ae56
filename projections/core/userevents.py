"""User-data events of Binance USD-M futures as attrs values, and the one converter that reads
them off the wire. Pure: imports neither trio nor redis.

`decode_frame(bytes)` gives a frame's JSON object and `parse_user_event(payload) -> UserEvent`
structures it, so that a fold looks at the `"e"` tag first and structures only the events it
folds. The converter renames Binance's one-letter keys (`E` -> `event_time`, `o` -> `order`,
...), picks the class from the `"e"` tag and falls back to `UnknownEvent` for a type this
version does not know. Unknown fields are ignored; a known event missing a field the folds
need raises `BadEvent`.

The folds store order and position fields exactly as Binance sent them, so the models that feed
a view keep the original mapping in `raw` next to the few typed fields the folds decide on.
Prices and quantities stay strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, override
from cattrs.strategies import configure_tagged_union


class BadEvent(ValueError):
    """Bytes that are not a JSON object, or a known event missing a required field."""


def _raw() -> Any:
    return attrs.field(factory=dict, repr=False)


@attrs.frozen
class OrderFields:
    """`o` of ORDER_TRADE_UPDATE."""

    symbol: str  # s
    order_id: int  # i
    status: str  # X
    execution_type: str  # x
    update_time: int  # T
    filled_qty: str  # z
    last_filled_qty: str = "0"  # l
    last_filled_price: str = "0"  # L
    realized_profit: str = "0"  # rp
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class OrderTradeUpdate:
    event_time: int  # E
    transaction_time: int  # T
    order: OrderFields  # o


@attrs.frozen
class AlgoFields:
    """`o` of ALGO_UPDATE (conditional orders of the Algo service)."""

    symbol: str  # s
    algo_id: int  # aid
    status: str  # X
    actual_order_id: str = ""  # ai: the matching-engine orderId once triggered
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class AlgoUpdate:
    event_time: int  # E
    transaction_time: int  # T
    order: AlgoFields  # o


@attrs.frozen
class PositionChange:
    """One element of ACCOUNT_UPDATE `a.P`."""

    symbol: str  # s
    position_side: str  # ps
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class BalanceChange:
    """One element of ACCOUNT_UPDATE `a.B`."""

    asset: str  # a
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class AccountData:
    reason: str = ""  # m
    balances: tuple[BalanceChange, ...] = ()  # B
    positions: tuple[PositionChange, ...] = ()  # P


@attrs.frozen
class AccountUpdate:
    event_time: int  # E
    transaction_time: int  # T
    account: AccountData  # a


@attrs.frozen
class TradeLite:
    event_time: int  # E
    symbol: str = ""  # s


@attrs.frozen
class MarginCall:
    """The account is close to liquidation: `p` lists the positions at risk."""

    event_time: int  # E
    cross_wallet: str = ""  # cw
    positions: tuple[Mapping[str, Any], ...] = ()  # p
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class LeverageChange:
    """`ac` of ACCOUNT_CONFIG_UPDATE: a symbol's new leverage."""

    symbol: str  # s
    raw: Mapping[str, Any] = _raw()  # `l` is read from here: it must be an integer as sent


@attrs.frozen
class MultiAssetsChange:
    """`ai` of ACCOUNT_CONFIG_UPDATE: the Multi-Assets margin mode."""

    raw: Mapping[str, Any] = _raw()  # `j`, a boolean as sent


@attrs.frozen
class AccountConfigUpdate:
    event_time: int  # E
    transaction_time: int = 0  # T
    leverage: LeverageChange | None = None  # ac
    multi_assets: MultiAssetsChange | None = None  # ai
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class StrategyUpdate:
    event_time: int  # E
    raw: Mapping[str, Any] = _raw()  # `su`: si, st, ss, s, ut, c


@attrs.frozen
class GridUpdate:
    event_time: int  # E
    raw: Mapping[str, Any] = _raw()  # `gu`: si, st, ss, s, r, up, uq, uf, mp, ut


@attrs.frozen
class TriggerReject:
    """CONDITIONAL_ORDER_TRIGGER_REJECT (deprecated by Binance on 2025-12-15)."""

    event_time: int  # E
    raw: Mapping[str, Any] = _raw()  # `or`: s, i, r


@attrs.frozen
class ListenKeyExpired:
    # The frame also names the listenKey: deliberately not modelled, so it cannot leak.
    event_time: int = 0  # E


@attrs.frozen
class UnknownEvent:
    event_type: str = ""  # e ("" when the object has none, e.g. a request's reply)
    raw: Mapping[str, Any] = _raw()


UserEvent = (OrderTradeUpdate | AlgoUpdate | AccountUpdate | TradeLite | MarginCall
             | AccountConfigUpdate | StrategyUpdate | GridUpdate | TriggerReject
             | ListenKeyExpired | UnknownEvent)

EVENT_TAGS: dict[type, str] = {
    OrderTradeUpdate: "ORDER_TRADE_UPDATE",
    AlgoUpdate: "ALGO_UPDATE",
    AccountUpdate: "ACCOUNT_UPDATE",
    TradeLite: "TRADE_LITE",
    MarginCall: "MARGIN_CALL",
    AccountConfigUpdate: "ACCOUNT_CONFIG_UPDATE",
    StrategyUpdate: "STRATEGY_UPDATE",
    GridUpdate: "GRID_UPDATE",
    TriggerReject: "CONDITIONAL_ORDER_TRIGGER_REJECT",
    ListenKeyExpired: "listenKeyExpired",
    UnknownEvent: "",
}

_RENAMES: dict[type, dict[str, str]] = {
    OrderFields: {"symbol": "s", "order_id": "i", "status": "X", "execution_type": "x",
                  "update_time": "T", "filled_qty": "z", "last_filled_qty": "l",
                  "last_filled_price": "L", "realized_profit": "rp"},
    OrderTradeUpdate: {"event_time": "E", "transaction_time": "T", "order": "o"},
    AlgoFields: {"symbol": "s", "algo_id": "aid", "status": "X", "actual_order_id": "ai"},
    AlgoUpdate: {"event_time": "E", "transaction_time": "T", "order": "o"},
    PositionChange: {"symbol": "s", "position_side": "ps"},
    BalanceChange: {"asset": "a"},
    AccountData: {"reason": "m", "balances": "B", "positions": "P"},
    AccountUpdate: {"event_time": "E", "transaction_time": "T", "account": "a"},
    TradeLite: {"event_time": "E", "symbol": "s"},
    MarginCall: {"event_time": "E", "cross_wallet": "cw", "positions": "p"},
    LeverageChange: {"symbol": "s"},
    MultiAssetsChange: {},
    AccountConfigUpdate: {"event_time": "E", "transaction_time": "T", "leverage": "ac",
                          "multi_assets": "ai"},
    StrategyUpdate: {"event_time": "E"},
    GridUpdate: {"event_time": "E"},
    TriggerReject: {"event_time": "E"},
    ListenKeyExpired: {"event_time": "E"},
    UnknownEvent: {"event_type": "e"},
}


def _register(conv: cattrs.Converter, cls: type, renames: dict[str, str]) -> None:
    overrides = {name: override(rename=key) for name, key in renames.items()}
    keeps_raw = "raw" in attrs.fields_dict(cls)
    if keeps_raw:
        overrides["raw"] = override(omit=True)
    base: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, conv, **overrides)  # type: ignore[arg-type]
    if keeps_raw:
        def with_raw(d: Any, t: Any, _b: Callable[[Any, Any], Any] = base) -> Any:
            return attrs.evolve(_b(d, t), raw=d)

        conv.register_structure_hook(cls, with_raw)
    else:
        conv.register_structure_hook(cls, base)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=False)
    # ai is "" until triggered, then a number or a numeric string: keep it as text.
    conv.register_structure_hook(str, lambda v, _: v if isinstance(v, str) else str(v))
    for cls, renames in _RENAMES.items():
        _register(conv, cls, renames)
    configure_tagged_union(UserEvent, conv, tag_generator=EVENT_TAGS.__getitem__,
                           tag_name="e", default=UnknownEvent)
    return conv


CONVERTER = make_converter()


def parse_user_event(payload: Any) -> UserEvent:
    """Structure one parsed user-data payload. Raises BadEvent on a known event missing a field."""
    if not isinstance(payload, dict) or not isinstance(payload.get("e", ""), str):
        raise BadEvent("not a user-data event object")
    try:
        event: UserEvent = CONVERTER.structure(payload, UserEvent)  # type: ignore[arg-type]
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError,
            AttributeError) as exc:  # AttributeError: a list or text where an object belongs
        raise BadEvent(f"{payload.get('e')}: {type(exc).__name__}: {exc}") from None
    return event


KNOWN_TYPES = frozenset(tag for tag in EVENT_TAGS.values() if tag)


def decode_frame(frame: bytes) -> dict[str, Any]:
    """The JSON object of one frame, not yet structured: a fold that needs one event type
    looks at `payload["e"]` first and structures (and judges) only what it folds."""
    try:
        payload = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise BadEvent("frame is not JSON") from None
    if not isinstance(payload, dict):
        raise BadEvent("frame is not a JSON object")
    return payload
