"""Positions, balances, leverage and the Multi-Assets mode from raw:user, and the position
events. Pure: imports neither trio nor redis.

Views (P = view prefix, symbols and assets lower case):
- `P:position:{symbol}` (one-way mode, ps BOTH), `P:position:{symbol}:long` / `:short` (hedge
  mode): the position as in ACCOUNT_UPDATE `a.P[]` (s, pa, ep, bep, cr, up, mt, iw, ps, ma and
  whatever else Binance adds), plus `timestamp` (seconds) and `source`.
- `P:balance:{asset}`: ACCOUNT_UPDATE `a.B[]` (a, wb, cw, bc) plus `timestamp` and `source`.
Each is a ViewWrite with version_field "timestamp", expiring 300 s after the entry's receipt.
- `P:leverage:{symbol}`: `timestamp`, `source`, `symbol`, `leverage` (an integer), from
  ACCOUNT_CONFIG_UPDATE `ac` {s, l} and from the `symbolConfig` snapshot
  (`GET /fapi/v1/symbolConfig`) that reconciliation logs at start and after every outage;
- `P:multi_assets_margin`: `timestamp`, `source`, `multi_assets_margin` (a boolean), from
  ACCOUNT_CONFIG_UPDATE `ai` {j} and the `multiAssetsMargin` snapshot
  (`GET /fapi/v1/multiAssetsMargin`).
Both are versioned by `timestamp` like positions and never expire: the stream tells every
change while it is up, the snapshots what changed while it was down.

`P:position_events` (a stream): each open, change and close of a position, with its cause
(`projections.core.positionevents`, whose tracker this fold feeds with ACCOUNT_UPDATE,
ORDER_TRADE_UPDATE fills, ALGO_UPDATE triggers and positionRisk snapshots). A full positionRisk
snapshot that no longer lists a position the fold knew open also writes that position's view
flat (`pa` "0"), so a close during an outage does not linger in the view until its expiry.

ACCOUNT_UPDATE carries only what changed, so the REST snapshots (positionRisk v3, balance v2)
seed and refresh every position and balance, and their TTL. Versions: an event's is its event
time E; a snapshot's is `fetched_at_ms`, the moment the exchange answered (the ingestor stamps
it on the exchange's clock, corrected by the server-time offset). So a snapshot taken after an
event replaces it, an event after a snapshot replaces that, and a replay of either changes
nothing. Two consecutive snapshots always differ in version, which is what refreshes the TTL
of a position no event touched.

positionRisk v3 -> P[] mapping: symbol->s, positionAmt->pa, entryPrice->ep,
breakEvenPrice->bep, unRealizedProfit->up, isolatedWallet->iw, positionSide->ps,
marginAsset->ma; `mt` is `marginType` when the answer has it (v2), otherwise "isolated" when
isolatedWallet is not zero, else "cross"; `cr` (accumulated realized) is not in any REST
answer: the last value an ACCOUNT_UPDATE gave for that position, or null if none was seen.
balance v2 -> B[]: asset->a, balance->wb, crossWalletBalance->cw, and bc (a change, which a
snapshot does not have) "0".

Poison (`projections.core.plausible`), so that no single entry can freeze or fake a view: an
event time E/T or a snapshot's `fetched_at_ms` later than the entry's receipt time plus
PIPELINE_MAX_CLOCK_AHEAD_S; a symbol or asset that is not well-formed (it names the key); a
position side other than BOTH, LONG, SHORT; amounts and prices that are not decimal strings; a
leverage that is not an integer from 1 to 1000, a Multi-Assets flag that is not a boolean; the
order and algo events as the orders fold judges them (`orders.implausible_event`). An entry is
judged whole before the fold's memory changes, so a retried entry meets the same memory.
`timestamp` is the first field of every view: the store reads the version with a pattern, and
the first `"timestamp":` of the JSON is then the view's own whatever fields Binance adds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.accountevents import DEFAULT_EVENTS_MAX_AGE_S, MAX_LEVERAGE, implausible
from projections.core.keys import Keys
from projections.core.orders import implausible_event
from projections.core.outputs import Entry, Output, PoisonEntry, ViewWrite
from projections.core.plausible import Bounds, check_fields, present
from projections.core.positionevents import Held, PositionTracker, held_from_risk
from projections.core.userevents import (
    AccountConfigUpdate,
    AccountUpdate,
    AlgoUpdate,
    BadEvent,
    OrderTradeUpdate,
    decode_frame,
    parse_user_event,
)

DEFAULT_TTL_S = 300.0
_SIDE_SUFFIX = {"BOTH": (), "LONG": ("long",), "SHORT": ("short",)}
_POSITION_DECIMALS = ("pa", "ep", "bep", "cr", "up", "iw")
_BALANCE_DECIMALS = ("wb", "cw", "bc")
_RISK_DECIMALS = ("positionAmt", "entryPrice", "breakEvenPrice", "unRealizedProfit",
                  "isolatedWallet")
_REST_BALANCE_DECIMALS = ("balance", "crossWalletBalance")


def position_key(keys: Keys, symbol: str, position_side: str) -> str:
    """`BOTH` (one-way mode) -> `P:position:{symbol}`; LONG/SHORT -> `...:long`/`...:short`."""
    return keys.position(symbol, *_SIDE_SUFFIX[position_side])


def implausible_update(event: AccountUpdate, limit_ms: int) -> str | None:
    """Why an ACCOUNT_UPDATE must not be applied, or None (module docstring)."""
    why = check_fields("ACCOUNT_UPDATE", limit_ms,
                       times=[("E", event.event_time), ("T", event.transaction_time)])
    for pos in event.account.positions:
        why = why or _side(pos.position_side) or check_fields(
            "ACCOUNT_UPDATE", limit_ms, symbols=[("P.s", pos.symbol)],
            decimals=present(pos.raw, _POSITION_DECIMALS))
    for bal in event.account.balances:
        why = why or check_fields("ACCOUNT_UPDATE", limit_ms, assets=[("B.a", bal.asset)],
                                  decimals=present(bal.raw, _BALANCE_DECIMALS))
    return why


def implausible_rows(kind: str, rows: list[Any], limit_ms: int) -> str | None:
    """Why a positionRisk or balance snapshot's rows must not be applied, or None."""
    for r in rows:
        if not isinstance(r, dict):
            return f"{kind} row is not an object"
        why = (check_fields(kind, limit_ms, assets=[("asset", r.get("asset"))],
                            decimals=present(r, _REST_BALANCE_DECIMALS)) if kind == "balance"
               else _side(r.get("positionSide", "BOTH")) or check_fields(
                   kind, limit_ms, symbols=[("symbol", r.get("symbol"))],
                   decimals=present(r, _RISK_DECIMALS)))
        if why:
            return why
    return None


def _side(position_side: Any) -> str | None:
    if position_side not in _SIDE_SUFFIX:
        return f"position side {str(position_side)[:20]!r} is not BOTH, LONG or SHORT"
    return None


def _is_zero(value: Any) -> bool:
    try:
        return Decimal(str(value)) == 0
    except InvalidOperation:
        return True


def position_from_risk(row: Mapping[str, Any], cr: Any) -> dict[str, Any]:
    """A positionRisk (v3) row in ACCOUNT_UPDATE P[] names (see the module docstring)."""
    mt = row.get("marginType") or ("cross" if _is_zero(row.get("isolatedWallet", "0"))
                                   else "isolated")
    out = {"s": row["symbol"], "pa": row["positionAmt"], "ep": row.get("entryPrice"),
           "bep": row.get("breakEvenPrice"), "cr": cr, "up": row.get("unRealizedProfit"),
           "mt": mt, "iw": row.get("isolatedWallet"), "ps": row.get("positionSide", "BOTH")}
    if "marginAsset" in row:
        out["ma"] = row["marginAsset"]
    return out


def balance_from_rest(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"a": row["asset"], "wb": row["balance"], "cw": row.get("crossWalletBalance"),
            "bc": "0"}



def implausible_config_rows(kind: str, response: Any, limit_ms: int) -> str | None:
    """Why a symbolConfig or multiAssetsMargin snapshot must not be applied, or None."""
    if kind == "multiAssetsMargin":
        if not isinstance(response, dict) or type(response.get("multiAssetsMargin")) is not bool:
            return "multiAssetsMargin snapshot without a boolean multiAssetsMargin"
        return None
    if not isinstance(response, list):
        return "symbolConfig snapshot without a response list"
    for row in response:
        if not isinstance(row, dict):
            return "symbolConfig row is not an object"
        lev = row.get("leverage")
        if type(lev) is not int or not 1 <= lev <= MAX_LEVERAGE:
            return f"symbolConfig: leverage {str(lev)[:20]!r} is not from 1 to {MAX_LEVERAGE}"
        why = check_fields(kind, limit_ms, symbols=[("symbol", row.get("symbol"))])
        if why:
            return why
    return None


_FOLDED = ("ACCOUNT_UPDATE", "ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_CONFIG_UPDATE")
_SNAPSHOTS = ("positionRisk", "balance", "symbolConfig", "multiAssetsMargin")
_FLAT = {"pa": "0", "ep": "0", "bep": "0", "up": "0", "iw": "0"}


class AccountProjection:
    """Folds raw:user into the position, balance, leverage and Multi-Assets views and into
    `P:position_events` (projections.core.positionevents). Exclusive: it remembers the last
    `cr` per position, which REST does not give, and what each position was, for its events.
    `account`: the account label whose `raw:user:{label}` it folds (as `account@{label}`) into
    that account's keys; None: `raw:user`, `account`."""

    exclusive = True

    def __init__(self, prefix: str = "websocket", *, ttl_s: float = DEFAULT_TTL_S,
                 events_max_age_s: float = DEFAULT_EVENTS_MAX_AGE_S,
                 bounds: Bounds | None = None, account: str | None = None,
                 **_unused: object) -> None:
        self.keys = Keys(prefix, account=account)
        self.name = self.keys.projection("account")
        self.sources = (self.keys.raw_user(),)
        self.bounds = bounds or Bounds()
        self.ttl_ms = int(ttl_s * 1000)
        self._cr: dict[str, Any] = {}  # position key -> last accumulated realized seen
        self._last: dict[str, dict[str, Any]] = {}  # position key -> its last view value
        self.positions = PositionTracker(self.keys.position_events(),
                                         int(events_max_age_s * 1000))

    def apply(self, entry: Entry) -> Iterable[Output]:
        if isinstance(entry, FrameEntry):
            return self._frame(entry)
        if isinstance(entry, ControlEntry) and entry.ctl in ("snapshot", "final_state"):
            judged = self._judged_snapshot(entry)
            # whatever fills a waiting change expected have come by a reconciliation
            out: list[Output] = [*self.positions.flush()]
            return out + (self._snapshot(entry, *judged) if judged is not None else [])
        return []

    def _write(self, key: str, value: dict[str, Any], ts: float, source: str,
               recv_ts: float | None) -> ViewWrite:
        """`recv_ts` None: a view that never expires (leverage, Multi-Assets)."""
        body = {"timestamp": ts, "source": source,
                **{k: v for k, v in value.items() if k not in ("timestamp", "source")}}
        expire = 0 if recv_ts is None else int(recv_ts * 1000) + self.ttl_ms
        return ViewWrite(key=key, value=orjson.dumps(body), version=ts,
                         version_field="timestamp", expire_at_ms=expire, event_s=ts)

    def _position(self, key: str, value: dict[str, Any], ts: float, source: str,
                  recv_ts: float) -> ViewWrite:
        self._last[key] = value
        return self._write(key, value, ts, source, recv_ts)

    # --- frames -----------------------------------------------------------------------------

    def _frame(self, entry: FrameEntry) -> list[Output]:
        try:
            payload = decode_frame(entry.frame)
            if payload.get("e") not in _FOLDED:
                return []
            event = parse_user_event(payload)
        except BadEvent as exc:
            raise PoisonEntry(str(exc)) from None
        limit_ms = self.bounds.time_limit_ms(entry.recv_ts)
        if isinstance(event, AccountUpdate):
            why = implausible_update(event, limit_ms)
        elif isinstance(event, OrderTradeUpdate | AlgoUpdate):
            why = implausible_event(event, limit_ms)
        else:
            assert isinstance(event, AccountConfigUpdate)
            why = implausible(event, limit_ms)
        if why is not None:
            raise PoisonEntry(why)
        # judged: from here on nothing raises, so a redelivery finds the memory as it was
        out: list[Output] = [*self.positions.flush(_time_of(event))]
        if isinstance(event, AccountUpdate):
            return out + self._account_update(event, entry.recv_ts)
        if isinstance(event, OrderTradeUpdate):
            return out + self.positions.on_order(event)
        if isinstance(event, AlgoUpdate):
            self.positions.on_algo(event)
            return out
        return out + self._config(event)

    def _account_update(self, event: AccountUpdate, recv_ts: float) -> list[Output]:
        ts = event.event_time / 1000
        out: list[Output] = []
        keys: dict[int, str] = {}
        for i, pos in enumerate(event.account.positions):
            key = keys[i] = position_key(self.keys, pos.symbol, pos.position_side)
            if "cr" in pos.raw:
                self._cr[key] = pos.raw["cr"]
            out.append(self._position(key, dict(pos.raw), ts, "websocket", recv_ts))
        for bal in event.account.balances:
            out.append(self._write(self.keys.balance(bal.asset), dict(bal.raw), ts,
                                   "websocket", recv_ts))
        return out + self.positions.on_account(event, keys)

    def _config(self, event: AccountConfigUpdate) -> list[Output]:
        """ACCOUNT_CONFIG_UPDATE: `ac` a symbol's leverage, `ai` the Multi-Assets mode."""
        ts = event.event_time / 1000
        if event.leverage is not None:
            symbol = event.leverage.symbol
            return [self._write(self.keys.leverage(symbol), {
                "symbol": symbol, "leverage": event.leverage.raw["l"]}, ts, "websocket", None)]
        if event.multi_assets is not None:
            return [self._write(self.keys.multi_assets_margin(), {
                "multi_assets_margin": event.multi_assets.raw["j"]}, ts, "websocket", None)]
        return []

    # --- reconciliation snapshots -------------------------------------------------------------

    def _judged_snapshot(self, entry: ControlEntry) -> tuple[str, Any, int] | None:
        """(kind, response, fetched_at_ms) of a snapshot this fold applies, judged; None for
        any other control entry. PoisonEntry when it is implausible."""
        body = entry.body
        if entry.ctl != "snapshot" or not isinstance(body, dict) or \
                body.get("kind") not in _SNAPSHOTS:
            return None
        kind, response, fetched = body["kind"], body.get("response"), body.get("fetched_at_ms")
        if type(fetched) is not int:
            raise PoisonEntry(f"{kind} snapshot without an integer fetched_at_ms")
        limit_ms = self.bounds.time_limit_ms(entry.recv_ts)
        if kind in ("positionRisk", "balance"):
            if not isinstance(response, list):
                raise PoisonEntry(f"{kind} snapshot without a response list")
            why = implausible_rows(kind, response, limit_ms) or _missing(kind, response)
        else:
            why = implausible_config_rows(kind, response, limit_ms)
        why = check_fields(kind, limit_ms, times=[("fetched_at_ms", fetched)]) or why
        if why is not None:
            raise PoisonEntry(why)
        return kind, response, fetched

    def _snapshot(self, entry: ControlEntry, kind: str, response: Any,
                  fetched: int) -> list[Output]:
        ts = fetched / 1000
        if kind == "balance":
            return [self._write(self.keys.balance(r["asset"]), balance_from_rest(r), ts,
                                "reconciliation", entry.recv_ts) for r in response]
        if kind == "symbolConfig":
            return [self._write(self.keys.leverage(r["symbol"]), {
                "symbol": r["symbol"], "leverage": r["leverage"]}, ts, "reconciliation", None)
                for r in response]
        if kind == "multiAssetsMargin":
            return [self._write(self.keys.multi_assets_margin(), {
                "multi_assets_margin": response["multiAssetsMargin"]}, ts, "reconciliation",
                None)]
        out: list[Output] = []
        rows: list[tuple[str, Held]] = []
        for r in response:
            key = position_key(self.keys, r["symbol"], r.get("positionSide", "BOTH"))
            rows.append((key, held_from_risk(r, fetched)))
            out.append(self._position(key, position_from_risk(r, self._cr.get(key)), ts,
                                      "reconciliation", entry.recv_ts))
        if entry.body.get("symbol") is not None:
            return out  # one symbol's rows: says nothing of the others
        events, flat = self.positions.on_snapshot(rows, fetched)
        for key in flat:
            held = self.positions.held[key]
            value = {"s": held.symbol, "ps": held.side, **self._last.get(key, {}), **_FLAT,
                     "cr": self._cr.get(key)}
            out.append(self._position(key, value, ts, "reconciliation", entry.recv_ts))
        return out + events


def _missing(kind: str, rows: list[Any]) -> str | None:
    """The first field a row lacks that the views need."""
    need = ("asset", "balance") if kind == "balance" else ("symbol", "positionAmt")
    for r in rows:
        for name in need:
            if name not in r:
                return f"{kind} row without {name}"
    return None


def _time_of(event: AccountUpdate | OrderTradeUpdate | AlgoUpdate | AccountConfigUpdate) -> int:
    return event.transaction_time or event.event_time
