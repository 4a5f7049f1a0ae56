"""Positions and balances from raw:user. Pure: imports neither trio nor redis.

Views (P = view prefix, symbols and assets lower case):
- `P:position:{symbol}` (one-way mode, ps BOTH), `P:position:{symbol}:long` / `:short` (hedge
  mode): the position as in ACCOUNT_UPDATE `a.P[]` (s, pa, ep, bep, cr, up, mt, iw, ps, ma and
  whatever else Binance adds), plus `timestamp` (seconds) and `source`.
- `P:balance:{asset}`: ACCOUNT_UPDATE `a.B[]` (a, wb, cw, bc) plus `timestamp` and `source`.
Each is a ViewWrite with version_field "timestamp", expiring 300 s after the entry's receipt.

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
position side other than BOTH, LONG, SHORT; amounts and prices that are not decimal strings.
`timestamp` is the first field of every view: the store reads the version with a pattern, and
the first `"timestamp":` of the JSON is then the view's own whatever fields Binance adds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.keys import Keys
from projections.core.outputs import Entry, Output, PoisonEntry, ViewWrite
from projections.core.plausible import Bounds, check_fields, present
from projections.core.userevents import AccountUpdate, BadEvent, decode_frame, parse_user_event

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


class AccountProjection:
    """Folds ACCOUNT_UPDATE and the positionRisk/balance snapshots into position and balance
    views. Exclusive: it remembers the last `cr` per position, which REST does not give.
    `account`: the account label whose `raw:user:{label}` it folds (as `account@{label}`) into
    that account's position and balance keys; None: `raw:user`, `account`."""

    exclusive = True

    def __init__(self, prefix: str = "websocket", *, ttl_s: float = DEFAULT_TTL_S,
                 bounds: Bounds | None = None, account: str | None = None,
                 **_unused: object) -> None:
        self.keys = Keys(prefix, account=account)
        self.name = self.keys.projection("account")
        self.sources = (self.keys.raw_user(),)
        self.bounds = bounds or Bounds()
        self.ttl_ms = int(ttl_s * 1000)
        self._cr: dict[str, Any] = {}  # position key -> last accumulated realized seen

    def apply(self, entry: Entry) -> Iterable[Output]:
        if isinstance(entry, FrameEntry):
            return self._frame(entry)
        if isinstance(entry, ControlEntry) and entry.ctl == "snapshot":
            return self._snapshot(entry)
        return []

    def _write(self, key: str, value: dict[str, Any], ts: float, source: str,
               recv_ts: float) -> ViewWrite:
        body = {"timestamp": ts, "source": source,
                **{k: v for k, v in value.items() if k not in ("timestamp", "source")}}
        return ViewWrite(key=key, value=orjson.dumps(body), version=ts,
                         version_field="timestamp",
                         expire_at_ms=int(recv_ts * 1000) + self.ttl_ms, event_s=ts)

    def _frame(self, entry: FrameEntry) -> list[Output]:
        try:
            payload = decode_frame(entry.frame)
            if payload.get("e") != "ACCOUNT_UPDATE":
                return []
            event = parse_user_event(payload)
        except BadEvent as exc:
            raise PoisonEntry(str(exc)) from None
        assert isinstance(event, AccountUpdate)
        why = implausible_update(event, self.bounds.time_limit_ms(entry.recv_ts))
        if why is not None:
            raise PoisonEntry(why)
        ts = event.event_time / 1000
        out: list[Output] = []
        for pos in event.account.positions:
            key = position_key(self.keys, pos.symbol, pos.position_side)
            if "cr" in pos.raw:
                self._cr[key] = pos.raw["cr"]
            out.append(self._write(key, dict(pos.raw), ts, "websocket", entry.recv_ts))
        for bal in event.account.balances:
            out.append(self._write(self.keys.balance(bal.asset), dict(bal.raw), ts,
                                   "websocket", entry.recv_ts))
        return out

    def _snapshot(self, entry: ControlEntry) -> list[Output]:
        body = entry.body
        if not isinstance(body, dict) or body.get("kind") not in ("positionRisk", "balance"):
            return []
        rows, fetched = body.get("response"), body.get("fetched_at_ms")
        if not isinstance(rows, list) or not isinstance(fetched, int | float):
            raise PoisonEntry(f"{body.get('kind')} snapshot without response list/fetched_at_ms")
        limit_ms = self.bounds.time_limit_ms(entry.recv_ts)
        why = check_fields(body["kind"], limit_ms, times=[("fetched_at_ms", fetched)]) \
            or implausible_rows(body["kind"], rows, limit_ms)
        if why is not None:
            raise PoisonEntry(why)
        ts = fetched / 1000
        try:
            if body["kind"] == "balance":
                return [self._write(self.keys.balance(r["asset"]), balance_from_rest(r),
                                    ts, "reconciliation", entry.recv_ts) for r in rows]
            out: list[Output] = []
            for r in rows:
                key = position_key(self.keys, r["symbol"], r.get("positionSide", "BOTH"))
                out.append(self._write(key, position_from_risk(r, self._cr.get(key)), ts,
                                       "reconciliation", entry.recv_ts))
            return out
        except (KeyError, TypeError, AttributeError) as exc:
            raise PoisonEntry(f"{body['kind']} row without {exc}") from None
