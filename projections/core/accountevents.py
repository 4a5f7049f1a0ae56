"""`P:account_events`: the account's alerts and settings changes, one stream entry per event.
Pure: imports neither trio nor redis.

The user-data stream carries five event types no view holds: MARGIN_CALL (the account is close
to liquidation), ACCOUNT_CONFIG_UPDATE (a symbol's leverage, `ac`, or the Multi-Assets mode,
`ai`), CONDITIONAL_ORDER_TRIGGER_REJECT (a triggered conditional order the matching engine
refused; deprecated by Binance since 2025-12-15, when ALGO_UPDATE REJECTED took over),
STRATEGY_UPDATE and GRID_UPDATE (the account's trading strategies). Each becomes one entry of
`P:account_events`:

    type      the event type (`e`)
    symbol    the symbol it names (`ac.s`, `or.s`, `su.s`, `gu.s`; MARGIN_CALL: the symbol of its
              positions when they are all of one symbol); the field is left out otherwise
    data      the event's JSON exactly as the exchange sent it (the frame's bytes)
    event_key the event's name (below)

Exactly once under redelivery, replay and duplicate frames (a 24-hour rotation logs the
frames of both connections): the entry id is the event time `E` in ms, and the event's name,
`{type}:{E}:{digest}` with the digest of its JSON (keys sorted), is what the store's append
function looks for before appending (`outputs.StreamAppend`, lua/streams.lua). The stream is
trimmed by age (`MINID`, PIPELINE_EVENTS_MAX_AGE_S, 7 days by default, Redis's clock).

Poison (`projections.core.plausible`): an event time later than the entry's receipt time plus
PIPELINE_MAX_CLOCK_AHEAD_S, a symbol that is not well-formed, an id that is not an integer in
[0, 2^53), a leverage that is not an integer from 1 to 1000, a Multi-Assets flag that is not a
boolean, amounts that are not decimal strings. Other event types write nothing here.

The leverage and Multi-Assets views (`P:leverage:{symbol}`, `P:multi_assets_margin`) are the
account projection's (`projections.core.account`); this module only judges their events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from pipeline.eventlog import FrameEntry
from projections.core.keys import Keys
from projections.core.outputs import Entry, Output, PoisonEntry, StreamAppend
from projections.core.plausible import Bounds, check_fields, present
from projections.core.userevents import (
    AccountConfigUpdate,
    BadEvent,
    GridUpdate,
    MarginCall,
    StrategyUpdate,
    TriggerReject,
    decode_frame,
    parse_user_event,
)

ACCOUNT_EVENT_TYPES = ("MARGIN_CALL", "ACCOUNT_CONFIG_UPDATE", "CONDITIONAL_ORDER_TRIGGER_REJECT",
                       "STRATEGY_UPDATE", "GRID_UPDATE")
DEFAULT_EVENTS_MAX_AGE_S = 7 * 86_400.0
MAX_LEVERAGE = 1000  # Binance allows 125 today; a little room for what it may allow later

AccountEvent = MarginCall | AccountConfigUpdate | TriggerReject | StrategyUpdate | GridUpdate
_MARGIN_DECIMALS = ("pa", "iw", "mp", "up", "mm")
_GRID_DECIMALS = ("r", "up", "uq", "uf", "mp")


def event_key(event_type: str, at_ms: int, payload: Mapping[str, Any]) -> str:
    """The name of one event: the same for every copy of it, different for any other event."""
    digest = hashlib.blake2b(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS),
                             digest_size=8).hexdigest()
    return f"{event_type}:{at_ms}:{digest}"


def _part(event: AccountEvent, name: str) -> Mapping[str, Any]:
    part = event.raw.get(name)
    if not isinstance(part, dict):
        raise PoisonEntry(f"{event.raw.get('e')}: {name} is not an object")
    return part


def symbol_of(event: AccountEvent) -> str | None:
    """The one symbol the event names, or None."""
    if isinstance(event, MarginCall):
        symbols = {p.get("s") for p in event.positions}
        return symbols.pop() if len(symbols) == 1 else None
    if isinstance(event, AccountConfigUpdate):
        return event.leverage.symbol if event.leverage is not None else None
    name = {TriggerReject: "or", StrategyUpdate: "su", GridUpdate: "gu"}[type(event)]
    symbol = _part(event, name).get("s")
    return str(symbol) if symbol is not None else None


def implausible(event: AccountEvent, limit_ms: int) -> str | None:
    """Why the event must not be appended (module docstring), or None."""
    kind = str(event.raw.get("e"))
    times = [("E", event.event_time), *present(event.raw, ("T",))]
    why = check_fields(kind, limit_ms, times=times)
    if why:
        return why
    if isinstance(event, AccountConfigUpdate):
        return implausible_config(event, limit_ms)
    if isinstance(event, MarginCall):
        for p in event.positions:
            why = why or check_fields(kind, limit_ms, symbols=[("p.s", p.get("s"))],
                                      decimals=present(p, _MARGIN_DECIMALS))
        return why or check_fields(kind, limit_ms, decimals=present(event.raw, ("cw",)))
    if isinstance(event, TriggerReject):
        part = _part(event, "or")
        return check_fields(kind, limit_ms, symbols=[("or.s", part.get("s"))],
                            ids=present(part, ("i",)))
    name = "su" if isinstance(event, StrategyUpdate) else "gu"
    part = _part(event, name)
    return check_fields(kind, limit_ms, symbols=[(f"{name}.s", part.get("s"))],
                        ids=present(part, ("si",)), counts=present(part, ("ut",)),
                        decimals=present(part, _GRID_DECIMALS) if name == "gu" else ())


def implausible_config(event: AccountConfigUpdate, limit_ms: int) -> str | None:
    """Why an ACCOUNT_CONFIG_UPDATE's `ac` or `ai` must not be applied, or None."""
    kind = "ACCOUNT_CONFIG_UPDATE"
    if event.leverage is not None:
        lev = event.leverage.raw.get("l")
        if type(lev) is not int or not 1 <= lev <= MAX_LEVERAGE:
            return f"{kind}: ac.l {str(lev)[:20]!r} is not a leverage from 1 to {MAX_LEVERAGE}"
        return check_fields(kind, limit_ms, symbols=[("ac.s", event.leverage.symbol)])
    if event.multi_assets is not None and type(event.multi_assets.raw.get("j")) is not bool:
        return f"{kind}: ai.j is not a boolean"
    return None


def parse_account_event(frame: bytes, limit_ms: int) -> AccountEvent | None:
    """The frame's account event, judged; None for another event type. PoisonEntry when it
    cannot be parsed or is implausible."""
    try:
        payload = decode_frame(frame)
        if payload.get("e") not in ACCOUNT_EVENT_TYPES:
            return None
        event = parse_user_event(payload)
    except BadEvent as exc:
        raise PoisonEntry(str(exc)) from None
    assert isinstance(event, MarginCall | AccountConfigUpdate | TriggerReject | StrategyUpdate
                      | GridUpdate)
    why = implausible(event, limit_ms)
    if why is not None:
        raise PoisonEntry(why)
    return event


class AccountEventsProjection:
    """Folds raw:user into `P:account_events` (module docstring).

    Exclusive: one consumer appends in the log's order, so entry ids follow event times; the
    fold itself keeps no state (the store finds duplicates). `account`: the account label whose
    `raw:user:{label}` it folds (as `account_events@{label}`); None: `raw:user`."""

    exclusive = True

    def __init__(self, prefix: str = "websocket", *,
                 events_max_age_s: float = DEFAULT_EVENTS_MAX_AGE_S,
                 bounds: Bounds | None = None, account: str | None = None,
                 **_unused: object) -> None:
        keys = Keys(prefix, account=account)
        self.name = keys.projection("account_events")
        self.sources = (keys.raw_user(),)
        self.key = keys.account_events()
        self.bounds = bounds or Bounds()
        self.max_age_ms = int(events_max_age_s * 1000)

    def apply(self, entry: Entry) -> Iterable[Output]:
        if not isinstance(entry, FrameEntry):
            return []
        event = parse_account_event(entry.frame, self.bounds.time_limit_ms(entry.recv_ts))
        if event is None:
            return []
        kind = str(event.raw["e"])
        symbol = symbol_of(event)
        fields: list[tuple[str, bytes]] = [("type", kind.encode())]
        if symbol is not None:
            fields.append(("symbol", symbol.encode()))
        fields.append(("data", entry.frame))
        return [StreamAppend(self.key, event.event_time,
                             event_key(kind, event.event_time, event.raw), tuple(fields),
                             self.max_age_ms)]
