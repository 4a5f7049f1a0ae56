"""REST reconciliation of the user-data stream: what the exchange says now, into the log.

Why: the user stream does not replay what happened while it was down (a fill, a triggered
stop). So on every connect and reconnect, and every few minutes, the ingestor asks REST for the
account's current state and appends each answer to `raw:user` as a control entry, so that the
projectors (and any later replay) see exactly the same answer:

    ctl=snapshot     {"kind": "openOrders"|"openAlgoOrders"|"positionRisk"|"balance",
                      "symbol": null, "fetched_at_ms": ..., "weight_used_1m": ...,
                      "response": <parsed JSON>}
                     and, at start and after every outage, "kind": "symbolConfig"
                     (GET /fapi/v1/symbolConfig: every symbol's leverage) and
                     "multiAssetsMargin" (GET /fapi/v1/multiAssetsMargin)
    ctl=final_state  {"kind": "order"|"algoOrder", "symbol": S, "fetched_at_ms": ...,
                      "weight_used_1m": ..., "response": <GET /fapi/v1/order or algoOrder>}
                     an order row found by allOrders instead adds "via": "allOrders" and
                     "trades": <its userTrades rows>
    ctl=final_state  {"kind": "notFound", "of": "order"|"algoOrder", "symbol": S, "id": "123",
                      "fetched_at_ms": ..., "weight_used_1m": ..., "response": {"code": -2013},
                      "trades": [...]}: the exchange no longer knows the order (below)

A snapshot lists only what is open, so an order that closed during the outage would simply
vanish. Therefore, for every order the views hold open (`P:open_orders:*`,
`P:open_algo_orders:*`) that the snapshot no longer lists, the final state is fetched one by
one and logged as `final_state`; the orders projection emits it on `P:orders`, and the
listener learns of the fill. The views are read BEFORE the snapshot is taken, so an order
placed during reconciliation is never mistaken for a vanished one. A triggered algo order
names the matching-engine order it created (`actualOrderId`, the stream's `ai`); that order was
never in the views, so its final state is fetched too.

Orders Binance forgot: `GET /fapi/v1/order` answers -2013 for an order CANCELED or EXPIRED
without fills more than 3 days after its creation, and for any order after 90 days (the same
rules hold for `algoOrder` and `allOrders`). Such an order is looked up once more with
`allOrders` (symbol, from its creation time, from its id) and, if not there, `userTrades` (its
fills, kept 90 days); found, its row is logged as a `final_state`; not found, a `notFound`
entry, which the orders projection turns into the terminal status `NO_LONGER_KNOWN` (its open
row goes, the listener is told, and nothing looks it up again).

Orders opened and closed while the stream was down never reached the views, so nothing above
asks for them. After an outage (`note_outage(since_ms)` when the stream went down, with the
outage's start on the exchange's clock, `stream_up()` when it is back) the reconciler lists,
for every symbol the account trades, the orders created since then
(`allOrders`, 7-day windows, weight 5 each) and, for those that filled, their trades
(`userTrades`, weight 5): each closed order the views did not hold is logged as a
`final_state` with its fills. The symbols: the settings' `PIPELINE_SYMBOLS` (unless `ALL`), the
symbols of the views' open orders, of open positions, and of every order event seen on the
stream by this process.

The account's settings (leverage per symbol, the Multi-Assets mode) change only by the
account's own hand, and every change while the stream is up comes as ACCOUNT_CONFIG_UPDATE; so
`symbolConfig` and `multiAssetsMargin` are fetched only at start and after an outage
(`note_outage`), until both were logged, not every period.

Weight: every call goes through `pipeline.rest.RestClient`, whose `WeightBudget` waits before a
call that would pass 80 % of the minute's limit. Without a symbol, openOrders and
openAlgoOrders cost 40 each; positionRisk and balance 5; each final-state lookup 1;
allOrders and userTrades 5 per symbol and window; symbolConfig 5 and multiAssetsMargin 30
(start and outages only). A body that is not the JSON a call returns
(cut short, empty, `{}` where a list belongs) is a failed call, never a snapshot.

Accounts: a reconciler serves one account (`account`, the ingestor's PIPELINE_ACCOUNT): it reads
that account's open-order views (`P:acct:{label}:open_orders:*`, `projections.core.keys`) and
its entries go to that account's `raw:user:{label}`; each run is counted in
`pipeline_reconciliations_total{account,outcome}` and its log line names the account.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import orjson
import redis
import trio

from pipeline import metrics
from pipeline.errors import ExchangeError, RedisUnavailable
from pipeline.redisconn import redis_errors
from pipeline.signing import SignedRest
from pipeline.weight import WEIGHTS, open_orders_weight
from projections.core.keys import Keys

log = logging.getLogger("pipeline.reconcile")

# kind -> (path, weight); order matters: open orders first, they decide the final-state lookups
SNAPSHOTS: tuple[tuple[str, str, int], ...] = (
    ("openOrders", "/fapi/v1/openOrders", open_orders_weight(None)),
    ("openAlgoOrders", "/fapi/v1/openAlgoOrders", open_orders_weight(None)),
    ("positionRisk", "/fapi/v3/positionRisk", 5),
    ("balance", "/fapi/v2/balance", 5),
)

# kind -> (path, weight, the JSON type of its answer): the account's settings, fetched at start
# and after an outage only (module docstring)
CONFIG_SNAPSHOTS: tuple[tuple[str, str, int, type], ...] = (
    ("symbolConfig", "/fapi/v1/symbolConfig", 5, list),
    ("multiAssetsMargin", "/fapi/v1/multiAssetsMargin", 30, dict),
)

# view hash (after the prefix) -> (final_state kind, id field, creation-time field)
HELD_VIEWS: dict[str, tuple[str, str, str]] = {
    "open_orders": ("order", "orderId", "time"),
    "open_algo_orders": ("algoOrder", "algoId", "createTime"),
}
# snapshot kind -> the final_state kind whose open orders it lists, and their id field
LISTS: dict[str, tuple[str, str]] = {
    "openOrders": ("order", "orderId"),
    "openAlgoOrders": ("algoOrder", "algoId"),
}
CODE_NO_SUCH_ORDER = -2013
CODE_INVALID_SYMBOL = -1121
DAY_MS = 86_400_000
WINDOW_MS = 7 * DAY_MS  # allOrders and userTrades: at most 7 days between start and end
PAGE = 1000  # their largest `limit`
OPEN_STATUSES = frozenset({"NEW", "PARTIALLY_FILLED"})

Append = Callable[[str, Mapping[str, Any]], None]  # (ctl, body) -> appended to raw:user


@attrs.frozen(order=True)
class HeldOrder:
    kind: str  # "order" | "algoOrder"
    symbol: str  # upper case, as REST wants it
    id: str
    created_ms: int = attrs.field(default=0, eq=False, order=False)  # 0: not known


@attrs.frozen
class ReconcileResult:
    snapshots: int
    final_states: int
    weight_used_1m: int
    failed: tuple[str, ...] = ()
    not_found: int = 0  # orders told as no longer known to the exchange
    history: int | None = None  # orders found by the outage search; None: not searched
    history_complete: bool = True  # False: a search call failed (run it again)


# --- pure ---------------------------------------------------------------------------------

def listed_ids(response: Any, id_field: str) -> set[str]:
    """Ids in a REST list answer (as text: views store hash fields as text)."""
    if not isinstance(response, list):
        return set()
    return {str(o[id_field]) for o in response if isinstance(o, dict) and id_field in o}


def vanished(held: Iterable[HeldOrder], listed: Mapping[str, set[str]]) -> list[HeldOrder]:
    """Held-open orders of a kind whose snapshot was taken and does not list them."""
    return sorted(h for h in held if h.kind in listed and h.id not in listed[h.kind])


def triggered_order_id(algo: Any) -> str | None:
    """The matching-engine order an algo order created when it triggered, if any."""
    if not isinstance(algo, dict):
        return None
    value = algo.get("actualOrderId", algo.get("ai"))
    if value in (None, "", 0, "0"):
        return None
    return str(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _created_ms(raw: bytes | str, field: str) -> int:
    try:
        value = orjson.loads(raw).get(field)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_held(keys: Keys, key: bytes | str,
               rows: Mapping[bytes, bytes] | Iterable[bytes | str]) -> list[HeldOrder]:
    """`P:open_orders:btcusdt` + its hash (or only its fields) -> HeldOrder per field."""
    held = keys.held_orders(_text(key))
    if held is None:
        return []
    family, symbol = held
    kind, _, created_field = HELD_VIEWS[family]
    if isinstance(rows, Mapping):
        return [HeldOrder(kind, symbol, _text(f), _created_ms(v, created_field))
                for f, v in rows.items()]
    return [HeldOrder(kind, symbol, _text(f)) for f in rows]


def windows(start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """[start, end] cut into the 7-day windows allOrders and userTrades accept."""
    out = []
    while start_ms <= end_ms:
        out.append((start_ms, min(start_ms + WINDOW_MS, end_ms)))
        start_ms += WINDOW_MS + 1
    return out


def position_symbols(response: Any) -> set[str]:
    """Symbols with an open position in a positionRisk answer."""
    out = set()
    for row in response if isinstance(response, list) else ():
        try:
            if isinstance(row, dict) and Decimal(str(row.get("positionAmt", "0"))) != 0:
                out.add(str(row["symbol"]))
        except (InvalidOperation, KeyError):
            continue
    return out


def _filled(row: Mapping[str, Any]) -> bool:
    try:
        return Decimal(str(row.get("executedQty", "0"))) > 0
    except InvalidOperation:
        return False


def closed_unknown(rows: Iterable[Any], known: set[str]) -> list[dict[str, Any]]:
    """The closed orders of an allOrders answer that are not in `known` (ids as text)."""
    return [r for r in rows if isinstance(r, dict) and "orderId" in r
            and str(r["orderId"]) not in known and r.get("status") not in OPEN_STATUSES]


# --- shell --------------------------------------------------------------------------------

class _Failed(Exception):
    """A REST call failed (already logged): the step it served is skipped this round."""


class Reconciler:
    """Runs one reconciliation at a time (connect, periodic and expiry may ask together)."""

    def __init__(self, api: SignedRest, views: redis.Redis, view_prefix: str,
                 append: Append, *, symbols: Iterable[str] = (),
                 account: str | None = None) -> None:
        self.api = api
        self.views = views
        self.account = account
        self.keys = Keys(view_prefix, account=account)
        self.append = append
        self.runs = 0
        self.traded: set[str] = set(symbols)  # symbols the outage search covers
        # start of an outage not yet searched (exchange clock, ms); None: nothing to search
        self.outage_since_ms: int | None = None
        self._stream_down = False  # searched only once the stream is back: nothing escapes
        self._told_unknown: set[tuple[str, str]] = set()  # (kind, id) logged as notFound
        self.config_due = True  # the settings snapshots: at start, and after each outage
        self._lock = trio.Lock()

    def note_outage(self, since_ms: int) -> None:
        """The stream was down from `since_ms` (exchange clock): the next run searches the
        orders of that time (an earlier outage not yet searched keeps its start)."""
        if self.outage_since_ms is None or since_ms < self.outage_since_ms:
            self.outage_since_ms = since_ms
        self._stream_down = True
        self.config_due = True

    def stream_up(self) -> None:
        self._stream_down = False

    async def run_once(self, reason: str) -> ReconcileResult:
        """Snapshots and final states, and after an outage (`note_outage`) the search for the
        orders opened and closed during it, until one search completes."""
        async with self._lock:
            since_ms = None if self._stream_down else self.outage_since_ms
            held = await self._held_open()
            listed: dict[str, set[str]] = {}
            failed = await self._snapshots(listed)
            tried = len(SNAPSHOTS)
            if self.config_due:
                tried += len(CONFIG_SNAPSHOTS)
                failed += await self._config_snapshots()
            snapshots = tried - len(failed)
            done: set[str] = set()  # order ids given a final state in this run
            finals, unknown = await self._final_states(vanished(held or (), listed), listed,
                                                       done)
            found, complete = (None, True) if since_ms is None else await self._history(
                since_ms, held or [], listed, done)
            if complete and self.outage_since_ms == since_ms:
                self.outage_since_ms = None
            self.runs += 1
            result = ReconcileResult(snapshots, finals, self.api.rest.budget.used,
                                     tuple(failed), unknown, found, complete)
            metrics.RECONCILIATIONS.labels(
                self.account or "", "complete" if not failed and complete else "partial").inc()
            log.info("reconciled", extra={
                "account": self.account or "-",
                "reason": reason, "snapshots": snapshots, "final_states": finals,
                "not_found": unknown, "failed": ",".join(failed),
                "outage_orders": "-" if found is None else found,
                "weight_used_1m": result.weight_used_1m})
            return result

    async def every(self, period: float) -> None:
        while True:
            await trio.sleep(period)
            await self.run_once("periodic")

    def saw_symbol(self, symbol: str) -> None:
        self.traded.add(symbol.upper())

    async def _snapshots(self, listed: dict[str, set[str]]) -> list[str]:
        """Log the four snapshots; `listed` gets the ids each open-order list names. Returns
        the kinds that failed."""
        failed: list[str] = []
        for kind, path, weight in SNAPSHOTS:
            try:
                response = await self._fetch(path, {}, weight, list)
            except _Failed:
                failed.append(kind)
                continue
            self._log("snapshot", kind, None, response)
            if kind in LISTS:
                held_kind, id_field = LISTS[kind]
                listed[held_kind] = listed_ids(response, id_field)
            elif kind == "positionRisk":
                self.traded |= position_symbols(response)
        return failed

    async def _config_snapshots(self) -> list[str]:
        """Log the account's settings (leverage per symbol, the Multi-Assets mode); due again
        until both were logged. Returns the kinds that failed."""
        failed: list[str] = []
        for kind, path, weight, expect in CONFIG_SNAPSHOTS:
            try:
                response = await self._fetch(path, {}, weight, expect)
            except _Failed:
                failed.append(kind)
                continue
            self._log("snapshot", kind, None, response)
        self.config_due = bool(failed)
        return failed

    # --- final states ---------------------------------------------------------------------

    async def _final_states(self, gone: list[HeldOrder], listed: Mapping[str, set[str]],
                            done: set[str]) -> tuple[int, int]:
        """(final_state entries logged, of which `notFound`); the orders' ids go to `done`."""
        count = unknown = 0
        for order in gone:
            if (order.kind, order.id) in self._told_unknown:
                continue
            try:
                response = await self._lookup(order)
                if response is None:
                    logged, told = await self._no_longer_known(order)
                    count, unknown = count + logged, unknown + told
                    done.add(order.id)
                    continue
            except _Failed:
                continue
            self._log("final_state", order.kind, order.symbol, response)
            count += 1
            if order.kind == "order":
                done.add(order.id)
            actual = triggered_order_id(response) if order.kind == "algoOrder" else None
            if actual is not None and actual not in listed.get("order", set()):
                more, more_unknown = await self._final_states(
                    [HeldOrder("order", order.symbol, actual)], listed, done)
                count, unknown = count + more, unknown + more_unknown
        return count, unknown

    async def _lookup(self, order: HeldOrder) -> Any:
        """GET order / algoOrder; None when the exchange no longer knows it (-2013)."""
        if order.kind == "order":
            path, params = "/fapi/v1/order", {"symbol": order.symbol, "orderId": order.id}
        else:
            path, params = "/fapi/v1/algoOrder", {"algoId": order.id}
        return await self._fetch(path, params, 1, dict, absent_code=CODE_NO_SUCH_ORDER)

    async def _no_longer_known(self, order: HeldOrder) -> tuple[int, int]:
        """The order is gone from GET order: search allOrders and userTrades once more; log
        what they say, or a `notFound` entry. Returns (entries logged, of which notFound);
        raises _Failed when a search failed (the next round tries again)."""
        row = await self._order_in_history(order) if order.kind == "order" else None
        trades = (await self._trades_of(order.symbol, {"orderId": order.id})
                  if order.kind == "order" and (row is None or _filled(row)) else [])
        if row is not None:
            self._log("final_state", "order", order.symbol, row, via="allOrders",
                      trades=trades)
            return 1, 0
        log.warning("order no longer known to the exchange: logged as NO_LONGER_KNOWN",
                    extra={"kind": order.kind, "symbol": order.symbol, "id": order.id,
                           "trades": len(trades)})
        self.append("final_state", {
            "kind": "notFound", "of": order.kind, "symbol": order.symbol, "id": order.id,
            "fetched_at_ms": self.api.server_clock.now_ms(),
            "weight_used_1m": self.api.rest.budget.used,
            "response": {"code": CODE_NO_SUCH_ORDER}, "trades": trades})
        self._told_unknown.add((order.kind, order.id))
        return 1, 1

    async def _order_in_history(self, order: HeldOrder) -> dict[str, Any] | None:
        params: dict[str, Any] = {"symbol": order.symbol, "orderId": order.id, "limit": 1}
        if order.created_ms:
            now = self.api.server_clock.now_ms()
            params.update(startTime=order.created_ms,
                          endTime=min(order.created_ms + WINDOW_MS, max(now, order.created_ms)))
        rows = await self._fetch("/fapi/v1/allOrders", params, WEIGHTS["/fapi/v1/allOrders"],
                                 list)
        return next((r for r in rows if isinstance(r, dict)
                     and str(r.get("orderId")) == order.id), None)

    # --- orders of an outage --------------------------------------------------------------

    async def _history(self, since_ms: int, held: list[HeldOrder],
                       listed: Mapping[str, set[str]], done: set[str]) -> tuple[int, bool]:
        """Log the closed orders created since `since_ms` that the views never held open (nor
        got a final state in this run). Returns (orders logged, every call answered)."""
        now = self.api.server_clock.now_ms()
        known = ({h.id for h in held if h.kind == "order"} | set(listed.get("order", ()))
                 | done)
        symbols = sorted(self.traded | {h.symbol for h in held})
        found, complete = 0, True
        for symbol in symbols:
            try:
                rows = await self._all_orders(symbol, since_ms, now)
                new = closed_unknown(rows, known)
                filled = {str(r["orderId"]) for r in new if _filled(r)}
                trades = await self._trades_of(symbol, {}, since_ms, now) if filled else []
            except _Failed:
                complete = False
                continue
            for row in new:
                mine = [t for t in trades if str(t.get("orderId")) == str(row["orderId"])]
                self._log("final_state", "order", symbol, row, via="allOrders", trades=mine)
                found += 1
        return found, complete

    async def _all_orders(self, symbol: str, start_ms: int, end_ms: int) -> list[Any]:
        rows: list[Any] = []
        for lo, hi in windows(start_ms, end_ms):
            params: dict[str, Any] = {"symbol": symbol, "startTime": lo, "endTime": hi,
                                      "limit": PAGE}
            while True:
                page = await self._fetch("/fapi/v1/allOrders", params,
                                         WEIGHTS["/fapi/v1/allOrders"], list,
                                         absent_code=CODE_INVALID_SYMBOL)
                if page is None:  # not a symbol of this exchange: nothing to search there
                    log.warning("outage search: symbol unknown to the exchange, dropped",
                                extra={"symbol": symbol})
                    self.traded.discard(symbol)
                    return []
                rows += page
                last = page[-1] if page else None
                if len(page) < PAGE or not isinstance(last, dict) or \
                        not isinstance(last.get("orderId"), int):
                    break
                params = {**params, "orderId": last["orderId"] + 1}
        return rows

    async def _trades_of(self, symbol: str, query: Mapping[str, Any],
                         start_ms: int | None = None, end_ms: int | None = None) -> list[Any]:
        """userTrades of `symbol` (for one order with `query={"orderId": ...}`), deduplicated
        by trade id, in the 7-day windows of [start_ms, end_ms] when given."""
        spans = windows(start_ms, end_ms) if start_ms is not None and end_ms is not None \
            else [None]
        seen: dict[Any, Any] = {}
        for span in spans:
            params: dict[str, Any] = {"symbol": symbol, **query, "limit": PAGE}
            if span is not None:
                params.update(startTime=span[0], endTime=span[1])
            while True:
                page = await self._fetch("/fapi/v1/userTrades", params,
                                         WEIGHTS["/fapi/v1/userTrades"], list)
                fresh = [t for t in page if isinstance(t, dict) and t.get("id") not in seen]
                seen.update((t.get("id"), t) for t in fresh)
                last = fresh[-1].get("time") if fresh else None
                if len(page) < PAGE or span is None or not isinstance(last, int):
                    break
                params = {**params, "startTime": last}
        return list(seen.values())

    # --- REST and the log -----------------------------------------------------------------

    async def _fetch(self, path: str, params: Mapping[str, Any], weight: int, expect: type,
                     absent_code: int | None = None) -> Any:
        """The answer, or _Failed (logged); None when the exchange answers `absent_code`."""
        try:
            return await self.api.signed("GET", path, params, weight=weight, expect=expect)
        except ExchangeError as exc:
            if absent_code is not None and exc.code == absent_code:
                return None
            # the message names method, path, status and Binance's code: never the query
            log.warning("reconciliation call failed", extra={"error": str(exc)})
            raise _Failed from None
        finally:
            metrics.REST_WEIGHT.set(self.api.rest.budget.used)

    def _log(self, ctl: str, kind: str, symbol: str | None, response: Any,
             **extra: Any) -> None:
        self.append(ctl, {"kind": kind, "symbol": symbol,
                          "fetched_at_ms": self.api.server_clock.now_ms(),
                          "weight_used_1m": self.api.rest.budget.used, "response": response,
                          **extra})

    async def _held_open(self) -> list[HeldOrder] | None:
        """Orders the views list open; None when Redis cannot tell (no final-state lookups)."""
        try:
            return await trio.to_thread.run_sync(self._read_held)
        except RedisUnavailable as exc:
            log.warning("cannot read the open-order views; final states skipped this round",
                        extra={"error": str(exc)})
            return None

    def _read_held(self) -> list[HeldOrder]:
        out: list[HeldOrder] = []
        with redis_errors():
            for family in HELD_VIEWS:
                for key in self.views.scan_iter(match=self.keys.pattern(family), count=500):
                    out += parse_held(self.keys, key, self.views.hgetall(key))
        return out
